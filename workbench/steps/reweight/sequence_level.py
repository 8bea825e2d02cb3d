"""Sequence-level ratio objectives: GSPO, GSPO-token, GMPO (geo_mean).

Formulas (each with its paper):

- ``gspo`` (Zheng et al. 2025, arXiv:2507.18071): s_i = exp((1/|y_i|) sum_t log r_t) over the
  row's valid tokens; L_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i), broadcast
  to every token of the row. Defaults 3e-4 / 4e-4, aggregation ``seq-mean-token-mean`` (which
  makes the loss (1/B') sum_i L_i). Gradient of L_i w.r.t. logp_t: -s_i A_i / |y_i| if row i is
  unclipped, else 0.
- ``gspo_token``: s_{i,t} = sg[s_i] pi(y_t) / sg[pi(y_t)] (value s_i, gradient as a token ratio);
  L_t = -min(s_{i,t} A_t, clip(s_{i,t}) A_t). Allows token advantages with sequence-level clipping.
  Gradient w.r.t. logp_t: -s_i A_t unless clipped.
- ``geo_mean`` (GMPO, Zhao et al. 2025, arXiv:2507.20673): clip each token's log-ratio in log space
  to [-clip_low, clip_high], pessimistically by the sign of A (A > 0: min(log r, clipped);
  A < 0: max(log r, clipped)), take g_i = exp(mean_t of that), L_i = -A_i g_i broadcast over the
  row. Defaults 0.4 / 0.4 (ratio range (e^-0.4, e^0.4)). Gradient w.r.t. logp_t: -g_i A_i / |y_i|
  for unclipped tokens, 0 for clipped ones.

Sequence advantage A_i (``LossInputs.seq_advantages``): A itself when advantages are [B]; the mean
over the row's valid tokens when they are [B, T] (the first valid token would silently ignore the
rest). ``gspo_token`` uses the token advantages A_t instead.

Clip metrics are token-weighted (fraction of valid tokens in clipped rows, as GSPO reports "clipped
tokens"): ``offpolicy/clipfrac_low`` (A < 0, s < 1 - clip_low), ``offpolicy/clipfrac_high``
(A > 0, s > 1 + clip_high), ``offpolicy/clipfrac``. geo_mean clips per token.
Per-token log-ratios are already clamped to +-20, so log s_i is too (verl clamps log s <= 10).

Left out: routing replay (MoE), GSPO's length normalisation variants.
"""

from __future__ import annotations

import torch

from workbench.steps.reweight.core import Param, register_objective

from workbench.steps.reweight.inputs import LossInputs, LossOutput
from workbench.steps.reweight.ppo_family import clipped_surrogate

_GSPO_PARAMS = [
    Param("clip_low", 3e-4, low=0.0, high=1.0, live=True,
          doc="lower clip on the sequence ratio: s < 1 - clip_low stops negative-advantage rows"),
    Param("clip_high", 4e-4, low=0.0, high=None, live=True,
          doc="upper clip on the sequence ratio: s > 1 + clip_high stops positive-advantage rows"),
]
_GSPO_PAPER = "Zheng et al. 2025 (Qwen), Group Sequence Policy Optimization, arXiv:2507.18071"


def _broadcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-1).expand_as(like)  # [B] -> [B, T]


@register_objective(
    "gspo",
    paper=_GSPO_PAPER,
    summary="PPO clip on the length-normalised sequence ratio exp(mean_t log r_t); one loss per response",
    params=_GSPO_PARAMS,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=True,
)
def gspo(inp: LossInputs, clip_low: float, clip_high: float) -> LossOutput:
    """L_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i), s_i = exp(mean_t log r_t)."""
    s = torch.exp(inp.seq_mean(inp.log_ratio))  # [B]
    loss, low, high = clipped_surrogate(s, inp.seq_advantages, clip_low, clip_high)  # [B] x3
    like = inp.log_ratio
    low, high = _broadcast(low, like), _broadcast(high, like)  # [B, T]
    return LossOutput(_broadcast(loss, like), {  # [B, T]
        **inp.clip_fractions(low, high),
        "gspo/seq_ratio_mean": _row_mean(s.detach(), inp),
    })


@register_objective(
    "gspo_token",
    paper=_GSPO_PAPER,
    summary="GSPO-token: sequence-level clipping with token advantages, ratio sg[s_i] pi_t / sg[pi_t]",
    params=_GSPO_PARAMS,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=True,
)
def gspo_token(inp: LossInputs, clip_low: float, clip_high: float) -> LossOutput:
    """L_t = -min(s_{i,t} A_t, clip(s_{i,t}) A_t), s_{i,t} = sg[s_i] exp(log r_t - sg[log r_t])."""
    lr = inp.log_ratio  # [B, T]
    log_s = inp.seq_mean(lr.detach())  # [B]
    s_tok = torch.exp(_broadcast(log_s, lr) + lr - lr.detach())  # [B, T], value s_i
    loss, low, high = clipped_surrogate(s_tok, inp.advantages, clip_low, clip_high)
    return LossOutput(loss, {
        **inp.clip_fractions(low, high),
        "gspo/seq_ratio_mean": _row_mean(torch.exp(log_s), inp),
    })


@register_objective(
    "geo_mean",
    paper="Zhao et al. 2025, Geometric-Mean Policy Optimization (GMPO), arXiv:2507.20673",
    summary="GMPO: geometric mean of per-token ratios clipped in log space, times the sequence advantage",
    params=[Param("clip_low", 0.4, low=0.0, high=None, live=True,
                  doc="log-space lower clip: log r < -clip_low stops negative-advantage tokens"),
            Param("clip_high", 0.4, low=0.0, high=None, live=True,
                  doc="log-space upper clip: log r > clip_high stops positive-advantage tokens")],
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=True,
)
def geo_mean(inp: LossInputs, clip_low: float, clip_high: float) -> LossOutput:
    """L_i = -A_i exp(mean_t c_t), c_t = min(l_t, clip(l_t)) if A_i > 0 else max(l_t, clip(l_t)), l = log r."""
    lr = inp.log_ratio  # [B, T]
    adv = _broadcast(inp.seq_advantages, lr)  # [B, T]
    clipped = lr.clamp(-clip_low, clip_high)  # [B, T]
    pessimistic = torch.where(adv > 0, torch.minimum(lr, clipped), torch.maximum(lr, clipped))  # [B, T]
    g = torch.exp(inp.seq_mean(pessimistic))  # [B]
    loss = -inp.seq_advantages * g  # [B]
    with torch.no_grad():
        low = (adv < 0) & (lr < -clip_low)  # [B, T]
        high = (adv > 0) & (lr > clip_high)  # [B, T]
    return LossOutput(_broadcast(loss, lr), {  # [B, T]
        **inp.clip_fractions(low, high),
    })


def _row_mean(x: torch.Tensor, inp: LossInputs) -> torch.Tensor:
    """Mean of a per-row value ``x [B]`` over rows with at least one valid token (NaN if none)."""
    rows = inp.seq_lengths > 0  # [B]
    return x[rows].mean() if bool(rows.any()) else x.new_tensor(float("nan"))
