"""CHORD of workbench/steps/reweight/chord.py: (1 - mu) PPO-clip on the batch + mu SFT on expert demonstrations,
with a scheduled mu and the phi token weight. The example's expert batch gives its hand-computed rows
(CASES, EXTRA_CASES, DIAGNOSTICS) and analytic per-token gradient (GRADIENTS), which
test_reweight_objectives.py runs; here: the mu schedule (warm-up, cosine decay, presets), the gradient
reaching the expert log-probs, and bad expert context. The loop's expert data for CHORD is in
test_reweight_context.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import OBJECTIVES, policy_loss
from workbench.steps.reweight.chord import chord_mu

from reweight_helpers import (
    ADV, EXPERT_LP, EXPERT_VALID, R, STEP, close, ex_context, example, mu_by_hand, ppo_dloss, ppo_loss, run_example,
    token_case,
)


# ---- (1 - mu) PPO-clip (token-mean) + mu * SFT (token-mean over the 4 expert tokens) ----
def _sft(weight):
    def phi(lp):
        p = math.exp(lp)
        return p * (1 - p) if weight == "phi" else (p if weight == "is" else 1.0)
    vals = [EXPERT_LP[i][t] for i, t in EXPERT_VALID]
    return sum(-phi(v) * v for v in vals) / len(vals), {k: -phi(EXPERT_LP[k[0]][k[1]]) / len(vals)
                                                          for k in EXPERT_VALID}


def _chord(warmup=200, decay=400, peak=0.5, valley=0.02, weight="phi"):
    mu = mu_by_hand(STEP, warmup, decay, peak, valley)
    rl_loss, rl_grad = token_case(lambda k: ppo_loss(R[k], ADV[k[0]]), lambda k: ppo_dloss(R[k], ADV[k[0]]))
    sft, _ = _sft(weight)
    return (1 - mu) * rl_loss + mu * sft, [[(1 - mu) * g for g in row] for row in rl_grad]


CASES = {"chord": ({}, *_chord())}

EXTRA_CASES = [
    ("chord", {"sft_weight": "none", "mu_peak": 0.9}, *_chord(peak=0.9, weight="none")),
    ("chord", {"sft_weight": "is"}, *_chord(weight="is")),
    ("chord", {"mu_warmup": 0.0, "mu_decay": 200.0, "mu_peak": 0.9, "mu_valley": 0.05, "sft_weight": "none"},
     *_chord(0, 200, 0.9, 0.05, "none")),
]

# Diagnostics on the example, by hand.
DIAGNOSTICS = {"chord": {"chord/mu": mu_by_hand(STEP, 200, 400, 0.5, 0.02), "chord/sft_loss": _sft("phi")[0],
                         "chord/expert_tokens": 4.0}}


def _g_chord(d, i, t):  # step 5 of a 200-update warm-up: mu = 5 / 200 * 0.5
    return (1 - 5 / 200 * 0.5) * ppo_dloss(math.exp(d["lr"][i][t]), d["adv"][i])


# name -> (params, analytic d(sum_t L_t)/d logp_t)
GRADIENTS = {"chord": ({}, _g_chord)}


# ---------------------------------------------------------------------------------------------
# the mu schedule and the expert gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step,warmup,decay,peak,valley,expected", [
    (0, 200, 400, 0.5, 0.02, 0.0),
    (100, 200, 400, 0.5, 0.02, 0.25),  # halfway through the warm-up: peak / 2
    (200, 200, 400, 0.5, 0.02, 0.5),  # end of warm-up: peak
    (400, 200, 400, 0.5, 0.02, 0.26),  # halfway through the cosine: (peak + valley) / 2
    (600, 200, 400, 0.5, 0.02, 0.02),  # end: valley
    (10_000, 200, 400, 0.5, 0.02, 0.02),
    (0, 0, 0, 0.1, 0.1, 0.1),  # CHORD-phi: constant
    (50, 0, 200, 0.9, 0.05, 0.05 + 0.85 * 0.5 * (1 + math.cos(math.pi / 4))),  # CHORD-mu
])
def test_chord_mu_schedule(step, warmup, decay, peak, valley, expected):
    assert chord_mu(step, warmup, decay, peak, valley) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    lp, beh, adv, mask = example()
    ctx = dict(ex_context(), step=step)
    _, m = policy_loss("chord", lp, beh, adv, mask, context=ctx, mu_warmup=warmup, mu_decay=decay, mu_peak=peak,
                       mu_valley=valley)
    assert m["chord/mu"] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_chord_expert_gradient_and_presets():
    _, _, _, ctx = run_example("chord", {})
    mu = mu_by_hand(STEP, 200, 400, 0.5, 0.02)
    _, dsft = _sft("phi")
    expected = [[mu * dsft.get((i, t), 0.0) for t in range(3)] for i in range(2)]
    close(ctx["expert_logprobs"].grad, expected)  # padded expert tokens (with garbage) get 0
    assert OBJECTIVES.meta("chord")["presets"]["chord_phi"]["mu_peak"] == 0.1
    lp, beh, adv, mask = example()
    bad = dict(ex_context(), expert_mask=torch.ones(2, 2))
    with pytest.raises(WorkbenchError, match="expert_mask"):
        policy_loss("chord", lp, beh, adv, mask, context=bad)
    bad = dict(ex_context(), step=-1)
    with pytest.raises(WorkbenchError, match="step"):
        policy_loss("chord", lp, beh, adv, mask, context=bad)
