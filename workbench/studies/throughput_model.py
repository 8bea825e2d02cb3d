"""The throughput model's spec and formulas: the wall-clock of synchronous and asynchronous RL from a
few settings, in closed form (the entry point is ``workbench.studies.throughput``).

Nothing here runs a model or a simulator: the settings are the ones the asynchronous mode names
(``async_workers`` = W generation slots, ``async_decode_step_s``: one engine decode step, in which
every active slot advances one token; ``async_update_s``: one learner update; ``async_length_sigma``;
``async_bound``) and the formulas below turn them into seconds. The lengths L of the responses are
i.i.d. draws from a distribution: measured lengths (``lengths``), or a lognormal with median m and
shape sigma (heavy-tailed: a few responses are many times the median), cut at ``length_max`` tokens
as a generation limit cuts them. Step counts are whole tokens.

**Synchronous** (generate the whole batch with the current weights, then train on it). The B
sequences are decoded in ceil(B / W) waves of at most W slots, and a wave lasts as long as its
longest sequence (the engine steps until its last slot finishes; finished slots idle):

    T_sync = (floor(B / W) E[max of W lengths] + E[max of (B mod W) lengths]) * decode_step_s + update_s

E[max of n lengths] is the straggler effect: with heavy tails it is many times the mean. It is
computed exactly from the empirical distribution: for sorted values x_1 <= ... <= x_N, the maximum
of n i.i.d. draws is <= x_k with probability (k / N)^n, so E[max] = sum_k x_k ((k/N)^n - ((k-1)/N)^n).
A parametric spec is first turned into an empirical one: ``samples`` lengths drawn with
``numpy.random.default_rng(seed)`` (a Monte Carlo sample, deterministic for a seed), over which the
expectations are then exact.

**Asynchronous** (continuous batching, the learner overlaps generation; AReaL, Fu et al. 2025,
"AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language Reasoning",
arXiv:2505.24298). A slot that finishes takes the next prompt at once, so each busy slot completes
a sequence every E[L] decode steps on average (renewal-reward) and W_eff busy slots deliver B
sequences in

    G = B * E[L] * decode_step_s / W_eff          T_async = max(update_s, G)

only the mean length enters: the stragglers no longer hold anybody up. The staleness bound eta
(AReaL's admission rule: at learner version i a new rollout is admitted only while the rollouts
admitted so far number at most (i + eta + 1) B) lets the generator run at most eta updates ahead:
of the (eta + 1) B sequences it may hold beyond those trained on, one batch is finished and waiting
for the learner, so at most eta B are decoding: W_eff = min(W, eta B). A small bound therefore caps
the overlap when W > eta B; eta = 0 is synchronous training (T_async = T_sync). The pipeline's
start-up is the first batch, generated from an empty engine before anything can train; it is taken
as one synchronous generation (an upper bound: with W_eff > B the first B finish sooner), so after
n updates the wall-clock is  start-up + update_s + (n - 1) T_async.

**Staleness** (steady state, in updates, the version lag of the data an update trains on).
Training-bound (update_s > G): the generator is faster and fills its lead until the bound stops it,
so every batch was admitted eta versions earlier (unbounded: the lead grows without limit).
Generation-bound (G >= update_s): by Little's law (Little 1961, "A Proof for the Queuing Formula
L = lambda W", Operations Research 9(3)) W_eff sequences in flight at B / T completions per second
spend W_eff / B update periods decoding, then wait half a period for their batch to fill:
E[staleness] = min(eta, W_eff / B + 1/2).

**Speed-up and regime.** speed-up = T_sync / T_async (steady state). With u = update_s / G and the
straggler factor r = E[max of B] / E[L] (W = B), the speed-up is (r + u) / max(u, 1): largest, r + 1,
when generation and training are balanced (u = 1). A 2.77x speed-up thus needs r ~ 1.8 at balance.
The peers' gains also come from things not modelled here (separate generation and training
devices, interruptible generation, dynamic batching); the model isolates the straggler and overlap
effects. The published figures and the specs that reproduce them: ``workbench.studies.throughput_published``.

Left out: the time to broadcast weights, prefill, memory limits on W, the KV-cache recomputation of
interrupted sequences, and a length distribution that drifts during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
import polars as pl

from workbench.errors import bad_value

MODES = ("sync", "async")
WALL_COLUMN = "wall_clock_s"  # the column wall_clock() returns


@dataclass(frozen=True)
class ThroughputSpec:
    """The settings the wall-clock of one update depends on (module doc for the formulas)."""

    batch: int = 256
    """B: sequences per update (prompts per update x group size)."""
    group_size: int = 16
    """Sequences sampled per prompt; ``batch`` must be a multiple of it (a group is trained together).
    16 as in AReaL's and verl's published runs."""
    workers: int = 256
    """W: generation slots decoding at once (``async_workers``; the same engine for both modes)."""
    decode_step_s: float = 0.01
    """Seconds per engine decode step, in which every active slot advances one token (``async_decode_step_s``;
    the default is assumed, of the order fitted to AReaL's 1.5B run: 4.7 ms)."""
    update_s: float = 60.0
    """Seconds per learner update (``async_update_s``; assumed, of the order of AReaL's 53 s per update)."""
    length_median: float = 4000.0
    """Median response length in tokens of the lognormal(log median, sigma) lengths (unused with ``lengths``)."""
    length_sigma: float = 0.3
    """Shape of the lognormal lengths (``async_length_sigma``): 0 is constant, 1 already heavy-tailed."""
    length_max: int = 27_648
    """Longest response in tokens (a generation limit truncates there); 0: no limit. 27K as in AReaL's recipe
    (verl's runs: 28K)."""
    lengths: tuple[int, ...] = ()
    """Measured response lengths (tokens); when given they are the distribution and the lognormal is unused."""
    bound: int | None = 4
    """Staleness bound eta (``async_bound``): the generator runs at most eta updates ahead; 0 is synchronous,
    None unbounded. 4: AReaL finds eta <= 4 costs little accuracy."""
    samples: int = 100_000
    """Lognormal lengths drawn to stand for the distribution (Monte Carlo; unused with ``lengths``)."""
    seed: int = 0
    """Seed of that draw (numpy default_rng)."""

    def __post_init__(self):
        for name, low in (("batch", 1), ("group_size", 1), ("workers", 1), ("samples", 1), ("length_max", 0),
                          ("seed", 0)):
            _check_int(name, getattr(self, name), low)
        if self.batch % self.group_size:
            raise bad_value("batch", self.batch, f"a multiple of group_size={self.group_size}")
        for name in ("decode_step_s", "update_s", "length_sigma"):
            _check_float(name, getattr(self, name), 0.0, strict=False)
        _check_float("length_median", self.length_median, 0.0, strict=True)
        if self.length_max and self.length_median > self.length_max:
            raise bad_value("length_median", self.length_median, f"at most length_max={self.length_max}")
        if self.bound is not None:
            _check_int("bound", self.bound, 0, "an int >= 0 (0: synchronous) or None (unbounded)")
        if not isinstance(self.lengths, tuple):
            raise bad_value("lengths", self.lengths, "a tuple of ints >= 1 (measured lengths), or () for the lognormal")
        bad = [x for x in self.lengths if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1]
        if bad:
            raise bad_value("lengths", bad[0], "every length an int >= 1 (tokens)")

    def replace(self, **changes: Any) -> "ThroughputSpec":
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in fields(self)}
        for k in changes:
            if k not in known:
                raise bad_value("field", k, f"a ThroughputSpec field ({', '.join(sorted(known))})")
        return ThroughputSpec(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def _check_int(name: str, v: Any, low: int, expected: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise bad_value(name, v, expected or f"an int >= {low}")


def _check_float(name: str, v: Any, low: float, strict: bool) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > low if strict else v >= low)
    if not ok:
        raise bad_value(name, v, f"a finite number {'>' if strict else '>='} {low:g}")


@lru_cache(maxsize=32)
def _sorted_lengths(lengths: tuple[int, ...], median: float, sigma: float, cap: int, samples: int,
                    seed: int) -> np.ndarray:
    if lengths:
        x = np.asarray(lengths, dtype=np.float64)  # [N]
    else:
        z = np.random.default_rng(seed).standard_normal(samples)  # [N]
        x = np.ceil(median * np.exp(sigma * z))  # [N] whole tokens; ceil keeps >= 1 for median > 0
    x = np.maximum(x, 1.0)
    if cap:
        x = np.minimum(x, float(cap))  # a generation limit truncates
    x.setflags(write=False)
    return np.sort(x)


def length_distribution(spec: ThroughputSpec) -> np.ndarray:
    """The sorted lengths (tokens, float64, read-only) that stand for the spec's distribution."""
    return _sorted_lengths(spec.lengths, float(spec.length_median), float(spec.length_sigma), spec.length_max,
                           spec.samples, spec.seed)


def mean_length(spec: ThroughputSpec) -> float:
    """E[L] in tokens."""
    return float(length_distribution(spec).mean())


def expected_max(spec: ThroughputSpec, n: int) -> float:
    """E[max of n i.i.d. lengths], exact over the empirical distribution (module doc); 0 for n = 0."""
    _check_int("n", n, 0)
    if n == 0:
        return 0.0
    x = length_distribution(spec)  # [N] sorted
    k = np.arange(x.size + 1, dtype=np.float64) / x.size  # [N + 1] the CDF at x_k: k / N
    weights = np.diff(k ** n)  # [N] P(max = x_k)
    return float(np.dot(x, weights))


def sync_generation_s(spec: ThroughputSpec) -> float:
    """Seconds to generate one batch synchronously: ceil(B / W) waves, each as long as its longest sequence."""
    full, rest = divmod(spec.batch, spec.workers)
    steps = full * expected_max(spec, spec.workers) + expected_max(spec, rest)
    return steps * spec.decode_step_s


def sync_update_time(spec: ThroughputSpec) -> float:
    """T_sync: seconds per synchronous update (generation, then the update)."""
    return sync_generation_s(spec) + spec.update_s


def effective_workers(spec: ThroughputSpec) -> int:
    """W_eff = min(W, eta B): the slots the staleness bound lets decode at once (W when unbounded, and for
    bound 0, which is synchronous training on all W)."""
    return spec.workers if not spec.bound else min(spec.workers, spec.bound * spec.batch)


def async_generation_s(spec: ThroughputSpec) -> float:
    """G = B E[L] decode_step_s / W_eff: seconds per batch at the W_eff slots' throughput (bound 0: synchronous)."""
    if spec.bound == 0:
        return sync_generation_s(spec)
    return spec.batch * mean_length(spec) * spec.decode_step_s / effective_workers(spec)


def async_update_time(spec: ThroughputSpec) -> float:
    """T_async = max(update_s, G) in steady state; bound 0 is synchronous training (T_sync)."""
    if spec.bound == 0:
        return sync_update_time(spec)
    return max(spec.update_s, async_generation_s(spec))


def async_startup_s(spec: ThroughputSpec) -> float:
    """The pipeline's start-up: the first batch, generated from an empty engine (one synchronous generation)."""
    return sync_generation_s(spec)


def regime(spec: ThroughputSpec) -> str:
    """``synchronous`` (bound 0), ``generation-bound`` (G >= update_s) or ``training-bound``."""
    if spec.bound == 0:
        return "synchronous"
    return "generation-bound" if async_generation_s(spec) >= spec.update_s else "training-bound"


def expected_staleness(spec: ThroughputSpec) -> float:
    """Steady-state mean staleness of the asynchronous mode, in updates (module doc); inf when unbounded
    and training-bound (the generator's lead grows without limit)."""
    bound = math.inf if spec.bound is None else float(spec.bound)
    if spec.bound == 0:
        return 0.0
    if regime(spec) == "training-bound":
        return bound
    return min(bound, effective_workers(spec) / spec.batch + 0.5)


def compare(spec: ThroughputSpec) -> dict[str, Any]:
    """Both modes side by side: seconds per update, generation seconds, speed-up, regime, staleness."""
    t_sync, t_async = sync_update_time(spec), async_update_time(spec)
    mean = mean_length(spec)
    return {"sync_s": t_sync, "async_s": t_async, "speedup": t_sync / t_async if t_async > 0 else math.nan,
            "sync_generation_s": sync_generation_s(spec), "async_generation_s": async_generation_s(spec),
            "update_s": spec.update_s, "async_startup_s": async_startup_s(spec), "regime": regime(spec),
            "staleness": expected_staleness(spec), "workers_effective": effective_workers(spec),
            "mean_length": mean, "expected_max_length": expected_max(spec, min(spec.batch, spec.workers)),
            "straggler_factor": expected_max(spec, min(spec.batch, spec.workers)) / mean}


def wall_clock_at(updates: np.ndarray, spec: ThroughputSpec, mode: str) -> np.ndarray:
    """Simulated seconds at the end of each of ``updates`` (counts of updates done, >= 1)."""
    if mode not in MODES:
        raise bad_value("mode", mode, f"one of {', '.join(MODES)}")
    n = np.asarray(updates, dtype=np.float64)  # [R]
    if mode == "sync" or spec.bound == 0:
        return n * sync_update_time(spec)
    return async_startup_s(spec) + spec.update_s + (n - 1.0) * async_update_time(spec)


def wall_clock(metrics: pl.DataFrame, spec: ThroughputSpec, mode: str, step: str = "update") -> pl.Series:
    """Simulated wall-clock seconds at the end of each row's update (``WALL_COLUMN``), for a run's
    per-update metrics (``step`` counts from 0, as the loop logs it: row ``update = k`` is the (k+1)th)."""
    if not isinstance(metrics, pl.DataFrame):
        raise bad_value("metrics", type(metrics).__name__, "a polars DataFrame (one row per update)")
    if step not in metrics.columns:
        raise bad_value("step", step, f"a column of metrics ({', '.join(metrics.columns[:12])})")
    k = metrics.get_column(step)
    if not k.dtype.is_integer() or (k.len() and (k.null_count() or k.min() < 0)):
        raise bad_value(step, k.head(5).to_list(), "update numbers: ints >= 0 without nulls")
    return pl.Series(WALL_COLUMN, wall_clock_at(k.to_numpy() + 1, spec, mode), dtype=pl.Float64)


__all__ = ["MODES", "WALL_COLUMN", "ThroughputSpec", "async_generation_s", "async_startup_s", "async_update_time",
           "compare", "effective_workers", "expected_max", "expected_staleness", "length_distribution", "mean_length",
           "regime", "sync_generation_s", "sync_update_time", "wall_clock", "wall_clock_at"]
