"""The charts of a run: one grid of small line panels of the per-update metrics, for the CLI's
``charts.png``, the notebooks' live widget (``workbench.ui.live``) and reports.

``chart_spec(metrics, knob_events)`` builds the Vega-Lite spec as a plain dict (Altair's schema
validation of a few thousand data rows took seconds, too slow for a live refresh); ``run_chart``
wraps it as an Altair chart; ``save_png`` / ``save_html`` render a chart or a spec fully offline
through vl-convert (Vega-Lite compiled and rendered in an embedded JavaScript engine; HTML exports
inline the JavaScript bundle). What each metric is called, its unit, the numerical floor that draws
on-policy round-off as its exact nominal value, smoothing, log scales and the objectives' key
statistics are in ``workbench.charts.style``; rendering (PNG, HTML, the notebook display bundle) and
``network_refs``, the check that an output loads nothing from the network, are in
``workbench.charts.render`` and re-exported here.

Every panel has a title, a y-axis title with its unit, legend names from ``chart_style.METRICS``
(the raw key is in the tooltip) and tooltips. Every panel folds one wide table (update + the
panels' columns, rounded to 7 significant digits) that the spec holds once, so a refresh sends each
number once. A panel is drawn only for columns that are present, numeric and hold at least one
finite value; null, NaN and inf are gaps. Columns logged only every N updates (``eval/``) are points
joined over their non-null rows; held-out accuracy carries its 95% Wilson interval as error bars
(``chart_style.BANDS``: the ``eval/accuracy_lo`` / ``_hi`` columns the loop logs). Knob changes (``knob_events.jsonl``) are dashed rules at the update
they took effect at, on every panel, named in one legend ("knob changes") with a row per change.
The metric definitions are in docs/design.md, "Diagnostics".

Left out: zoom/brush selections, histograms of ratios.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import altair as alt
import polars as pl

from workbench.charts.render import (ChartDisplay, mimebundle, network_refs, png_bytes, save_html, save_png,
                                    spec_and_version)
from workbench.charts.style import (BANDS, PANELS, REF_PREFIX, SPARSE_PREFIXES, Flat, Panel, apply_floor, as_panel,
                                   chartable, flat_domain, floor_note, key_panels, metric, panel_ids, smooth_frame,
                                   spans_decades, y_scale)
from workbench.errors import bad_value

WIDTH, HEIGHT, COLUMNS = 230, 120, 3
EMPTY_TEXT = "no updates yet"
SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
LOG_SCALES = ("off", "auto")  # or a list of panel ids (chart_style.Panel.id)
# knob-change rules: dark, dashed, apart from the panels' own (tableau10) series colours
KNOB_COLOURS = ["#333333", "#7b2d8e", "#a05a00", "#1b4f8a", "#0e6b50", "#9b1c1c"]


EMPTY_MEANS = {"sampler_logits_dtype": "exact", "trainer_logits_dtype": "exact"}
"""What a knob's empty value means, for the labels ('' is "no rounding" for the logit dtypes)."""


def event_label(changes: dict[str, Any]) -> str:
    """Short text of one knob change, e.g. ``staleness=32 objective=m2po tau=0.08``."""
    parts = []
    for k, v in changes.items():
        if k == "objective_params":
            if "objective" not in changes:  # a switch resets every parameter: the name says enough
                parts.extend(f"{p}={_fmt(x)}" for p, x in v.items())
        else:
            parts.append(f"{k}={EMPTY_MEANS.get(k, '') if v == '' else _fmt(v)}")
    return " ".join(parts)


def change_text(update: int, label: str) -> str:
    """One row of the knob-change legend."""
    return f"update {update}: {label}"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _clean(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    v = float(v)
    return float(f"{v:.7g}") if math.isfinite(v) else None  # JSON has no NaN/inf: gaps


def present_panels(metrics: pl.DataFrame, panels: Sequence[Panel | tuple[str, Sequence[str]]]) -> list[Panel]:
    """The panels with at least one numeric column holding a finite value, with only those columns."""
    out = []
    for panel in map(as_panel, panels):
        keep = tuple(c for c in panel.columns if chartable(metrics, c))
        if keep:
            out.append(Panel(panel.id, panel.title, panel.axis, keep))
    return out


def _check(metrics: Any, step: str, smooth: Any, log_scale: Any) -> None:
    if not isinstance(metrics, pl.DataFrame):
        raise bad_value("metrics", type(metrics).__name__, "a polars DataFrame (one row per update)")
    if step not in metrics.columns and metrics.width:  # an empty frame (no updates yet) is fine
        raise bad_value("step", step, f"a column of metrics ({', '.join(metrics.columns[:12])})")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise bad_value("smooth", smooth, "an int >= 0 (updates in the trailing mean; 0 or 1: raw values)")
    ids = isinstance(log_scale, (list, tuple)) and all(isinstance(x, str) for x in log_scale)
    if not (ids or (isinstance(log_scale, str) and log_scale in LOG_SCALES)):
        raise bad_value("log_scale", log_scale, "'off', 'auto' or a list of panel ids (chart_style.PANELS)")


def _names_expr(cols: Sequence[str]) -> str:
    """A Vega expression mapping ``datum.series`` (the raw key) to its legend name."""
    expr = json.dumps(metric(cols[-1]).name)
    for c in reversed(cols[:-1]):
        expr = f"datum.series === {json.dumps(c)} ? {json.dumps(metric(c).name)} : {expr}"
    return expr


def _bands(frame: pl.DataFrame, cols: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The interval columns (``chart_style.BANDS``) the frame holds for ``cols``."""
    return {c: BANDS[c] for c in cols if c in BANDS and all(chartable(frame, b) for b in BANDS[c])}


def _band_layer(col: str, lo: str, hi: str, step: str, axis: str) -> dict[str, Any]:
    """Error bars from ``lo`` to ``hi`` at ``col``'s points, in its series colour (the shared scale)."""
    return {"transform": [{"filter": f"isValid(datum[{json.dumps(lo)}]) && isValid(datum[{json.dumps(hi)}])"}],
            "mark": {"type": "rule", "strokeWidth": 1.2, "opacity": 0.6},
            "encoding": {"x": {"field": step, "type": "quantitative"},
                         "y": {"field": lo, "type": "quantitative"}, "y2": {"field": hi},
                         "color": {"datum": metric(col).name},
                         "tooltip": [{"field": step, "type": "quantitative", "title": step},
                                     {"field": lo, "type": "quantitative", "title": f"{axis}: 95% interval, low",
                                      "format": ".4~g"},
                                     {"field": hi, "type": "quantitative", "title": f"{axis}: 95% interval, high",
                                      "format": ".4~g"}]}}


def _panel(p: Panel, step: str, width: int, scale: dict[str, Any], note: str, changes: list[str],
           bands: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    cols = list(p.columns)
    names = [metric(c).name for c in cols]
    base: dict[str, Any] = {
        "transform": [{"fold": cols, "as": ["series", "value"]},
                      {"filter": "isValid(datum.value) || indexof(datum.series, 'eval/') != 0"},
                      {"calculate": _names_expr(cols), "as": "name"}],
        "encoding": {
            "x": {"field": step, "type": "quantitative", "title": step, "axis": {"tickMinStep": 1, "format": "d"}},
            "y": {"field": "value", "type": "quantitative", "title": p.axis, "scale": scale},
            "color": {"field": "name", "type": "nominal", "sort": names, "scale": {"domain": names},
                      "legend": {"title": None, "orient": "bottom", "direction": "vertical", "labelLimit": width}},
            "tooltip": [{"field": "name", "type": "nominal", "title": "metric"},
                        {"field": "series", "type": "nominal", "title": "key"},
                        {"field": step, "type": "quantitative", "title": step},
                        {"field": "value", "type": "quantitative", "title": p.axis, "format": ".6~g"}],
        },
    }
    if any(c.startswith(REF_PREFIX) for c in cols):  # a parameter's value: dashed, like a threshold
        base["encoding"]["strokeDash"] = {"condition": {"test": f"indexof(datum.series, '{REF_PREFIX}') == 0",
                                                        "value": [6, 3]}, "value": [1, 0]}
    layers: list[dict[str, Any]] = [{**base, "mark": {"type": "line", "strokeWidth": 1.5}}]
    sparse = [c for c in cols if c.startswith(SPARSE_PREFIXES)]
    if sparse:
        layers.append({**base, "transform": base["transform"] + [{"filter": {"field": "series", "oneOf": sparse}}],
                       "mark": {"type": "point", "filled": True, "size": 20}})
    for col, (lo, hi) in (bands or {}).items():
        if col in cols:
            layers.append(_band_layer(col, lo, hi, step, p.axis))
            note = "; ".join(filter(None, [note, f"bars: 95% interval of {metric(col).name}"]))
    if changes:
        layers.append(_knob_layer(changes))
    return {"title": {"text": p.title, "subtitle": note} if note else p.title, "width": width, "layer": layers}


def _knob_layer(changes: list[str]) -> dict[str, Any]:
    """Dashed rules at the knob changes; ``stroke`` is shared across the grid, so the changes are one
    legend of the whole chart with a row each (``change_text``), not text over the data."""
    columns = 1 if len(changes) <= 6 else 2 if len(changes) <= 16 else 3
    return {"data": {"name": "knobs"},
            "transform": [{"calculate": "'update ' + datum.update + ': ' + datum.label", "as": "change"}],
            "mark": {"type": "rule", "strokeDash": [4, 3], "strokeWidth": 1.5, "opacity": 0.85},
            "encoding": {"x": {"field": "update", "type": "quantitative"},
                         "stroke": {"field": "change", "type": "nominal", "sort": changes,
                                    "scale": {"domain": changes, "range": KNOB_COLOURS},
                                    "legend": {"title": "knob changes", "orient": "bottom", "direction": "vertical",
                                               "columns": columns, "labelLimit": 0, "labelFontSize": 11,
                                               "symbolDash": [4, 3], "symbolStrokeWidth": 2}},
                         "tooltip": [{"field": "update", "type": "quantitative", "title": "knob change at update"},
                                     {"field": "label", "type": "nominal", "title": "change"}]}}


def chart_spec(metrics: pl.DataFrame, knob_events: Sequence[dict[str, Any]] = (), *,
               panels: Sequence[Panel | tuple[str, Sequence[str]]] | None = None, title: str = "",
               width: int = WIDTH, height: int = HEIGHT, columns: int = COLUMNS, step: str = "update",
               empty_text: str = EMPTY_TEXT, objectives: Sequence[str] | None = None, smooth: int = 0,
               log_scale: str | Sequence[str] = "off") -> dict[str, Any]:
    """The grid as a Vega-Lite dict: one panel per entry of ``panels`` (default ``PANELS``) that has
    data, the key-statistic panel of each objective in ``objectives`` (default: the run's
    ``knob/objective`` values; with the default panels), knob changes as rules on every panel; a
    single text mark saying ``empty_text`` when nothing has data.

    ``smooth``: trailing mean over that many updates (0: raw values; ``chart_style.smooth_frame``).
    ``log_scale``: "off", "auto" (log axes for panels spanning >= ``chart_style.LOG_DECADES``
    decades) or the ids of the panels to draw on a log axis. Flat-within-noise columns are drawn
    as their exact value with a note (``chart_style.apply_floor``)."""
    _check(metrics, step, smooth, log_scale)
    unknown = sorted(set(log_scale) - panel_ids(PANELS if panels is None else panels)) if isinstance(
        log_scale, (list, tuple)) else []
    if unknown:
        known = ", ".join(sorted(p.id for p in PANELS))
        raise bad_value("log_scale", unknown[0], f"a panel id: {known} or key/<objective>")
    spec: dict[str, Any] = {"$schema": SCHEMA, "config": {"view": {"continuousWidth": width,
                                                                   "continuousHeight": height}}}
    notes = [f"lines: trailing mean over {smooth} updates"] if smooth > 1 else []
    if title or notes:
        spec["title"] = {"text": title, "subtitle": "; ".join(notes), "anchor": "start"} if notes else title
    if not (metrics.height and step in metrics.columns):
        return _empty(spec, empty_text, width, height)
    keyed, refs = key_panels(metrics, objectives) if panels is None or objectives is not None else ([], [])
    frame = metrics.with_columns(refs) if refs else metrics
    generic = present_panels(frame, PANELS if panels is None else panels)
    covered = {c for p in keyed for c in p.columns}
    generic = [p for p in generic if not set(p.columns) <= covered]  # shown by an objective's own panel
    present = present_panels(frame, keyed)
    present = generic[:1] + present + generic[1:] if panels is None else generic + present
    if not present:
        return _empty(spec, empty_text, width, height)
    cols = list(dict.fromkeys(c for p in present for c in p.columns))
    bands = _bands(frame, cols)  # e.g. held-out accuracy's Wilson interval: error bars, not lines
    extra = [b for pair in bands.values() for b in pair]
    frame, flats = apply_floor(frame.select([step] + cols + extra), cols)
    frame = smooth_frame(frame, cols, smooth)
    scales = {**{c: metric(c).scale for c in cols}, **{b: metric(c).scale for c, pair in bands.items() for b in pair}}
    frame = frame.with_columns(pl.col(c) * k for c, k in scales.items() if k != 1.0)
    rows = [{k: _clean(v) for k, v in r.items()} for r in frame.iter_rows(named=True)]
    events = [{"update": e["update"], "label": event_label(e["changes"])} for e in knob_events]
    changes = list(dict.fromkeys(change_text(e["update"], e["label"]) for e in events))  # the legend's rows
    charts = []
    for p in present:
        charts.append({**_panel(p, step, width, _scale(frame, p, flats, log_scale, bands),
                                floor_note(p.columns, flats), changes, bands), "height": height})
    spec.update({"data": {"name": "metrics"}, "datasets": {"metrics": rows, "knobs": events},
                 "concat": charts, "columns": columns, "resolve": {"scale": {"color": "independent"}}})
    return spec


def _scale(frame: pl.DataFrame, p: Panel, flats: dict[str, Flat], log_scale: str | Sequence[str],
           bands: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    domain = flat_domain(p.columns, flats)
    if domain is not None:
        return {"zero": False, "domain": domain}
    shown = list(p.columns) + [b for c, pair in (bands or {}).items() if c in p.columns for b in pair]
    values = [v for c in shown for v in frame.get_column(c).cast(pl.Float64).to_list()]
    log = p.id in log_scale if isinstance(log_scale, (list, tuple)) else (log_scale == "auto" and spans_decades(values))
    return y_scale(values, log)


def _empty(spec: dict[str, Any], text: str, width: int, height: int) -> dict[str, Any]:
    spec.update({"data": {"values": [{"t": text}]}, "mark": {"type": "text", "size": 13},
                 "encoding": {"text": {"field": "t", "type": "nominal"}}, "width": width, "height": height})
    return spec


def run_chart(metrics: pl.DataFrame, title: str = "", knob_events: Sequence[dict[str, Any]] = (),
              **kw: Any) -> alt.TopLevelMixin:
    """``chart_spec`` as an Altair chart (not re-validated; a notebook displays it offline through
    ``chart_render``'s renderer)."""
    spec = chart_spec(metrics, knob_events, title=title, **kw)
    cls = alt.ConcatChart if "concat" in spec else alt.Chart
    return cls.from_dict(spec, validate=False)


__all__ = ["COLUMNS", "EMPTY_TEXT", "HEIGHT", "PANELS", "SPARSE_PREFIXES", "WIDTH", "ChartDisplay", "chart_spec",
           "change_text", "event_label", "mimebundle", "network_refs", "png_bytes", "present_panels", "run_chart",
           "save_html", "save_png", "spec_and_version"]
