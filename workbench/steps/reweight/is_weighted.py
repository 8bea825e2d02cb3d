"""Stop-gradient weighted policy gradients: TIS, CISPO, TOPR.

All three are REINFORCE with a detached, bounded importance weight: L_t = -sg[w_t] A_t logp_t, so
every token keeps a gradient of -w_t A_t:

- ``tis``: truncated importance sampling, w = min(rho, C) with rho = r_t (``level="token"``) or
  rho = prod_t r_t = exp(sum_t log r_t) broadcast over the row (``level="sequence"``), C = 2.0
  (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training",
  fengyao.notion.site/off-policy-rl; verl ``rollout_is_threshold``).
- ``cispo``: w = clip(r_t, 1 - eps_low, 1 + eps_high) (MiniMax-M1, arXiv:2506.13585). Default
  eps_low = 1.0, i.e. lower bound 0 = no lower bound (r > 0 always; any eps_low >= 1 is the same,
  verl's example uses 10); eps_high = 0.2.
- ``topr``: tapered off-policy REINFORCE (Le Roux et al. 2025, arXiv:2503.14286). w = the sequence
  ratio pi(y)/mu(y) truncated to [pos_low, pos_high] for A >= 0 and [neg_low, neg_high] for A < 0.
  Canonical TOPR: positives [1, 1] (weight 1: SFT on positives), negatives [0, 1]. ``seq_ratio``
  "product" is the paper's exp(sum_t log r_t); "geo_mean" is the length-normalised
  exp(mean_t log r_t) of the verl/ROLL variants. The paper uses A = R (+1/-1, no baseline); here
  A is whatever the advantage estimator produced.

``truncated_is_weight`` is the reusable weight computation (``corrections`` applies it as TIS/MIS
on top of any objective). Sequence log-weights are safety-clamped to +-20 (verl clamps
all weights to exp(+-20)) before exponentiation.

``offpolicy/truncated_frac`` = fraction of valid tokens whose weight differs from the raw ratio
because of truncation (for TOPR, a side whose bounds are equal uses a constant weight by design
and is not counted). These objectives never zero a gradient: clipfrac = masked_frac = 0.

Left out here: MIS / rejection (masking) variants, batch renormalisation of the weights and the
decoupled three-policy form (rho = pi_prox / mu): ``corrections`` provides them on top of any
objective (``policy_loss(..., correction=...)``).
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.core import KeyMetric, Param, register_objective
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP, LossInputs, LossOutput


def truncated_is_weight(
    log_ratio: torch.Tensor, mask: torch.Tensor, *, level: str = "token", cap: float | None = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached truncated IS weight min(rho, cap) -> (weight [B, T], truncated [B, T] bool).

    ``log_ratio [B, T]`` is log rho per token (any finite value at masked positions is ignored),
    ``mask [B, T]`` bool. ``level="token"``: rho_t = exp(log_ratio_t); ``level="sequence"``:
    rho_i = exp(sum_t log_ratio_t) over the row's valid tokens, broadcast to every token of the
    row. ``cap=None`` means no truncation. Computed in log space; log rho is clamped to +-20.
    Masked positions get weight 0 and truncated False.
    """
    lr = torch.where(mask, log_ratio.detach(), log_ratio.new_zeros(()))  # [B, T]
    if level == "token":
        log_w = lr  # [B, T]
    elif level == "sequence":
        log_w = lr.sum(dim=-1, keepdim=True).expand_as(lr)  # [B, T]
    else:
        raise WorkbenchError(f"level={level!r} is invalid: expected one of token, sequence")
    log_w = log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    if cap is None:
        truncated = torch.zeros_like(mask)  # [B, T]
    else:
        truncated = mask & (log_w > math.log(cap))  # [B, T]
        log_w = log_w.clamp(max=math.log(cap))
    weight = torch.where(mask, torch.exp(log_w), log_w.new_zeros(()))  # [B, T]
    return weight, truncated


@register_objective(
    "tis",
    paper="Yao et al. 2025, Your Efficient RL Framework Secretly Brings You Off-Policy RL Training "
          "(fengyao.notion.site/off-policy-rl); verl rollout correction",
    summary="REINFORCE with a detached truncated IS weight min(rho, C), per token or per sequence",
    params=[Param("cap", 2.0, low=1.0, high=None, live=True, doc="truncation threshold C (>= 1)"),
            Param("level", "token", live=False, choices=("token", "sequence"),
                  doc="token: rho = r_t; sequence: rho = prod_t r_t broadcast over the response")],
    reduces_to_reinforce=True,
    key_metric=KeyMetric(("offpolicy/truncated_frac",), title="tokens with a truncated weight"),
)
def tis(inp: LossInputs, cap: float, level: str) -> LossOutput:
    """L_t = -sg[min(rho, C)] A_t logp_t. Gradient w.r.t. logp: -min(rho, C) A_t."""
    weight, truncated = truncated_is_weight(inp.log_ratio, inp.mask, level=level, cap=cap)
    return LossOutput(-weight * inp.advantages * inp.logprobs, {  # [B, T]
        "offpolicy/truncated_frac": inp.frac(truncated),
    })


@register_objective(
    "cispo",
    paper="MiniMax 2025, MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention "
          "(CISPO), arXiv:2506.13585",
    summary="REINFORCE with a detached clipped IS weight clip(r, 1-eps_low, 1+eps_high); no token loses its gradient",
    params=[Param("eps_low", 1.0, low=0.0, high=None, live=True,
                  doc="lower bound 1 - eps_low on the weight; >= 1 means no lower bound (default)"),
            Param("eps_high", 0.2, low=0.0, high=None, live=True, doc="upper bound 1 + eps_high on the weight")],
    reduces_to_reinforce=True,
    key_metric=KeyMetric(("offpolicy/truncated_frac",), title="tokens with a truncated weight"),
)
def cispo(inp: LossInputs, eps_low: float, eps_high: float) -> LossOutput:
    """L_t = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] A_t logp_t. Gradient: -clip(r_t) A_t."""
    r = inp.ratio.detach()  # [B, T]
    lo, hi = max(1.0 - eps_low, 0.0), 1.0 + eps_high
    weight = r.clamp(lo, hi)  # [B, T]
    truncated = (r > hi) | (r < lo)  # [B, T]
    return LossOutput(-weight * inp.advantages * inp.logprobs, {  # [B, T]
        "offpolicy/truncated_frac": inp.frac(truncated),
    })


def _check_topr(params: dict) -> None:
    for side in ("pos", "neg"):
        lo, hi = params[f"{side}_low"], params[f"{side}_high"]
        if lo > hi:
            raise WorkbenchError(f"topr.{side}_low={lo!r} is invalid: expected <= {side}_high={hi!r}")


@register_objective(
    "topr",
    paper="Le Roux, Bellemare et al. 2025, Tapered Off-Policy REINFORCE, arXiv:2503.14286",
    summary="SFT-like weight 1 on positive sequences, truncated sequence IS weight [0, 1] on negatives",
    params=[Param("pos_low", 1.0, low=0.0, high=None, live=True, doc="lower truncation of the A >= 0 weight"),
            Param("pos_high", 1.0, low=0.0, high=None, live=True, doc="upper truncation of the A >= 0 weight"),
            Param("neg_low", 0.0, low=0.0, high=None, live=True,
                  doc="lower truncation of the A < 0 weight (> 0 degenerates like REINFORCE)"),
            Param("neg_high", 1.0, low=0.0, high=None, live=True, doc="upper truncation of the A < 0 weight"),
            Param("seq_ratio", "product", live=False, choices=("product", "geo_mean"),
                  doc="product: pi(y)/mu(y) (paper); geo_mean: exp(mean_t log r_t) (verl/ROLL variant)")],
    check=_check_topr,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=True,
    key_metric=KeyMetric(("offpolicy/truncated_frac",), title="tokens with a truncated weight"),
)
def topr(inp: LossInputs, pos_low: float, pos_high: float, neg_low: float, neg_high: float,
         seq_ratio: str) -> LossOutput:
    """L_t = -sg[w_i] A_t logp_t, w_i = [rho_i]_{a}^{b} with (a, b) = pos or neg bounds by sign of A_t.

    rho_i = exp(sum_t log r_t) ("product") or exp(mean_t log r_t) ("geo_mean"). Gradient: -w_i A_t.
    """
    lr = inp.log_ratio.detach()  # [B, T]
    log_rho = inp.seq_sum(lr) if seq_ratio == "product" else inp.seq_mean(lr)  # [B]
    rho = torch.exp(log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).unsqueeze(-1)  # [B, 1]
    pos = inp.advantages >= 0  # [B, T]
    lo = torch.where(pos, lr.new_tensor(pos_low), lr.new_tensor(neg_low))  # [B, T]
    hi = torch.where(pos, lr.new_tensor(pos_high), lr.new_tensor(neg_high))  # [B, T]
    weight = torch.minimum(torch.maximum(rho, lo), hi)  # [B, T]
    tapered = (pos & (pos_low < pos_high)) | (~pos & (neg_low < neg_high))  # [B, T]
    truncated = tapered & ((rho < lo) | (rho > hi))  # [B, T]
    return LossOutput(-weight * inp.advantages * inp.logprobs, {  # [B, T]
        "offpolicy/truncated_frac": inp.frac(truncated),
    })
