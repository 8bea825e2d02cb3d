"""The ``correction/`` metrics of a behaviour correction (``corrections.apply_correction``), no graph.

Over valid tokens; sequences = rows with >= 1 valid token. Before the correction (the raw behaviour
ratio rho, docs/design.md, "The reweight contract"): ``rho_mean`` / ``rho_max`` / ``rho_q95`` (token
rho), ``rho_seq_mean`` / ``rho_seq_max`` / ``rho_seq_q95`` (sequence product ratio) and
``rho_geo_mean`` (mean over sequences of the geometric-mean ratio exp(mean_t log rho)). After it:
``weight_mean`` (the applied weight keep * w) and ``ess`` = (sum a)^2 / (N sum a^2) of the applied
weights a (0 when every token is rejected). What it did: ``truncated_frac`` and
``truncated_seq_frac`` (weight cut down to the cap C), ``truncated_low_frac`` (weight raised to
``clip_low``), ``rejected_frac`` and ``rejected_seq_frac`` (rows with any rejected token) and
``changed_frac`` (valid tokens whose weight is not exactly 1: rejected, truncated either way, or
reweighted; the same number ``policy_loss`` reports as ``offpolicy/correction_changed_frac``).
``decoupled`` is 1.0 / 0.0. Statistics are NaN when there is no valid token; fractions are 0.
"""

from __future__ import annotations

from typing import Any

import torch

from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP, LossInputs

_NAN = float("nan")
_STATISTICS = ("weight_mean", "ess", "rho_mean", "rho_max", "rho_q95", "rho_seq_mean", "rho_seq_max", "rho_seq_q95",
               "rho_geo_mean")


def _quantile95(x: torch.Tensor) -> torch.Tensor | float:
    return torch.quantile(x, 0.95) if x.numel() else _NAN


def correction_metrics(inp: LossInputs, log_rho: torch.Tensor, w: torch.Tensor, truncated: torch.Tensor,
                       truncated_low: torch.Tensor, keep: torch.Tensor, changed: torch.Tensor,
                       decoupled: bool) -> dict[str, Any]:
    """The ``correction/`` metrics (module docstring) from log rho, w, the truncation and keep masks [B, T]."""
    valid = inp.mask  # [B, T]
    rows = inp.seq_lengths > 0  # [B]
    n_rows = int(rows.sum())

    def row_frac(cond: torch.Tensor) -> torch.Tensor | float:
        return (cond & valid).any(dim=-1)[rows].double().mean() if n_rows else 0.0

    rejected = valid & ~keep  # [B, T]
    applied = torch.where(keep, w, w.new_zeros(())).double()[valid]  # [N]
    out: dict[str, Any] = {
        "correction/decoupled": 1.0 if decoupled else 0.0,
        "correction/truncated_frac": inp.frac(truncated),
        "correction/truncated_seq_frac": row_frac(truncated),
        "correction/truncated_low_frac": inp.frac(truncated_low),
        "correction/rejected_frac": inp.frac(rejected),
        "correction/rejected_seq_frac": row_frac(rejected),
        "correction/changed_frac": inp.frac(changed),
    }
    if applied.numel() == 0:
        out.update({f"correction/{k}": _NAN for k in _STATISTICS})
        return out
    sq = (applied * applied).sum()
    out["correction/weight_mean"] = applied.mean()
    out["correction/ess"] = applied.sum() ** 2 / (applied.numel() * sq) if float(sq) > 0 else 0.0
    rho = log_rho.double()[valid].clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [N]
    rho_seq = inp.seq_sum(log_rho).double()[rows].clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [B']
    rho_geo = inp.seq_mean(log_rho).double()[rows].clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [B']
    out.update({
        "correction/rho_mean": rho.mean(), "correction/rho_max": rho.max(), "correction/rho_q95": _quantile95(rho),
        "correction/rho_seq_mean": rho_seq.mean(), "correction/rho_seq_max": rho_seq.max(),
        "correction/rho_seq_q95": _quantile95(rho_seq), "correction/rho_geo_mean": rho_geo.mean(),
    })
    return out


__all__ = ["correction_metrics"]
