"""Off-policy value estimators of J(pi) from a batch logged by an older policy mu (docs/ope.md).

Every estimator is a plain function of ``OPEInputs`` (per-sequence log-weights log w_i = sum_t
(log pi - log mu), rewards r_i, group ids, and, where needed, the behaviour log-prob log mu(y_i) or
the per-token log-ratios) returning per-sequence numerator and denominator terms (a_i, b_i): the
estimate is sum_i a_i / sum_i b_i. Mean-type estimators have b_i = 1; self-normalised IS has
b_i = w_i. One representation serves the point estimate and the bootstrap over groups, which is
the same ratio of sums over resampled groups.

``estimate(name, inputs, ...)`` wraps one of them in an ``OPEResult``: the estimate, a percentile
bootstrap interval over whole prompt groups (``workbench.stats.bootstrap_ci``), a Hoeffding interval
where the terms are bounded (``clipped_is`` with rewards in ``reward_range``; NaN otherwise), the
effective sample size of the raw sequence weights, and a refusal when that ESS is too small a
fraction of the batch.

Sources: importance sampling and per-decision IS, Precup, Sutton and Singh 2000, "Eligibility
Traces for Off-Policy Policy Evaluation" (ICML); self-normalised IS, Kong 1992 / Owen 2013 "Monte
Carlo theory, methods and examples" ch. 9 (also the source of the ESS formula); truncated IS,
Ionides 2008, "Truncated Importance Sampling", J. Comput. Graph. Stat. 17:295-311; exponential
smoothing, Aouali, Brunel, Rohde and Korba 2023, "Exponential Smoothing for Off-Policy Learning",
arXiv:2305.15877; doubly robust, Dudik, Langford and Li 2011, "Doubly Robust Policy Evaluation and
Learning", arXiv:1103.4601; Hoeffding 1963, "Probability inequalities for sums of bounded random
variables", JASA 58:13-30.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError, bad_value
from workbench.registry import Registry
from workbench.stats import bootstrap_ci

LOG_W_MAX = 700.0  # |log w| clamp: exp(709) is the largest finite float64; beyond it a weight is inf
DEFAULT_MIN_ESS_FRAC = 0.01
DEFAULT_RESAMPLES = 2000  # group bootstrap resamples: percentile bounds settle to ~1e-3 of their width
DEFAULT_REWARD_RANGE = (0.0, 1.0)

Terms = tuple[np.ndarray, np.ndarray]  # (numerator [N], denominator [N]); estimate = sum(a) / sum(b)
EstimatorFn = Callable[..., Terms]
ESTIMATORS: Registry[EstimatorFn] = Registry("estimator")


@dataclass(frozen=True)
class OPEInputs:
    """Per-sequence inputs, float64 numpy. ``token_log_ratio`` / ``mask`` [N, T] are used by ``pdis``
    only (None: one decision per sequence, the sequence log-weight); ``token_rewards`` [N, T] are
    per-decision rewards (None: the reward r_i at the last valid token, the only reward in this
    project); ``log_mu`` [N] = log mu(y_i), needed by ``ips_alpha``."""

    log_w: np.ndarray  # [N]
    rewards: np.ndarray  # [N]
    group_id: np.ndarray  # [N]
    log_mu: np.ndarray | None = None  # [N]
    token_log_ratio: np.ndarray | None = None  # [N, T]
    mask: np.ndarray | None = None  # [N, T]
    token_rewards: np.ndarray | None = None  # [N, T]

    @classmethod
    def of(cls, log_w, rewards, group_id=None, log_mu=None, **kw: Any) -> "OPEInputs":
        """Checked inputs from sequences (``group_id`` None: every sequence is its own group)."""
        lw = _vector("log_w", log_w)
        r = _vector("rewards", rewards, len(lw))
        g = np.arange(len(lw)) if group_id is None else _vector("group_id", group_id, len(lw)).astype(np.int64)
        mu = None if log_mu is None else _vector("log_mu", log_mu, len(lw))
        arrays = {k: None if v is None else np.asarray(v, dtype=np.float64) for k, v in kw.items()}
        for k, v in arrays.items():
            if v is not None and (v.ndim != 2 or v.shape[0] != len(lw) or not np.all(np.isfinite(v))):
                raise bad_value(k, v, f"a finite [N, T] array with N = {len(lw)} rows")
        return cls(lw, r, g, mu, **arrays)

    @property
    def weights(self) -> np.ndarray:
        return np.exp(np.clip(self.log_w, -LOG_W_MAX, LOG_W_MAX))  # [N]


@dataclass(frozen=True)
class OPEResult:
    """One estimator on one batch. ``lo``/``hi``: percentile bootstrap over prompt groups;
    ``bound_lo``/``bound_hi``: Hoeffding interval (NaN where the terms are unbounded); ``refused``:
    the ESS fraction is below the threshold and ``reason`` says so (the number is kept, not shown)."""

    estimator: str
    estimate: float
    lo: float
    hi: float
    bound_lo: float
    bound_hi: float
    ess: float
    ess_frac: float
    refused: bool
    reason: str
    n: int

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- the estimators
@ESTIMATORS.register("is", summary="trajectory importance sampling: mean(w r), w = exp(sum_t log pi/mu)",
                     paper="Precup, Sutton, Singh 2000, Eligibility Traces for Off-Policy Policy Evaluation",
                     unbiased=True, params={})
def trajectory_is(inp: OPEInputs) -> Terms:
    """(1/N) sum_i w_i r_i: unbiased when mu > 0 wherever pi > 0; variance grows like E_mu[w^2]."""
    return inp.weights * inp.rewards, np.ones_like(inp.rewards)


@ESTIMATORS.register("pdis", summary="per-decision IS: sum_t rho_{0:t} r_t (= trajectory IS with one terminal reward)",
                     paper="Precup, Sutton, Singh 2000, Eligibility Traces for Off-Policy Policy Evaluation",
                     unbiased=True, params={})
def per_decision_is(inp: OPEInputs) -> Terms:
    """(1/N) sum_i sum_t rho_{i,0:t} r_{i,t}, rho_{i,0:t} = exp(sum_{s<=t} log pi/mu): the reward of
    decision t is weighted only by the ratios of the decisions before it. With a single terminal
    reward (this project: r_i at the last response token, nothing before) the only term is
    rho_{i,0:T} r_i = w_i r_i, so PDIS equals trajectory IS exactly; it differs with per-token rewards."""
    if inp.token_log_ratio is None:
        return trajectory_is(inp)
    mask = np.ones_like(inp.token_log_ratio) if inp.mask is None else inp.mask  # [N, T]
    cum = np.clip(np.cumsum(inp.token_log_ratio * mask, axis=1), -LOG_W_MAX, LOG_W_MAX)  # [N, T]
    per_token = inp.token_rewards if inp.token_rewards is not None else _terminal_rewards(inp.rewards, mask)
    return (np.exp(cum) * per_token * mask).sum(axis=1), np.ones_like(inp.rewards)  # [N]


@ESTIMATORS.register("snis", summary="self-normalised IS: sum(w r) / sum(w); biased O(1/N), consistent",
                     paper="Owen 2013, Monte Carlo theory, methods and examples, ch. 9", unbiased=False, params={})
def self_normalised_is(inp: OPEInputs) -> Terms:
    """sum_i w_i r_i / sum_i w_i: always within the rewards' range; bias O(1/N)."""
    w = inp.weights
    return w * inp.rewards, w


@ESTIMATORS.register("clipped_is", summary="truncated IS: mean(min(w, c) r); biased down by E_mu[(w - c)+ r]",
                     paper="Ionides 2008, Truncated Importance Sampling, J. Comput. Graph. Stat. 17:295-311",
                     unbiased=False, params={"c": 10.0})
def clipped_is(inp: OPEInputs, c: float = 10.0) -> Terms:
    """(1/N) sum_i min(w_i, c) r_i. Default c = 10: one sequence counts for at most ten, a loss of
    mass only where pi is 10x likelier than mu; the terms lie in [c min(r_lo, 0), c max(r_hi, 0)],
    so a Hoeffding interval exists."""
    if not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 and math.isfinite(c)):
        raise bad_value("clipped_is.c", c, "a finite number > 0 (the weight cap)")
    return np.minimum(inp.weights, float(c)) * inp.rewards, np.ones_like(inp.rewards)


@ESTIMATORS.register("ips_alpha", summary="exponential smoothing: mean(pi / mu^alpha r) (alpha = 1 is IS)",
                     paper="Aouali, Brunel, Rohde, Korba 2023, Exponential Smoothing for Off-Policy Learning, "
                           "arXiv:2305.15877", unbiased=False, params={"alpha": 0.7})
def ips_alpha(inp: OPEInputs, alpha: float = 0.7) -> Terms:
    """(1/N) sum_i pi(y_i) / mu(y_i)^alpha r_i = w_i mu(y_i)^(1 - alpha) r_i, the objective
    ``ips_alpha``'s weight at sequence level (alpha = 0.7 as there). Biased towards 0 by the factor
    mu(y)^(1 - alpha) (a pessimistic estimate for r >= 0); with whole responses, where mu(y) is tiny,
    that factor dominates."""
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0):
        raise bad_value("ips_alpha.alpha", alpha, "a number in [0, 1] (1 = plain IS)")
    if inp.log_mu is None:
        raise WorkbenchError("estimator 'ips_alpha' needs log_mu (the behaviour log-prob of each sequence)")
    log_term = np.clip(inp.log_w + (1.0 - alpha) * inp.log_mu, -LOG_W_MAX, LOG_W_MAX)  # [N]
    return np.exp(log_term) * inp.rewards, np.ones_like(inp.rewards)


@ESTIMATORS.register("dr", summary="doubly robust with a leave-one-out per-prompt mean reward: mean(q + w (r - q))",
                     paper="Dudik, Langford, Li 2011, Doubly Robust Policy Evaluation and Learning, arXiv:1103.4601",
                     unbiased=True, params={})
def doubly_robust(inp: OPEInputs) -> Terms:
    """(1/N) sum_i q_i + w_i (r_i - q_i) with q_i the mean logged reward of the *other* sequences of
    i's group (0 for a group of one: the term is then IS). Leave-one-out keeps q_i independent of
    y_i given the prompt, so E_mu[w_i (r_i - q_i) | x, q_i] = J(pi | x) - q_i and the estimator stays
    unbiased; q fitted on the same row would correlate with w_i r_i and bias it."""
    r, g = inp.rewards, inp.group_id
    _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)  # [G]
    others = counts[inv] - 1  # [N]
    q = np.where(others > 0, (sums[inv] - r) / np.maximum(others, 1), 0.0)  # [N]
    return q + inp.weights * (r - q), np.ones_like(r)


# ----------------------------------------------------------------------------- one result
def estimate(name: str, inp: OPEInputs, params: dict[str, Any] | None = None, *, confidence: float = 0.95,
             seed: int = 0, resamples: int = DEFAULT_RESAMPLES, min_ess_frac: float = DEFAULT_MIN_ESS_FRAC,
             reward_range: tuple[float, float] = DEFAULT_REWARD_RANGE) -> OPEResult:
    """Estimator ``name`` on ``inp`` with its intervals, ESS and refusal (module docstring)."""
    entry = ESTIMATORS.entry(name)
    kw = _params(name, entry.meta["params"], params)
    if not (isinstance(min_ess_frac, (int, float)) and 0.0 <= min_ess_frac <= 1.0):
        raise bad_value("min_ess_frac", min_ess_frac, "a number in [0, 1]")
    a, b = entry.obj(inp, **kw)  # [N], [N]
    _, inv = np.unique(inp.group_id, return_inverse=True)
    num, den = np.bincount(inv, weights=a), np.bincount(inv, weights=b)  # [G] group sums

    def ratio(idx: np.ndarray) -> float:  # groups drawn with replacement -> the estimator on them
        i = idx.astype(np.int64)
        d = den[i].sum()
        return float(num[i].sum() / d) if d != 0 else math.nan

    point, lo, hi = bootstrap_ci(np.arange(len(num), dtype=np.float64), ratio, confidence, resamples, seed)
    n = len(inp.rewards)
    ess = effective_sample_size(inp.log_w)
    b_lo, b_hi = _hoeffding(name, kw, inp, inv, point, confidence, reward_range)
    refused = ess / n < min_ess_frac
    reason = (f"not enough overlap: ESS {100 * ess / n:.1f}% of N={n} (minimum {100 * min_ess_frac:g}%)"
              if refused else "")
    return OPEResult(name, point, lo, hi, b_lo, b_hi, ess, ess / n, bool(refused), reason, n)


def effective_sample_size(log_w: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 (Kong 1992; Owen 2013, ch. 9), shifted by max log w so nothing overflows."""
    lw = np.asarray(log_w, dtype=np.float64)
    w = np.exp(lw - lw.max())  # [N], largest 1
    return float(w.sum() ** 2 / (w * w).sum())


def _hoeffding(name: str, kw: dict[str, Any], inp: OPEInputs, inv: np.ndarray, point: float, confidence: float,
               reward_range: tuple[float, float]) -> tuple[float, float]:
    """Hoeffding interval for ``clipped_is``: its terms lie in [lo, hi] = c [min(r_lo, 0), max(r_hi, 0)].
    Groups (prompts) are the independent units: the estimate is sum_g lambda_g m_g with m_g the
    group's mean term and lambda_g = n_g / N, so P(|err| >= t) <= 2 exp(-2 t^2 / ((hi - lo)^2 sum
    lambda_g^2)). NaN for every other estimator (unbounded terms) and for rewards outside the range."""
    r_lo, r_hi = reward_range
    if name != "clipped_is" or np.any(inp.rewards < r_lo) or np.any(inp.rewards > r_hi):
        return math.nan, math.nan
    c = float(kw["c"])
    width = c * (max(r_hi, 0.0) - min(r_lo, 0.0))
    lam = np.bincount(inv) / len(inv)  # [G]
    t = width * math.sqrt(math.log(2.0 / (1.0 - confidence)) * float((lam * lam).sum()) / 2.0)
    return max(point - t, c * min(r_lo, 0.0)), min(point + t, c * max(r_hi, 0.0))


def _params(name: str, defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise WorkbenchError(f"{name} params={unknown} are invalid: valid params of {name} are {valid}")
    return {**defaults, **given}


def _terminal_rewards(rewards: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, T] with r_i at the last valid token of row i and 0 elsewhere."""
    out = np.zeros_like(mask)
    last = np.where(mask.sum(axis=1) > 0, mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1), -1)  # [N]
    rows = np.nonzero(last >= 0)[0]
    out[rows, last[rows]] = rewards[rows]
    return out


def _vector(field: str, values: Any, n: int | None = None) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or (n is not None and x.size != n):
        want = f"a 1-D array of {n} numbers" if n is not None else "a non-empty 1-D array of numbers"
        raise bad_value(field, values, want)
    if not np.all(np.isfinite(x)):
        raise bad_value(field, values, "finite numbers")
    return x


__all__ = ["DEFAULT_MIN_ESS_FRAC", "DEFAULT_RESAMPLES", "ESTIMATORS", "OPEInputs", "OPEResult",
           "clipped_is", "doubly_robust", "effective_sample_size", "estimate", "ips_alpha", "per_decision_is",
           "self_normalised_is", "trajectory_is"]
