"""Token-level ratio objectives: REINFORCE, plain IS, PPO-clip, dual-clip PPO, SAPO.

Each objective maps ``LossInputs`` (ratio r = pi_theta / anchor per token, advantages A [B, T])
to a per-token loss; ``policy_loss`` aggregates it. Formulas, each with its paper:

- ``reinforce``: L = -A logp (no importance weight; Williams 1992). Gradient -A.
- ``is``: L = -r A (unclipped importance-sampled surrogate). Gradient -r A.
- ``ppo_clip``: L = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) (Schulman et al. 2017,
  arXiv:1707.06347). Presets: GRPO (arXiv:2402.03300) 0.2 / 0.2, DAPO clip-higher
  (arXiv:2503.14476) 0.2 / 0.28.
- ``dual_clip``: PPO-clip, and for A < 0 additionally min(., -c A) (Ye et al. 2019,
  arXiv:1912.09729), so the loss of a negative token is bounded when r >> 1.
- ``sapo``: L = -f(r) A with the soft gate f(r) = (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos
  for A > 0 and tau_neg otherwise (SAPO, arXiv:2511.20347). f'(1) = 1, so on-policy it is
  REINFORCE; away from r = 1 the gradient weight 4 s (1 - s) r (s the sigmoid) decays smoothly.

Clip metrics: ``offpolicy/clipfrac_low`` (A < 0 and r < 1 - clip_low), ``offpolicy/clipfrac_high``
(A > 0 and r > 1 + clip_high), ``offpolicy/clipfrac_dual`` (A < 0 and r > c), and
``offpolicy/clipfrac`` = any of them = the fraction of valid tokens whose gradient is zero
because of clipping.

Left out: value-function clipping (no critic here), KL penalties (the update step adds them),
adaptive bounds (``bapo``, in ``adaptive``).
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.core import Param, register_objective
from workbench.steps.reweight.inputs import LossInputs, LossOutput

_CLIP_LOW = Param("clip_low", 0.2, low=0.0, high=1.0, live=True,
                  doc="lower clip: ratios below 1 - clip_low stop negative-advantage gradients")
_CLIP_HIGH = Param("clip_high", 0.2, low=0.0, high=None, live=True,
                   doc="upper clip: ratios above 1 + clip_high stop positive-advantage gradients (DAPO: 0.28)")


def clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate -> (per-token loss [B, T], clipped-low [B, T], clipped-high [B, T]).

    loss = max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A), equal to -min(r A, clip(r) A).
    ``ratio`` may be a token ratio or a sequence ratio broadcast over tokens.
    """
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    loss = torch.maximum(-adv * ratio, -adv * clipped_ratio)  # [B, T]
    with torch.no_grad():
        low = (adv < 0) & (ratio < 1.0 - clip_low)  # [B, T]
        high = (adv > 0) & (ratio > 1.0 + clip_high)  # [B, T]
    return loss, low, high


@register_objective(
    "reinforce",
    paper="Williams 1992, Simple statistical gradient-following algorithms for connectionist RL, "
          "Machine Learning 8:229-256",
    summary="plain policy gradient -A logp, no importance weight (ignores how stale the sample is)",
    params=[],
    reduces_to_reinforce=True,
    ignores_behavior=True,  # metadata read by workbench.lint: the gradient never sees pi/mu
)
def reinforce(inp: LossInputs) -> LossOutput:
    """L_t = -A_t log pi_theta(y_t). Gradient w.r.t. logp: -A_t."""
    return LossOutput(-inp.advantages * inp.logprobs)  # [B, T]


@register_objective(
    "is",
    paper="Precup et al. 2000 (importance-sampled policy evaluation); the unclipped surrogate of "
          "Schulman et al. 2017, arXiv:1707.06347",
    summary="unclipped token importance sampling -r A (unbiased, unbounded variance)",
    params=[],
    reduces_to_reinforce=True,
)
def importance_sampling(inp: LossInputs) -> LossOutput:
    """L_t = -r_t A_t with r_t = pi_theta / anchor. Gradient w.r.t. logp: -r_t A_t."""
    return LossOutput(-inp.advantages * inp.ratio)  # [B, T]


@register_objective(
    "ppo_clip",
    paper="Schulman et al. 2017, Proximal Policy Optimization Algorithms, arXiv:1707.06347 "
          "(GRPO arXiv:2402.03300; DAPO clip-higher arXiv:2503.14476)",
    summary="PPO clipped surrogate -min(rA, clip(r, 1-clip_low, 1+clip_high)A); zero gradient once clipped",
    params=[_CLIP_LOW, _CLIP_HIGH],
    presets={"grpo": {"clip_low": 0.2, "clip_high": 0.2}, "dapo": {"clip_low": 0.2, "clip_high": 0.28}},
    reduces_to_reinforce=True,
)
def ppo_clip(inp: LossInputs, clip_low: float, clip_high: float) -> LossOutput:
    """L_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t).

    Gradient w.r.t. logp: -r_t A_t, except 0 where (A>0, r>1+clip_high) or (A<0, r<1-clip_low).
    """
    loss, low, high = clipped_surrogate(inp.ratio, inp.advantages, clip_low, clip_high)
    return LossOutput(loss, {
        **inp.clip_fractions(low, high),
    })


def _check_dual(params: dict) -> None:
    if not params["clip_c"] > 1.0:
        raise WorkbenchError(f"dual_clip.clip_c={params['clip_c']!r} is invalid: expected a number > 1")


@register_objective(
    "dual_clip",
    paper="Ye et al. 2019, Mastering Complex Control in MOBA Games with Deep RL (dual-clip PPO), "
          "arXiv:1912.09729",
    summary="PPO-clip plus a bound -c A on negative-advantage tokens with r > c",
    params=[_CLIP_LOW, _CLIP_HIGH,
            Param("clip_c", 3.0, low=1.0, high=None, live=True,
                  doc="dual-clip bound c (> 1): negative-advantage tokens with r > c get zero gradient")],
    check=_check_dual,
    reduces_to_reinforce=True,
)
def dual_clip(inp: LossInputs, clip_low: float, clip_high: float, clip_c: float) -> LossOutput:
    """L_t = ppo_clip_t for A_t >= 0; min(ppo_clip_t, -c A_t) for A_t < 0 (c > 1).

    Gradient w.r.t. logp: -r_t A_t, except 0 where PPO clips or where A<0 and r>c.
    """
    adv = inp.advantages  # [B, T]
    loss, low, high = clipped_surrogate(inp.ratio, adv, clip_low, clip_high)
    neg = adv < 0  # [B, T]
    loss = torch.where(neg, torch.minimum(loss, -clip_c * adv), loss)  # [B, T]
    dual = neg & (inp.ratio.detach() > clip_c)  # [B, T]
    return LossOutput(loss, {
        **inp.clip_fractions(low, high, dual),
    })


def _check_sapo(params: dict) -> None:
    for k in ("tau_pos", "tau_neg"):
        if not params[k] > 0.0:
            raise WorkbenchError(f"sapo.{k}={params[k]!r} is invalid: expected a number > 0")


@register_objective(
    "sapo",
    paper="Qwen team 2025, Soft Adaptive Policy Optimization (SAPO), arXiv:2511.20347",
    summary="soft gate -(4/tau) sigmoid(tau (r-1)) A instead of a hard clip; tau by advantage sign",
    params=[Param("tau_pos", 1.0, low=0.0, high=100.0, live=True, doc="gate temperature for A > 0 (> 0)"),
            Param("tau_neg", 1.05, low=0.0, high=100.0, live=True, doc="gate temperature for A <= 0 (> 0)")],
    check=_check_sapo,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=True,
)
def sapo(inp: LossInputs, tau_pos: float, tau_neg: float) -> LossOutput:
    """L_t = -f(r_t) A_t, f(r) = (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos if A_t > 0 else tau_neg.

    Gradient w.r.t. logp: -4 s (1 - s) r A_t with s = sigmoid(tau (r - 1)); never exactly zero.
    """
    adv = inp.advantages  # [B, T]
    tau = torch.where(adv > 0, adv.new_tensor(tau_pos), adv.new_tensor(tau_neg))  # [B, T]
    gate = torch.sigmoid(tau * (inp.ratio - 1.0)) * (4.0 / tau)  # [B, T]
    return LossOutput(-gate * adv)  # [B, T]
