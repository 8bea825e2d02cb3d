"""What every objective receives (``LossInputs``) and returns (``LossOutput``), and ``make_inputs``,
which validates the tensors and sanitises them at padded positions.

Ratio: r = exp(clamp(logprobs - anchor, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) as in verl, so nothing
overflows; the clamp also stops the gradient beyond |log r| = 20. The anchor is
``behavior_logprobs`` (two-policy "bypass" mode) or ``prox_logprobs`` when given (AReaL decoupled
PPO, arXiv:2505.24298; docs/design.md, "The reweight contract").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import WorkbenchError

LOG_RATIO_CLAMP = 20.0
"""Bound on |log r| everywhere a log-ratio is exponentiated (ratios, weights, KL estimators)."""


@dataclass
class LossInputs:
    """What every objective receives; all tensors are sanitised at padded positions.

    At positions with ``mask`` False: logprobs and anchor are 0, log_ratio 0, ratio 1 and
    advantages 0, so any formula stays finite there (and gets exactly zero gradient).
    """

    logprobs: torch.Tensor  # [B, T] current policy log-probs (carries the graph; float32 or float64)
    anchor_logprobs: torch.Tensor  # [B, T] behaviour (or proximal) log-probs, detached
    log_ratio: torch.Tensor  # [B, T] clamp(logprobs - anchor, -20, 20) (graph)
    ratio: torch.Tensor  # [B, T] exp(log_ratio) (graph)
    advantages: torch.Tensor  # [B, T] broadcast from [B] if needed, detached
    mask: torch.Tensor  # [B, T] bool, True = real token
    seq_advantages: torch.Tensor  # [B] mean advantage over each row's valid tokens (0 if none)
    seq_lengths: torch.Tensor  # [B] number of valid tokens per row (float, compute dtype)
    context: dict[str, Any] = field(default_factory=dict)  # policy_loss(..., context=...); see context.py

    @property
    def n_valid(self) -> torch.Tensor:
        """Number of valid tokens (0-d tensor)."""
        return self.mask.sum()

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x [B, T]`` over each row's valid tokens -> [B]."""
        return torch.where(self.mask, x, x.new_zeros(())).sum(dim=-1)  # [B]

    def seq_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``x [B, T]`` over each row's valid tokens -> [B] (0 for an empty row)."""
        return self.seq_sum(x) / self.seq_lengths.clamp(min=1)  # [B]

    def frac(self, cond: torch.Tensor) -> torch.Tensor:
        """Fraction of valid tokens where ``cond [B, T]`` holds (0 when there are none)."""
        return (cond & self.mask).sum().double() / self.n_valid.clamp(min=1).double()

    def clip_fractions(self, low: torch.Tensor, high: torch.Tensor, dual: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """The clip metrics every clipping objective reports, from its [B, T] clip masks:
        ``offpolicy/clipfrac_low`` (clipped at the lower bound), ``offpolicy/clipfrac_high`` (upper),
        ``offpolicy/clipfrac_dual`` (dual clip, when given) and ``offpolicy/clipfrac`` (any of them)."""
        out = {"offpolicy/clipfrac_low": self.frac(low), "offpolicy/clipfrac_high": self.frac(high)}
        if dual is None:
            out["offpolicy/clipfrac"] = self.frac(low | high)
        else:
            out["offpolicy/clipfrac_dual"] = self.frac(dual)
            out["offpolicy/clipfrac"] = self.frac(low | high | dual)
        return out


@dataclass
class LossOutput:
    """An objective's result: the per-token loss and its own metrics (tensors or floats)."""

    per_token_loss: torch.Tensor  # [B, T]
    metrics: dict[str, Any] = field(default_factory=dict)
    extra_loss: torch.Tensor | None = None  # scalar added after aggregation (e.g. CHORD's SFT term)


def _check_tensor(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise WorkbenchError(f"policy_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_finite(name: str, x: torch.Tensor, valid: torch.Tensor) -> None:
    bad = valid & ~torch.isfinite(x)  # [B, T]
    if bool(bad.any()):
        i, t = (int(v) for v in bad.nonzero()[0])
        raise WorkbenchError(
            f"policy_loss: {name} has a non-finite value ({float(x[i, t])}) at valid token [{i}, {t}] "
            f"(response_mask=1); NaN/inf is only allowed at padded positions"
        )


def make_inputs(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    prox_logprobs: torch.Tensor | None = None,
) -> LossInputs:
    """Validate the tensors and build the sanitised ``LossInputs`` (see ``policy_loss``)."""
    logprobs = _check_tensor("logprobs", logprobs)
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise WorkbenchError(
            f"policy_loss: logprobs must be a floating [B, T] tensor, got shape {tuple(logprobs.shape)} "
            f"dtype {logprobs.dtype}"
        )
    shape = tuple(logprobs.shape)
    named = [("behavior_logprobs", behavior_logprobs), ("response_mask", response_mask)]
    if prox_logprobs is not None:
        named.append(("prox_logprobs", prox_logprobs))
    for name, x in named:
        if tuple(_check_tensor(name, x).shape) != shape:
            raise WorkbenchError(
                f"policy_loss: {name} has shape {tuple(x.shape)} but logprobs has shape {shape}; "
                f"all [B, T] inputs must match"
            )
    advantages = _check_tensor("advantages", advantages)
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise WorkbenchError(
            f"policy_loss: advantages has shape {tuple(advantages.shape)}; expected [B]={shape[:1]} or "
            f"[B, T]={shape} to match logprobs"
        )
    if response_mask.dtype == torch.bool:
        valid = response_mask  # [B, T]
    else:
        if not bool(((response_mask == 0) | (response_mask == 1)).all()):
            raise WorkbenchError("policy_loss: response_mask must contain only 0 and 1 (or be bool)")
        valid = response_mask != 0  # [B, T]
    # Compute in at least float32: exp(20) overflows float16, and bf16 ratios are too coarse.
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    logprobs = logprobs.to(dtype)  # [B, T] (a no-op unless half precision; gradient flows through)
    behavior_logprobs = behavior_logprobs.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand(shape)  # [B, T]
    _check_finite("logprobs", logprobs.detach(), valid)
    _check_finite("behavior_logprobs", behavior_logprobs, valid)
    _check_finite("advantages", adv, valid)
    if prox_logprobs is not None:
        anchor = prox_logprobs.detach().to(dtype)  # [B, T]
        _check_finite("prox_logprobs", anchor, valid)
    else:
        anchor = behavior_logprobs  # [B, T]
    zero = logprobs.new_zeros(())
    lp = torch.where(valid, logprobs, zero)  # [B, T]
    anchor = torch.where(valid, anchor, zero)  # [B, T]
    adv = torch.where(valid, adv, zero)  # [B, T]
    log_ratio = (lp - anchor).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    lengths = valid.sum(dim=-1).to(dtype)  # [B]
    seq_adv = adv.sum(dim=-1) / lengths.clamp(min=1)  # [B]
    return LossInputs(lp, anchor, log_ratio, ratio, adv, valid, seq_adv, lengths)


__all__ = ["LOG_RATIO_CLAMP", "LossInputs", "LossOutput", "make_inputs"]
