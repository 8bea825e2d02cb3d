"""What an estimator lab table (``workbench.lab.estimator_lab``) shows, and only that: the interval of
each metric, the sentences its intervals support, the JSON summary and the chart over staleness.

    lab_findings(table)   # ["reinforce at staleness 16: cosine 0.21 [0.15, 0.28], below the fresh-batch floor ..."]
    lab_chart(table)      # one panel per metric, x = staleness (symlog: 0 drawn), grey band = the floor

A sentence compares an estimator with the noise floor (a fresh REINFORCE batch of the same size,
``FRESH_ROW``) only through their two 95% intervals: ``below`` the floor when its upper bound lies
under the floor's lower bound, ``above`` when its lower bound lies over the floor's upper bound,
otherwise ``not distinguished from`` it (two intervals that do not overlap imply a resolved difference;
overlapping ones leave it unresolved, a conservative reading). Every interval is a percentile
bootstrap across the K batches (``workbench.stats.bootstrap_ci``); with fewer than
``FEW_REPEATS`` batches they are too narrow and the findings say so.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import altair as alt
import polars as pl

from workbench.charts.style import y_scale
from workbench.errors import WorkbenchError, bad_value
from workbench.stats import bootstrap_ci
from workbench.studies.replay_report import FEW_REPEATS, FRESH_ROW

REFERENCE_ROW = "on-policy reference g*"
TABLE_COLUMNS = ("objective", "staleness", "metric", "mean", "lo", "hi", "n")
NOISY_REFERENCE = 0.5  # split cosine below this: g*'s own noise dominates what the cosines can show
CHART_METRICS = (("cosine", "cosine to g*"), ("projection", "projection <g, g*> / |g*|^2"),
                 ("relative_error", "relative error |g - g*| / |g*|"), ("variance", "variance / |mean|^2"),
                 ("ess_token", "token ESS"), ("ess_seq", "sequence ESS"))


def metric_interval(values: Sequence[float], seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Mean of the finite ``values`` with its percentile-bootstrap interval and their count ``n``
    (no finite value: NaN mean; one: no interval)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    est, lo, hi = bootstrap_ci(finite, confidence=confidence, seed=seed)
    return {"mean": est, "lo": lo, "hi": hi, "n": len(finite)}


def check_table(table: Any) -> None:
    """A lab table: a polars frame with ``TABLE_COLUMNS``, the floor's and the reference's rows."""
    if not isinstance(table, pl.DataFrame):
        raise bad_value("table", type(table).__name__, "a polars DataFrame (from estimator_lab)")
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise bad_value("table", f"columns {', '.join(table.columns)}", f"a frame with the column {missing[0]!r} too")
    names = set(table["objective"].to_list())
    for row in (FRESH_ROW, REFERENCE_ROW):
        if row not in names:
            raise WorkbenchError(f"table has no {row!r} rows: the lab's floor or reference is missing (estimator_lab)")


def cell(table: pl.DataFrame, objective: str, staleness: int, metric: str) -> dict[str, Any]:
    """The row of (objective, staleness, metric) as a dict; a missing one is a one-line error."""
    hit = table.filter((pl.col("objective") == objective) & (pl.col("staleness") == staleness)
                       & (pl.col("metric") == metric))
    if not hit.height:
        raise WorkbenchError(f"table has no row objective={objective!r} staleness={staleness} metric={metric!r}")
    return hit.row(0, named=True)


def estimators(table: pl.DataFrame) -> list[str]:
    """The estimator names of a lab table, in its order (the floor and reference left out)."""
    return [n for n in dict.fromkeys(table["objective"].to_list()) if n not in (FRESH_ROW, REFERENCE_ROW)]


def _fmt(row: dict[str, Any]) -> str:
    m, lo, hi = row["mean"], row["lo"], row["hi"]
    if not math.isfinite(m):
        return "undefined (no gradient)"
    return f"{m:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else f"{m:.2f} (no interval)"


def versus_floor(row: dict[str, Any], floor: dict[str, Any]) -> str:
    """``below`` / ``above`` / ``not distinguished from`` (module doc) / ``no interval``."""
    bounds = (row["lo"], row["hi"], floor["lo"], floor["hi"])
    if not all(math.isfinite(b) for b in bounds):
        return "no interval"
    lo, hi, flo, fhi = bounds
    return "below" if hi < flo else "above" if lo > fhi else "not distinguished from"


def lab_findings(table: pl.DataFrame) -> list[str]:
    """The reference's precision, the floor, then per estimator and staleness its cosine and projection
    with their intervals and how each stands against the floor's: nothing the intervals do not show."""
    check_table(table)
    ref = {m: cell(table, REFERENCE_ROW, 0, m) for m in ("relative_se", "split_cosine", "cosine_ceiling", "sequences")}
    out = [f"on-policy reference g*: {int(ref['sequences']['mean'])} fresh sequences in {ref['sequences']['n']} "
           f"chunks, relative standard error {ref['relative_se']['mean']:.2f}, cosine between its halves "
           f"{ref['split_cosine']['mean']:.2f}: an exact gradient would reach a cosine of about "
           f"{ref['cosine_ceiling']['mean']:.2f} against it"]
    if not ref["split_cosine"]["mean"] >= NOISY_REFERENCE:  # NaN too: no resolved reference
        out[0] += (f"; its halves agree less than {NOISY_REFERENCE}: the reference is noisy, every cosine below is "
                   "shrunk by it (raise reference_factor)")
    floor = {m: cell(table, FRESH_ROW, 0, m) for m in ("cosine", "projection")}
    out.append(f"fresh-batch floor (REINFORCE on a fresh batch of the same size): cosine {_fmt(floor['cosine'])}, "
               f"projection {_fmt(floor['projection'])} (mean and 95% interval over {floor['cosine']['n']} batches)")
    if floor["cosine"]["n"] < FEW_REPEATS:
        out[-1] += f"; with fewer than {FEW_REPEATS} batches every interval is too narrow, read it as a lower bound"
    for name in estimators(table):
        for s in sorted(set(table.filter(pl.col("objective") == name)["staleness"].to_list())):
            cos, proj = cell(table, name, s, "cosine"), cell(table, name, s, "projection")
            if cos["n"] == 0:
                out.append(f"{name} at staleness {s}: zero gradient on every batch, no direction to compare")
                continue
            out.append(f"{name} at staleness {s}: cosine {_fmt(cos)}, {versus_floor(cos, floor['cosine'])} the "
                       f"fresh-batch floor {_fmt(floor['cosine'])}; projection {_fmt(proj)}, "
                       f"{versus_floor(proj, floor['projection'])} the floor's {_fmt(floor['projection'])}")
    return out


def interval_sentences(table: pl.DataFrame, metric: str = "cosine", value: float = 0.0) -> list[str]:
    """Per estimator and staleness, whether the ``metric`` interval includes ``value`` and the
    fresh-batch floor's mean, read from the numbers alone: "at staleness 3 the cosine interval of
    ppo_clip [0.12, 0.40] does not include 0.00 (it lies above) and includes the fresh-batch floor
    mean 0.31"."""
    check_table(table)
    floor = cell(table, FRESH_ROW, 0, metric)
    out = []
    for name in estimators(table):
        for s in sorted(set(table.filter(pl.col("objective") == name)["staleness"].to_list())):
            row = cell(table, name, s, metric)
            lo, hi = row["lo"], row["hi"]
            if not (math.isfinite(lo) and math.isfinite(hi)):
                out.append(f"at staleness {s} the {metric} of {name} has no interval ({_fmt(row)})")
                continue

            def against(v: float, what: str) -> str:
                if not math.isfinite(v):
                    return f"cannot be compared with {what or 'the value'} (undefined)"
                side = "" if lo <= v <= hi else " (it lies above)" if lo > v else " (it lies below)"
                return f"{'includes' if not side else 'does not include'} {what}{v:.2f}{side}"

            out.append(f"at staleness {s} the {metric} interval of {name} [{lo:.2f}, {hi:.2f}] "
                       f"{against(value, '')} and {against(floor['mean'], 'the fresh-batch floor mean ')}")
    return out


def lab_summary(table: pl.DataFrame) -> dict[str, Any]:
    """JSON-able headline of a lab table: estimators, staleness, batches, the reference's precision,
    the floor's and every estimator's cosine with interval, and the findings."""
    check_table(table)
    names = estimators(table)
    cos = table.filter(pl.col("metric") == "cosine")

    def triple(r: dict[str, Any]) -> list[float | None]:
        return [None if not math.isfinite(v) else v for v in (r["mean"], r["lo"], r["hi"])]

    return {"objectives": names,
            "staleness": sorted(set(table.filter(pl.col("objective").is_in(names))["staleness"].to_list())),
            "batches": int(cell(table, FRESH_ROW, 0, "cosine")["n"]), "rows": table.height,
            "reference": {m: cell(table, REFERENCE_ROW, 0, m)["mean"]
                          for m in ("relative_se", "split_cosine", "cosine_ceiling", "sequences")},
            "floor_cosine": triple(cell(table, FRESH_ROW, 0, "cosine")),
            "cosine": {n: {str(r["staleness"]): triple(r) for r in cos.filter(pl.col("objective") == n).iter_rows(named=True)}
                       for n in names},
            "findings": lab_findings(table)}


def _json_rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in frame.iter_rows(named=True)]


def lab_chart(table: pl.DataFrame, metrics: Sequence[tuple[str, str]] = CHART_METRICS) -> alt.TopLevelMixin:
    """One panel per metric over staleness (a symlog x axis, ``charts.style.y_scale``: 0 is drawn, the
    rest is logarithmic), a line and 95% interval bars per estimator, the fresh-batch floor's interval
    as a grey band with its mean dashed."""
    check_table(table)
    names = estimators(table)
    stale = sorted(set(table.filter(pl.col("objective").is_in(names))["staleness"].to_list()))
    x_scale = alt.Scale(**y_scale([float(s) for s in stale], log=True))
    colour = alt.Color("objective:N", sort=names, scale=alt.Scale(domain=names), legend=alt.Legend(orient="bottom"))
    panels = []
    for metric, title in metrics:
        rows = _json_rows(table.filter(pl.col("objective").is_in(names) & (pl.col("metric") == metric)))
        floor = _json_rows(table.filter((pl.col("objective") == FRESH_ROW) & (pl.col("metric") == metric)))
        if not rows:
            continue
        data, floor_data = alt.Data(values=rows), alt.Data(values=floor)
        x = alt.X("staleness:Q", scale=x_scale, title="staleness (updates, symlog)",
                  axis=alt.Axis(values=stale, format="d"))
        band = alt.Chart(floor_data).mark_rect(color="#999999", opacity=0.3).encode(y="lo:Q", y2="hi:Q")
        rule = alt.Chart(floor_data).mark_rule(color="#555555", strokeDash=[4, 3]).encode(y="mean:Q")
        bars = alt.Chart(data).mark_rule(strokeWidth=2).encode(x=x, y=alt.Y("lo:Q", title=metric), y2="hi:Q",
                                                               color=colour)
        line = alt.Chart(data).mark_line(point=True).encode(
            x=x, y="mean:Q", color=colour,
            tooltip=["objective:N", "staleness:Q", alt.Tooltip("mean:Q", format=".3f"),
                     alt.Tooltip("lo:Q", format=".3f"), alt.Tooltip("hi:Q", format=".3f"), "n:Q"])
        panels.append(alt.layer(band, rule, bars, line).properties(
            width=230, height=150, title={"text": title, "subtitle": "bars: 95% interval; grey: fresh-batch floor"}))
    if not panels:
        raise WorkbenchError("table has no rows of the charted metrics: nothing to draw")
    return alt.concat(*panels, columns=3)


__all__ = ["CHART_METRICS", "FRESH_ROW", "NOISY_REFERENCE", "REFERENCE_ROW", "TABLE_COLUMNS", "cell", "check_table", "estimators",
           "interval_sentences",
           "lab_chart", "lab_findings", "lab_summary", "metric_interval", "versus_floor"]
