"""M2PO of workbench/steps/reweight/m2po.py: the objective and its second-moment mask ``m2po_mask``. Two literal
oracles of the mask (Algorithm 1's greedy loop and the released code's cap found by bisection) give its
hand-computed rows on the 2x3 example (CASES, EXTRA_CASES, METRICS) and its per-token gradient weight
(WEIGHTS), which test_reweight_objectives.py runs; here: both variants on a hand example, the masked tokens
in the normaliser, the degenerate cases, and the vectorised mask against the oracles on random batches.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from workbench.steps.reweight import m2po_mask, policy_loss

from reweight_helpers import ADV, B, F64, LR, R, T, VALID, coeff, example


def m2po_greedy(items, tau):
    """Algorithm 1 literally: items = {key: (log r, A)}; returns the set of masked keys."""
    trust = {k: lr * lr for k, (lr, a) in items.items() if (a > 0 and lr > 0) or (a < 0 and lr < 0)}
    masked = set()
    while trust and sum(trust.values()) / len(trust) > tau:
        j = max(trust, key=trust.get)
        masked.add(j)
        del trust[j]
    return masked


def m2po_cap(items, tau):
    """Released-code criterion by bisection: sum min(d2, c) = tau n_T; masked = T-tokens with d2 > c."""
    d2 = {k: lr * lr for k, (lr, a) in items.items() if (a > 0 and lr > 0) or (a < 0 and lr < 0)}
    if not d2 or sum(d2.values()) <= tau * len(d2):
        return set(), None
    lo, hi = 0.0, max(d2.values())
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(v, mid) for v in d2.values()) > tau * len(d2):
            hi = mid
        else:
            lo = mid
    return {k for k, v in d2.items() if v > hi * (1 + 1e-12)}, math.sqrt(hi)


EX_ITEMS = {k: (LR[k], ADV[k[0]]) for k in VALID}
EX_M2PO_MASKED = m2po_greedy(EX_ITEMS, 0.04)


def _masked_is(masked):
    c = coeff("token-mean")
    loss = sum(c[k] * (0.0 if k in masked else -R[k] * ADV[k[0]]) for k in VALID)
    grad = [[c[(i, t)] * (0.0 if (i, t) in masked else -R[(i, t)] * ADV[i]) if (i, t) in c else 0.0
             for t in range(T)] for i in range(B)]
    return loss, grad


CASES = {"m2po": ({}, *_masked_is(EX_M2PO_MASKED))}

EXTRA_CASES = [
    ("m2po", {"tau": 0.5}, *_masked_is(m2po_greedy(EX_ITEMS, 0.5))),
    ("m2po", {"variant": "cap"}, *_masked_is(m2po_cap(EX_ITEMS, 0.04)[0])),
    ("m2po", {"tau": 0.0}, *_masked_is(m2po_greedy(EX_ITEMS, 0.0))),
]

# Objective-specific metrics on the example, by hand.
METRICS = {
    "m2po": {"offpolicy/masked_frac": 2 / 5, "offpolicy/clipfrac": 0.0, "m2po/trust_frac": 3 / 5,
             "m2po/tau_star": 0.1,
             "offpolicy/m2_after": (0.1 ** 2 + 0.3 ** 2 + 1.3 ** 2) / 3},
}


def _trust_items(lr, adv, mask):
    return {(i, t): (float(lr[i, t]), float(adv[i])) for i in range(lr.shape[0]) for t in range(lr.shape[1])
            if mask[i, t]}


def _w_m2po(lr, adv, mask, i, t):
    items = {(j, u): (lr[j][u], adv[j]) for j in range(len(lr)) for u in range(len(lr[j])) if mask[j][u]}
    return 0.0 if (i, t) in m2po_greedy(items, 0.04) else math.exp(lr[i][t])


# name -> (params, weight(lr, adv, mask, i, t)) with d(sum_t L_t)/d logp_t = -weight * A
WEIGHTS = {"m2po": ({}, _w_m2po)}


# ---------------------------------------------------------------------------------------------
# Algorithm 1 vs the released-code cap criterion on a hand example
# ---------------------------------------------------------------------------------------------
# Trust-region tokens (A>0, r>1) or (A<0, r<1) and their (log r)^2:
#   (0,0): A=+1, log r = sqrt(0.5)    -> 0.50      (0,1): A=+1, log r = -0.9 -> not in T
#   (0,2): A=+1, log r = 0.1          -> 0.01      (1,1): A=-1, log r = +0.8 -> not in T
#   (1,0): A=-1, log r = -sqrt(0.06)  -> 0.06      (1,2): padding
# Alg. 1 (tau = 0.04): mean{0.5, 0.06, 0.01} = 0.19 > tau -> drop 0.5; mean{0.06, 0.01} = 0.035 <= tau.
#   masked = {(0,0)}; tau* = largest kept |log r| in T = sqrt(0.06).
# cap: solve sum min(d2, c) = 0.04 * 3 = 0.12. With one token capped: c + 0.07 = 0.12 -> c = 0.05 < 0.06
#   (inconsistent); with two capped: 2c + 0.01 = 0.12 -> c = 0.055 in [0.01, 0.06]. masked = {(0,0), (1,0)}.
M2_LR = [[math.sqrt(0.5), -0.9, 0.1], [-math.sqrt(0.06), 0.8, 0.0]]
M2_ADV = [1.0, -1.0]


def _m2po_run(variant):
    beh = torch.full((2, 3), -2.0, dtype=F64)
    lp = (beh + torch.tensor(M2_LR, dtype=F64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    loss, m = policy_loss("m2po", lp, beh, torch.tensor(M2_ADV, dtype=F64), mask, variant=variant)
    loss.backward()
    return loss, lp.grad, m


@pytest.mark.parametrize("variant,masked,tau_star", [
    ("alg1", {(0, 0)}, math.sqrt(0.06)),
    ("cap", {(0, 0), (1, 0)}, math.sqrt(0.055)),
])
def test_m2po_hand_example(variant, masked, tau_star):
    loss, grad, m = _m2po_run(variant)
    valid = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    kept = [k for k in valid if k not in masked]
    r = {k: math.exp(M2_LR[k[0]][k[1]]) for k in valid}
    # normaliser = all 5 valid tokens, masked ones included (footnote 2)
    assert float(loss.detach()) == pytest.approx(sum(-r[k] * M2_ADV[k[0]] for k in kept) / 5, rel=1e-12)
    for k in valid:
        expected = 0.0 if k in masked else -r[k] * M2_ADV[k[0]] / 5
        assert float(grad[k]) == pytest.approx(expected, rel=1e-12, abs=0)
    assert m["offpolicy/masked_frac"] == pytest.approx(len(masked) / 5)
    assert m["m2po/tau_star"] == pytest.approx(tau_star, rel=1e-12)
    d2 = {k: M2_LR[k[0]][k[1]] ** 2 for k in valid}
    assert m["offpolicy/m2"] == pytest.approx(sum(d2.values()) / 5, rel=1e-12)
    assert m["offpolicy/m2_after"] == pytest.approx(sum(d2[k] for k in kept) / len(kept), rel=1e-12)
    # the oracles agree with the hand derivation
    items = {k: (M2_LR[k[0]][k[1]], M2_ADV[k[0]]) for k in valid}
    oracle = m2po_greedy(items, 0.04) if variant == "alg1" else m2po_cap(items, 0.04)[0]
    assert oracle == masked


def test_m2po_masked_tokens_count_in_the_normaliser():
    loss, _, _ = _m2po_run("alg1")
    beh = torch.full((2, 3), -2.0, dtype=F64)
    lp = beh + torch.tensor(M2_LR, dtype=F64)
    # dropping the masked token from the mask instead would divide by 4
    mask4 = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=F64)
    loss4, _ = policy_loss("is", lp, beh, torch.tensor(M2_ADV, dtype=F64), mask4)
    assert float(loss.detach()) == pytest.approx(float(loss4.detach()) * 4 / 5, rel=1e-12)


def test_m2po_no_trust_tokens_and_large_tau():
    lp, beh, _, mask = example()
    _, m = policy_loss("m2po", lp, beh, torch.zeros(2, dtype=F64), mask)
    assert math.isnan(m["m2po/tau_star"]) and m["offpolicy/masked_frac"] == 0.0
    _, m = policy_loss("m2po", lp, beh, torch.tensor([1.0, -0.5], dtype=F64), mask, tau=10.0)
    assert m["offpolicy/masked_frac"] == 0.0 and m["m2po/tau_star"] == pytest.approx(1.5)  # max |log r| in T


@pytest.mark.parametrize("seed", range(20))
def test_m2po_vectorised_mask_matches_the_literal_loops(seed):
    rng = random.Random(seed)
    b, t = rng.randint(1, 4), rng.randint(1, 12)
    lr = torch.tensor([[rng.gauss(0, rng.choice([0.05, 0.3, 1.0])) for _ in range(t)] for _ in range(b)], dtype=F64)
    adv = torch.tensor([rng.choice([-1.0, 0.0, 0.5, 2.0]) for _ in range(b)], dtype=F64)
    mask = torch.tensor([[rng.random() < 0.8 for _ in range(t)] for _ in range(b)])
    tau = rng.choice([0.0, 0.01, 0.04, 0.2])
    items = _trust_items(lr, adv, mask)
    adv_bt = adv[:, None].expand(b, t)
    got, tau_star, _ = m2po_mask(lr, adv_bt, mask, tau, "alg1")
    assert {(i, j) for i, j in got.nonzero().tolist()} == m2po_greedy(items, tau)
    got, tau_star, _ = m2po_mask(lr, adv_bt, mask, tau, "cap")
    expected, cap = m2po_cap(items, tau)
    assert {(i, j) for i, j in got.nonzero().tolist()} == expected
    if cap is not None:
        assert tau_star == pytest.approx(cap, rel=1e-9, abs=1e-12)
