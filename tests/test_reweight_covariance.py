"""Clip-Cov and KL-Cov of workbench/steps/reweight/covariance.py: act on the tokens whose covariance of
(logp, A) is largest. The token covariance of the 2x3 example gives their hand-computed rows (CASES,
EXTRA_CASES, DIAGNOSTICS) and analytic per-token gradients (GRADIENTS), which
test_reweight_objectives.py runs; here: Clip-Cov's random choice among the eligible tokens is
deterministic for a batch and follows a generator passed in the context.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.steps.reweight import policy_loss

from reweight_helpers import ADV, F64, LP, LR, N, R, VALID, ppo_dloss, ppo_loss, sign, token_case, valid_log_ratios

# ---- token covariance of (logp, A) over the 5 valid tokens ----
MEAN_LP = sum(LP.values()) / N
MEAN_A = sum(ADV[k[0]] for k in VALID) / N
COV = {k: (LP[k] - MEAN_LP) * (ADV[k[0]] - MEAN_A) for k in VALID}


def _clip_cov(selected, lo=1.0, hi=1.0):
    return token_case(lambda k: 0.0 if k in selected else ppo_loss(R[k], ADV[k[0]], lo, hi),
                      lambda k: 0.0 if k in selected else ppo_dloss(R[k], ADV[k[0]], lo, hi))


def _kl_cov(n_sel, beta=1.0):
    top = set(sorted(VALID, key=lambda k: -COV[k])[:n_sel])
    return token_case(lambda k: -R[k] * ADV[k[0]] + (beta * abs(LR[k]) if k in top else 0.0),
                      lambda k: -R[k] * ADV[k[0]] + (beta * sign(LR[k]) if k in top else 0.0))


CASES = {
    # only (1, 0) has Cov in (1, 5) (1.368): it is the one token detached
    "clip_cov": ({}, *_clip_cov({(1, 0)})),
    "kl_cov": ({}, *_kl_cov(1)),
}

EXTRA_CASES = [
    # Cov: (0,0) 0.348, (0,2) 0.408, (1,0) 1.368 lie in (0.3, 5); select_ratio 1 detaches all three
    ("clip_cov", {"cov_lb": 0.3, "select_ratio": 1.0}, *_clip_cov({(0, 0), (0, 2), (1, 0)})),
    # PPO clip 0.2: (0,1) and (1,0) are PPO-clipped and not eligible; (0,0), (0,2) are detached
    ("clip_cov", {"cov_lb": 0.3, "select_ratio": 1.0, "clip_low": 0.2, "clip_high": 0.2},
     *_clip_cov({(0, 0), (0, 2)}, 0.2, 0.2)),
    ("kl_cov", {"select_ratio": 0.5, "kl_coef": 0.5}, *_kl_cov(2, 0.5)),
]

# Diagnostics on the example, by hand.
DIAGNOSTICS = {
    "clip_cov": {"clipcov/selected_frac": 1 / 5, "offpolicy/masked_frac": 1 / 5, "offpolicy/clipfrac": 0.0},
    "kl_cov": {"klcov/selected_frac": 1 / 5, "offpolicy/clipfrac": 0.0},
}


def _cov(d):
    items = valid_log_ratios(d)
    lps = {k: d["beh"][k[0]][k[1]] + v for k, v in items.items()}
    ml = sum(lps.values()) / len(lps)
    ma = sum(d["adv"][k[0]] for k in items) / len(items)
    return {k: (lps[k] - ml) * (d["adv"][k[0]] - ma) for k in items}


def _g_clip_cov(d, i, t):  # cov_lb 0.05, select_ratio 1: every eligible token is detached
    r, a = math.exp(d["lr"][i][t]), d["adv"][i]
    ppo_clipped = (a > 0 and r > 2.0) or (a < 0 and r < 0.0)
    return 0.0 if ppo_clipped or 0.05 < _cov(d)[(i, t)] < 5.0 else -r * a


def _g_kl_cov(d, i, t):  # select_ratio 0.3 of the 14 valid tokens: the top 4 by covariance
    cov = _cov(d)
    top = sorted(cov, key=lambda k: -cov[k])[:int(0.3 * len(cov))]
    r, a = math.exp(d["lr"][i][t]), d["adv"][i]
    return -r * a + (sign(d["lr"][i][t]) if (i, t) in top else 0.0)


# name -> (params, analytic d(sum_t L_t)/d logp_t)
GRADIENTS = {
    "clip_cov": ({"cov_lb": 0.05, "select_ratio": 1.0}, _g_clip_cov),
    "kl_cov": ({"select_ratio": 0.3}, _g_kl_cov),
}


# ---------------------------------------------------------------------------------------------
# Clip-Cov: deterministic random selection
# ---------------------------------------------------------------------------------------------
def _clip_cov_selected(seed, ctx=None, **params):
    g = torch.Generator().manual_seed(seed)
    beh = -torch.rand(16, 32, generator=g, dtype=F64) * 3
    lp = (beh + torch.randn(16, 32, generator=g, dtype=F64) * 0.1).requires_grad_()
    adv = torch.randn(16, generator=g, dtype=F64) * 2
    loss, m = policy_loss("clip_cov", lp, beh, adv, torch.ones(16, 32, dtype=F64), context=ctx,
                          cov_lb=0.2, select_ratio=0.01, **params)
    loss.backward()
    return frozenset(map(tuple, (lp.grad == 0).nonzero().tolist())), m


def test_clip_cov_selection_is_deterministic_and_random_among_eligible():
    a, m = _clip_cov_selected(0)
    b, _ = _clip_cov_selected(0)
    assert a == b and len(a) == 5 and m["clipcov/selected_frac"] == pytest.approx(5 / 512)
    # a generator in the context replaces the batch-seeded one; equal seeds give equal choices
    c, _ = _clip_cov_selected(0, {"generator": torch.Generator().manual_seed(1)})
    d, _ = _clip_cov_selected(0, {"generator": torch.Generator().manual_seed(1)})
    e, _ = _clip_cov_selected(0, {"generator": torch.Generator().manual_seed(2)})
    assert c == d and len(c) == 5 and len({a, c, e}) > 1
