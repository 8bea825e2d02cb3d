"""REC of workbench/steps/reweight/rec.py: group-relative REINFORCE with an explicit clip mask (none, one-side,
two-side, ring), a detached weight (none, token or GSPO-style importance sampling, advantage) and an
optional regulariser (k2, forward KL). REC has no checks of its own beyond its rows: its hand-computed
cases on the 2x3 example (CASES, EXTRA_CASES, DIAGNOSTICS) and its analytic per-token gradient
(GRADIENTS), which test_reweight_objectives.py runs with every other objective's.
"""

from __future__ import annotations

import math

from reweight_helpers import ADV, LP, LR, R, ROWS, token_case


def _rec(mode="one-side", weight="none", reg="none", coef=0.1, el=0.2, eh=0.2, elp=0.6, ehp=2.0, temp=1.0):
    def keep(k):
        r, a = R[k], ADV[k[0]]
        two = 1 - el <= r <= 1 + eh
        if mode == "none":
            return True
        if mode == "two-side":
            return two
        if mode == "one-side":
            return (a >= 0 and r <= 1 + eh) or (a <= 0 and r >= 1 - el)
        return two or (a >= 0 and r <= 1 - elp) or (a <= 0 and r >= 1 + ehp)

    def w(k):
        i = k[0]
        if weight == "importance_sampling":
            return R[k]
        if weight == "gspo_importance_sampling":
            return math.exp(sum(LR[(i, t)] for t in ROWS[i]) / len(ROWS[i]))
        if weight == "advantage":
            return math.exp(ADV[i] / temp)
        return 1.0

    def reg_loss(k):
        return coef * LR[k] ** 2 if reg == "k2" else (-coef * LP[k] if reg == "forward_kl" else 0.0)

    def reg_grad(k):
        return 2 * coef * LR[k] if reg == "k2" else (-coef if reg == "forward_kl" else 0.0)

    return token_case(lambda k: (-ADV[k[0]] * w(k) * LP[k] if keep(k) else 0.0) + reg_loss(k),
                      lambda k: (-ADV[k[0]] * w(k) if keep(k) else 0.0) + reg_grad(k))


CASES = {"rec": ({}, *_rec())}

EXTRA_CASES = [
    ("rec", {"clip_mode": "none"}, *_rec("none")),
    ("rec", {"clip_mode": "two-side", "regularizer": "forward_kl"}, *_rec("two-side", reg="forward_kl")),
    ("rec", {"clip_mode": "ring", "weight": "importance_sampling", "regularizer": "k2", "reg_coef": 0.3},
     *_rec("ring", "importance_sampling", "k2", 0.3)),
    ("rec", {"clip_mode": "ring", "eps_low_prime": 0.7, "eps_high_prime": 1.5}, *_rec("ring", elp=0.7, ehp=1.5)),
    ("rec", {"weight": "gspo_importance_sampling"}, *_rec(weight="gspo_importance_sampling")),
    ("rec", {"weight": "advantage", "temp": 2.0}, *_rec(weight="advantage", temp=2.0)),
]

# Diagnostics on the example, by hand.
DIAGNOSTICS = {"rec": {"offpolicy/clipfrac": 2 / 5}}


def _g_rec(d, i, t):  # ring + importance_sampling + k2 (coef 0.1)
    r, a, lr = math.exp(d["lr"][i][t]), d["adv"][i], d["lr"][i][t]
    keep = (0.8 <= r <= 1.2) or (a >= 0 and r <= 0.4) or (a <= 0 and r >= 3.0)
    return (-a * r if keep else 0.0) + 2 * 0.1 * lr


# name -> (params, analytic d(sum_t L_t)/d logp_t)
GRADIENTS = {"rec": ({"clip_mode": "ring", "weight": "importance_sampling", "regularizer": "k2"}, _g_rec)}
