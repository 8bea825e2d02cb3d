"""The proximal policy of decoupled PPO without a forward pass: AReaL's log-linear (and linear) approximation.

Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language
Reasoning" (arXiv:2505.24298), decoupled PPO with ``prox_logp_method="loglinear"``:

    log pi_prox = log mu + alpha (log pi_theta - log mu)        (detached)
    alpha = (v_prox - v_behave) / (v_theta - v_behave), clamped to [0, 1]; 0 where v_theta = v_behave

with AReaL's version numbering: v_theta = the version being updated (the weights this update starts
from, ``current_version`` = workbench's ``policy_version`` k at update k) and v_prox = v_theta - 1.
For staleness s = k - v_behave that is alpha = (s - 1) / s for s >= 1 and alpha = 0 for s <= 1: on
data one version old (or fresh) the proximal policy *is* the behaviour policy, the behaviour weight
pi_prox / mu is 1 and the objective is plain PPO against mu; s = 3 gives 2/3.

What it approximates: the policy one version before the weights being trained, interpolated on the
straight line between mu (version v_behave) and pi_theta (version k) in log space. It is exact when
each token's log-prob moves linearly with the version, and it is *not* workbench's
``proximal="recompute"`` (a forward pass with the weights at the start of the batch's first update,
version k), which is one version later (tests/test_reweight_exactness.py shows both on synthetic
log-probs).

Per token or per sequence: AReaL stores a version per token; workbench's ``Rollouts.policy_version``
is per sequence, because a whole completion is sampled by one version of the weights, so per-token
alpha equals per-sequence alpha here. ``loglinear_alpha`` accepts either shape ([B] or [B, T]).
AReaL gives alpha = 0 to tokens with a negative version (prompt tokens); so does this.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError

PROXIMAL_MODES: tuple[str, ...] = ("none", "recompute", "loglinear", "linear")


def loglinear_alpha(behavior_version: torch.Tensor, current_version: int) -> torch.Tensor:
    """alpha (float64, the shape of ``behavior_version``: [B] or [B, T]) of AReaL's approximation.

    ``current_version`` is v_theta, the version of the weights this update trains (the loop's
    ``policy_version`` k); v_prox = v_theta - 1. alpha = (v_prox - v_b) / (v_theta - v_b) clamped to
    [0, 1], and 0 where v_theta - v_b <= 0 (fresh data) or v_b < 0.
    """
    vb = behavior_version.detach().to(torch.float64)  # [B] or [B, T]
    v_theta = float(current_version)
    v_prox = v_theta - 1.0
    diff = v_theta - vb  # [B] or [B, T], the staleness s
    usable = (diff > 0) & (vb >= 0)
    alpha = torch.where(usable, (v_prox - vb) / torch.where(usable, diff, torch.ones_like(diff)),
                        torch.zeros_like(vb))  # [B] or [B, T]
    return alpha.clamp(0.0, 1.0)


def loglinear_proximal(
    logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, behavior_version: torch.Tensor, current_version: int,
    mask: torch.Tensor | None = None, mode: str = "loglinear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_prox [B, T] detached, alpha [B] or [B, T]): log mu + alpha (log pi_theta - log mu).

    ``mode="linear"`` is AReaL's ``prox_logp_method="linear"``: the same alpha, the interpolation in
    probability space, pi_prox = (1 - alpha) mu + alpha pi_theta, i.e. log pi_prox =
    logaddexp(log(1 - alpha) + log mu, log alpha + log pi_theta) (alpha 0: mu exactly; 1: pi_theta).
    By concavity of log it lies at or above the log-linear point, so its behaviour weight
    pi_prox / mu is the larger of the two. ``behavior_version`` is [B] (one version per sequence)
    or [B, T] (per token). Padded positions (``mask`` 0, when given) are 0.
    """
    lp = logprobs.detach()  # [B, T]
    beh = behavior_logprobs.detach().to(lp.dtype)  # [B, T]
    shape = tuple(behavior_version.shape)
    if shape not in (tuple(lp.shape[:1]), tuple(lp.shape)):
        raise WorkbenchError(f"behavior_version has shape {shape}: expected [B]={tuple(lp.shape[:1])} "
                             f"or [B, T]={tuple(lp.shape)} to match the log-probs")
    alpha = loglinear_alpha(behavior_version, current_version)  # [B] or [B, T]
    a = alpha.to(lp.dtype)
    a = a.unsqueeze(-1) if a.dim() == 1 else a  # [B, 1] or [B, T]
    if mode == "linear":
        prox = torch.logaddexp(torch.log1p(-a) + beh, torch.log(a) + lp)  # [B, T]; log 0 = -inf drops a side
    elif mode == "loglinear":
        prox = beh + a * (lp - beh)  # [B, T]
    else:
        raise WorkbenchError(f"mode={mode!r} is invalid: expected loglinear or linear")
    if mask is not None:
        prox = torch.where(mask.bool(), prox, prox.new_zeros(()))
    return prox, alpha


__all__ = ["PROXIMAL_MODES", "loglinear_alpha", "loglinear_proximal"]
