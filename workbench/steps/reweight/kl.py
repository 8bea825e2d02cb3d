"""The KL penalty to a frozen reference policy: per-token estimators of KL(pi_theta || pi_ref).

On the sampled tokens, with x = log pi_ref - log pi_theta (Schulman 2020, "Approximating KL
Divergence", http://joschu.net/blog/kl-approx.html; the names in brackets are verl's
``kl_penalty`` names):

- ``k1`` = -x = log pi_theta - log pi_ref (``kl``): unbiased, can be negative; gradient
  d k1 / d log pi_theta = 1. *Not clamped*: k1 is linear in the log-probs, so nothing can
  overflow and it is finite whenever the log-probs are; a clamp of x to +-20 would only zero its
  gradient past |x| = 20 (as verl, which does not clamp it either).
- ``k2`` = x^2 / 2 (``mse``): gradient -x, i.e. (log pi_theta - log pi_ref) grad log pi_theta,
  whose expectation under pi_theta is the gradient of KL(pi_theta || pi_ref). Not clamped, for
  the same reason as k1 (a polynomial; finite for finite log-probs).
- ``k3`` = e^x - 1 - x >= 0 (``low_var_kl``): x is clamped to [-20, 20] before the exp and the
  value to [-10, 10], as verl's ``low_var_kl``, so one token adds at most 10; the gradient,
  (1 - pi_ref / pi_theta) per unit of log pi_theta, is 0 wherever a clamp is active. Its
  expectation is the gradient of KL(pi_ref || pi_theta), not of the reverse KL.
- ``k3+`` (``low_var_kl+`` / ``k3+``): straight-through, the value of k3 (clamped as above) with
  the gradient of k2: ``k2 - sg(k2) + sg(k3)``.

``is_corrected`` (TRL ``GRPOConfig.use_bias_correction_kl``; DeepSeek-AI 2025, "DeepSeek-V3.2:
Pushing the Frontier of Open Large Language Models", arXiv:2512.02556): the tokens were sampled by
mu, not pi_theta, so each token's estimate is multiplied by rho = pi_theta / mu, with log rho
clamped to [-20, 20] before the exp. As in TRL, rho carries the gradient (TRL's ``coef_1`` is not
detached): then the gradient of rho * k3 is rho (log pi_theta - log pi_ref) grad log pi_theta, whose
expectation under mu is exactly the gradient of KL(pi_theta || pi_ref). A detached rho would only
reweight k3's gradient, whose expectation is the gradient of the other KL. Within one update
on-policy (mu = pi_theta in value) the corrected value equals the uncorrected one.

Positions with ``mask`` False are set to 0 before anything is computed (zero value, zero gradient).
``kl_term`` reduces the per-token penalty with the run's loss aggregation (``aggregate``, over the
response mask), as verl does (its ``kl_loss`` and entropy use ``loss_agg_mode``); ``update_step``
reduces the entropy bonus the same way.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.aggregate import aggregate
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "k3+")
K3_VALUE_CLAMP = 10.0
"""Bound on the k3 value per token (verl's ``low_var_kl`` clamps it to [-10, 10])."""


def _k3(x: torch.Tensor) -> torch.Tensor:
    xc = x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    return (torch.exp(xc) - 1 - xc).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)  # [B, T]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, *,
               mask: torch.Tensor | None = None, behavior_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on samples; [B, T] -> [B, T] (module docstring).

    ``behavior_logprobs`` (mu), when given, weights each token by rho = pi_theta / mu (the
    IS-corrected estimate). ``mask`` [B, T]: False positions are 0 (any garbage there is ignored).
    """
    if estimator not in KL_ESTIMATORS:
        raise WorkbenchError(f"kl_estimator={estimator!r} is invalid: expected {' | '.join(KL_ESTIMATORS)}")
    ref = ref_logprobs.detach().to(logprobs.dtype)  # [B, T]
    beh = None if behavior_logprobs is None else behavior_logprobs.detach().to(logprobs.dtype)  # [B, T]
    lp = logprobs  # [B, T]
    if mask is not None:
        valid = mask.bool()  # [B, T]
        zero = logprobs.new_zeros(())
        lp = torch.where(valid, lp, zero)
        ref = torch.where(valid, ref, zero)
        beh = None if beh is None else torch.where(valid, beh, zero)
    x = ref - lp  # [B, T] log(pi_ref / pi_theta)
    if estimator == "k1":
        kl = -x  # [B, T]
    elif estimator == "k2":
        kl = 0.5 * x * x  # [B, T]
    elif estimator == "k3":
        kl = _k3(x)  # [B, T]
    else:  # k3+: value of k3, gradient of k2
        k2 = 0.5 * x * x  # [B, T]
        kl = k2 - k2.detach() + _k3(x).detach()  # [B, T]
    if beh is not None:
        rho = torch.exp((lp - beh).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T], carries the gradient
        kl = rho * kl
    if mask is not None:
        kl = torch.where(mask.bool(), kl, kl.new_zeros(()))
    return kl


def kl_term(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str,
            aggregation: str = "token-mean", loss_scale_factor: float | None = None,
            behavior_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """The KL penalty's scalar: ``kl_penalty`` per token [B, T], reduced by ``aggregate`` over ``mask``."""
    per_token = kl_penalty(logprobs, ref_logprobs, estimator, mask=mask, behavior_logprobs=behavior_logprobs)  # [B, T]
    return aggregate(per_token, mask, aggregation, loss_scale_factor)


__all__ = ["K3_VALUE_CLAMP", "KL_ESTIMATORS", "kl_penalty", "kl_term"]
