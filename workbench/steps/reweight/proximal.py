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

Per token or per sequence: AReaL stores a version per token. With ``staleness_mode="fixed"`` a whole
completion is sampled by one version of the weights, so ``Rollouts.policy_version`` [B] is exact and
per-token alpha equals per-sequence alpha; with ``staleness_mode="async"`` and partial rollouts a
completion continues under newer weights after each update and ``Rollouts.token_version`` [B, T] holds
each token's version, which the update passes here instead (``steps/async_pipeline.py``).
``loglinear_alpha`` accepts either shape ([B] or [B, T]).
AReaL gives alpha = 0 to tokens with a negative version (prompt tokens); so does this.

``proximal="reuse_train_logp"``: AReaL's ``prox_logp_method="reuse_train_logp"`` (inclusionAI/AReaL,
``areal/trainer/ppo/actor.py``: ``prox_logp_gt = logprobs.detach()`` inside the loss; the help text of
``PPOActorConfig.prox_logp_method``: "Reuse training forward-pass logprobs as the proximal logp (skip
the extra forward; requires ppo_n_minibatches=1)"). log pi_prox is the training forward's own log-probs,
detached, so pi_theta / pi_prox = 1 in value (gradient grad log pi_theta) and the behaviour weight is
pi_theta / mu at the weights being updated. That *is* the proximal policy only while one optimizer step
uses the batch: at update k it equals ``recompute`` (a no-grad forward with the same weights before the
step) without the extra forward pass, up to float rounding. With several updates per batch (epochs or
minibatches) the weights move between them, the training forward is no longer the policy at the start
of the batch, and the ratio would stay 1, so the trust region would silently vanish: AReaL forces
``ppo_n_minibatches=1`` with a warning; ``check_reuse_train_logp`` refuses
updates_per_batch * num_minibatches > 1 instead. It also refuses a training forward that is not the
policy's: ALP's perturbed forward (``alp_scale`` > 0) and LoRA dropout > 0 (a random mask per forward).
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError

PROXIMAL_MODES: tuple[str, ...] = ("none", "recompute", "loglinear", "linear", "reuse_train_logp")


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


def check_reuse_train_logp(updates_per_batch: int, num_minibatches: int, alp_scale: float = 0.0,
                           lora_dropout: float = 0.0) -> None:
    """One-line WorkbenchError unless ``proximal="reuse_train_logp"`` is the proximal policy here:
    one optimizer step per batch and a training forward that is the plain policy's (see the module
    docstring)."""
    if updates_per_batch * num_minibatches != 1:
        field, value = (("updates_per_batch", updates_per_batch) if updates_per_batch != 1
                        else ("num_minibatches", num_minibatches))
        raise WorkbenchError(
            f"{field}={value!r} is invalid with proximal=reuse_train_logp: expected updates_per_batch=1 and "
            f"num_minibatches=1 (the training forward is the proximal policy only for one update per batch; "
            f"AReaL requires ppo_n_minibatches=1); use proximal=recompute for reuse")
    if alp_scale:
        raise WorkbenchError(f"alp_scale={alp_scale!r} is invalid with proximal=reuse_train_logp: expected 0 "
                             f"(the perturbed training forward is not the policy; use proximal=recompute)")
    if lora_dropout:
        raise WorkbenchError(f"lora.dropout={lora_dropout!r} is invalid with proximal=reuse_train_logp: expected 0 "
                             f"(a dropout forward is not the policy; use proximal=recompute)")


def resolve_proximal(
    proximal: str, logprobs: torch.Tensor, prox: torch.Tensor | None, behavior_logprobs: torch.Tensor,
    behavior_version: torch.Tensor, policy_version: int | None, mask: torch.Tensor,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """(log pi_prox [B, T] or None, metrics) after the training forward ``logprobs`` [B, T].

    ``prox`` is what the update already has (the batch's, or ``recompute``'s forward): kept for
    ``none`` / ``recompute``; ``loglinear`` / ``linear`` replace it by AReaL's interpolation (needs
    ``policy_version``, the version at the start of the update); ``reuse_train_logp`` by
    ``logprobs`` detached, 0 at padded positions.
    """
    if proximal in ("loglinear", "linear"):
        if policy_version is None:
            raise WorkbenchError(f"proximal={proximal!r} needs policy_version (the version at the start of the update)")
        out, alpha = loglinear_proximal(logprobs, behavior_logprobs, behavior_version, policy_version, mask,
                                        mode=proximal)  # [B, T], [B]
        return out, {"correction/prox_alpha_mean": float(alpha.mean()) if alpha.numel() else float("nan")}
    if proximal == "reuse_train_logp":
        lp = logprobs.detach()  # [B, T]: the training forward's own log-probs, no graph
        return torch.where(mask.bool(), lp, lp.new_zeros(())), {}
    if proximal not in ("none", "recompute"):
        raise WorkbenchError(f"proximal={proximal!r} is invalid: expected {' | '.join(PROXIMAL_MODES)}")
    return prox, {}


__all__ = ["PROXIMAL_MODES", "check_reuse_train_logp", "loglinear_alpha", "loglinear_proximal", "resolve_proximal"]
