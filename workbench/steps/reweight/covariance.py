"""Clip-Cov and KL-Cov: act on the few tokens whose covariance of (logp, A) drives entropy down.

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
arXiv:2505.22617 (code ``PRIME-RL/Entropy-Mechanism-of-RL``, merged into verl as
``loss_mode: clip_cov | kl_cov``). Token covariance over the batch's valid tokens:

    Cov_t = (logp_t - mean logp) (A_t - mean A)

``clip_cov``: PPO's surrogate max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A); among the valid
tokens that PPO did not already clip and whose Cov lies strictly inside (cov_lb, cov_ub) = (1, 5),
pick max(1, floor(select_ratio N)) (select_ratio = 2e-4, N = valid tokens) uniformly at random and
zero their loss (value and gradient, as the code's ``corr``). Defaults clip_low = clip_high = 1 are
the paper's Clip-Cov scripts (ratio clip effectively off; verl would use 0.2). Randomness: the
code calls ``torch.randperm`` on the global RNG; here the permutation comes from
``context["generator"]`` when given, else from a generator seeded with a hash of the eligible
tokens' positions and covariances, so the same batch always selects the same tokens (reproducible
runs, exact resume) without touching any global RNG.
Gradient w.r.t. logp: -r A, 0 where PPO clips or the token is selected. Not REINFORCE on-policy
(a selected token loses its gradient even at r = 1).

``kl_cov``: no ratio clip; the top max(1, floor(select_ratio N)) valid tokens by Cov (ties broken by
position) get L_t = -r A + kl_coef |log r|, the others L_t = -r A (select_ratio = 2e-4, verl's
``kl_cov_ratio`` default; the paper uses 2e-3 for 7B and 2e-4 for 32B; kl_coef = ``ppo_kl_coef`` = 1).
Gradient w.r.t. logp: -r A + kl_coef sign(log r) for selected tokens (|x|'s gradient is 0 at x = 0,
so on-policy KL-Cov is REINFORCE).

Metrics: ``clipcov/selected_frac`` / ``klcov/selected_frac`` (selected / valid tokens);
Clip-Cov also reports ``offpolicy/masked_frac`` (= its selected fraction) and PPO's clip fractions.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.context import batch_generator
from workbench.steps.reweight.core import KeyMetric, Param, register_objective
from workbench.steps.reweight.inputs import LossInputs, LossOutput
from workbench.steps.reweight.ppo_family import clipped_surrogate


def token_covariance(inp: LossInputs) -> torch.Tensor:
    """Cov_t = (logp_t - mean logp)(A_t - mean A) over valid tokens -> [B, T] (0 at padding), no graph."""
    lp, adv = inp.logprobs.detach(), inp.advantages
    n = inp.n_valid.clamp(min=1)
    zero = lp.new_zeros(())
    mlp = torch.where(inp.mask, lp, zero).sum() / n
    madv = torch.where(inp.mask, adv, zero).sum() / n
    return torch.where(inp.mask, (lp - mlp) * (adv - madv), zero)


def _n_select(n_valid: int, ratio: float) -> int:
    return max(1, int(ratio * n_valid)) if n_valid else 0


def _check_clip_cov(p: dict) -> None:
    if not p["cov_lb"] < p["cov_ub"]:
        raise WorkbenchError(f"clip_cov.cov_lb={p['cov_lb']!r} is invalid: expected < cov_ub={p['cov_ub']!r}")


@register_objective(
    "clip_cov",
    paper="Cui et al. 2025, The Entropy Mechanism of RL for Reasoning Language Models (Clip-Cov), arXiv:2505.22617",
    summary="PPO surrogate with a few random high-covariance (logp, A) tokens detached to slow entropy collapse",
    params=[
        Param("clip_low", 1.0, low=0.0, high=1.0, live=True, doc="PPO lower clip 1 - clip_low (scripts: 1 = off)"),
        Param("clip_high", 1.0, low=0.0, high=None, live=True, doc="PPO upper clip 1 + clip_high (scripts: 1)"),
        Param("select_ratio", 2e-4, low=0.0, high=1.0, live=True,
              doc="fraction of valid tokens detached (at least 1 when any is eligible)"),
        Param("cov_lb", 1.0, low=None, high=None, live=True, doc="eligible tokens have Cov > cov_lb"),
        Param("cov_ub", 5.0, low=None, high=None, live=True, doc="eligible tokens have Cov < cov_ub"),
    ],
    check=_check_clip_cov,
    default_aggregation="token-mean",
    reduces_to_reinforce=False,
    key_metric=KeyMetric(("clipcov/selected_frac",), "select_ratio", "tokens selected by covariance"),
)
def clip_cov(inp: LossInputs, clip_low: float, clip_high: float, select_ratio: float, cov_lb: float,
             cov_ub: float) -> LossOutput:
    """L_t = max(-r A, -clip(r) A) for unselected tokens, 0 for the selected ones.

    Gradient w.r.t. logp: -r_t A_t, 0 where PPO clips or the token is selected.
    """
    loss, low, high = clipped_surrogate(inp.ratio, inp.advantages, clip_low, clip_high)
    with torch.no_grad():
        cov = token_covariance(inp)  # [B, T]
        eligible = inp.mask & ~(low | high) & (cov > cov_lb) & (cov < cov_ub)  # [B, T]
        idx = eligible.flatten().nonzero().squeeze(-1)  # [n_eligible]
        k = min(_n_select(int(inp.n_valid), select_ratio), idx.numel())
        flat = torch.zeros(inp.mask.numel(), dtype=torch.bool, device=inp.mask.device)  # [B*T]
        if k:
            gen = batch_generator(inp, idx, cov.flatten()[idx])
            pick = torch.randperm(idx.numel(), generator=gen, device=gen.device)[:k].to(idx.device)
            flat[idx[pick]] = True
        selected = flat.view(inp.mask.shape)  # [B, T]
    loss = torch.where(selected, loss.new_zeros(()), loss)  # [B, T]
    frac = inp.frac(selected)
    return LossOutput(loss, {
        "clipcov/selected_frac": frac,
        "offpolicy/masked_frac": frac,
        **inp.clip_fractions(low, high),
    })


@register_objective(
    "kl_cov",
    paper="Cui et al. 2025, The Entropy Mechanism of RL for Reasoning Language Models (KL-Cov), arXiv:2505.22617",
    summary="unclipped -rA plus a |log r| penalty on the top-k tokens by covariance of (logp, A)",
    params=[
        Param("select_ratio", 2e-4, low=0.0, high=1.0, live=True,
              doc="fraction k of valid tokens penalised (at least 1; paper 2e-3 for 7B, 2e-4 for 32B)"),
        Param("kl_coef", 1.0, low=0.0, high=None, live=True, doc="beta on |log r| for the selected tokens"),
    ],
    default_aggregation="token-mean",
    reduces_to_reinforce=True,
    key_metric=KeyMetric(("klcov/selected_frac",), "select_ratio", "tokens selected by covariance"),
)
def kl_cov(inp: LossInputs, select_ratio: float, kl_coef: float) -> LossOutput:
    """L_t = -r_t A_t + kl_coef |log r_t| [t in top-k by Cov]. Gradient: -r A + kl_coef sign(log r) [selected]."""
    with torch.no_grad():
        cov = token_covariance(inp)  # [B, T]
        idx = inp.mask.flatten().nonzero().squeeze(-1)  # [N] valid positions in order
        k = _n_select(idx.numel(), select_ratio)
        flat = torch.zeros(inp.mask.numel(), dtype=torch.bool, device=inp.mask.device)  # [B*T]
        if k:
            order = torch.sort(cov.flatten()[idx], descending=True, stable=True).indices[:k]
            flat[idx[order]] = True
        selected = flat.view(inp.mask.shape)  # [B, T]
    loss = -inp.ratio * inp.advantages  # [B, T]
    loss = torch.where(selected, loss + kl_coef * inp.log_ratio.abs(), loss)
    return LossOutput(loss, {"klcov/selected_frac": inp.frac(selected)})
