"""Run charts: a grid of small line charts of the per-update metrics, saved as PNG or offline HTML.

``run_chart(metrics)`` draws one small panel per entry of ``PANELS`` (title, metric columns) against
the step column ``update``, skipping columns that are missing, non-numeric or all-null. Nulls,
NaN and inf are gaps, not errors. Columns logged only every N updates (``eval/`` by default, see
``SPARSE_PREFIXES``) are drawn as points joined over their non-null rows; the others are lines
that break at missing values. Rendering is fully offline through vl-convert (Vega-Lite compiled and
rendered in an embedded JavaScript engine; HTML exports inline the JavaScript bundle, no CDN).
The metric definitions (M2 = mean (log r)^2 of M2PO arXiv:2510.01161, ESS, clip fractions) live in
objectives.md section 5; this module only draws what the loop logged.

Left out: interactive selections / live updating (the notebook widgets redraw the chart), per-
staleness breakdowns, histograms of importance ratios, and smoothing (raw values are drawn).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import altair as alt
import polars as pl
import vl_convert as vlc

from workbench.errors import WorkbenchError, bad_value

# (panel title, metric columns). Adding a panel is one line; absent columns are skipped.
PANELS: list[tuple[str, list[str]]] = [
    ("accuracy (held-out, train)", ["eval/accuracy", "reward/accuracy"]),
    ("reward", ["reward/mean"]),
    ("clip / masked fraction", ["offpolicy/clipfrac", "offpolicy/masked_frac"]),
    ("M2 = mean (log r)^2", ["offpolicy/m2", "offpolicy/m2_after"]),
    ("ESS (fraction; token, sequence)", ["offpolicy/ess_token", "offpolicy/ess_seq"]),
    ("entropy", ["perf/entropy", "loss/entropy"]),
    ("KL(mu || pi) estimates", ["offpolicy/kl_k1", "offpolicy/kl_k3"]),
    ("staleness", ["offpolicy/staleness_mean", "offpolicy/staleness_max"]),
    ("response length", ["reward/response_len_mean"]),
    ("zero-variance groups", ["reward/zero_var_group_frac"]),
    ("grad norm (pre-clip)", ["loss/grad_norm", "perf/grad_norm"]),
    ("positive share of the loss", ["offpolicy/pos_share"]),
]
SPARSE_PREFIXES: tuple[str, ...] = ("eval/",)  # logged every N updates: points + line over non-null
WIDTH, HEIGHT, COLUMNS = 220, 150, 3


def _usable(df: pl.DataFrame, col: str) -> bool:
    if col not in df.columns or not df.schema[col].is_numeric():
        return False
    values = df.get_column(col).cast(pl.Float64)
    return bool(values.is_finite().any())  # null, NaN and inf only -> nothing to draw


def _panel_rows(df: pl.DataFrame, step: str, cols: list[str]) -> list[dict]:
    """Long-form rows {step, series, value, sparse}; non-finite values become null (gaps)."""
    rows: list[dict] = []
    for col in cols:
        sparse = col.startswith(SPARSE_PREFIXES)
        value = pl.col(col).cast(pl.Float64)
        part = df.select(
            pl.col(step).cast(pl.Float64).alias("step"),
            pl.when(value.is_finite()).then(value).alias("value"),
        ).filter(pl.col("step").is_not_null())
        if sparse:
            part = part.filter(pl.col("value").is_not_null())
        for r in part.sort("step").iter_rows(named=True):
            rows.append({"step": r["step"], "series": col, "value": r["value"], "sparse": sparse})
    return rows


def _panel(
    title: str, rows: list[dict], cols: list[str], step: str, width: int, height: int
) -> alt.LayerChart:
    legend = None  # one series: the y-axis title names it
    if len(cols) > 1:
        legend = alt.Legend(title=None, orient="bottom", direction="vertical", labelLimit=width)
    base = alt.Chart(alt.Data(values=rows)).encode(
        x=alt.X("step:Q", title=step, axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("value:Q", title=cols[0] if len(cols) == 1 else None, scale=alt.Scale(zero=False),
                axis=alt.Axis(format=".3~g")),  # on-policy M2 is float noise (1e-13): short labels
        color=alt.Color("series:N", legend=legend, sort=cols),
        tooltip=[
            alt.Tooltip("series:N"), alt.Tooltip("step:Q", title=step), alt.Tooltip("value:Q", format=".4g"),
        ],
    )
    line = base.mark_line(strokeWidth=1.5)
    points = base.transform_filter("datum.sparse").mark_point(filled=True, size=25)
    return alt.layer(line, points).properties(title=title, width=width, height=height)


def run_chart(
    metrics: pl.DataFrame,
    title: str = "",
    *,
    step: str = "update",
    panels: Sequence[tuple[str, Sequence[str]]] | None = None,
    columns: int = COLUMNS,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> alt.TopLevelMixin:
    """A ``columns``-wide grid of line charts of ``metrics`` (one row per update) against ``step``.

    Returns an Altair top-level chart (a ``ConcatChart``; a single text chart saying so when no
    known column has data). ``panels`` defaults to ``PANELS``.
    """
    if not isinstance(metrics, pl.DataFrame):
        raise bad_value("metrics", type(metrics).__name__, "a polars DataFrame (one row per update)")
    if step not in metrics.columns and metrics.width:  # an empty frame (no updates yet) is fine
        raise bad_value("step", step, f"a column of metrics ({', '.join(metrics.columns[:12])})")
    charts = []
    for panel_title, cols in PANELS if panels is None else panels:
        present = [c for c in cols if step in metrics.columns and _usable(metrics, c)]
        if present:
            rows = _panel_rows(metrics, step, present)
            charts.append(_panel(panel_title, rows, present, step, width, height))
    if not charts:
        note = alt.Chart(alt.Data(values=[{"t": "no chartable metric columns yet"}])).mark_text(size=13)
        return note.encode(text="t:N").properties(title=title, width=width, height=height)
    grid = alt.concat(*charts, columns=columns).resolve_scale(color="independent")
    return grid.properties(title=title) if title else grid


def _spec_and_version(chart: alt.TopLevelMixin) -> tuple[dict, str | None]:
    if not isinstance(chart, alt.TopLevelMixin):
        raise bad_value("chart", type(chart).__name__, "an Altair chart (e.g. from run_chart)")
    version = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return chart.to_dict(), version if version in vlc.get_vegalite_versions() else None


def save_png(chart: alt.TopLevelMixin, path: str | Path, scale: float = 1.0) -> Path:
    """Render ``chart`` to a PNG file offline (vl-convert; external data URLs are refused)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise bad_value("scale", scale, "a positive number")
    spec, version = _spec_and_version(chart)
    png = vlc.vegalite_to_png(spec, vl_version=version, scale=float(scale), allowed_base_urls=[])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def save_html(chart: alt.TopLevelMixin, path: str | Path) -> Path:
    """Write a self-contained HTML page (Vega, Vega-Lite and vega-embed inlined; no CDN)."""
    spec, version = _spec_and_version(chart)
    html = vlc.vegalite_to_html(spec, vl_version=version, bundle=True)
    if "cdn.jsdelivr" in html:  # guard against a vl-convert behaviour change
        raise WorkbenchError("save_html: vl-convert produced CDN links despite bundle=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


__all__ = ["COLUMNS", "HEIGHT", "PANELS", "SPARSE_PREFIXES", "WIDTH", "run_chart", "save_html", "save_png"]
