""""How stale can I go?" answered from the prosperity sweeps, and the compute they took.

The rule (``within``). At staleness s, objective o's gap is d = mean final(o, s) - mean final of the
on-policy reference, with the unpaired percentile-bootstrap 95% interval [lo, hi] across seeds
(``workbench.stats.difference_interval``). s is *within* reach when that interval includes 0 or
lies above -delta (delta = ``DELTA``, statement (c)'s 3-point margin): o is then not shown to be
worse than on-policy by delta or more. It is *out* when the interval lies below 0 and reaches
-delta or lower. A cell with one seed (no interval) is within when d > -delta.

The answer for o is the largest measured staleness S such that every measured staleness up to S
is within: "at least S" when the largest measured is within, "below S" when the smallest measured
is already out (nothing smaller was measured, so nothing smaller is claimed). A staleness within
again after one that is out is named, not counted.

Compute (``compute_lines``): run-minutes (the sum of every run's ``perf/time_step``, the update
steps alone, and of the run wall times the sweep recorded, evaluations and start-up included) and
the sweeps' wall time (``prosperity_sweeps.wall_seconds``).

Left out: equivalence tests with an alpha budget across the grid (two or three seeds cannot carry one).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from workbench.stats import Interval, difference_interval
from workbench.studies.prosperity_intervals import CHECK_THRESHOLDS, CONFIDENCE, seed_values
from workbench.studies.prosperity_stats import ONPOLICY

DELTA = CHECK_THRESHOLDS["margin"]  # 3 points: the margin of statement (c)


def within(interval: Interval, delta: float = DELTA) -> bool:
    """The rule of the module docstring for one gap ``(d, lo, hi)`` to on-policy (fractions)."""
    d, lo, hi = interval
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return d > -delta
    return (lo <= 0.0 <= hi) or lo > -delta


def how_stale(runs: pl.DataFrame, delta: float = DELTA) -> pl.DataFrame:
    """Objective x staleness: ``gap``, ``lo``, ``hi`` (final - on-policy final, its 95% interval; NaN:
    none), ``seeds`` and ``within``; empty without on-policy runs. ``runs``: ``runs_table``."""
    ref = seed_values(runs, ONPOLICY, 0)
    rows = []
    if not len(ref):
        return pl.DataFrame()
    for o in runs["objective"].unique(maintain_order=True).to_list():
        if o == ONPOLICY:
            continue
        for s in sorted(runs.filter(pl.col("objective") == o)["staleness"].unique().to_list()):
            x = seed_values(runs, o, s)
            if not len(x):
                continue
            iv = difference_interval(x, ref, CONFIDENCE)
            rows.append({"objective": o, "staleness": s, "seeds": len(x), "gap": iv.estimate, "lo": iv.lo,
                         "hi": iv.hi, "within": within(iv, delta)})
    return pl.from_dicts(rows, infer_schema_length=None) if rows else pl.DataFrame()


def answer(part: pl.DataFrame) -> tuple[str, int | None]:
    """One objective's rows of ``how_stale`` -> (the answer's text, the largest staleness within or None)."""
    part = part.sort("staleness")
    steps, ok = part["staleness"].to_list(), part["within"].to_list()
    if all(ok):
        return f"at least {steps[-1]} (the largest measured)", steps[-1]
    first_out = ok.index(False)
    if first_out == 0:
        return f"below {steps[0]} (the smallest measured)", None
    return f"{steps[first_out - 1]} (out at {steps[first_out]})", steps[first_out - 1]


def _gap(row: dict) -> str:
    if not (math.isfinite(row["lo"]) and math.isfinite(row["hi"])):
        return f"{100 * row['gap']:+.1f} (one seed)"
    return f"{100 * row['gap']:+.1f} [{100 * row['lo']:+.1f}, {100 * row['hi']:+.1f}]"


def how_stale_lines(runs: pl.DataFrame, delta: float = DELTA) -> list[str]:
    """The rule in words, a table (objective x staleness: gap, interval, within / out, answer) and one
    sentence per objective, generated from ``how_stale``; one line saying what is missing without it."""
    table = how_stale(runs, delta)
    if not table.height:
        return ["Not measured: needs the on-policy reference runs (staleness 0) and at least one stale objective."]
    stale = sorted(table["staleness"].unique().to_list())
    out = [f"Rule: at staleness s, the gap is an objective's final accuracy minus on-policy's "
           f"({100 * float(np.mean(seed_values(runs, ONPOLICY, 0))):.1f}%), with its {100 * CONFIDENCE:g}% bootstrap "
           f"CI across seeds. s is *within* reach when that CI includes 0 or lies above -{100 * delta:g} points, *out* "
           f"when it lies below 0 and reaches -{100 * delta:g} points (one seed: within when the gap is above "
           f"-{100 * delta:g}). The answer is the largest staleness up to which every measured staleness is within.",
           "", "| objective | " + " | ".join(f"staleness {s}: gap (points)" for s in stale) + " | how stale |",
           "|---|" + "---|" * (len(stale) + 1)]
    sentences = []
    for o in table["objective"].unique(maintain_order=True).to_list():
        part = table.filter(pl.col("objective") == o).sort("staleness")
        cells = {r["staleness"]: r for r in part.iter_rows(named=True)}
        text, limit = answer(part)
        out.append(f"| {o} | " + " | ".join(
            f"{_gap(cells[s])} {'within' if cells[s]['within'] else '**out**'}" if s in cells else "-"
            for s in stale) + f" | {text} |")
        rows = part.to_dicts()
        outs = [r for r in rows if not r["within"]]
        if not outs:
            last = rows[-1]
            sentences.append(f"- {o}: within reach at every measured staleness, up to {last['staleness']} "
                             f"(gap there {_gap(last)} points).")
            continue
        first = outs[0]
        again = [r["staleness"] for r in rows if r["within"] and r["staleness"] > first["staleness"]]
        head = (f"- {o}: up to staleness {limit}, then out at {first['staleness']}" if limit is not None else
                f"- {o}: out already at the smallest measured staleness, {first['staleness']}")
        sentences.append(head + f" (gap {_gap(first)} points)"
                         + (f"; within again at {', '.join(map(str, again))}" if again else "") + ".")
    return out + [""] + sentences


def compute_lines(df: pl.DataFrame, wall: float | None) -> list[str]:
    """What the runs cost: run-minutes (``perf/time_step`` and the recorded run wall times) and the
    sweeps' wall time ``wall`` (seconds; None: not recorded). ``df``: the merged sweep metrics."""
    ok = df.filter(pl.col("status") == "ok") if "status" in df.columns else df
    runs = ok["run"].n_unique() if "run" in ok.columns else 0
    out = [f"- Runs: {runs} successful."]
    if "perf/time_step" in ok.columns:
        steps = float(ok["perf/time_step"].cast(pl.Float64).drop_nulls().drop_nans().sum())
        out.append(f"- Update steps: {steps / 60:.0f} run-minutes (the sum of every update's perf/time_step).")
    else:
        out.append("- Update steps: not measured (the runs logged no perf/time_step).")
    if "run_seconds" in ok.columns:
        per_run = ok.group_by("run").agg(pl.col("run_seconds").first())["run_seconds"].drop_nulls().drop_nans()
        if len(per_run):
            out.append(f"- Whole runs: {float(per_run.sum()) / 60:.0f} run-minutes (the sweeps' recorded wall time "
                       f"of {len(per_run)} runs: evaluations, checkpoints and start-up included).")
    out.append(f"- Sweep wall time: {wall / 60:.0f} minutes (every report command that ran these sweeps)."
               if wall is not None else
               "- Sweep wall time: not recorded (sweeps run before it was; `python -m workbench report` records it).")
    return out


__all__ = ["DELTA", "answer", "compute_lines", "how_stale", "how_stale_lines", "within"]
