"""Token-level ratio objectives of workbench/steps/reweight/ppo_family.py: reinforce, is, ppo_clip (GRPO and
DAPO bounds), dual_clip and sapo. This file holds their hand-computed rows on the 2x3 example (CASES,
EXTRA_CASES, METRICS) and their per-token gradient weights (WEIGHTS: d loss / d logp = -weight * A),
which test_reweight_objectives.py runs, and dual-clip's own parameter check (c > 1).
"""

from __future__ import annotations

import math

import pytest

from workbench.steps.reweight import policy_loss

from reweight_helpers import error_message, example, ppo_dloss, ppo_loss, ratio_case, sigmoid


def dual_loss(r, a, c=3.0):
    base = ppo_loss(r, a)
    return min(base, -c * a) if a < 0 else base


def dual_dloss(r, a, c=3.0):
    return 0.0 if (a < 0 and r > c) else ppo_dloss(r, a)


def _sapo(tp, tn):
    def tau(a):
        return tp if a > 0 else tn

    return ratio_case(lambda r, a, lp: -(4 / tau(a)) * sigmoid(tau(a) * (r - 1)) * a,
                      lambda r, a, lp: -4 * sigmoid(tau(a) * (r - 1)) * (1 - sigmoid(tau(a) * (r - 1))) * r * a,
                      "seq-mean-token-mean")


CASES = {
    "reinforce": ({}, *ratio_case(lambda r, a, lp: -a * lp, lambda r, a, lp: -a)),
    "is": ({}, *ratio_case(lambda r, a, lp: -r * a, lambda r, a, lp: -r * a)),
    "ppo_clip": ({}, *ratio_case(lambda r, a, lp: ppo_loss(r, a), lambda r, a, lp: ppo_dloss(r, a))),
    "dual_clip": ({}, *ratio_case(lambda r, a, lp: dual_loss(r, a), lambda r, a, lp: dual_dloss(r, a))),
    "sapo": ({}, *_sapo(1.0, 1.05)),
}

EXTRA_CASES = [
    ("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28}, *ratio_case(
        lambda r, a, lp: ppo_loss(r, a, 0.2, 0.28), lambda r, a, lp: ppo_dloss(r, a, 0.2, 0.28))),
    ("ppo_clip", {"clip_low": 0.1, "clip_high": 0.7}, *ratio_case(
        lambda r, a, lp: ppo_loss(r, a, 0.1, 0.7), lambda r, a, lp: ppo_dloss(r, a, 0.1, 0.7))),
    ("dual_clip", {"clip_c": 4.0}, *ratio_case(lambda r, a, lp: dual_loss(r, a, 4.0),
                                               lambda r, a, lp: dual_dloss(r, a, 4.0))),
    ("sapo", {"tau_pos": 2.0, "tau_neg": 0.5}, *_sapo(2.0, 0.5)),
]

# Objective-specific metrics on the example, by hand.
METRICS = {
    "ppo_clip": {"offpolicy/clipfrac_low": 1 / 5, "offpolicy/clipfrac_high": 1 / 5, "offpolicy/clipfrac": 2 / 5,
                 "offpolicy/masked_frac": 0.0},
    "dual_clip": {"offpolicy/clipfrac_low": 1 / 5, "offpolicy/clipfrac_high": 1 / 5,
                  "offpolicy/clipfrac_dual": 1 / 5, "offpolicy/clipfrac": 3 / 5},
    "reinforce": {"offpolicy/clipfrac": 0.0, "offpolicy/masked_frac": 0.0},
}


def _w_clip(lo, hi, c=None):
    def fn(lr, adv, mask, i, t):
        r, a = math.exp(lr[i][t]), adv[i]
        if (a > 0 and r > 1 + hi) or (a < 0 and r < 1 - lo) or (c is not None and a < 0 and r > c):
            return 0.0
        return r
    return fn


def _w_sapo(lr, adv, mask, i, t):
    r, a = math.exp(lr[i][t]), adv[i]
    s = sigmoid((1.0 if a > 0 else 1.05) * (r - 1))
    return 4 * s * (1 - s) * r


# name -> (params, weight(lr, adv, mask, i, t)) with d(sum_t L_t)/d logp_t = -weight * A
WEIGHTS = {
    "reinforce": ({}, lambda lr, adv, mask, i, t: 1.0),
    "is": ({}, lambda lr, adv, mask, i, t: math.exp(lr[i][t])),
    "ppo_clip": ({}, _w_clip(0.2, 0.2)),
    "dual_clip": ({"clip_c": 1.5}, _w_clip(0.2, 0.2, 1.5)),
    "sapo": ({}, _w_sapo),
}


@pytest.mark.parametrize("c", [1.0, 0.99, 0.5])
def test_dual_clip_needs_c_above_one(c):
    msg = error_message(policy_loss, "dual_clip", *example(), clip_c=c)
    assert "clip_c" in msg and "dual_clip" in msg
