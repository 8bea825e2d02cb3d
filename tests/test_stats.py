"""workbench.stats against references that do not share its code: Wilson intervals as the roots of
the score test's quadratic and as hand-worked closed forms, bootstrap intervals whose bounds follow
from the exact resampling distribution (and a simulated coverage check), IQMs worked by hand,
probability of improvement by counting pairs and by the rank-sum form of Mann-Whitney U.

scipy is not installed in this venv, so there is no comparison with scipy.stats.binomtest here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.stats import (Interval, bootstrap_ci, describe_difference, difference_interval, difference_is_resolved,
                             excludes, iqm, iqm_weights, probability_of_improvement, probability_of_improvement_ci,
                             wilson_difference, wilson_interval, z_value)

Z95 = 1.959963984540054  # Phi^-1(0.975)


def wilson_by_roots(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval as the set {q : (p - q)^2 <= z^2 q (1 - q) / n}: the roots of
    (1 + z^2/n) q^2 - (2p + z^2/n) q + p^2 = 0, by the quadratic formula."""
    p, c = k / n, z * z / n
    a, b, cc = 1.0 + c, -(2.0 * p + c), p * p
    disc = math.sqrt(b * b - 4.0 * a * cc)
    return (-b - disc) / (2.0 * a), (-b + disc) / (2.0 * a)


# ----------------------------------------------------------------------------- Wilson
def test_z_value_is_the_normal_quantile():
    assert z_value(0.95) == pytest.approx(Z95, rel=1e-12)
    assert z_value(0.90) == pytest.approx(1.6448536269514722, rel=1e-12)


@pytest.mark.parametrize("k, n", [(128, 256), (0, 10), (10, 10), (3, 10), (77, 256), (1, 1), (199, 200)])
def test_wilson_matches_the_roots_of_the_score_quadratic(k, n):
    lo, hi = wilson_interval(k, n)
    ref_lo, ref_hi = wilson_by_roots(k, n)
    assert lo == pytest.approx(max(ref_lo, 0.0), rel=1e-9, abs=1e-12)
    assert hi == pytest.approx(min(ref_hi, 1.0), rel=1e-9, abs=1e-12)


def test_wilson_by_hand():
    c = Z95**2 / 10  # z^2 / n for n = 10
    # 0 of 10: lo = 0, hi = (z^2/n) / (1 + z^2/n); 10 of 10 is its mirror image
    assert wilson_interval(0, 10) == pytest.approx((0.0, c / (1 + c)), rel=1e-12)
    assert wilson_interval(10, 10) == pytest.approx((1 / (1 + c), 1.0), rel=1e-12)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775327998628892, rel=1e-12)
    # 128 of 256: centred on 1/2, half-width z / (1 + z^2/n) * sqrt(1/(4n) + z^2/(4n^2))
    n = 256
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(0.25 / n + Z95**2 / (4 * n * n))
    assert wilson_interval(128, 256) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-12)
    assert half == pytest.approx(0.06079444141093704, rel=1e-12)


def test_wilson_is_vectorised_and_n_zero_gives_nan():
    k, n = np.array([0, 5, 128, 0]), np.array([10, 10, 256, 0])
    lo, hi = wilson_interval(k, n)
    assert lo.shape == (4,) and hi.shape == (4,)
    for i in range(3):
        assert (lo[i], hi[i]) == pytest.approx(wilson_interval(int(k[i]), int(n[i])), rel=1e-12)
    assert math.isnan(lo[3]) and math.isnan(hi[3])
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    # a fractional count (accuracy x n) only enters through p
    assert wilson_interval(0.5 * 256, 256) == pytest.approx(wilson_interval(128, 256), rel=1e-12)
    assert wilson_interval(0, 10, confidence=0.9)[1] < wilson_interval(0, 10)[1]


@pytest.mark.parametrize("k, n, confidence, needle", [(11, 10, 0.95, "successes"), (-1, 10, 0.95, "successes"),
                                                      (1, 2.5, 0.95, "n="), (1, -3, 0.95, "n="),
                                                      (1, 10, 1.0, "confidence"), (1, 10, 0, "confidence")])
def test_wilson_rejects_bad_input(k, n, confidence, needle):
    with pytest.raises(WorkbenchError, match=needle) as e:
        wilson_interval(k, n, confidence)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- IQM
def test_iqm_by_hand():
    assert iqm([10, 1, 3, 2]) == pytest.approx(2.5, rel=1e-12)  # n = 4: drop 1 and 10, mean(2, 3)
    assert iqm([16, 1, 8, 2, 4]) == pytest.approx(14 / 3, rel=1e-12)  # n = 5, floor(5/4) = 1 each side: mean(2, 4, 8)
    assert iqm([1, 2, 3, 4, 5, 6, 7, 100]) == pytest.approx(4.5, rel=1e-12)  # n = 8: mean(3, 4, 5, 6)
    assert iqm([1, 2, 4, 8, 16, 32]) == pytest.approx(7.5, rel=1e-12)  # n = 6: drop 1 each side: mean(2, 4, 8, 16)
    assert iqm([3.0, 9.0, 0.0]) == pytest.approx(4.0, rel=1e-12)  # n < 4 trims nothing: the mean
    assert iqm([7.0]) == 7.0


def test_fractional_iqm_is_the_mean_of_exactly_the_middle_half():
    # n = 5: the middle half is positions [1.25, 3.75]: 3/4 of x(1), all of x(2), 3/4 of x(3), over 2.5
    assert iqm([16, 1, 8, 2, 4], fractional=True) == pytest.approx((0.75 * 2 + 4 + 0.75 * 8) / 2.5, rel=1e-12)
    # n = 6: [1.5, 4.5]: half of x(1), x(2), x(3), half of x(4), over 3
    assert iqm([1, 2, 4, 8, 16, 32], fractional=True) == pytest.approx((0.5 * 2 + 4 + 8 + 0.5 * 16) / 3, rel=1e-12)
    # multiples of 4: the same as the whole-value trim
    assert iqm([10, 1, 3, 2], fractional=True) == pytest.approx(2.5, rel=1e-12)
    assert iqm([1, 2, 3, 4, 5, 6, 7, 100], fractional=True) == pytest.approx(4.5, rel=1e-12)
    # n = 3: [0.75, 2.25]: a quarter of each end, all of the middle, over 1.5
    assert iqm([0.0, 3.0, 9.0], fractional=True) == pytest.approx((0.25 * 0 + 3 + 0.25 * 9) / 1.5, rel=1e-12)
    for n in range(1, 13):
        for frac in (False, True):
            w = iqm_weights(n, frac)
            assert w.sum() == pytest.approx(1.0, rel=1e-12) and np.all(w >= 0) and np.allclose(w, w[::-1])


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_bounds_follow_the_exact_resampling_distribution():
    # two values: the resampled mean is a, (a+b)/2 or b with probability 1/4, 1/2, 1/4, so the 2.5%
    # and 97.5% quantiles fall inside the end atoms: exactly a and b
    est, lo, hi = bootstrap_ci([0.2, 0.4])
    assert (est, lo, hi) == pytest.approx((0.3, 0.2, 0.4), rel=1e-12)
    # [0, 0, 0, 0, 1]: the mean is K/5, K ~ Binomial(5, 1/5); P(K=0) = 0.328 and
    # P(K<=2) = 0.942 < 0.975 < P(K<=3) = 0.993: the interval is [0, 3/5]
    assert bootstrap_ci([0, 0, 0, 0, 1]) == pytest.approx((0.2, 0.0, 0.6), rel=1e-12, abs=1e-12)
    # IQM of [0.1, 0.4, 0.5, 0.9]: it equals 0.1 when >= 3 of 4 draws are 0.1, P = 13/256 = 5.1% > 2.5%
    assert bootstrap_ci([0.9, 0.1, 0.5, 0.4], "iqm") == pytest.approx((0.45, 0.1, 0.9), rel=1e-12)
    # a callable statistic; the median of two values resamples like their mean
    assert bootstrap_ci([1.0, 3.0], np.median) == pytest.approx((2.0, 1.0, 3.0), rel=1e-12)


def test_bootstrap_of_one_value_has_no_interval():
    est, lo, hi = bootstrap_ci([0.42])
    assert est == 0.42 and math.isnan(lo) and math.isnan(hi)
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)  # no spread: a zero-width interval, honestly


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1234)
    hits = 0
    for trial in range(400):
        sample = rng.normal(loc=2.0, scale=3.0, size=30)
        _, lo, hi = bootstrap_ci(sample, resamples=2000, seed=trial)
        hits += lo <= 2.0 <= hi
    assert 0.90 <= hits / 400 <= 0.99


def test_bootstrap_is_deterministic_for_a_seed():
    x = [0.31, 0.45, 0.28, 0.52, 0.40, 0.37]
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, "iqm", seed=7) == bootstrap_ci(x, "iqm", seed=7)
    assert bootstrap_ci(x, seed=7) != bootstrap_ci(x, seed=8)
    assert difference_interval(x, x[::-1][:4], seed=3) == difference_interval(x, x[::-1][:4], seed=3)
    assert probability_of_improvement_ci(x, [0.4, 0.3], seed=5) == probability_of_improvement_ci(x, [0.4, 0.3], seed=5)


@pytest.mark.parametrize("kwargs, needle", [
    ({"values": []}, "values"), ({"values": [1.0, float("nan")]}, "finite"), ({"values": [[1.0, 2.0]]}, "1-D"),
    ({"values": [1.0, 2.0], "stat": "median"}, "stat"), ({"values": [1.0, 2.0], "resamples": 0}, "resamples"),
    ({"values": [1.0, 2.0], "seed": -1}, "seed"), ({"values": [1.0, 2.0], "confidence": 95}, "confidence"),
    ({"values": ["a", "b"]}, "values")])
def test_bootstrap_rejects_bad_input(kwargs, needle):
    with pytest.raises(WorkbenchError, match=needle) as e:
        bootstrap_ci(**kwargs)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- differences
def test_difference_interval_bounds_by_hand():
    a, b = [0.5, 0.6], [0.30, 0.42]
    # unpaired: each mean takes its end values with probability 1/4, so the extreme differences
    # min(a) - max(b) and max(a) - min(b) each have probability 1/16 > 2.5%: they are the bounds
    est, lo, hi = difference_interval(a, b)
    assert (est, lo, hi) == pytest.approx((0.55 - 0.36, 0.5 - 0.42, 0.6 - 0.30), rel=1e-12)
    # paired: the differences 0.2 and 0.18 are resampled: their bounds
    assert difference_interval(a, b, paired=True) == pytest.approx((0.19, 0.18, 0.2), rel=1e-12)
    est, lo, hi = difference_interval([0.5], [0.3, 0.4])
    assert est == pytest.approx(0.15, rel=1e-12) and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(WorkbenchError, match="paired=True needs as many values"):
        difference_interval([1.0, 2.0], [1.0], paired=True)


def test_resolution_and_its_phrase():
    assert difference_is_resolved(Interval(0.1, 0.02, 0.2)) and difference_is_resolved((-0.1, -0.2, -0.01))
    assert not difference_is_resolved(Interval(0.1, -0.02, 0.2)) and not difference_is_resolved((0.1, math.nan, math.nan))
    assert excludes((0.5, 0.04, 0.1), 0.03) and not excludes((0.5, 0.02, 0.1), 0.03)
    kw = dict(scale=100, digits=1)
    assert describe_difference("topr", "m2po", Interval(0.05, 0.021, 0.083), **kw) == \
        "topr > m2po (95% CI of the difference [2.1, 8.3] excludes 0)"
    assert describe_difference("is", "on-policy", (-0.2, -0.25, -0.15), **kw, unit=" points") == \
        "is < on-policy (95% CI of the difference [-25.0, -15.0] points excludes 0)"
    assert describe_difference("topr", "on-policy", (-0.01, -0.042, 0.013), **kw) == \
        "topr vs on-policy: not resolved, the 95% CI [-4.2, 1.3] includes 0"
    assert describe_difference("a", "b", (0.1, math.nan, math.nan)) == \
        "a vs b: not resolved, no interval (fewer than 2 seeds on a side)"
    assert describe_difference("a", "b", (0.1, 0.05, 0.2), confidence=0.9).startswith("a > b (90% CI")


# ----------------------------------------------------------------------------- probability of improvement
def _poi_by_counting(x, y):
    wins = ties = 0
    for xi in x:
        for yj in y:
            wins += xi > yj
            ties += xi == yj
    return (wins + 0.5 * ties) / (len(x) * len(y))


def _poi_by_ranks(x, y):
    """Mann-Whitney U of x from the rank sum of x in the pooled sample (ties get their mean rank)."""
    pooled = sorted(list(x) + list(y))
    rank = {v: np.mean([i + 1 for i, w in enumerate(pooled) if w == v]) for v in pooled}
    u = sum(rank[v] for v in x) - len(x) * (len(x) + 1) / 2
    return u / (len(x) * len(y))


@pytest.mark.parametrize("x, y", [([1, 2, 2, 3], [2, 2, 1]), ([0.5, 0.5], [0.5, 0.5, 0.5]), ([3, 4], [1, 2]),
                                  ([1, 2], [3, 4]), ([0.1, 0.4, 0.4, 0.7, 0.2], [0.4, 0.3])])
def test_probability_of_improvement_counts_pairs_with_ties_as_half(x, y):
    p = probability_of_improvement(x, y)
    assert p == pytest.approx(_poi_by_counting(x, y), rel=1e-12)
    assert p == pytest.approx(_poi_by_ranks(x, y), rel=1e-12)
    assert p + probability_of_improvement(y, x) == pytest.approx(1.0, rel=1e-12)


def test_probability_of_improvement_interval():
    est, lo, hi = probability_of_improvement_ci([3, 4, 5], [1, 2])  # every resample still separates them
    assert (est, lo, hi) == (1.0, 1.0, 1.0)
    x, y = [1, 2, 2, 3], [2, 2, 1]
    est, lo, hi = probability_of_improvement_ci(x, y)
    assert est == pytest.approx(10 / 16, rel=1e-12) and 0.0 <= lo <= est <= hi <= 1.0 and lo < hi
    # the bounds are the exact bootstrap distribution's quantiles, within Monte Carlo error (one step of
    # its grid of values k / 24): enumerate every equally likely pair of resamples (4^4 x 3^3)
    values = sorted(_poi_by_counting(xs, ys) for xs in itertools.product(x, repeat=4)
                    for ys in itertools.product(y, repeat=3))
    ref_lo, ref_hi = np.quantile(values, [0.025, 0.975])
    assert lo == pytest.approx(ref_lo, abs=1 / 24) and hi == pytest.approx(ref_hi, abs=1 / 24)
    est, lo, hi = probability_of_improvement_ci([1.0], [0.5, 0.7])
    assert est == 1.0 and math.isnan(lo) and math.isnan(hi)


def test_wilson_difference_is_newcombes_hybrid_score_interval():
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80 -> difference 0.2000, 95% CI [0.0524, 0.3339]
    d, lo, hi = wilson_difference(56 / 70, 70, 48 / 80, 80)
    assert d == pytest.approx(0.2, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
