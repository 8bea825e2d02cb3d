"""Seed-paper advantage estimators beyond the group baselines of ``workbench.steps.score``: CAPO.

``capo`` (Calibration-Aware Policy Optimization; Wang, Lou, Wu, Wen, Zhang 2026, "Calibration-Aware Policy
Optimization for Reasoning LLMs", arXiv:2604.12632). GRPO's reward-only advantage is the gradient of a
linear, AUC-inconsistent ranking surrogate; CAPO takes the advantage from the logistic AUC surrogate
over the group's (better, worse) pairs instead, so it depends on the responses' confidence:

    L_G = sum over pairs (i, j) of one group with R_i > R_j of log(1 + exp(-(s_i - s_j))),

with s the response's confidence (its mean token log-probability, i.e. minus log perplexity). The
advantage of a response is minus the gradient of its pairs' terms with respect to its own score,
averaged over its kept pairs, times 2:

    A_i = 2 mean_{j: R_j < R_i, kept} sigmoid(s_j - s_i) - 2 mean_{k: R_k > R_i, kept} sigmoid(s_i - s_k).

A correct response that is already more confident than the incorrect ones gets little push, an
incorrect one that is more confident than the correct ones a strong pull down; with equal confidences
(or none) every pair gives sigmoid(0) = 1/2, so with 0/1 rewards A = +1 for correct and -1 for
incorrect responses (the factor 2 puts CAPO on the scale of a sign advantage). Noise masking: a pair
whose worse response is more confident than the better one by more than ``noise_margin`` (nats per
token) is dropped: the better one is likely a lucky guess, or the worse one near-correct reasoning.

Choices, stated plainly: the paper scores confidence with the policy's perplexity and masks noise with a
reference model's perplexity; the score step runs before the update and has no reference model, so
both use the sampler's (behaviour) log-probs, which ``score`` passes as ``confidence`` (mean over the
response's tokens). Pairs are every better x worse pair of a group by exact reward comparison (ties
never pair, so a constant group or a group of one gets 0); with graded rewards a middle response gets
both terms. The mean is over the kept pairs (0 when a response has none). Default margin 1.0 nats per
token (my choice; the paper's threshold is on its reference perplexity).
"""

from __future__ import annotations

import math

import torch

from workbench.errors import bad_value

CAPO_META = dict(
    paper="Wang, Lou, Wu, Wen, Zhang 2026, Calibration-Aware Policy Optimization for Reasoning LLMs (CAPO), "
          "arXiv:2604.12632",
    summary="pairwise logistic-AUC advantage: 2 mean sigmoid(s_worse - s_better) over a response's pairs, "
            "confidence s = mean log-prob; pairs misranked by > noise_margin dropped",
    numbers={"noise_margin": (0.0, 50.0)},
    group_relative=True,
)
"""Registry metadata of ``capo`` (``score`` registers it in ``ADVANTAGES``)."""


def sequence_confidence(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean log-prob over each row's valid tokens (0 for an empty row): minus log perplexity. [B]"""
    valid = mask != 0  # [B, T]
    lp = torch.where(valid, logprobs.double(), torch.zeros((), dtype=torch.float64, device=logprobs.device))
    return lp.sum(-1) / valid.sum(-1).clamp(min=1).double()  # [B]


def capo(rewards: torch.Tensor, group_id: torch.Tensor, *, eps: float = 1e-6,
         confidence: torch.Tensor | None = None, noise_margin: float = 1.0) -> torch.Tensor:
    """CAPO advantages [B] from rewards [B], group ids [B] and per-response confidences [B] (None: all equal).

    ``eps`` is unused (every estimator takes it).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise bad_value("rewards", getattr(rewards, "shape", rewards), "a 1-D tensor [B]")
    if not isinstance(group_id, torch.Tensor) or group_id.shape != rewards.shape:
        raise bad_value("group_id", getattr(group_id, "shape", group_id), f"a tensor of shape {tuple(rewards.shape)}")
    if isinstance(noise_margin, bool) or not isinstance(noise_margin, (int, float)) \
            or not math.isfinite(noise_margin) or not 0.0 <= noise_margin <= 50.0:
        raise bad_value("advantage_params.noise_margin", noise_margin, "a number in [0.0, 50.0] (advantage=capo)")
    r = rewards.double()  # [B]
    if confidence is None:
        s = torch.zeros_like(r)  # [B]
    elif not isinstance(confidence, torch.Tensor) or confidence.shape != rewards.shape \
            or not bool(torch.isfinite(confidence).all()):
        raise bad_value("confidence", getattr(confidence, "shape", confidence),
                        f"a finite tensor of shape {tuple(rewards.shape)} (mean log-prob per response)")
    else:
        s = confidence.detach().to(r.device, torch.float64)  # [B]
    same = group_id[:, None].to(r.device) == group_id[None, :].to(r.device)  # [B, B]
    better = same & (r[:, None] > r[None, :])  # [B, B]: row i's reward beats column j's
    gap = s[None, :] - s[:, None]  # [B, B]: s_j - s_i, how much more confident the worse one is
    kept = (better & ~(gap > noise_margin)).double()  # [B, B]
    push = torch.sigmoid(gap) * kept  # [B, B]: the logistic gradient of each kept pair
    n_up, n_down = kept.sum(1), kept.sum(0)  # [B], [B]
    up = push.sum(1) / n_up.clamp(min=1)  # [B]: mean over the responses i beats
    down = push.sum(0) / n_down.clamp(min=1)  # [B]: mean over the responses that beat i
    return (2.0 * (up - down)).to(rewards.dtype)  # [B]


__all__ = ["CAPO_META", "capo", "sequence_confidence"]
