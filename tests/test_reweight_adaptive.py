"""Objectives of workbench/steps/reweight/adaptive.py whose constraint adapts every update: bapo (bounds searched
until the positive share reaches rho0) and r2vpo (a dual variable kept in the context's state). A literal
transcription of BAPO's search gives the hand-computed rows on the 2x3 example (CASES, EXTRA_CASES,
DIAGNOSTICS) and the analytic per-token gradients (GRADIENTS) that test_reweight_objectives.py runs; here:
the bounds each search order picks, behaviour-probability weighting, bad params, and R2VPO's lambda across
calls (dual ascent, clamping, the ratio cap). Its survival of checkpoint + resume is in test_reweight_context.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import policy_loss, validate_params
from workbench.steps.reweight.adaptive import bapo_bounds

from reweight_helpers import (
    ADV, F64, N, R, VALID, clip, close, example, run_example, token_case, valid_log_ratios,
)


# ---- BAPO: a literal transcription of the search (c = min(c + step, max) until rho >= rho0) ----
def bapo_search(items, rho0=0.5, lows=(0.6, 0.9, 0.02), highs=(1.2, 3.0, 0.05), order="high_first",
                contribution="gradient", c=3.0, weights=None):
    """items = {key: (r, A)} -> (c_low, c_high, rho). weights = {key: w} (default 1)."""
    w = weights or {k: 1.0 for k in items}

    def rho(cl, ch):
        pos = neg = 0.0
        for k, (r, a) in items.items():
            if a > 0:
                if contribution == "value":
                    pos += w[k] * min(r, ch) * a
                elif r <= ch:
                    pos += w[k] * r * a
            elif a < 0:
                if contribution == "value":
                    neg += w[k] * max(r, cl) * -a
                elif cl <= r <= c:
                    neg += w[k] * r * -a
        return pos / (pos + neg) if pos + neg > 0 else math.nan

    def met(cl, ch):
        x = rho(cl, ch)
        return math.isnan(x) or x >= rho0

    cl, ch = lows[0], highs[0]
    for phase in (["high", "low"] if order == "high_first" else ["low", "high"]):
        if phase == "high":
            while not met(cl, ch) and ch < highs[1] and highs[2] > 0:
                ch = min(ch + highs[2], highs[1])
        else:
            while not met(cl, ch) and cl < lows[1] and lows[2] > 0:
                cl = min(cl + lows[2], lows[1])
    return cl, ch, rho(cl, ch)


def bapo_tok(r, a, cl, ch, c=3.0):
    base = -min(r * a, clip(r, cl, ch) * a)
    return min(base, -c * a) if a < 0 else base


def bapo_dtok(r, a, cl, ch, c=3.0):
    clipped = (a > 0 and r > ch) or (a < 0 and (r < cl or r > c))
    return 0.0 if clipped else -r * a


def _bapo(rho0=0.5, **kw):
    cl, ch, _ = bapo_search({k: (R[k], ADV[k[0]]) for k in VALID}, rho0=rho0, **kw)
    return token_case(lambda k: bapo_tok(R[k], ADV[k[0]], cl, ch), lambda k: bapo_dtok(R[k], ADV[k[0]], cl, ch))


# ---- R2VPO ----
def _r2vpo(lam=0.04, center="mean"):
    m = sum(R.values()) / N if center == "mean" else 1.0
    return token_case(lambda k: -R[k] * ADV[k[0]] + lam * (R[k] - m) ** 2,
                      lambda k: -R[k] * ADV[k[0]] + 2 * lam * R[k] * (R[k] - m))


CASES = {
    "bapo": ({}, *_bapo()),
    "r2vpo": ({}, *_r2vpo()),
}

EXTRA_CASES = [
    ("bapo", {"rho0": 0.9, "contribution": "value"}, *_bapo(0.9, contribution="value")),
    ("bapo", {"rho0": 0.9, "contribution": "value", "order": "low_first"},
     *_bapo(0.9, contribution="value", order="low_first")),
    ("bapo", {"low_start": 0.1, "rho0": 0.99, "step_low": 0.1}, *_bapo(0.99, lows=(0.1, 0.9, 0.1))),
    ("r2vpo", {"variant": "fixed"}, *_r2vpo(0.04, "one")),
    ("r2vpo", {"variant": "fixed", "lam": 0.5}, *_r2vpo(0.5, "one")),
    ("r2vpo", {"moment": "second_moment", "lam": 0.3}, *_r2vpo(0.3, "one")),
]

_VAR = sum((x - sum(R.values()) / N) ** 2 for x in R.values()) / N  # the example's ratio variance
# Diagnostics on the example, by hand. Default BAPO: positive r <= 1.2 -> 1.105 + 0.741; negative in [0.6, 3]: none.
DIAGNOSTICS = {
    "bapo": {"bapo/clip_low": 0.6, "bapo/clip_high": 1.2, "bapo/pos_share": 1.0, "bapo/target_met": 1.0,
             "offpolicy/clipfrac": 3 / 5, "offpolicy/clipfrac_dual": 1 / 5},
    "r2vpo": {"r2vpo/lambda": 0.04, "r2vpo/lambda_next": 0.04 + (_VAR - 0.01), "r2vpo/ratio_var": _VAR,
              "r2vpo/moment": _VAR},
}


def _g_bapo(d, i, t):
    items = {k: (math.exp(v), d["adv"][k[0]]) for k, v in valid_log_ratios(d).items()}
    cl, ch, _ = bapo_search(items)
    return bapo_dtok(math.exp(d["lr"][i][t]), d["adv"][i], cl, ch)


def _g_r2vpo(d, i, t):
    rs = [math.exp(v) for v in valid_log_ratios(d).values()]
    m, r = sum(rs) / len(rs), math.exp(d["lr"][i][t])
    return -r * d["adv"][i] + 2 * 0.04 * r * (r - m)


# name -> (params, analytic d(sum_t L_t)/d logp_t)
GRADIENTS = {
    "bapo": ({}, _g_bapo),
    "r2vpo": ({}, _g_r2vpo),
}


# ---------------------------------------------------------------------------------------------
# BAPO: which bounds each search order picks on a hand example
# ---------------------------------------------------------------------------------------------
def test_bapo_diagnostics_after_a_search():
    _, _, m, _ = run_example("bapo", {"rho0": 0.9, "contribution": "value"})
    cl, ch, rho = bapo_search({k: (R[k], ADV[k[0]]) for k in VALID}, rho0=0.9, contribution="value")
    assert (m["bapo/clip_low"], m["bapo/clip_high"]) == pytest.approx((cl, ch), rel=1e-12)
    assert m["bapo/pos_share"] == pytest.approx(rho, rel=1e-9) and m["bapo/target_met"] == 0.0


# Row 0 (A = +1): r = 1.0 and 1.33; row 1 (A = -1): r = 0.71 and 1.0. At the start (0.6, 1.2):
#   gradient contribution: pos = 1.0 (1.33 > 1.2 is clipped), neg = 0.71 + 1.0 -> rho = 1 / 2.71 = 0.369.
#   high_first (rho0 0.45): c_high 1.25, 1.3 change nothing; 1.35 admits 1.33 -> rho = 2.33 / 4.04 = 0.577.
#   low_first: c_low 0.62 ... 0.70 change nothing; 0.72 drops 0.71 -> rho = 1 / 2 = 0.5.
#   value contribution (rho0 0.6): pos(c) = 1 + min(1.33, c) <= 2.33, neg(c_low) = max(0.71, c_low) + 1 only
#   grows with c_low, so rho never reaches 0.6: both orders end at the maxima (0.9, 3.0), rho = 2.33 / 4.23.
BAPO_LR = [[0.0, math.log(1.33)], [math.log(0.71), 0.0]]
BAPO_ADV = [1.0, -1.0]


@pytest.mark.parametrize("order,contribution,rho0,bounds,share", [
    ("high_first", "gradient", 0.45, (0.6, 1.35), 2.33 / 4.04),
    ("low_first", "gradient", 0.45, (0.72, 1.2), 0.5),
    ("high_first", "value", 0.6, (0.9, 3.0), 2.33 / 4.23),
    ("low_first", "value", 0.6, (0.9, 3.0), 2.33 / 4.23),
    ("high_first", "gradient", 0.3, (0.6, 1.2), 1 / 2.71),  # already met: no search
])
def test_bapo_bounds_by_search_order(order, contribution, rho0, bounds, share):
    beh = torch.full((2, 2), -1.0, dtype=F64)
    lp = (beh + torch.tensor(BAPO_LR, dtype=F64)).requires_grad_()
    adv = torch.tensor(BAPO_ADV, dtype=F64)
    loss, m = policy_loss("bapo", lp, beh, adv, torch.ones(2, 2, dtype=F64), rho0=rho0, order=order,
                          contribution=contribution)
    assert (m["bapo/clip_low"], m["bapo/clip_high"]) == pytest.approx(bounds, rel=1e-9)
    assert m["bapo/pos_share"] == pytest.approx(share, rel=1e-9)
    loss.backward()
    cl, ch = bounds
    r = [[math.exp(x) for x in row] for row in BAPO_LR]
    expected = [[bapo_dtok(r[i][t], BAPO_ADV[i], cl, ch) / 4 for t in range(2)] for i in range(2)]
    close(lp.grad, expected)
    # the literal transcription of the search agrees with the hand derivation
    items = {(i, t): (r[i][t], BAPO_ADV[i]) for i in range(2) for t in range(2)}
    assert bapo_search(items, rho0, order=order, contribution=contribution)[:2] == pytest.approx(bounds)


def test_bapo_behavior_prob_weighting():
    # weights pi_rollout = exp(beh): the positive tokens get 0.5, the negative ones 0.1
    beh = torch.log(torch.tensor([[0.5, 0.5], [0.1, 0.1]], dtype=F64))
    lr = torch.tensor(BAPO_LR, dtype=F64)
    lp = beh + lr
    c_low, c_high, share = bapo_bounds(torch.exp(lr), torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=F64),
                                       torch.ones(2, 2, dtype=torch.bool), torch.exp(beh), rho0=0.6)
    # pos = 0.5 * 1.0 = 0.5, neg = 0.1 * (0.71 + 1.0) = 0.171: rho = 0.745 >= 0.6 at the start
    assert (c_low, c_high) == (0.6, 1.2) and share == pytest.approx(0.5 / 0.671, rel=1e-9)
    _, m = policy_loss("bapo", lp, beh, torch.tensor(BAPO_ADV, dtype=F64), torch.ones(2, 2), rho0=0.6,
                       weighting="behavior_prob")
    assert m["bapo/pos_share"] == pytest.approx(0.5 / 0.671, rel=1e-9)
    _, m = policy_loss("bapo", lp, beh, torch.tensor(BAPO_ADV, dtype=F64), torch.ones(2, 2), rho0=0.6)
    assert m["bapo/clip_high"] > 1.2  # unweighted: 1 / 2.71 < 0.6, the search raises c_high


def test_bapo_bad_params():
    with pytest.raises(WorkbenchError, match="low_start"):
        validate_params("bapo", {"low_start": 0.95})
    with pytest.raises(WorkbenchError, match="step_high"):
        validate_params("bapo", {"step_high": 1e-6})
    with pytest.raises(WorkbenchError, match="clip_c"):
        validate_params("bapo", {"clip_c": 1.0})


# ---------------------------------------------------------------------------------------------
# R2VPO: the dual variable is state that changes across calls sharing the state dict
# ---------------------------------------------------------------------------------------------
def test_r2vpo_lambda_changes_across_calls_with_the_same_state():
    state = {}
    _, _, m1, _ = run_example("r2vpo", {}, state)
    r = list(R.values())
    mean = sum(r) / N
    var = sum((x - mean) ** 2 for x in r) / N
    lam1 = 0.04 + 1.0 * (var - 0.01)  # dual ascent: lambda + dual_lr (Var - delta), clamped to [0, 100]
    assert m1["r2vpo/lambda"] == 0.04 and state == {"r2vpo/lambda": pytest.approx(lam1, rel=1e-12)}
    loss2, grad2, m2, _ = run_example("r2vpo", {}, state)
    assert m2["r2vpo/lambda"] == pytest.approx(lam1, rel=1e-12) and m2["r2vpo/lambda"] != m1["r2vpo/lambda"]
    assert state["r2vpo/lambda"] == pytest.approx(lam1 + (var - 0.01), rel=1e-12)
    # the second loss uses the updated lambda
    exp_loss, exp_grad = _r2vpo(lam1)
    close(loss2.detach(), exp_loss)
    close(grad2, exp_grad)
    json.dumps(state)  # JSON-able: the loop checkpoints it


def test_r2vpo_lambda_is_clamped_and_fixed_variant_needs_no_state():
    state = {"r2vpo/lambda": 5.0}
    run_example("r2vpo", {"delta": 100.0}, state)  # Var - delta < 0 pushes lambda below 0: clamped at 0
    assert state["r2vpo/lambda"] == 0.0
    state = {}
    run_example("r2vpo", {"lam_max": 0.05, "dual_lr": 1000.0}, state)
    assert state["r2vpo/lambda"] == 0.05
    lp, beh, adv, mask = example()
    policy_loss("r2vpo", lp, beh, adv, mask, variant="fixed")  # no context needed
    with pytest.raises(WorkbenchError, match=r"context\['state'\]"):
        policy_loss("r2vpo", lp, beh, adv, mask)


def test_r2vpo_ratio_cap_flattens_the_penalty_of_extreme_tokens():
    # fixed variant, lam 0.5, cap 10: token 1 (r = e^3 = 20.1) pays the constant 0.5 (10 - 1)^2
    lr = [0.2, 3.0]
    beh = torch.full((1, 2), -4.0, dtype=F64)
    lp = (beh + torch.tensor([lr], dtype=F64)).requires_grad_()
    loss, m = policy_loss("r2vpo", lp, beh, torch.tensor([1.0], dtype=F64), torch.ones(1, 2), variant="fixed",
                          lam=0.5, ratio_cap=10.0)
    loss.backward()
    r0, r1 = math.exp(lr[0]), math.exp(lr[1])
    assert float(loss.detach()) == pytest.approx((-r0 + 0.5 * (r0 - 1) ** 2 - r1 + 0.5 * 81) / 2, rel=1e-12)
    close(lp.grad, [[(-r0 + r0 * (r0 - 1)) / 2, -r1 / 2]])
    assert m["r2vpo/moment"] == pytest.approx(((r0 - 1) ** 2 + 81) / 2, rel=1e-12)
