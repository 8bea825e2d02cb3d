"""Paired differences of a ``BranchSet`` (``workbench.branch``): variant - control, per update and final.

    df = paired_differences(bs, "eval/accuracy")   # variant, update, final, estimate, lo, hi, method...
    save_png(paired_chart_spec(df), "paired.png")   # workbench.charts.save_png
    print(markdown_table(df)); print("\\n".join(sentences(df)))

For each variant v, repeat r and update k where both have the metric, d_r = x_{v,r,k} - x_{control,r,k}
(the same repeat: the same checkpoint and random streams). The estimate is the mean of d over the R
repeats; its 95% interval (``method``):

- ``t`` (R >= 2): mean(d) -+ t_{(1+c)/2, R-1} sd(d) / sqrt(R), sd with R - 1 degrees of freedom
  (Student 1908, "The probable error of a mean", Biometrika 6:1-25): the paired t-interval, exact
  for normal differences, which a percentile bootstrap of two or three pairs is not (workbench.stats);
- ``newcombe`` (R = 1, ``eval/accuracy``): Newcombe's hybrid score interval of the difference of two
  binomial proportions from their Wilson intervals (``stats.wilson_difference``, n = the held-out
  problems of one evaluation). It treats the two evaluations as independent; the branches score the
  same problems with positively correlated policies, so it is conservative (too wide), never too narrow;
- ``none`` (R = 1, any other metric): no interval (lo, hi NaN): one pair says nothing about its noise.

The final value of a branch is the metric after its last update (``BranchSet.finals``).
The t quantile is computed here from the closed-form CDF of Student's t for integer degrees of freedom
(Abramowitz and Stegun 1964, "Handbook of Mathematical Functions", 26.7.3-26.7.4), inverted by bisection.

Left out: corrections for looking at many updates at once (the per-update intervals are pointwise).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from workbench.branch import CONTROL, BranchSet
from workbench.charts import HEIGHT, WIDTH
from workbench.charts.style import metric as metric_style
from workbench.errors import WorkbenchError, bad_value
from workbench.stats import describe_difference, wilson_difference

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
COLUMNS = ("metric", "variant", "label", "update", "final", "repeats", "control", "value", "estimate", "lo", "hi",
           "method")


def t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` >= 1 (Abramowitz and Stegun 26.7.3-26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 powers of cos
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= (2 * j) / (2 * j + 1) * c2
            total += term
        return 2.0 / math.pi * (theta + s * math.cos(theta) * total) if df > 1 else 2.0 * theta / math.pi
    term, total = 1.0, 1.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for j in range(1, df // 2):
        term *= (2 * j - 1) / (2 * j) * c2
        total += term
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = ``confidence`` (12.706... for 0.95 and df = 1), by bisection to 1e-12."""
    if not 0 < confidence < 1:
        raise bad_value("confidence", confidence, "a number strictly between 0 and 1")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise bad_value("df", df, "an integer >= 1")
    lo, hi = 0.0, 1.0
    while t_two_sided_cdf(hi, df) < confidence:
        hi *= 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_cdf(mid, df) < confidence else (lo, mid)
    return 0.5 * (lo + hi)


def paired_interval(diffs: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, str]:
    """(mean, lo, hi, method) of paired differences: the t-interval for >= 2, no interval for 1."""
    n = len(diffs)
    est = float(np.mean(diffs))
    if n < 2:
        return est, math.nan, math.nan, "none"
    half = t_quantile(confidence, n - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(n)
    return est, est - half, est + half, "t"


def paired_differences(bs: BranchSet, metric: str = "eval/accuracy", confidence: float = 0.95) -> pl.DataFrame:
    """Per variant (not the control) and update where the metric exists, and for the final value
    (``final`` True): the mean over repeats of variant - control with its interval (module doc).
    Columns ``COLUMNS``; ``control`` and ``value`` are the two arms' means over the same repeats."""
    if not isinstance(metric, str) or not metric:
        raise bad_value("metric", metric, "a metric column such as eval/accuracy")
    long = bs.metrics()
    if metric not in long.columns and metric != "eval/accuracy":
        known = ", ".join(c for c in long.columns if "/" in c and not c.startswith("perf/"))[:300]
        raise WorkbenchError(f"metric={metric!r} is not logged by these branches: expected one of {known}")
    per_update = (long.select("variant", "repeat", "update", pl.col(metric).cast(pl.Float64).alias("value"))
                  if metric in long.columns else pl.DataFrame())
    return differences_table(per_update, bs.finals(metric), bs.labels, metric,
                             bs.eval_n() if metric == "eval/accuracy" else 0, confidence)


def differences_table(per_update: pl.DataFrame, finals: pl.DataFrame, labels: list[str], metric: str,
                      eval_n: int = 0, confidence: float = 0.95) -> pl.DataFrame:
    """``paired_differences`` on long frames of ``variant`` (0 = control), ``repeat``, ``update``,
    ``value`` (null: not logged there): one of every update, one of the final values. ``eval_n`` > 0:
    the metric is a held-out accuracy over that many problems (one repeat: the Newcombe interval)."""
    rows = []
    for final, frame in ((False, per_update), (True, finals)):
        frame = frame.drop_nulls("value") if frame.height else frame
        if not frame.height:
            continue
        control = frame.filter(pl.col("variant") == 0).select("repeat", "update", pl.col("value").alias("control"))
        paired = frame.filter(pl.col("variant") > 0).join(control, on=["repeat", "update"], how="inner")
        for (variant, update), g in sorted(paired.group_by(["variant", "update"]), key=lambda kv: kv[0]):
            d = (g["value"] - g["control"]).to_numpy()  # [R] paired differences
            est, lo, hi, method = paired_interval(d, confidence)
            c, v = float(g["control"].mean()), float(g["value"].mean())
            if method == "none" and eval_n:
                _, lo, hi = wilson_difference(v, eval_n, c, eval_n, confidence)
                method = "newcombe"
            rows.append({"metric": metric, "variant": int(variant), "label": labels[int(variant)],
                         "update": int(update), "final": final, "repeats": len(d), "control": c, "value": v,
                         "estimate": est, "lo": lo, "hi": hi, "method": method})
    schema = {"metric": pl.Utf8, "variant": pl.Int64, "label": pl.Utf8, "update": pl.Int64, "final": pl.Boolean,
              "repeats": pl.Int64, "control": pl.Float64, "value": pl.Float64, "estimate": pl.Float64,
              "lo": pl.Float64, "hi": pl.Float64, "method": pl.Utf8}
    return pl.DataFrame(rows, schema=schema)


def interval_note(diffs: pl.DataFrame) -> str:
    """What the intervals of a ``paired_differences`` table are."""
    methods = set(diffs["method"].to_list()) if diffs.height else set()
    notes = {"t": "paired t-intervals over repeats (same checkpoint and random streams per repeat)",
             "newcombe": "one repeat: Newcombe's Wilson-difference interval of held-out accuracy (conservative: "
                         "it ignores that both branches score the same problems)",
             "none": "one repeat: no interval for this metric (run --repeats >= 2)"}
    return "95% intervals: " + "; ".join(notes[m] for m in ("t", "newcombe", "none") if m in methods)


def markdown_table(diffs: pl.DataFrame) -> str:
    """The final values: one row per metric and variant, the difference with its interval."""
    lines = ["| metric | variant | repeats | control | variant value | difference [95% CI] | interval |",
             "|---|---|---|---|---|---|---|"]
    for r in diffs.filter(pl.col("final")).iter_rows(named=True):
        s = metric_style(r["metric"]).scale
        ci = f"[{s * r['lo']:.2f}, {s * r['hi']:.2f}]" if math.isfinite(r["lo"]) else "(none)"
        lines.append(f"| {r['metric']} | {r['label']} | {r['repeats']} | {s * r['control']:.2f} | "
                     f"{s * r['value']:.2f} | {s * r['estimate']:+.2f} {ci} | {r['method']} |")
    return "\n".join(lines)


def sentences(diffs: pl.DataFrame) -> list[str]:
    """One sentence per metric and variant on its final difference (``stats.describe_difference``)."""
    out = []
    for r in diffs.filter(pl.col("final")).iter_rows(named=True):
        style = metric_style(r["metric"])
        unit = " points" if style.scale == 100.0 else ""
        text = describe_difference(r["label"], CONTROL, (r["estimate"], r["lo"], r["hi"]), scale=style.scale,
                                   digits=1 if style.scale == 100.0 else 3, unit=unit)
        out.append(f"{r['metric']}: {text}")
    return out


def paired_chart_spec(diffs: pl.DataFrame, title: str = "", width: int = 2 * WIDTH,
                      height: int = 2 * HEIGHT) -> dict[str, Any]:
    """Vega-Lite dict of the per-update differences of one metric: a line per variant, its interval
    as a band, and a zero line; y in the metric's drawn units (``charts.style``: accuracy in points).
    Render with ``workbench.charts.save_png`` / ``save_html``."""
    per = diffs.filter(~pl.col("final"))
    metrics = per["metric"].unique().to_list() if per.height else []
    if len(metrics) > 1:
        raise bad_value("diffs", metrics, "the paired_differences table of one metric")
    name = metrics[0] if metrics else "metric"
    style = metric_style(name)
    unit = "points" if style.scale == 100.0 else style.unit
    rows = [{"update": r["update"], "variant": r["label"], "estimate": style.scale * r["estimate"],
             "lo": style.scale * r["lo"] if math.isfinite(r["lo"]) else None,
             "hi": style.scale * r["hi"] if math.isfinite(r["hi"]) else None}
            for r in per.iter_rows(named=True)]
    order = list(dict.fromkeys(r["variant"] for r in rows))
    color = {"field": "variant", "type": "nominal", "sort": order, "scale": {"domain": order},
             "legend": {"title": None, "orient": "bottom", "direction": "vertical"}}
    x = {"field": "update", "type": "quantitative", "title": "update", "axis": {"format": "d", "tickMinStep": 1}}
    y_title = f"{name}: variant - control" + (f" ({unit})" if unit else "")
    y = {"field": "estimate", "type": "quantitative", "title": y_title, "scale": {"zero": False}}
    layers = [
        {"mark": {"type": "area", "opacity": 0.18}, "transform": [{"filter": "isValid(datum.lo)"}],
         "encoding": {"x": x, "y": {"field": "lo", "type": "quantitative", "title": y_title}, "y2": {"field": "hi"},
                      "color": color}},
        {"mark": {"type": "line", "strokeWidth": 1.6, "point": True},
         "encoding": {"x": x, "y": y, "color": color,
                      "tooltip": [{"field": "variant"}, {"field": "update", "type": "quantitative"},
                                  {"field": "estimate", "type": "quantitative", "format": ".4~g"},
                                  {"field": "lo", "type": "quantitative", "format": ".4~g"},
                                  {"field": "hi", "type": "quantitative", "format": ".4~g"}]}},
        {"data": {"values": [{"zero": 0.0}]}, "mark": {"type": "rule", "strokeDash": [4, 3], "color": "#333333"},
         "encoding": {"y": {"field": "zero", "type": "quantitative"}}},
    ]
    return {"$schema": SCHEMA, "title": title or f"paired differences: {name}", "width": width, "height": height,
            "data": {"values": rows}, "layer": layers}


__all__ = ["COLUMNS", "differences_table", "interval_note", "markdown_table", "paired_chart_spec",
           "paired_differences", "paired_interval", "sentences", "t_quantile", "t_two_sided_cdf"]
