"""Smooth and bounded ratio shaping: MHPO, IPS-alpha (exponential smoothing), GBPO.

``mhpo`` (Wang et al. 2026, MHPO: Modulated Hazard-aware Policy Optimization, arXiv:2603.16929;
no official code, formula from a detailed summary and a third-party script):

    psi(r)  = c tanh(log r / c)                                   (Log-Fidelity Modulator)
    zeta(r) = (g(sg psi) / lam_pos)^k_pos + (g(-sg psi) / lam_neg)^k_neg   (Decoupled Hazard Penalty,
                                                                    Weibull cumulative hazards)
    L_t     = -exp(psi(r_t) - sg[zeta(r_t)]) A_t

psi ~ log r near r = 1 and saturates at +-c, so the gradient multiplier exp(psi) sech^2(log r / c)
is bounded by e^c; zeta is semi-gradient (it only rescales). Gradient w.r.t. logp:
-exp(psi - zeta) sech^2(log r / c) A_t.
Not pinned by the sources, our choices:
- ``hazard_gate`` g: "softplus" (default: the formula as written) gives zeta(1) = (ln 2/lam_pos)^k_pos
  + (ln 2/lam_neg)^k_neg, a constant down-scale exp(-zeta(1)) ~ 0.265 of every gradient at r = 1
  with the defaults (on-policy MHPO is then 0.265 x REINFORCE); "relu" (max(x, 0)) has zeta(1) = 0,
  the reading under which the penalty only acts away from r = 1 and on-policy MHPO is REINFORCE.
- aggregation: seq-mean-token-mean (the summary's (1/K) sum_i (1/T_i) sum_t; the script uses
  token-mean, pass ``aggregation=`` to switch).
- defaults c = 1.5, (k_pos, lam_pos) = (1.5, 1.0), (k_neg, lam_neg) = (2.0, 0.8) (paper section 4.1 per
  the script).
Metrics: ``mhpo/hazard_mean`` (mean zeta), ``mhpo/weight_mean`` (mean gradient multiplier
exp(psi - zeta) sech^2(log r / c)), over valid tokens.

``ips_alpha`` (Aouali, Brunel, Rohde, Korba 2023, Exponential Smoothing for Off-Policy Learning,
arXiv:2305.15877): the estimator -(1/n) sum r_i pi(a_i) / pi_0(a_i)^alpha applied
per token: L_t = -w_t A_t with w_t = pi_theta(y_t) / mu(y_t)^alpha = exp(logp - alpha log mu)
(log w clamped to +-20). alpha = 1 is plain IS (``is``), alpha = 0 is -pi A. Gradient -w_t A_t.
Default alpha = 0.7 is ours (the paper tunes alpha with its PAC-Bayes bound). ``mu`` is the anchor
(behaviour, or the proximal policy when given). Token level only (a sequence-level pi/mu^alpha
over whole responses under- or overflows). Metrics ``ips_alpha/weight_mean``, ``ips_alpha/ess``.

``gbpo`` (Ao et al. 2026, Bounded Ratio Reinforcement Learning, arXiv:2604.18578;
from the code README): a regression of the ratio onto a bounded target chosen by the sequence score:

    scale_i  = sigmoid((score_i - median_{j in group(i)} score_j) / T)
    target_i = 1 - eps_low + (eps_low + eps_high) scale_i
    L_t      = |r_t - target_i| |A_t|

With T = 1e-4 (default) scale is ~binary: above-median responses are pulled to r = 1 + eps_high,
below-median ones to 1 - eps_low; a response exactly at its group's median gets the midpoint target
1 + (eps_high - eps_low)/2. Gradient w.r.t. logp: sign(r_t - target_i) |A_t| r_t (0 at the target).
Choices: ``score="reward"`` (default, the README's score: needs context['rewards']) or "advantage"
(the row's mean advantage: same above/below-median split for group-normalised advantages); the
median is the usual one (mean of the two middle values for an even group, rows without valid tokens
left out); needs context['group_id']. Metric ``gbpo/target_mean`` (mean target over valid tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.steps.reweight.context import group_index, group_median, row_values
from workbench.steps.reweight.core import Param, register_objective
from workbench.steps.reweight.diagnostics import effective_sample_size
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP, LossInputs, LossOutput


def _positive(objective: str, *names: str):
    def check(p: dict) -> None:
        for k in names:
            if not p[k] > 0.0:
                raise WorkbenchError(f"{objective}.{k}={p[k]!r} is invalid: expected a number > 0")
    return check


def _valid_mean(x: torch.Tensor, inp: LossInputs) -> torch.Tensor:
    vals = x.detach()[inp.mask]
    return vals.double().mean() if vals.numel() else x.new_tensor(math.nan)


@register_objective(
    "mhpo",
    paper="Wang et al. 2026, MHPO: Modulated Hazard-aware Policy Optimization for Stable RL, arXiv:2603.16929",
    summary="smooth ratio modulator c tanh(log r / c) with a semi-gradient Weibull hazard penalty per shift direction",
    params=[
        Param("c", 1.5, low=0.0, high=100.0, live=True, doc="modulator bound: psi = c tanh(log r / c) in (-c, c)"),
        Param("k_pos", 1.5, low=0.0, high=100.0, live=True, doc="Weibull shape of the hazard for r > 1"),
        Param("lam_pos", 1.0, low=0.0, high=None, live=True, doc="Weibull scale of the hazard for r > 1"),
        Param("k_neg", 2.0, low=0.0, high=100.0, live=True, doc="Weibull shape of the hazard for r < 1"),
        Param("lam_neg", 0.8, low=0.0, high=None, live=True, doc="Weibull scale of the hazard for r < 1"),
        Param("hazard_gate", "softplus", live=False, choices=("softplus", "relu"),
              doc="softplus: formula as written (exp(-zeta(1)) ~ 0.265 at r = 1); relu: zero penalty at r = 1"),
    ],
    check=_positive("mhpo", "c", "k_pos", "lam_pos", "k_neg", "lam_neg"),
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=False,
)
def mhpo(inp: LossInputs, c: float, k_pos: float, lam_pos: float, k_neg: float, lam_neg: float,
         hazard_gate: str) -> LossOutput:
    """L_t = -exp(psi(r_t) - sg[zeta(r_t)]) A_t, psi = c tanh(log r / c), zeta = Weibull hazards of sg psi.

    Gradient w.r.t. logp: -exp(psi - zeta) sech^2(log r / c) A_t.
    """
    th = torch.tanh(inp.log_ratio / c)  # [B, T]
    psi = c * th  # [B, T]
    with torch.no_grad():
        gate = F.softplus if hazard_gate == "softplus" else torch.relu
        p = psi.detach()
        zeta = (gate(p) / lam_pos) ** k_pos + (gate(-p) / lam_neg) ** k_neg  # [B, T]
    loss = -torch.exp(psi - zeta) * inp.advantages  # [B, T]
    with torch.no_grad():
        weight = torch.exp(p - zeta) * (1.0 - th.detach() ** 2)  # [B, T]
    return LossOutput(loss, {
        "mhpo/hazard_mean": _valid_mean(zeta, inp),
        "mhpo/weight_mean": _valid_mean(weight, inp),
    })


@register_objective(
    "ips_alpha",
    paper="Aouali, Brunel, Rohde, Korba 2023, Exponential Smoothing for Off-Policy Learning (ICML), arXiv:2305.15877",
    summary="power-smoothed importance weight pi / mu^alpha (alpha = 1 is IS): a smooth alternative to clipping",
    params=[Param("alpha", 0.7, low=0.0, high=1.0, live=True,
                  doc="smoothing power on the behaviour probability: w = pi / mu^alpha (1 = plain IS; ours: 0.7)")],
    default_aggregation="token-mean",
    reduces_to_reinforce=False,
)
def ips_alpha(inp: LossInputs, alpha: float) -> LossOutput:
    """L_t = -exp(logp_t - alpha log mu_t) A_t (log-weight clamped to +-20). Gradient: -w_t A_t."""
    log_w = (inp.log_ratio + (1.0 - alpha) * inp.anchor_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w = torch.exp(log_w)  # [B, T]
    with torch.no_grad():
        vals = w.detach()[inp.mask].double()  # [N]
        if vals.numel():
            ess = effective_sample_size(log_w.detach()[inp.mask].double())
        else:
            ess = math.nan
    return LossOutput(-w * inp.advantages, {  # [B, T]
        "ips_alpha/weight_mean": _valid_mean(w, inp),
        "ips_alpha/ess": ess,
    })


def _check_gbpo(p: dict) -> None:
    _positive("gbpo", "temperature")(p)


@register_objective(
    "gbpo",
    paper="Ao et al. 2026, Bounded Ratio Reinforcement Learning (BPO / GBPO), arXiv:2604.18578",
    summary="regress the ratio onto a bounded target: 1+eps_high above the group's median score, 1-eps_low below",
    params=[
        Param("eps_low", 0.2, low=0.0, high=1.0, live=True, doc="below-median target ratio 1 - eps_low"),
        Param("eps_high", 0.28, low=0.0, high=None, live=True, doc="above-median target ratio 1 + eps_high"),
        Param("temperature", 1e-4, low=0.0, high=None, live=True,
              doc="T in sigmoid((score - median)/T); 1e-4 is ~binary (> 0)"),
        Param("score", "reward", live=False, choices=("reward", "advantage"),
              doc="reward: context['rewards'] (README); advantage: the row's mean advantage"),
    ],
    check=_check_gbpo,
    needs=lambda p: ("group_id", "rewards") if p["score"] == "reward" else ("group_id",),
    default_aggregation="token-mean",
    reduces_to_reinforce=False,
)
def gbpo(inp: LossInputs, eps_low: float, eps_high: float, temperature: float, score: str) -> LossOutput:
    """L_t = |r_t - target_i| |A_t|, target_i = 1 - eps_low + (eps_low + eps_high) sigmoid((s_i - med_g)/T).

    Gradient w.r.t. logp: sign(r_t - target_i) |A_t| r_t.
    """
    with torch.no_grad():
        s = row_values(inp, "rewards") if score == "reward" else inp.seq_advantages.detach()  # [B]
        inv, n_groups = group_index(inp)
        med = group_median(s, inv, n_groups)  # [B]
        scale = torch.sigmoid((s - med) / temperature)  # [B]
        target = (1.0 - eps_low + (eps_low + eps_high) * scale).unsqueeze(-1).expand_as(inp.ratio)  # [B, T]
    loss = (inp.ratio - target).abs() * inp.advantages.abs()  # [B, T]
    return LossOutput(loss, {"gbpo/target_mean": _valid_mean(target, inp)})
