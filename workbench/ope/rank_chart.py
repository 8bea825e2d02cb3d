"""The figure of a sweep's policy ranking (``workbench.ope.rank``): estimate against truth per candidate.

``selection_chart_spec(table)`` draws one panel per estimator: each candidate checkpoint is a point
at (its truth, its estimate), with the estimate's bootstrap interval as a vertical bar and the
truth's Wilson interval as a horizontal one; the dashed diagonal is estimate = truth, so a good
estimator's points lie along it and a good *ranker*'s points at least rise with it. A refused
estimate (too little overlap) is a hollow mark, its reason in the tooltip. The panel title carries
the estimator's Spearman and regret@1. Rendered by the one chart system (``workbench.charts``).
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from workbench.charts import HEIGHT, WIDTH
from workbench.errors import WorkbenchError

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
COLUMNS = ("estimator", "candidate", "estimate", "lo", "hi", "refused", "truth", "truth_lo", "truth_hi", "spearman",
           "regret_at_1")


def _num(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def selection_chart_spec(table: pl.DataFrame, title: str = "policy selection: estimate vs truth per checkpoint",
                         *, width: int = WIDTH, height: int = WIDTH) -> dict[str, Any]:
    """Vega-Lite dict of a ``rank_sweep`` table (module doc); one-line error when columns miss."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if not table.height or missing:
        raise WorkbenchError(f"table has no ranking rows to draw (missing columns: {', '.join(missing) or 'none'}, "
                             f"rows: {table.height}): it is the table rank_sweep returns")
    rows, lows, highs = [], [], []
    for r in table.iter_rows(named=True):
        rho = "undefined" if not math.isfinite(r["spearman"]) else f"{r['spearman']:.2f}"
        label = f"{r['estimator']}: Spearman {rho}, regret@1 {r['regret_at_1']:.3f}"
        row = {"panel": label, "candidate": r["candidate"], "refused": bool(r["refused"]),
               "estimate": _num(r["estimate"]), "lo": _num(r["lo"]), "hi": _num(r["hi"]), "truth": _num(r["truth"]),
               "truth_lo": _num(r["truth_lo"]), "truth_hi": _num(r["truth_hi"]), "reason": r.get("reason") or ""}
        rows.append(row)
        values = [v for v in (row["estimate"], row["lo"], row["hi"], row["truth"], row["truth_lo"], row["truth_hi"])
                  if v is not None]
        lows.append(min(values, default=0.0))
        highs.append(max(values, default=1.0))
    lo, hi = min(lows), max(highs)
    panels = list(dict.fromkeys(r["panel"] for r in rows))
    diagonal = [{"panel": p, "diag": v} for p in panels for v in (lo, hi)]  # estimate = truth, in every panel
    x = {"field": "truth", "type": "quantitative", "title": "truth (fresh sample, mean reward)",
         "scale": {"domain": [lo, hi]}}
    y = {"field": "estimate", "type": "quantitative", "title": "estimate from the logged batch",
         "scale": {"domain": [lo, hi]}}
    tip = [{"field": "candidate"}, {"field": "truth", "type": "quantitative", "format": ".4f"},
           {"field": "estimate", "type": "quantitative", "format": ".4f"},
           {"field": "lo", "type": "quantitative", "title": "interval, low", "format": ".4f"},
           {"field": "hi", "type": "quantitative", "title": "interval, high", "format": ".4f"},
           {"field": "reason", "title": "refused"}]
    colour = {"field": "candidate", "type": "nominal", "legend": {"title": "checkpoint", "orient": "bottom",
                                                                  "columns": 2}}
    layers = [
        {"transform": [{"filter": "isValid(datum.diag)"}], "mark": {"type": "line", "color": "#777777",
                                                                     "strokeDash": [5, 3]},
         "encoding": {"x": {"field": "diag", "type": "quantitative", "scale": {"domain": [lo, hi]},
                            "title": x["title"]},
                      "y": {"field": "diag", "type": "quantitative", "scale": {"domain": [lo, hi]},
                            "title": y["title"]}}},
        {"transform": [{"filter": "isValid(datum.lo) && isValid(datum.truth)"}], "mark": {"type": "rule"},
         "encoding": {"x": x, "y": {**y, "field": "lo"}, "y2": {"field": "hi"}, "color": colour}},
        {"transform": [{"filter": "isValid(datum.truth_lo) && isValid(datum.estimate)"}], "mark": {"type": "rule"},
         "encoding": {"x": {**x, "field": "truth_lo"}, "x2": {"field": "truth_hi"}, "y": y, "color": colour}},
        {"transform": [{"filter": "isValid(datum.estimate) && !datum.refused"}],
         "mark": {"type": "point", "filled": True, "size": 60},
         "encoding": {"x": x, "y": y, "color": colour, "tooltip": tip}},
        {"transform": [{"filter": "isValid(datum.estimate) && datum.refused"}],
         "mark": {"type": "point", "filled": False, "size": 60},
         "encoding": {"x": x, "y": y, "color": colour, "tooltip": tip}},
    ]
    return {"$schema": SCHEMA, "data": {"values": rows + diagonal},
            "facet": {"field": "panel", "type": "nominal", "sort": panels, "title": None}, "columns": 3,
            "spec": {"layer": layers, "width": width, "height": height},
            "resolve": {"scale": {"x": "shared", "y": "shared"}},
            "title": {"text": title, "subtitle": "points: checkpoints; bars: estimate's bootstrap and truth's Wilson "
                                                 "intervals; dashed: estimate = truth; hollow: refused"}}


__all__ = ["COLUMNS", "selection_chart_spec"]
