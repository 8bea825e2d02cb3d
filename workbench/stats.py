"""Uncertainty of a comparison: binomial intervals of one evaluation, bootstrap intervals across seeds.

    lo, hi = wilson_interval(123, 256)                  # one held-out evaluation: 123 of 256 right
    est, lo, hi = bootstrap_ci([0.41, 0.47, 0.44])      # the mean over seeds, with a 95% interval
    d = difference_interval(topr_finals, onpolicy_finals)
    describe_difference("topr", "on-policy", d, scale=100, digits=1)
    # 'topr vs on-policy: not resolved, the 95% CI [-4.2, 1.3] includes 0'

Two sources of noise enter every comparison the workbench reports. One evaluation of n held-out
problems is a binomial draw: at 50% accuracy on 256 problems its standard error is 3.1 points, its
95% interval +-6.1 points (``wilson_interval``). Seeds differ by more than that: the policy itself
lands elsewhere (``bootstrap_ci``, ``difference_interval``, ``probability_of_improvement_ci``).

Conventions. Every resampling takes a ``seed`` (``numpy.random.default_rng``) and gives the same
numbers for the same inputs and seed. Bad input is a one-line ``WorkbenchError``. No interval is
made up: a bootstrap over one value returns ``(value, nan, nan)``, and a Wilson interval of n = 0
trials is ``(nan, nan)`` (vectorised calls over tables of runs keep going; a NaN bound reads as "no
interval"). With two seeds, the percentile bootstrap of the mean can only return the two values
themselves as bounds, and with fewer than about five it covers less than its nominal level (its
spread is the sample's, which is too narrow by sqrt((n - 1) / n) and more: Efron and Tibshirani
1993, "An Introduction to the Bootstrap"): read intervals on two or three seeds as a lower bound
on the noise.

Pure numpy (no torch, no polars), so notebooks, the sweep results and the reports can all use it.

Left out: BCa and studentised bootstrap intervals, stratified bootstrap over several tasks
(rliable's), multiple-comparison corrections.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable, NamedTuple

import numpy as np

from workbench.errors import WorkbenchError, bad_value, short_repr

RESAMPLES = 10_000  # bootstrap resamples: percentile bounds move by well under 0.1 of a point past this


class Interval(NamedTuple):
    """An estimate with its confidence interval; ``lo`` and ``hi`` are NaN when there is none."""

    estimate: float
    lo: float
    hi: float


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard normal quantile: ``Phi^-1(1 - (1 - confidence) / 2)`` (1.95996... at 0.95)."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(successes, n, confidence: float = 0.95):
    """Wilson score interval of a binomial proportion (Wilson 1927, "Probable inference, the law of
    succession, and statistical inference", JASA 22:209-212); vectorised over arrays.

    With p = successes / n and z = ``z_value(confidence)``::

        centre    = (p + z^2 / (2n)) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

    the interval is centre -+ halfwidth: the set of proportions q with |p - q| <= z sqrt(q (1 - q) / n).
    Unlike the Wald interval p -+ z sqrt(p (1 - p) / n) it stays inside [0, 1] and is not empty at
    p = 0 or 1 (0 of 10 gives [0, 0.278]). ``successes`` may be fractional (accuracy x n: only p
    enters). Returns ``(lo, hi)``: floats for scalar input, arrays for array input; NaN where n = 0.
    """
    k = np.asarray(successes, dtype=np.float64)
    size = np.asarray(n, dtype=np.float64)
    if not np.all(np.isfinite(size)) or np.any(size < 0) or np.any(size != np.round(size)):
        raise bad_value("n", n, "whole numbers of trials >= 0")
    if not np.all(np.isfinite(k)) or np.any(k < 0) or np.any(k > size):
        raise bad_value("successes", successes, "numbers between 0 and n")
    z2 = z_value(confidence) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):  # n = 0: NaN bounds, by design
        p = k / size
        denom = 1.0 + z2 / size
        centre = (p + z2 / (2.0 * size)) / denom
        half = math.sqrt(z2) / denom * np.sqrt(p * (1.0 - p) / size + z2 / (4.0 * size**2))
    lo = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))  # exact ends: rounding must not leave 1e-17
    hi = np.where(k == size, 1.0, np.clip(centre + half, 0.0, 1.0))
    lo, hi = np.where(size == 0, np.nan, lo), np.where(size == 0, np.nan, hi)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def iqm_weights(n: int, fractional: bool = False) -> np.ndarray:
    """Weights of the sorted values in the interquartile mean of ``n`` values (they sum to 1).

    Default, as rliable (the library of Agarwal et al. 2021) computes it, ``scipy.stats.trim_mean(x,
    0.25)``: drop g = floor(n / 4) values at each end and average the n - 2g left (n < 4 trims
    nothing: the IQM is the mean). ``fractional=True``: the mean of exactly the middle 50% of the
    sample, for any n: sorted value i (0-based) covers [i, i + 1] of [0, n], and weighs its overlap
    with [n / 4, 3n / 4] divided by n / 2, so values cut by a quartile count in part. The two agree
    when n is a multiple of 4.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise bad_value("n", n, "an int >= 1 (values to average)")
    if fractional:
        i = np.arange(n, dtype=np.float64)
        overlap = np.clip(np.minimum(i + 1.0, 0.75 * n) - np.maximum(i, 0.25 * n), 0.0, None)
        return overlap / (0.5 * n)
    g = n // 4
    w = np.zeros(n)
    w[g:n - g] = 1.0 / (n - 2 * g)
    return w


def iqm(values, fractional: bool = False) -> float:
    """Interquartile mean: the mean of the middle 50% of ``values``, sorted (Agarwal, Schwarzer,
    Castro, Courville and Bellemare 2021, "Deep Reinforcement Learning at the Edge of the
    Statistical Precipice", arXiv:2108.13264). Robust to one outlying seed, less noisy than the
    median. Trimming for n not divisible by 4: ``iqm_weights``."""
    x = _values(values)
    return float(np.sort(x) @ iqm_weights(len(x), fractional))


STATS: dict[str, Callable[[np.ndarray], float]] = {"mean": lambda x: float(np.mean(x)), "iqm": iqm}


def bootstrap_ci(values, stat: str | Callable = "mean", confidence: float = 0.95, resamples: int = RESAMPLES,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``stat`` over ``values`` (one value per seed; Efron 1979,
    "Bootstrap methods: another look at the jackknife", Ann. Statist. 7:1-26).

    ``resamples`` times, draw len(values) values with replacement and compute ``stat``; the interval
    is the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those. ``stat``: "mean", "iqm"
    (``iqm``) or a function of a 1-D array. One value: ``(value, nan, nan)``, there is no spread to
    resample.
    """
    x = _values(values)
    fn = _stat(stat)
    _check_confidence(confidence)
    estimate = float(fn(x))
    if len(x) < 2:
        return Interval(estimate, math.nan, math.nan)
    samples = x[_rng(seed).integers(0, len(x), size=(_resamples(resamples), len(x)))]  # [R, n]
    return Interval(estimate, *_percentiles(_rowwise(stat, fn, samples), confidence))


def difference_interval(a, b, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0,
                        paired: bool = False) -> Interval:
    """Bootstrap interval of mean(a) - mean(b), one value per seed on each side.

    Unpaired (default): a and b are resampled independently (different runs; their seeds share
    nothing that makes seed i of a a partner of seed i of b). ``paired=True``: a[i] and b[i] belong
    together (the same run, or the same seed where the seed fixes common randomness) and the
    differences a[i] - b[i] are resampled. Fewer than two values on a side (or two pairs): ``(d, nan, nan)``.
    """
    xa, xb = _values(a, "a"), _values(b, "b")
    _check_confidence(confidence)
    if paired:
        if len(xa) != len(xb):
            raise WorkbenchError(f"paired=True needs as many values in a as in b, got {len(xa)} and {len(xb)}")
        return bootstrap_ci(xa - xb, "mean", confidence, resamples, seed)
    estimate = float(np.mean(xa) - np.mean(xb))
    if min(len(xa), len(xb)) < 2:
        return Interval(estimate, math.nan, math.nan)
    rng, r = _rng(seed), _resamples(resamples)
    ma = xa[rng.integers(0, len(xa), size=(r, len(xa)))].mean(axis=1)  # [R]
    mb = xb[rng.integers(0, len(xb), size=(r, len(xb)))].mean(axis=1)  # [R]
    return Interval(estimate, *_percentiles(ma - mb, confidence))


def probability_of_improvement(x, y) -> float:
    """P(X > Y) + P(X = Y) / 2 over every pair of a run of X and a run of Y: the Mann-Whitney U
    statistic of x against y divided by len(x) len(y), as Agarwal et al. 2021 (arXiv:2108.13264)
    define it for one task. 0.5: neither tends to beat the other; 1: every run of X beats every run of Y."""
    xa, ya = _values(x, "x"), _values(y, "y")
    greater = (xa[:, None] > ya[None, :]).mean()  # [nx, ny] pairs
    ties = (xa[:, None] == ya[None, :]).mean()
    return float(greater + 0.5 * ties)


def probability_of_improvement_ci(x, y, confidence: float = 0.95, resamples: int = RESAMPLES,
                                  seed: int = 0) -> Interval:
    """``probability_of_improvement`` with a percentile bootstrap interval (x and y resampled
    independently, as rliable does within a task); fewer than two runs on a side: ``(p, nan, nan)``."""
    xa, ya = _values(x, "x"), _values(y, "y")
    _check_confidence(confidence)
    estimate = probability_of_improvement(xa, ya)
    if min(len(xa), len(ya)) < 2:
        return Interval(estimate, math.nan, math.nan)
    rng, r = _rng(seed), _resamples(resamples)
    sx = xa[rng.integers(0, len(xa), size=(r, len(xa)))]  # [R, nx]
    sy = ya[rng.integers(0, len(ya), size=(r, len(ya)))]  # [R, ny]
    greater = (sx[:, :, None] > sy[:, None, :]).mean(axis=(1, 2))  # [R]
    ties = (sx[:, :, None] == sy[:, None, :]).mean(axis=(1, 2))  # [R]
    return Interval(estimate, *_percentiles(greater + 0.5 * ties, confidence))


def excludes(interval: Interval | tuple, value: float = 0.0) -> bool:
    """True when the interval lies entirely above or below ``value`` (False without an interval)."""
    _, lo, hi = interval
    return bool((lo > value) or (hi < value))  # NaN compares False: no interval, not resolved


def difference_is_resolved(interval: Interval | tuple) -> bool:
    """True when the interval of a difference excludes 0 (``excludes(interval, 0)``)."""
    return excludes(interval, 0.0)


def describe_difference(name_a: str, name_b: str, interval: Interval | tuple, *, confidence: float = 0.95,
                        scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """One phrase on the difference A - B with its interval ``(estimate, lo, hi)``:

    ``"A > B (95% CI of the difference [lo, hi] excludes 0)"``, ``"A < B (...)"``, or
    ``"A vs B: not resolved, the 95% CI [lo, hi] includes 0"``; without an interval (one seed on a
    side) ``"A vs B: not resolved, no interval (fewer than 2 seeds on a side)"``. The bounds are
    multiplied by ``scale`` (100: fractions as points) and followed by ``unit``.
    """
    _check_confidence(confidence)
    _, lo, hi = interval
    level = f"{100 * confidence:g}%"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{name_a} vs {name_b}: not resolved, no interval (fewer than 2 seeds on a side)"
    bounds = f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]{unit}"
    if lo > 0 or hi < 0:
        sign = ">" if lo > 0 else "<"
        return f"{name_a} {sign} {name_b} ({level} CI of the difference {bounds} excludes 0)"
    return f"{name_a} vs {name_b}: not resolved, the {level} CI {bounds} includes 0"


# ----------------------------------------------------------------------------- input checks
def _values(values, field: str = "values") -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise bad_value(field, values, "a 1-D sequence of numbers") from None
    if x.ndim != 1 or x.size == 0:
        raise bad_value(field, values, "a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(x)):
        raise WorkbenchError(f"{field}={short_repr(values)} is invalid: expected finite numbers (drop the "
                             "runs without a value first)")
    return x


def _stat(stat: str | Callable) -> Callable[[np.ndarray], float]:
    if callable(stat):
        return stat
    if stat not in STATS:
        raise bad_value("stat", stat, f"one of {', '.join(STATS)} or a function of a 1-D array")
    return STATS[stat]


def _rowwise(stat: str | Callable, fn: Callable, samples: np.ndarray) -> np.ndarray:
    """``fn`` of every row of ``samples`` [R, n] -> [R]; the built-in stats in one vectorised step."""
    if stat == "mean":
        return samples.mean(axis=1)  # [R]
    if stat == "iqm":
        return np.sort(samples, axis=1) @ iqm_weights(samples.shape[1])  # [R]
    return np.array([float(fn(row)) for row in samples])  # [R]


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise bad_value("confidence", confidence, "a number strictly between 0 and 1 (0.95: a 95% interval)")


def _resamples(resamples: int) -> int:
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise bad_value("resamples", resamples, "an int >= 1")
    return int(resamples)


def _rng(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise bad_value("seed", seed, "an int >= 0")
    return np.random.default_rng(int(seed))


def wilson_difference(p1: float, n1: int, p2: float, n2: int, confidence: float = 0.95) -> Interval:
    """p1 - p2 of two independent binomial evaluations with Newcombe's hybrid score interval, built
    from their Wilson intervals (Newcombe 1998, "Interval estimation for the difference between
    independent proportions: comparison of eleven methods", Statistics in Medicine 17:873-890,
    method 10): [d - sqrt((p1 - l1)^2 + (u2 - p2)^2), d + sqrt((u1 - p1)^2 + (p2 - l2)^2)]."""
    l1, u1 = wilson_interval(p1 * n1, n1, confidence)
    l2, u2 = wilson_interval(p2 * n2, n2, confidence)
    d = p1 - p2
    return Interval(d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


__all__ = ["Interval", "RESAMPLES", "STATS", "bootstrap_ci", "describe_difference", "difference_interval",
           "difference_is_resolved", "excludes", "iqm", "iqm_weights", "probability_of_improvement",
           "probability_of_improvement_ci", "wilson_difference", "wilson_interval", "z_value"]
