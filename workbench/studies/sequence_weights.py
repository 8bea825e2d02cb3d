"""How per-token log-ratio noise becomes sequence weights, as a function of the response length L.

A sequence-level importance weight multiplies its tokens' ratios, w_IS = exp(sum_t x_t) (sequence-level
IS), while GSPO takes the length-normalised geometric mean, w_GSPO = exp((1/L) sum_t x_t) (Zheng et al.
2025, "Group Sequence Policy Optimization", arXiv:2507.18071). For numerics-only noise (the null test,
``workbench.studies.null_test``) the x_t are roughly i.i.d.; with mean m and std sigma, by the central
limit theorem

    log w_IS   ~ N(L m, L sigma^2)      (lognormal weight: its spread grows like sqrt(L))
    log w_GSPO ~ N(m,   sigma^2 / L)    (its spread shrinks like 1 / sqrt(L))

so the q-quantile of the weight is exp(mean + z_q sd) (z_0.05 = -1.6449, the median exp(mean)) and the
share of sequences with weight below c is Phi((log c - mean) / sd). ``analytic_row`` is that curve;
``measured_row`` is the same statistics measured by resampling: each of ``n`` synthetic sequences of
length L draws its L log-ratios with replacement from a pool of real per-token log-ratios (a null-test
batch), which keeps the real tokens' heavy tails and their mean instead of the normal approximation;
``batch_row`` is the real sequences themselves, at their own lengths. Default lengths 4 .. 4096 and
the cut 0.1 are the table ``python -m workbench null-test`` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from workbench.errors import WorkbenchError, bad_value

LENGTHS = (4, 16, 64, 256, 1024, 4096)
"""Response lengths of the default table."""
LOW_WEIGHT = 0.1
"""The cut of ``share_below``: a sequence whose weight is below this has lost 90% of its gradient."""
Z05 = -1.6448536269514722  # Phi^-1(0.05)


@dataclass(frozen=True)
class WeightStats:
    """Distribution of one aggregation's sequence weight at one length."""

    median: float
    """Median of the weight."""
    q05: float
    """5% quantile of the weight."""
    share_below: float
    """Share of sequences whose weight is below ``LOW_WEIGHT`` (or the cut asked for)."""


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def lognormal_stats(mean: float, sd: float, cut: float = LOW_WEIGHT) -> WeightStats:
    """Median, 5% quantile and P(w < cut) of w = exp(N(mean, sd^2)); sd = 0 is the point mass exp(mean)."""
    if sd == 0:
        w = math.exp(mean)
        return WeightStats(w, w, float(w < cut))
    return WeightStats(math.exp(mean), math.exp(mean + Z05 * sd), _phi((math.log(cut) - mean) / sd))


def _check(length: int, sigma: float, mean: float) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise bad_value("length", length, "an int >= 1 (tokens per response)")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < float("inf"):
        raise bad_value("sigma", sigma, "a finite number >= 0 (std of the per-token log-ratio)")
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean):
        raise bad_value("mean", mean, "a finite number (mean of the per-token log-ratio)")


def analytic_row(length: int, sigma: float, mean: float = 0.0, cut: float = LOW_WEIGHT) -> dict[str, WeightStats]:
    """{"is": ..., "gspo": ...} for i.i.d. token log-ratios of ``mean`` and std ``sigma`` (module docstring)."""
    _check(length, sigma, mean)
    return {"is": lognormal_stats(length * mean, sigma * math.sqrt(length), cut),
            "gspo": lognormal_stats(mean, sigma / math.sqrt(length), cut)}


def _empirical(log_w: torch.Tensor, cut: float) -> WeightStats:
    """Stats of the weights exp(log_w) [n]: quantiles as torch.quantile's linear interpolation."""
    lw = log_w.double()
    q = torch.quantile(lw, torch.tensor([0.5, 0.05], dtype=torch.float64))  # [2], exp is monotone
    return WeightStats(float(q[0].exp()), float(q[1].exp()), float((lw < math.log(cut)).double().mean()))


def measured_row(pool: torch.Tensor, length: int, n: int = 1000, seed: int = 0,
                 cut: float = LOW_WEIGHT) -> dict[str, WeightStats]:
    """{"is": ..., "gspo": ...} of ``n`` synthetic length-``length`` sequences whose token log-ratios
    are drawn with replacement from ``pool`` [N] (a seeded generator: deterministic)."""
    _check(length, 0.0, 0.0)
    pool = pool.detach().double().flatten()  # [N]
    if pool.numel() == 0:
        raise WorkbenchError("measured_row: the pool of token log-ratios is empty: expected at least one token")
    gen = torch.Generator().manual_seed(int(seed))
    sums = torch.zeros(n, dtype=torch.float64)  # [n]
    step = max(1, 2_000_000 // n)  # tokens drawn per sequence at a time: bounded memory at L = 4096
    for start in range(0, length, step):
        k = min(step, length - start)
        idx = torch.randint(0, pool.numel(), (n, k), generator=gen)  # [n, k]
        sums += pool[idx].sum(-1)
    return {"is": _empirical(sums, cut), "gspo": _empirical(sums / length, cut)}


def batch_row(log_ratio: torch.Tensor, mask: torch.Tensor, cut: float = LOW_WEIGHT) -> dict[str, WeightStats]:
    """{"is": ..., "gspo": ...} of real sequences: ``log_ratio`` [B, T] per token, ``mask`` [B, T]
    (rows without a valid token are left out)."""
    valid = mask > 0  # [B, T]
    x = torch.where(valid, log_ratio.double(), torch.zeros((), dtype=torch.float64))  # [B, T]
    lengths = valid.sum(-1)  # [B]
    has = lengths > 0
    if not bool(has.any()):
        raise WorkbenchError("batch_row: no sequence has a valid token")
    sums = x.sum(-1)[has]  # [b]
    return {"is": _empirical(sums, cut), "gspo": _empirical(sums / lengths[has], cut)}


def weight_table(pool: torch.Tensor, lengths: Sequence[int] = LENGTHS, *, sigma: float | None = None,
                 mean: float | None = None, n: int = 1000, seed: int = 0, cut: float = LOW_WEIGHT) -> list[dict]:
    """One row per length: L, the measured (resampled from ``pool``) and analytic stats of both
    aggregations. ``sigma`` / ``mean`` of the analytic curve default to the pool's std / mean."""
    pool = pool.detach().double().flatten()
    sigma = float(pool.std(unbiased=False)) if sigma is None else sigma
    mean = float(pool.mean()) if mean is None else mean
    rows = []
    for length in lengths:
        rows.append({"L": int(length), "measured": measured_row(pool, int(length), n, seed, cut),
                     "analytic": analytic_row(int(length), sigma, mean, cut)})
    return rows


def format_weight_table(rows: list[dict], sigma: float, mean: float, cut: float = LOW_WEIGHT) -> str:
    """Markdown: per L, median / q05 / share below ``cut`` of exp(sum) and exp(mean), measured and analytic."""
    head = (f"Sequence weights at per-token log-ratio mean {mean:.3g}, std {sigma:.3g} (measured: resampled "
            f"tokens; analytic: i.i.d. normal)")
    lines = [head, "", f"| L | IS exp(sum): median | q05 | share < {cut:g} | analytic median | q05 | share < {cut:g} "
             f"| GSPO exp(mean): median | q05 | share < {cut:g} | analytic median | q05 | share < {cut:g} |",
             "|---|" + "---|" * 12]
    for r in rows:
        cells = []
        for agg in ("is", "gspo"):
            for src in ("measured", "analytic"):
                s = r[src][agg]
                cells += [f"{s.median:.4g}", f"{s.q05:.4g}", f"{100 * s.share_below:.2f}%"]
        lines.append(f"| {r['L']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["LENGTHS", "LOW_WEIGHT", "WeightStats", "analytic_row", "batch_row", "format_weight_table",
           "lognormal_stats", "measured_row", "weight_table"]
