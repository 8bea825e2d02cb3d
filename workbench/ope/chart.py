"""The OPE panel: each estimator's estimate over updates against the truth, from ``ope.parquet``.

``ope_chart_spec(table)`` draws, per update of the ``OPEMonitor``'s table (``workbench.ope.monitor``),
one line per estimator with its bootstrap 95% interval as bars, and the truth (a fresh on-policy
sample's mean reward) as a dashed black line with its Wilson interval as a grey band, so a reader
sees where each estimator holds and where it breaks as the data goes stale. A refused estimate (ESS
below the minimum: "not enough overlap") is not drawn as a number: it is a hollow mark at the truth
with its reason in the tooltip, never a point that looks like a measurement. The lower panel is
the ESS fraction of the batch's sequence weights (the same for every estimator) on a log axis, the
quantity that decides the refusals. Rendered by the
one chart system (``workbench.charts.save_png`` / ``mimebundle``), offline.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from workbench.charts import HEIGHT, WIDTH
from workbench.errors import WorkbenchError

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
COLUMNS = ("update", "estimator", "estimate", "lo", "hi", "ess_frac", "refused", "truth", "truth_lo", "truth_hi")


def _num(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def ope_chart_spec(table: pl.DataFrame, title: str = "off-policy estimates vs the truth", *,
                   width: int = 2 * WIDTH, height: int = 2 * HEIGHT) -> dict[str, Any]:
    """Vega-Lite dict of an ``OPEMonitor`` table (module docstring); one-line error when columns miss."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if not table.height or missing:
        raise WorkbenchError(f"table has no OPE rows to draw (missing columns: {', '.join(missing) or 'none'}, "
                             f"rows: {table.height}): it is the ope.parquet an OPEMonitor writes")
    names = list(dict.fromkeys(table["estimator"].to_list()))
    rows = []
    for r in table.iter_rows(named=True):
        refused = bool(r["refused"])
        rows.append({"update": int(r["update"]), "estimator": r["estimator"], "refused": refused,
                     "estimate": None if refused else _num(r["estimate"]),
                     "lo": None if refused else _num(r["lo"]), "hi": None if refused else _num(r["hi"]),
                     "at_truth": _num(r["truth"]) if refused else None, "reason": r.get("reason") or "",
                     "ess_frac": _num(r["ess_frac"])})
    truth = [{"update": int(r["update"]), "truth": _num(r["truth"]), "truth_lo": _num(r["truth_lo"]),
              "truth_hi": _num(r["truth_hi"])}
             for r in table.unique("update", keep="first", maintain_order=True).iter_rows(named=True)]
    updates = sorted({t["update"] for t in truth})  # ticks at the evaluated updates only
    x = {"field": "update", "type": "quantitative", "title": "update", "axis": {"format": "d", "values": updates}}
    colour = {"field": "estimator", "type": "nominal", "sort": names, "scale": {"domain": names},
              "legend": {"title": "estimator", "orient": "right"}}
    y_title = "expected reward of sampling pi (reward per sample)"
    tip = [{"field": "estimator"}, {"field": "update", "type": "quantitative"},
           {"field": "estimate", "type": "quantitative", "format": ".4~g"},
           {"field": "lo", "type": "quantitative", "title": "95% interval, low", "format": ".4~g"},
           {"field": "hi", "type": "quantitative", "title": "95% interval, high", "format": ".4~g"}]
    estimates = {"data": {"values": rows}, "layer": [
        {"data": {"values": truth}, "mark": {"type": "area", "color": "#999999", "opacity": 0.3},
         "transform": [{"filter": "isValid(datum.truth_lo)"}],
         "encoding": {"x": x, "y": {"field": "truth_lo", "type": "quantitative", "title": y_title},
                      "y2": {"field": "truth_hi"}}},
        {"data": {"values": truth}, "mark": {"type": "line", "color": "#222222", "strokeDash": [5, 3]},
         "encoding": {"x": x, "y": {"field": "truth", "type": "quantitative"},
                      "tooltip": [{"field": "update", "type": "quantitative"},
                                  {"field": "truth", "type": "quantitative", "title": "truth (fresh sample)",
                                   "format": ".4~g"}]}},
        {"mark": {"type": "rule", "strokeWidth": 1.5, "opacity": 0.7}, "transform": [{"filter": "isValid(datum.lo)"}],
         "encoding": {"x": x, "y": {"field": "lo", "type": "quantitative"}, "y2": {"field": "hi"}, "color": colour}},
        {"mark": {"type": "line", "point": True}, "transform": [{"filter": "isValid(datum.estimate)"}],
         "encoding": {"x": x, "y": {"field": "estimate", "type": "quantitative"}, "color": colour, "tooltip": tip}},
        {"mark": {"type": "point", "filled": False, "size": 60}, "transform": [{"filter": "datum.refused"}],
         "encoding": {"x": x, "y": {"field": "at_truth", "type": "quantitative"}, "color": colour,
                      "tooltip": [{"field": "estimator"}, {"field": "update", "type": "quantitative"},
                                  {"field": "reason", "title": "refused"}]}},
    ], "width": width, "height": height,
        "title": {"text": title, "subtitle": "lines: estimates with 95% bootstrap bars; dashed + grey: the truth "
                                             "with its Wilson interval; hollow: refused (too little overlap)"}}
    per_update = {r["update"]: r["ess_frac"] for r in rows}  # the same for every estimator: drawn once
    overlap = [{"update": u, "ess_frac": e} for u, e in per_update.items() if e is not None and e > 0]
    ess = {"data": {"values": overlap}, "mark": {"type": "line", "point": True, "color": "#222222"},
           "encoding": {"x": x, "y": {"field": "ess_frac", "type": "quantitative", "scale": {"type": "log"},
                                      "title": "ESS (fraction of samples, log)"},
                        "tooltip": [{"field": "update", "type": "quantitative"},
                                    {"field": "ess_frac", "type": "quantitative", "format": ".3~g"}]},
           "width": width, "height": height // 2, "title": "overlap: the effective sample size of the weights"}
    return {"$schema": SCHEMA, "vconcat": [estimates, ess], "resolve": {"scale": {"color": "shared"}}}


__all__ = ["COLUMNS", "ope_chart_spec"]
