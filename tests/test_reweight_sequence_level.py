"""Sequence-level ratio objectives of workbench/steps/reweight/sequence_level.py: gspo, gspo_token and geo_mean
(GMPO). This file holds their hand-computed rows on the 2x3 example (CASES, EXTRA_CASES, METRICS) and
their per-token gradient weights (WEIGHTS), which test_reweight_objectives.py runs, and checks that GSPO
reduces token advantages to their row mean over the valid tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.steps.reweight import policy_loss

from reweight_helpers import (
    ADV, B, F64, LR, ROWS, T, VALID, clip, coeff, example, row_log_ratio, seq_logr,
)


def seq_case(seq_loss, seq_dloss, mode="seq-mean-token-mean"):
    """(loss, grad) for an objective whose loss L_i is broadcast over row i; seq_dloss(i, t) = dL_i/dlogp_t."""
    c = coeff(mode)
    loss = sum(c[(i, t)] * seq_loss(i) for (i, t) in VALID)
    grad = [[sum(c[(i, s)] for s in ROWS[i]) * seq_dloss(i, t) if (i, t) in c else 0.0 for t in range(T)]
            for i in range(B)]
    return loss, grad


def _gspo(lo, hi, mode="seq-mean-token-mean"):
    s = {i: math.exp(seq_logr(i, True)) for i in ROWS}

    def unclipped(i):
        return not ((ADV[i] > 0 and s[i] > 1 + hi) or (ADV[i] < 0 and s[i] < 1 - lo))

    return seq_case(lambda i: -min(s[i] * ADV[i], clip(s[i], 1 - lo, 1 + hi) * ADV[i]),
                    lambda i, t: -ADV[i] * s[i] / len(ROWS[i]) if unclipped(i) else 0.0, mode)


def _gspo_token(lo, hi):
    # s_{i,t} has the value s_i but depends on logp_t alone (d s_{i,t} / d logp_t = s_i).
    s = {i: math.exp(seq_logr(i, True)) for i in ROWS}
    c = coeff("seq-mean-token-mean")

    def clipped(i):
        return (ADV[i] > 0 and s[i] > 1 + hi) or (ADV[i] < 0 and s[i] < 1 - lo)

    loss = sum(c[(i, t)] * -min(s[i] * ADV[i], clip(s[i], 1 - lo, 1 + hi) * ADV[i]) for (i, t) in VALID)
    grad = [[c[(i, t)] * (0.0 if clipped(i) else -s[i] * ADV[i]) if (i, t) in c else 0.0 for t in range(T)]
            for i in range(B)]
    return loss, grad


def _geo_mean(lo, hi):
    def pess(i, t):
        lr = LR[(i, t)]
        return min(lr, clip(lr, -lo, hi)) if ADV[i] > 0 else max(lr, clip(lr, -lo, hi))

    def clipped(i, t):
        lr = LR[(i, t)]
        return (ADV[i] > 0 and lr > hi) or (ADV[i] < 0 and lr < -lo)

    g = {i: math.exp(sum(pess(i, t) for t in ROWS[i]) / len(ROWS[i])) for i in ROWS}
    return seq_case(lambda i: -ADV[i] * g[i],
                    lambda i, t: 0.0 if clipped(i, t) else -ADV[i] * g[i] / len(ROWS[i]))


CASES = {
    # GSPO's default 3e-4 / 4e-4 clips both rows here; wider bounds keep row 1 (s = 0.905) unclipped.
    "gspo": ({"clip_low": 0.2, "clip_high": 0.05}, *_gspo(0.2, 0.05)),
    "gspo_token": ({"clip_low": 0.2, "clip_high": 0.05}, *_gspo_token(0.2, 0.05)),
    "geo_mean": ({}, *_geo_mean(0.4, 0.4)),
}

EXTRA_CASES = [
    ("gspo", {}, *_gspo(3e-4, 4e-4)),
    ("gspo", {"clip_low": 0.2, "clip_high": 0.05, "_agg": "token-mean"}, *_gspo(0.2, 0.05, "token-mean")),
    ("geo_mean", {"clip_low": 0.1, "clip_high": 0.2}, *_geo_mean(0.1, 0.2)),
]

# Objective-specific metrics on the example, by hand.
METRICS = {
    "gspo": {"offpolicy/clipfrac_high": 3 / 5, "offpolicy/clipfrac_low": 0.0, "offpolicy/clipfrac": 3 / 5},
    "geo_mean": {"offpolicy/clipfrac_high": 1 / 5, "offpolicy/clipfrac_low": 1 / 5, "offpolicy/clipfrac": 2 / 5},
}


def _w_gspo(lo, hi):
    def fn(lr, adv, mask, i, t):
        s, a = math.exp(row_log_ratio(lr, mask, i, True)), adv[i]
        return 0.0 if (a > 0 and s > 1 + hi) or (a < 0 and s < 1 - lo) else s
    return fn


def _w_geo(lo, hi):
    def fn(lr, adv, mask, i, t):
        a = adv[i]
        vals = [min(x, clip(x, -lo, hi)) if a > 0 else max(x, clip(x, -lo, hi))
                for x, m in zip(lr[i], mask[i]) if m]
        g = math.exp(sum(vals) / len(vals))
        return 0.0 if (a > 0 and lr[i][t] > hi) or (a < 0 and lr[i][t] < -lo) else g
    return fn


# name -> (params, weight(lr, adv, mask, i, t)) with d(sum_t L_t)/d logp_t = -weight * A
WEIGHTS = {
    "gspo": ({"clip_low": 0.1, "clip_high": 0.1}, _w_gspo(0.1, 0.1)),
    "gspo_token": ({"clip_low": 0.1, "clip_high": 0.1}, _w_gspo(0.1, 0.1)),
    "geo_mean": ({}, _w_geo(0.4, 0.4)),
}


def test_gspo_token_advantages_use_the_row_mean():
    lp, beh, _, mask = example()
    adv = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 99.0]], dtype=F64)  # padded 99 is ignored
    loss, _ = policy_loss("gspo", lp, beh, adv, mask, aggregation="seq-mean-token-mean", clip_low=0.2,
                          clip_high=0.05)
    s0, s1 = math.exp(seq_logr(0, True)), math.exp(seq_logr(1, True))
    a0, a1 = 2.0, -0.5  # row means over valid tokens
    expected = 0.5 * (-min(s0 * a0, clip(s0, 0.8, 1.05) * a0) - min(s1 * a1, clip(s1, 0.8, 1.05) * a1))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
