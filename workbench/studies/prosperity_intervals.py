"""How sure the prosperity report can be: intervals across seeds, and whether each comparison is resolved.

The report (``workbench.studies.prosperity_report``) compares cells of the objective x staleness
grid. Two sources of noise enter each number (``workbench.stats``):

- **seeds**: each cell's ``final`` and ``best`` accuracy is shown as the mean over seeds with a
  percentile-bootstrap 95% interval (``cell_intervals``), and from ``IQM_MIN_SEEDS`` seeds on also
  as the interquartile mean (Agarwal et al. 2021, arXiv:2108.13264; below 4 seeds rliable's 25%
  trimming drops no run and the IQM is the mean). With two seeds the bootstrap interval of the
  mean is the two seeds' range; with two or three it covers less than 95%.
- **one evaluation**: a cell with one seed has no across-seed interval; it shows the Wilson 95%
  interval of its run's last held-out evaluation of ``eval_n`` problems (the binomial noise alone).

Every comparison the report words says whether its difference lies outside its interval: the
ranking per staleness (``closest_lines``) and the four statements (``check_interval``), each
against the threshold the statement uses (``CHECK_THRESHOLDS``, ``check_claims``' defaults).
Differences between cells are unpaired: different cells share seeds, but a seed does not make two
runs of different objectives partners (their rollouts differ from the first update on). Within a
run (``is``'s rise from its start, its fall from its best) the per-run differences are resampled.

Left out: corrections for the many comparisons a report makes (read one resolved difference among
twenty as suggestive); intervals for the table's token fractions, M2 and ESS (statement (d), the
one comparison of fractions, has its interval).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import polars as pl

from workbench.errors import WorkbenchError
from workbench.stats import Interval, bootstrap_ci, describe_difference, difference_interval, wilson_interval
from workbench.studies.prosperity import ONPOLICY, check_claims

CONFIDENCE = 0.95
IQM_MIN_SEEDS = 4  # rliable's trim of floor(n / 4) runs per side removes nothing below 4
CHECK_THRESHOLDS = dict(check_claims.__kwdefaults__)  # margin, degrade, ratio: what the statements compare with
NONE = Interval(math.nan, math.nan, math.nan)


def last_evaluations(df: pl.DataFrame) -> pl.DataFrame:
    """``run`` -> ``last``: each successful run's last held-out evaluation (what a Wilson interval describes)."""
    ok = df.filter((pl.col("status") == "ok") & pl.col("eval/accuracy").is_not_null())
    return ok.sort("run", "update").group_by("run", maintain_order=True).agg(
        pl.col("eval/accuracy").last().cast(pl.Float64).alias("last"))


def with_last(runs: pl.DataFrame, df: pl.DataFrame) -> pl.DataFrame:
    """``runs`` (``runs_table(df)``) with each run's last evaluation as ``last``."""
    return runs.join(last_evaluations(df), on="run", how="left")


def seed_values(runs: pl.DataFrame, objective: str, staleness: int, column: str = "final") -> np.ndarray:
    """The finite values of ``column`` over the seeds of one cell of ``runs`` (``runs_table``)."""
    part = runs.filter((pl.col("objective") == objective) & (pl.col("staleness") == staleness))
    return part[column].cast(pl.Float64).drop_nulls().drop_nans().to_numpy()


def _ci(values: np.ndarray, stat: str = "mean") -> Interval:
    return bootstrap_ci(values, stat, CONFIDENCE) if len(values) else NONE


def cell_intervals(runs: pl.DataFrame, eval_n: int | None = None) -> pl.DataFrame:
    """Objective x staleness: ``seeds``; ``final``, ``best`` with ``_lo`` / ``_hi`` (bootstrap 95%
    interval of the mean across seeds); ``iqm`` with ``iqm_lo`` / ``iqm_hi`` from ``IQM_MIN_SEEDS``
    seeds (else NaN); with one seed and ``eval_n`` known, ``last`` and the Wilson 95% interval of that
    last evaluation, ``last_lo`` / ``last_hi`` (else NaN). ``runs``: ``with_last(runs_table(df), df)``."""
    _need_runs(runs)
    rows = []
    for (objective, staleness), part in runs.group_by(["objective", "staleness"], maintain_order=True):
        final = part["final"].cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
        best = part["best"].cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
        f, b = _ci(final), _ci(best)
        q = _ci(final, "iqm") if len(final) >= IQM_MIN_SEEDS else NONE
        last, wilson = math.nan, (math.nan, math.nan)
        if part.height == 1 and eval_n and "last" in part.columns and part["last"][0] is not None:
            last = float(part["last"][0])
            wilson = wilson_interval(last * eval_n, eval_n, CONFIDENCE)
        rows.append({"objective": objective, "staleness": staleness, "seeds": part.height,
                     "final": f.estimate, "final_lo": f.lo, "final_hi": f.hi,
                     "best": b.estimate, "best_lo": b.lo, "best_hi": b.hi,
                     "iqm": q.estimate, "iqm_lo": q.lo, "iqm_hi": q.hi,
                     "last": last, "last_lo": wilson[0], "last_hi": wilson[1]})
    return pl.from_dicts(rows, infer_schema_length=None)


def _finite(*xs: float) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def _pts(x: float, signed: bool = False) -> str:
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def accuracy_text(row: dict, stat: str) -> str:
    """One table cell, in points: ``45.0 [40.0, 50.0]`` (mean and bootstrap interval across seeds);
    with one seed ``48.0 (W [41.9, 54.1])`` (W: Wilson interval of the last evaluation) or ``48.0``."""
    v = row[stat]
    if not _finite(v):
        return "-"
    if _finite(row[f"{stat}_lo"], row[f"{stat}_hi"]):
        return f"{_pts(v)} [{_pts(row[f'{stat}_lo'])}, {_pts(row[f'{stat}_hi'])}]"
    if stat == "final" and _finite(row["last_lo"], row["last_hi"]):
        return f"{_pts(v)} (W [{_pts(row['last_lo'])}, {_pts(row['last_hi'])}])"
    return _pts(v)


def gap_text(interval: Interval) -> str:
    """``-2.0 [-5.1, +1.2] includes 0`` / ``... excludes 0``; ``-2.0, one seed: no interval``."""
    est, lo, hi = interval
    if not _finite(lo, hi):
        return f"{_pts(est, True)}, one seed: no interval, not resolved"
    side = "excludes" if lo > 0 or hi < 0 else "includes"
    return f"{_pts(est, True)} [{_pts(lo, True)}, {_pts(hi, True)}] {side} 0"


def against(name: str, interval: Interval, threshold: float, *, scale: float = 100.0, digits: int = 1,
            unit: str = " points") -> str:
    """``name`` with its 95% interval, and whether ``threshold`` lies outside it (resolved) or inside."""
    est, lo, hi = interval
    t = f"{scale * threshold:g}{unit}"
    value = f"{name} {scale * est:.{digits}f}{unit}"
    if not _finite(lo, hi):
        return f"{value}, no interval (one seed): not resolved against {t}"
    bounds = f"{100 * CONFIDENCE:g}% CI [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    if lo > threshold or hi < threshold:
        return f"{value}, {bounds} {'above' if lo > threshold else 'below'} {t}: resolved"
    return f"{value}, {bounds} includes {t}: not resolved"


class Part(NamedTuple):
    """One comparison behind a statement: ``label``'s ``interval`` against ``threshold``."""

    label: str
    """What is compared, e.g. ``on-policy - m2po final``."""
    interval: Interval
    """The estimate and its 95% interval (NaN bounds: none)."""
    threshold: float
    """The value the statement compares with."""
    above: bool
    """True: the statement needs the value above ``threshold``; False: below."""
    digits: int = 1
    """Decimals shown (after scaling to points or percent)."""
    unit: str = " points"
    """Unit shown after the numbers."""
    scale: float = 100.0
    """Shown = value x scale (100: fractions as points; 1: nats)."""


def part_text(p: Part) -> str:
    """``against`` of one part (whether its threshold lies outside the interval)."""
    return against(p.label, p.interval, p.threshold, scale=p.scale, digits=p.digits, unit=p.unit)


def part_side(p: Part) -> bool | None:
    """True when the whole interval is on the side the statement needs, False when it is all on the
    other side, None when it includes the threshold or there is no interval."""
    _, lo, hi = p.interval
    if not _finite(lo, hi):
        return None
    if lo > p.threshold or hi < p.threshold:
        return (lo > p.threshold) == p.above
    return None


def settled(holds: bool | None, parts: list[Part]) -> bool | None:
    """Whether the intervals settle a verdict: a statement that holds is settled when every part's
    interval lies on the needed side, one that does not hold when some part's lies on the wrong
    side; None without a verdict or parts."""
    if holds is None or not parts:
        return None
    sides = [part_side(p) for p in parts]
    return all(s is True for s in sides) if holds else any(s is False for s in sides)


def check_parts(name: str, runs: pl.DataFrame, staleness: int | None) -> list[Part]:
    """The comparisons behind statement ``name`` (b-d of ``check_claims``) at ``staleness``; [] when its
    cells are missing. Thresholds: ``CHECK_THRESHOLDS``."""
    _need_runs(runs)
    margin, degrade, ratio = (CHECK_THRESHOLDS[k] for k in ("margin", "degrade", "ratio"))
    ref = seed_values(runs, ONPOLICY, 0)
    if staleness is None or not len(ref):
        return []
    v = {(o, c): seed_values(runs, o, staleness, c) for o in ("is", "ppo_clip", "m2po") for c in ("final", "zeroed")}
    if name == "b" and len(v["is", "final"]) and len(v["ppo_clip", "final"]):
        per_run = runs.with_columns((pl.col("best") - pl.col("initial")).alias("_rise"),
                                    (pl.col("best") - pl.col("final")).alias("_fall"))
        return [Part("is rise from its start", _ci(seed_values(per_run, "is", staleness, "_rise")), degrade, True),
                Part("is fall from its best", _ci(seed_values(per_run, "is", staleness, "_fall")), degrade, True),
                Part("on-policy - ppo_clip final", difference_interval(ref, v["ppo_clip", "final"], CONFIDENCE),
                     margin, True)]  # rise and fall are within each run: paired
    if name == "c" and len(v["m2po", "final"]):
        return [Part("on-policy - m2po final", difference_interval(ref, v["m2po", "final"], CONFIDENCE), margin, False)]
    if name == "d" and len(v["m2po", "zeroed"]) and len(v["ppo_clip", "zeroed"]):
        d = difference_interval(v["m2po", "zeroed"], ratio * v["ppo_clip", "zeroed"], CONFIDENCE)
        return [Part(f"m2po masked - {ratio:g} x ppo_clip clipped", d, 0.0, False, 3, "% of tokens")]
    return []


def check_interval(name: str, runs: pl.DataFrame, staleness: int | None, eval_n: int | None = None) -> str:
    """The intervals behind statement ``name`` (a-d of ``check_claims``) at ``staleness``, as one
    sentence ("" when its cells are missing); thresholds: ``CHECK_THRESHOLDS``."""
    _need_runs(runs)
    ref = seed_values(runs, ONPOLICY, 0)
    if name == "a":
        if not len(ref):
            return ""
        est, lo, hi = _ci(ref)
        if _finite(lo, hi):
            return (f"on-policy final {_pts(est)}%, {100 * CONFIDENCE:g}% CI [{_pts(lo)}, {_pts(hi)}] across "
                    f"{len(ref)} seeds")
        cell = cell_intervals(runs.filter((pl.col("objective") == ONPOLICY) & (pl.col("staleness") == 0)), eval_n)
        row = cell.row(0, named=True)
        if _finite(row["last_lo"], row["last_hi"]):
            return (f"one seed: its last evaluation {_pts(row['last'])}%, Wilson {100 * CONFIDENCE:g}% "
                    f"[{_pts(row['last_lo'])}, {_pts(row['last_hi'])}] on {eval_n} problems")
        return "one seed: no interval"
    return "; ".join(part_text(p) for p in check_parts(name, runs, staleness))


def closest_lines(runs: pl.DataFrame) -> list[str]:
    """Per staleness: the objectives by mean final accuracy, best first, each with its gap to
    on-policy and the 95% interval of that gap, then whether the first two are resolved."""
    _need_runs(runs)
    ref = seed_values(runs, ONPOLICY, 0)
    lines = []
    for s in sorted(x for x in runs["staleness"].unique().to_list() if x > 0):
        at = runs.filter(pl.col("staleness") == s)["objective"].unique(maintain_order=True).to_list()
        cells = [(o, seed_values(runs, o, s)) for o in at]
        cells = sorted([(o, x) for o, x in cells if len(x)], key=lambda c: -float(np.mean(c[1])))
        parts = [f"{o} {_pts(float(np.mean(x)))}%"
                 + (f" ({gap_text(difference_interval(x, ref, CONFIDENCE))})" if len(ref) else "") for o, x in cells]
        lines.append(f"- staleness {s}: " + ", ".join(parts))
        if len(cells) >= 2:
            (a, xa), (b, xb) = cells[:2]
            lines.append("  - first vs second: " + describe_difference(
                a, b, difference_interval(xa, xb, CONFIDENCE), confidence=CONFIDENCE, scale=100, digits=1,
                unit=" points"))
    if len(ref):
        lines.append(f"- (final accuracy; in brackets the points against on-policy {_pts(float(np.mean(ref)))}% and "
                     f"the {100 * CONFIDENCE:g}% bootstrap CI of that difference across seeds)")
    return lines


def _need_runs(runs: pl.DataFrame) -> None:
    missing = sorted({"objective", "staleness", "seed", "final", "best"} - set(runs.columns))
    if missing:
        raise WorkbenchError(f"runs lacks column(s) {', '.join(missing)}: expected runs_table(df) (one row per "
                             "run), not a summary table")


__all__ = ["CHECK_THRESHOLDS", "CONFIDENCE", "IQM_MIN_SEEDS", "Part", "accuracy_text", "against", "cell_intervals",
           "check_interval", "check_parts", "closest_lines", "gap_text", "last_evaluations", "part_side", "part_text",
           "seed_values", "settled", "with_last"]
