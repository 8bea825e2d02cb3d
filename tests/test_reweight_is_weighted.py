"""Stop-gradient weighted policy gradients of workbench/steps/reweight/is_weighted.py: tis (token and sequence
level), cispo and topr, plus the reusable ``truncated_is_weight``. This file holds their hand-computed rows
on the 2x3 example (CASES, EXTRA_CASES, METRICS) and their per-token gradient weights (WEIGHTS), which
test_reweight_objectives.py runs, and checks ``truncated_is_weight`` at both levels by hand.
"""

from __future__ import annotations

import math

import torch

from workbench.steps.reweight import truncated_is_weight

from reweight_helpers import (
    ADV, B, F64, LP, ROWS, T, VALID, clip, close, coeff, ratio_case, row_log_ratio, seq_logr,
)


def _row_weighted(w, mode):
    """(loss, grad) for L_t = -w_i A_i logp_t with a detached weight w_i per row i."""
    c = coeff(mode)
    loss = sum(c[k] * -w[k[0]] * ADV[k[0]] * LP[k] for k in VALID)
    grad = [[c[(i, t)] * -w[i] * ADV[i] if (i, t) in c else 0.0 for t in range(T)] for i in range(B)]
    return loss, grad


def _tis(cap, level):
    if level == "token":
        return ratio_case(lambda r, a, lp: -min(r, cap) * a * lp, lambda r, a, lp: -min(r, cap) * a)
    return _row_weighted({i: min(math.exp(seq_logr(i, False)), cap) for i in ROWS}, "token-mean")


def _cispo(el, eh):
    return ratio_case(lambda r, a, lp: -clip(r, max(1 - el, 0), 1 + eh) * a * lp,
                      lambda r, a, lp: -clip(r, max(1 - el, 0), 1 + eh) * a)


def _topr(pos=(1.0, 1.0), neg=(0.0, 1.0), mean=False):
    rho = {i: math.exp(seq_logr(i, mean)) for i in ROWS}
    return _row_weighted({i: clip(rho[i], *(pos if ADV[i] >= 0 else neg)) for i in ROWS}, "seq-mean-token-mean")


CASES = {
    "tis": ({}, *_tis(2.0, "token")),
    "cispo": ({}, *_cispo(1.0, 0.2)),
    "topr": ({}, *_topr()),
}

EXTRA_CASES = [
    ("tis", {"level": "sequence"}, *_tis(2.0, "sequence")),
    ("tis", {"level": "sequence", "cap": 1.2}, *_tis(1.2, "sequence")),
    ("tis", {"cap": 1.1}, *_tis(1.1, "token")),
    ("cispo", {"eps_low": 0.2, "eps_high": 0.3}, *_cispo(0.2, 0.3)),
    ("topr", {"neg_high": 0.5}, *_topr(neg=(0.0, 0.5))),
    ("topr", {"seq_ratio": "geo_mean", "pos_low": 0.5, "pos_high": 1.05}, *_topr(pos=(0.5, 1.05), mean=True)),
]

# Objective-specific metrics on the example, by hand.
METRICS = {
    "tis": {"offpolicy/truncated_frac": 1 / 5, "offpolicy/clipfrac": 0.0},
    "cispo": {"offpolicy/truncated_frac": 2 / 5, "offpolicy/clipfrac": 0.0},
    "topr": {"offpolicy/truncated_frac": 0.0},
}


def _w_topr(lr, adv, mask, i, t):
    return 1.0 if adv[i] >= 0 else min(math.exp(row_log_ratio(lr, mask, i, False)), 1.0)


# name -> (params, weight(lr, adv, mask, i, t)) with d(sum_t L_t)/d logp_t = -weight * A
WEIGHTS = {
    "tis": ({"cap": 1.3}, lambda lr, adv, mask, i, t: min(math.exp(lr[i][t]), 1.3)),
    "cispo": ({}, lambda lr, adv, mask, i, t: min(math.exp(lr[i][t]), 1.2)),
    "topr": ({}, _w_topr),
}


def test_truncated_is_weight_levels():
    lr = torch.tensor([[0.5, 0.5, 9.0], [-0.2, 0.1, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w, trunc = truncated_is_weight(lr, mask, level="token", cap=1.5)
    close(w, [[1.5, 1.5, 0.0], [math.exp(-0.2), math.exp(0.1), 1.0]])
    assert trunc.tolist() == [[True, True, False], [False, False, False]]
    w, trunc = truncated_is_weight(lr, mask, level="sequence", cap=2.0)
    close(w, [[2.0, 2.0, 0.0], [math.exp(-0.1)] * 3])
    assert trunc.tolist() == [[True, True, False], [False, False, False]]
    w, _ = truncated_is_weight(lr, mask, level="sequence", cap=None)
    close(w[0, :2], [math.e, math.e])
