"""Held-out accuracy against simulated wall-clock: the trade a choice between synchronous and
asynchronous training is about, one line per run with its 95% Wilson interval as a band.

    chart = accuracy_vs_wall_clock({"on-policy": m0, "stale 4": m1},
                                   {"on-policy": (spec, "sync"), "stale 4": (spec, "async")})

Each run's x is ``throughput.wall_clock`` of its metrics under its (spec, mode); the y values are
its ``eval/accuracy`` rows in %, the band its ``eval/accuracy_lo`` / ``_hi`` columns (the interval
the loop logs with every evaluation; runs without them are drawn without a band). The x unit
follows the longest run: seconds, minutes or hours.
"""

from __future__ import annotations

from typing import Mapping

import altair as alt
import polars as pl

from workbench.charts.style import BANDS
from workbench.errors import bad_value
from workbench.studies.throughput_model import MODES, ThroughputSpec, wall_clock

ACCURACY = "eval/accuracy"
LO, HI = BANDS[ACCURACY]  # the Wilson interval columns logged beside it
BAND_TEXT = "band: 95% Wilson interval of each held-out evaluation; x: simulated by workbench.studies.throughput"
UNITS = ((3 * 3600, 3600.0, "h"), (180, 60.0, "min"), (0, 1.0, "s"))  # longest run above -> divisor, unit


def _pairs(runs: Mapping[str, pl.DataFrame], specs) -> dict[str, tuple[ThroughputSpec, str]]:
    if not isinstance(runs, Mapping) or not runs:
        raise bad_value("runs", type(runs).__name__, "a non-empty dict of run name -> metrics DataFrame")
    if isinstance(specs, tuple):
        specs = {name: specs for name in runs}  # one (spec, mode) for every run
    if not isinstance(specs, Mapping):
        raise bad_value("specs", type(specs).__name__, "a (ThroughputSpec, mode) pair or a dict run name -> pair")
    out = {}
    for name, metrics in runs.items():
        if not isinstance(metrics, pl.DataFrame):
            raise bad_value(f"runs[{name!r}]", type(metrics).__name__, "a polars DataFrame (one row per update)")
        if ACCURACY not in metrics.columns:
            raise bad_value(f"runs[{name!r}]", list(metrics.columns[:8]), f"metrics with a {ACCURACY} column")
        pair = specs.get(name)
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], ThroughputSpec)
                and pair[1] in MODES):
            raise bad_value(f"specs[{name!r}]", pair, f"a (ThroughputSpec, mode) pair, mode one of {', '.join(MODES)}")
        out[name] = pair
    return out


def wall_clock_frame(runs: Mapping[str, pl.DataFrame], specs) -> pl.DataFrame:
    """Long table of the evaluated updates: run, mode, update, wall_clock_s, accuracy, lo, hi (fractions)."""
    parts = []
    for name, (spec, mode) in _pairs(runs, specs).items():
        m = runs[name]
        cols = [pl.col(c).cast(pl.Float64).alias(a) if c in m.columns else pl.lit(None, pl.Float64).alias(a)
                for c, a in ((ACCURACY, "accuracy"), (LO, "lo"), (HI, "hi"))]
        parts.append(m.with_columns(wall_clock(m, spec, mode)).select(
            pl.lit(name).alias("run"), pl.lit(mode).alias("mode"), pl.col("update").cast(pl.Int64),
            "wall_clock_s", *cols).filter(pl.col("accuracy").is_not_null() & pl.col("accuracy").is_not_nan()))
    return pl.concat(parts)


def accuracy_vs_wall_clock(runs: Mapping[str, pl.DataFrame], specs, title: str = "",
                           width: int = 420, height: int = 260) -> alt.LayerChart:
    """Accuracy (%) against simulated wall-clock, one colour per run (legend: ``run (mode)``), the
    Wilson band behind each line, tooltips with the update, the time and the interval."""
    frame = wall_clock_frame(runs, specs)
    longest = float(frame["wall_clock_s"].max() or 0.0)
    div, unit = next((d, u) for low, d, u in UNITS if longest > low or low == 0)
    data = frame.with_columns((pl.col("wall_clock_s") / div).alias("wall"),
                              (pl.col("accuracy", "lo", "hi") * 100.0),
                              (pl.col("run") + " (" + pl.col("mode") + ")").alias("series"))
    order = list(dict.fromkeys(data["series"].to_list()))
    x = alt.X("wall:Q", title=f"simulated wall-clock ({unit})")
    colour = alt.Color("series:N", sort=order, scale=alt.Scale(domain=order), title="run (mode)")
    tips = [alt.Tooltip("run:N"), alt.Tooltip("mode:N"), alt.Tooltip("update:Q", title="update"),
            alt.Tooltip("wall:Q", title=f"wall-clock ({unit})", format=".3~f"),
            alt.Tooltip("accuracy:Q", title="held-out accuracy (%)", format=".1f"),
            alt.Tooltip("lo:Q", title="95% interval low (%)", format=".1f"),
            alt.Tooltip("hi:Q", title="95% interval high (%)", format=".1f")]
    base = alt.Chart().encode(x=x, color=colour)
    band = base.transform_filter("isValid(datum.lo) && isValid(datum.hi)").mark_area(opacity=0.18).encode(
        y=alt.Y("lo:Q", title="held-out accuracy (%)", scale=alt.Scale(zero=False)), y2="hi:Q")
    line = base.mark_line(point=True, strokeWidth=1.6).encode(y="accuracy:Q", tooltip=tips)
    return alt.layer(band, line, data=alt.Data(values=data.drop("wall_clock_s").to_dicts())).properties(
        width=width, height=height,
        title=alt.TitleParams(text=title or "held-out accuracy against simulated wall-clock", subtitle=BAND_TEXT))


__all__ = ["accuracy_vs_wall_clock", "wall_clock_frame"]
