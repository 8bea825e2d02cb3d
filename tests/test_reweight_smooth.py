"""Smooth and bounded ratio shaping of workbench/steps/reweight/smooth.py: mhpo (log-fidelity modulator and
hazard penalty), ips_alpha (exponential smoothing of the behaviour probability) and gbpo (group-median
targets). This file holds their hand-computed rows on the 2x3 example (CASES, EXTRA_CASES, DIAGNOSTICS) and
analytic per-token gradients (GRADIENTS), which test_reweight_objectives.py runs, and checks that on-policy
MHPO's softplus gate is a constant rescale of REINFORCE while IPS-alpha is not REINFORCE.
"""

from __future__ import annotations

import math

import pytest
import torch

from reweight_helpers import (
    ADV, BEH, LP, LR, N, R, REWARDS, ROWS, VALID, on_policy_grads, sigmoid, sign, softplus, token_case,
)


# ---- MHPO ----
def _mhpo_parts(lr, c=1.5, kp=1.5, lp_=1.0, kn=2.0, ln=0.8, gate="softplus"):
    g = softplus if gate == "softplus" else (lambda x: max(x, 0.0))
    psi = c * math.tanh(lr / c)
    zeta = (g(psi) / lp_) ** kp + (g(-psi) / ln) ** kn
    return psi, zeta, 1 - math.tanh(lr / c) ** 2


def _mhpo(gate="softplus", mode="seq-mean-token-mean"):
    def loss(k):
        psi, zeta, _ = _mhpo_parts(LR[k], gate=gate)
        return -math.exp(psi - zeta) * ADV[k[0]]

    def dloss(k):
        psi, zeta, sech2 = _mhpo_parts(LR[k], gate=gate)
        return -math.exp(psi - zeta) * sech2 * ADV[k[0]]

    return token_case(loss, dloss, mode)


# ---- IPS-alpha ----
def _ips(alpha):
    def w(k):
        return math.exp(LP[k] - alpha * BEH[k[0]][k[1]])
    return token_case(lambda k: -w(k) * ADV[k[0]], lambda k: -w(k) * ADV[k[0]])


# ---- GBPO: one group {row 0, row 1}; median of the two scores is their mean ----
def _gbpo(scores, el=0.2, eh=0.28, temp=1e-4):
    med = sum(scores) / 2
    target = {i: 1 - el + (el + eh) * sigmoid((scores[i] - med) / temp) for i in ROWS}
    return token_case(lambda k: abs(R[k] - target[k[0]]) * abs(ADV[k[0]]),
                      lambda k: sign(R[k] - target[k[0]]) * abs(ADV[k[0]]) * R[k])


CASES = {
    "mhpo": ({}, *_mhpo()),
    "ips_alpha": ({}, *_ips(0.7)),
    "gbpo": ({}, *_gbpo(REWARDS)),
}

EXTRA_CASES = [
    ("mhpo", {"hazard_gate": "relu"}, *_mhpo("relu")),
    ("mhpo", {"_agg": "token-mean"}, *_mhpo(mode="token-mean")),
    ("ips_alpha", {"alpha": 1.0}, *_ips(1.0)),
    ("ips_alpha", {"alpha": 0.0}, *_ips(0.0)),
    ("gbpo", {"score": "advantage"}, *_gbpo([ADV[0], ADV[1]])),
    ("gbpo", {"temperature": 1.0, "eps_high": 0.5}, *_gbpo(REWARDS, eh=0.5, temp=1.0)),
]

_PSI_ZETA = [_mhpo_parts(LR[k]) for k in VALID]
_W_IPS = [math.exp(LP[k] - 0.7 * BEH[k[0]][k[1]]) for k in VALID]
# Diagnostics on the example, by hand.
DIAGNOSTICS = {
    "mhpo": {"mhpo/hazard_mean": sum(z for _, z, _ in _PSI_ZETA) / N,
             "mhpo/weight_mean": sum(math.exp(p - z) * s for p, z, s in _PSI_ZETA) / N},
    "ips_alpha": {"ips_alpha/weight_mean": sum(_W_IPS) / N,
                  "ips_alpha/ess": sum(_W_IPS) ** 2 / (N * sum(x * x for x in _W_IPS))},
    "gbpo": {"gbpo/target_mean": (3 * 1.28 + 2 * 0.8) / 5},
}


def _g_mhpo(d, i, t):
    psi, zeta, sech2 = _mhpo_parts(d["lr"][i][t])
    return -math.exp(psi - zeta) * sech2 * d["adv"][i]


def _g_ips(d, i, t):
    return -math.exp(d["lr"][i][t] + 0.3 * d["beh"][i][t]) * d["adv"][i]


def _g_gbpo(d, i, t):
    rew = [float(j % 3) for j in range(len(d["lr"]))]  # make_context's rewards, groups of two rows
    pair = [j for j in range(len(rew)) if j // 2 == i // 2]
    med = sum(rew[j] for j in pair) / len(pair)
    target = 1 - 0.2 + 0.48 * sigmoid((rew[i] - med) / 1e-4)
    r = math.exp(d["lr"][i][t])
    return sign(r - target) * abs(d["adv"][i]) * r


# name -> (params, analytic d(sum_t L_t)/d logp_t)
GRADIENTS = {
    "mhpo": ({}, _g_mhpo),
    "ips_alpha": ({}, _g_ips),
    "gbpo": ({}, _g_gbpo),
}


def test_on_policy_mhpo_softplus_is_a_constant_rescale_and_ips_alpha_is_not_reinforce():
    got, reinforce = on_policy_grads("mhpo", {})
    zeta1 = (math.log(2) / 1.0) ** 1.5 + (math.log(2) / 0.8) ** 2
    torch.testing.assert_close(got, math.exp(-zeta1) * reinforce, rtol=1e-9, atol=1e-12)
    assert math.exp(-zeta1) == pytest.approx(0.265, abs=1e-3)
    got, reinforce = on_policy_grads("ips_alpha", {"alpha": 0.5})
    assert not torch.allclose(got, reinforce)
