"""The charts of a run: one grid of small line panels of the per-update metrics, with knob changes
drawn as dashed vertical rules, for the CLI's ``charts.png``, the notebooks' live widget and reports.

``chart_spec(metrics, knob_events)`` builds the Vega-Lite spec as a plain dict (Altair's schema
validation of a few thousand data rows took seconds, too slow for a live refresh); ``run_chart``
wraps it as an Altair chart for display; ``save_png`` / ``save_html`` render a chart or a spec
fully offline through vl-convert (Vega-Lite compiled and rendered in an embedded JavaScript
engine; HTML exports inline the JavaScript bundle, no CDN).

Every panel folds one wide table (update + the panels' columns, rounded to 5 significant digits)
that the spec holds once, so a refresh sends each number once. A panel is drawn only for columns
that are present, numeric and hold at least one finite value; null, NaN and inf are gaps.
Columns logged only every N updates (``eval/``, ``SPARSE_PREFIXES``) are points joined over their
non-null rows. Knob changes (``knob_events.jsonl``) are rules at the update they took effect at,
labelled on the first panel. The metric definitions are in docs/design.md, "Diagnostics".

Left out: zoom/brush selections, smoothing (raw values are drawn), histograms of ratios.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import altair as alt
import polars as pl
import vl_convert as vlc

from workbench.errors import WorkbenchError, bad_value
from workbench.runs.files import atomic_write_bytes

# (panel title, metric columns). Adding a panel is one line; absent columns are skipped.
PANELS: list[tuple[str, list[str]]] = [
    ("accuracy (held-out, train)", ["eval/accuracy", "reward/accuracy"]),
    ("reward", ["reward/mean"]),
    ("clip / masked fraction", ["offpolicy/clipfrac", "offpolicy/masked_frac"]),
    ("ratio quantiles, A > 0", ["offpolicy/ratio_pos_q05", "offpolicy/ratio_pos_q50", "offpolicy/ratio_pos_q95"]),
    ("ratio quantiles, A < 0", ["offpolicy/ratio_neg_q05", "offpolicy/ratio_neg_q50", "offpolicy/ratio_neg_q95"]),
    ("M2 = mean (log r)^2", ["offpolicy/m2", "offpolicy/m2_after"]),
    ("ESS (token, sequence)", ["offpolicy/ess_token", "offpolicy/ess_seq"]),
    ("KL(mu || pi): k1, k3", ["offpolicy/kl_k1", "offpolicy/kl_k3"]),
    ("entropy", ["loss/entropy"]),
    ("staleness (knob, mean, max)", ["knob/staleness", "offpolicy/staleness_mean", "offpolicy/staleness_max"]),
    ("response length", ["reward/response_len_mean"]),
    ("zero-variance groups", ["reward/zero_var_group_frac"]),
    ("grad norm (pre-clip)", ["loss/grad_norm"]),
    ("positive share of the loss", ["offpolicy/pos_share"]),
]
SPARSE_PREFIXES: tuple[str, ...] = ("eval/",)  # logged every N updates: points + line over non-null
WIDTH, HEIGHT, COLUMNS = 230, 120, 3
EMPTY_TEXT = "no updates yet"


def event_label(changes: dict[str, Any]) -> str:
    """Short text of one knob change, e.g. ``staleness=32 objective=m2po tau=0.08``."""
    parts = []
    for k, v in changes.items():
        if k == "objective_params":
            if "objective" not in changes:  # a switch resets every parameter: the name says enough
                parts.extend(f"{p}={_fmt(x)}" for p, x in v.items())
        else:
            parts.append(f"{k}={_fmt(v)}")
    return " ".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _clean(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    v = float(v)
    return float(f"{v:.5g}") if math.isfinite(v) else None  # JSON has no NaN/inf: gaps


def present_panels(metrics: pl.DataFrame, panels: Sequence[tuple[str, Sequence[str]]]
                   ) -> list[tuple[str, list[str]]]:
    """The panels with at least one numeric column holding a finite value, and those columns."""
    out = []
    for title, cols in panels:
        keep = [c for c in cols if c in metrics.columns and metrics.schema[c].is_numeric()
                and bool(metrics.get_column(c).cast(pl.Float64).is_finite().any())]
        if keep:
            out.append((title, keep))
    return out


def _check(metrics: Any, step: str) -> None:
    if not isinstance(metrics, pl.DataFrame):
        raise bad_value("metrics", type(metrics).__name__, "a polars DataFrame (one row per update)")
    if step not in metrics.columns and metrics.width:  # an empty frame (no updates yet) is fine
        raise bad_value("step", step, f"a column of metrics ({', '.join(metrics.columns[:12])})")


def _panel(title: str, cols: list[str], step: str, width: int, labelled: bool, events: bool) -> dict[str, Any]:
    x = {"field": step, "type": "quantitative", "title": step, "axis": {"tickMinStep": 1, "format": "d"}}
    base = {
        "transform": [{"fold": cols, "as": ["series", "value"]},
                      {"filter": "isValid(datum.value) || indexof(datum.series, 'eval/') != 0"}],
        "encoding": {
            "x": x,
            "y": {"field": "value", "type": "quantitative", "title": None, "scale": {"zero": False},
                  "axis": {"format": ".3~g"}},  # float noise (1e-13) gets short tick labels
            "color": {"field": "series", "type": "nominal", "sort": cols,
                      "legend": {"title": None, "orient": "bottom", "direction": "vertical", "labelLimit": width}},
            "tooltip": [{"field": "series", "type": "nominal"}, {"field": step, "type": "quantitative"},
                        {"field": "value", "type": "quantitative", "format": ".4g"}],
        },
    }
    layers: list[dict[str, Any]] = [{**base, "mark": {"type": "line", "strokeWidth": 1.5}}]
    sparse = [c for c in cols if c.startswith(SPARSE_PREFIXES)]
    if sparse:
        layers.append({**base, "transform": base["transform"] + [{"filter": {"field": "series", "oneOf": sparse}}],
                       "mark": {"type": "point", "filled": True, "size": 20}})
    if events:
        layers.append({"data": {"name": "knobs"},
                       "mark": {"type": "rule", "color": "#444", "strokeDash": [4, 3], "opacity": 0.7},
                       "encoding": {"x": {"field": "update", "type": "quantitative"},
                                    "tooltip": [{"field": "update", "type": "quantitative",
                                                 "title": "knob change at update"},
                                                {"field": "label", "type": "nominal"}]}})
        if labelled:
            layers.append({"data": {"name": "knobs"},
                           "mark": {"type": "text", "align": "left", "baseline": "top", "dx": 3, "fontSize": 9,
                                    "color": "#444"},
                           "encoding": {"x": {"field": "update", "type": "quantitative"},
                                        "y": {"field": "y", "type": "quantitative", "scale": None},
                                        "text": {"field": "label", "type": "nominal"}}})
    return {"title": title, "width": width, "layer": layers}


def chart_spec(metrics: pl.DataFrame, knob_events: Sequence[dict[str, Any]] = (), *,
               panels: Sequence[tuple[str, Sequence[str]]] | None = None, title: str = "",
               width: int = WIDTH, height: int = HEIGHT, columns: int = COLUMNS, step: str = "update",
               empty_text: str = EMPTY_TEXT) -> dict[str, Any]:
    """The grid as a Vega-Lite dict: one panel per entry of ``panels`` (default ``PANELS``) that has
    data, knob changes as rules; a single text mark saying ``empty_text`` when nothing has data."""
    _check(metrics, step)
    panels = PANELS if panels is None else panels
    spec: dict[str, Any] = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json",
                            "config": {"view": {"continuousWidth": width, "continuousHeight": height}}}
    if title:
        spec["title"] = title
    present = present_panels(metrics, panels) if metrics.height and step in metrics.columns else []
    if not present:
        spec.update({"data": {"values": [{"t": empty_text}]}, "mark": {"type": "text", "size": 13},
                     "encoding": {"text": {"field": "t", "type": "nominal"}}, "width": width, "height": height})
        return spec
    cols = sorted({c for _, cs in present for c in cs})
    table = metrics.select([step] + cols)
    rows = [{k: _clean(v) for k, v in r.items()} for r in table.iter_rows(named=True)]
    events = [{"update": e["update"], "label": event_label(e["changes"]), "y": 2 + 11 * (i % 4)}
              for i, e in enumerate(knob_events)]  # labels staggered over 4 lines so close changes stay legible
    charts = [{**_panel(t, pcols, step, width, i == 0, bool(events)), "height": height}
              for i, (t, pcols) in enumerate(present)]
    spec.update({"data": {"name": "metrics"}, "datasets": {"metrics": rows, "knobs": events},
                 "concat": charts, "columns": columns, "resolve": {"scale": {"color": "independent"}}})
    return spec


def run_chart(metrics: pl.DataFrame, title: str = "", knob_events: Sequence[dict[str, Any]] = (),
              **kw: Any) -> alt.TopLevelMixin:
    """``chart_spec`` as an Altair chart (for display in any notebook; not re-validated)."""
    spec = chart_spec(metrics, knob_events, title=title, **kw)
    cls = alt.ConcatChart if "concat" in spec else alt.Chart
    return cls.from_dict(spec, validate=False)


def _spec_and_version(chart: alt.TopLevelMixin | dict[str, Any]) -> tuple[dict, str | None]:
    if isinstance(chart, dict):
        spec = chart
    elif isinstance(chart, alt.TopLevelMixin):
        spec = chart.to_dict(validate=False)
    else:
        raise bad_value("chart", type(chart).__name__, "an Altair chart or a Vega-Lite dict (e.g. from run_chart)")
    version = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return spec, version if version in vlc.get_vegalite_versions() else None


def save_png(chart: alt.TopLevelMixin | dict[str, Any], path: str | Path, scale: float = 1.0) -> Path:
    """Render a chart (Altair or a Vega-Lite dict) to a PNG file offline (external URLs refused)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise bad_value("scale", scale, "a positive number")
    spec, version = _spec_and_version(chart)
    png = vlc.vegalite_to_png(spec, vl_version=version, scale=float(scale), allowed_base_urls=[])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, png)  # temp + rename, the umask's mode like every run file


def save_html(chart: alt.TopLevelMixin | dict[str, Any], path: str | Path) -> Path:
    """Write a self-contained HTML page (Vega, Vega-Lite and vega-embed inlined; no CDN): the
    tooltips work offline."""
    spec, version = _spec_and_version(chart)
    html = vlc.vegalite_to_html(spec, vl_version=version, bundle=True)
    if "cdn.jsdelivr" in html:  # guard against a vl-convert behaviour change
        raise WorkbenchError("save_html: vl-convert produced CDN links despite bundle=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, html.encode("utf-8"))


__all__ = ["COLUMNS", "EMPTY_TEXT", "HEIGHT", "PANELS", "SPARSE_PREFIXES", "WIDTH", "chart_spec", "event_label",
           "present_panels", "run_chart", "save_html", "save_png"]
