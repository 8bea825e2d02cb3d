"""What a same-batch replay (``workbench.studies.replay``) shows, and only that: intervals across its
repeats, one sentence per objective, the JSON summary and the chart.

    intervals = replay_intervals(table)     # per objective: mean cosine, 95% interval, minus the floor
    replay_findings(intervals)              # ["cosine of m2po to the on-policy gradient: 0.03 [-0.10, 0.16] ..."]

Every cosine is the mean over the repeats with a percentile-bootstrap 95% interval (``bootstrap_ci``);
its difference to the noise floor (the ``fresh batch (REINFORCE)`` row, a fresh on-policy batch of
the same size) is an unpaired bootstrap interval (``difference_interval``). ``replay_verdict`` reads
them in this order, and a sentence claims a direction only when its interval lies above 0:

- ``no_gradient``: the gradient is zero on every batch (everything silenced): no direction to compare;
- ``no_interval``: one repeat: no interval, no direction resolved;
- ``against``: the interval lies below 0;
- ``unresolved``: the interval includes 0: no direction resolved;
- ``below_floor``: above 0, below the floor (difference interval below 0): keeps part of the direction;
- ``level_with_floor``: above 0, the difference to the floor not resolved: keeps the direction;
- ``above_floor``: above 0 and above the floor;
- ``above_zero``: above 0, the floor has no interval to compare with.

With fewer than about five repeats the bootstrap interval is too narrow (``workbench.stats``): the
findings say so. Left out: intervals that also resample the on-policy reference.
"""

from __future__ import annotations

import math
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from workbench.errors import WorkbenchError, bad_value
from workbench.stats import bootstrap_ci, difference_interval

FRESH_ROW = "fresh batch (REINFORCE)"
TABLE_COLUMNS = ("repeat", "objective", "grad_norm", "cosine_to_onpolicy", "silenced_frac", "clipfrac",
                 "masked_frac", "ess_token")
INTERVAL_COLUMNS = ("objective", "repeats", "directed", "cosine", "cosine_lo", "cosine_hi", "minus_floor",
                    "minus_floor_lo", "minus_floor_hi")
FEW_REPEATS = 5  # below this the percentile bootstrap covers less than its nominal level (workbench.stats)
CLAIMS = {  # verdict -> what the sentence says after the numbers
    "no_gradient": "zero gradient on every batch (everything silenced): no direction to compare",
    "no_interval": "one repeat, no interval: no direction resolved",
    "against": "the interval lies below 0: points against the on-policy gradient",
    "unresolved": "the interval includes 0: no direction resolved",
    "below_floor": "above 0 but below the floor: keeps part of the direction, less than a fresh batch",
    "level_with_floor": "above 0, its difference to the floor not resolved: keeps the direction",
    "above_floor": "above 0 and above the floor: keeps the direction, more than a fresh batch",
    "above_zero": "above 0 (the floor has no interval): keeps the direction",
}


def _check_columns(frame: Any, columns: tuple[str, ...], what: str) -> None:
    if not isinstance(frame, pl.DataFrame):
        raise bad_value(what, type(frame).__name__, "a polars DataFrame")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise bad_value(what, f"columns {', '.join(frame.columns)}", f"a frame with the column {missing[0]!r} too")
    if FRESH_ROW not in frame["objective"].to_list():
        raise WorkbenchError(f"{what} has no {FRESH_ROW!r} rows: the noise floor is missing (from same_batch_replay)")


def _interval(values: list[float], confidence: float, seed: int) -> tuple[float, float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return tuple(bootstrap_ci(finite, confidence=confidence, seed=seed)) if finite else (math.nan,) * 3


def replay_intervals(table: pl.DataFrame, confidence: float = 0.95, seed: int = 0) -> pl.DataFrame:
    """Per objective (the floor row last): ``repeats``, ``directed`` (repeats with a nonzero gradient),
    the mean cosine with its interval, its difference to the floor's with that interval, the mean
    and interval of the gradient norm, and the mean silenced / clip / mask fractions and token ESS."""
    _check_columns(table, TABLE_COLUMNS, "table")
    names = list(dict.fromkeys(n for n in table["objective"].to_list() if n != FRESH_ROW)) + [FRESH_ROW]
    floor = [v for v in table.filter(pl.col("objective") == FRESH_ROW)["cosine_to_onpolicy"].to_list()
             if math.isfinite(v)]
    rows = []
    for name in names:
        sub = table.filter(pl.col("objective") == name)
        cos = [v for v in sub["cosine_to_onpolicy"].to_list() if math.isfinite(v)]
        diff = (difference_interval(cos, floor, confidence, seed=seed) if cos and floor and name != FRESH_ROW
                else (math.nan,) * 3)
        row = {"objective": name, "repeats": sub.height, "directed": len(cos)}
        row.update(zip(("cosine", "cosine_lo", "cosine_hi"), _interval(cos, confidence, seed)))
        row.update(zip(("minus_floor", "minus_floor_lo", "minus_floor_hi"), diff))
        row.update(zip(("grad_norm", "grad_norm_lo", "grad_norm_hi"),
                       _interval(sub["grad_norm"].to_list(), confidence, seed)))
        row.update({c: float(np.nanmean(sub[c].to_numpy())) if sub[c].is_not_nan().any() else math.nan
                    for c in ("silenced_frac", "clipfrac", "masked_frac", "ess_token")})
        rows.append(row)
    return pl.DataFrame(rows)


def replay_verdict(row: dict[str, Any]) -> str:
    """The verdict (module doc) of one row of ``replay_intervals``."""
    lo, hi, dlo, dhi = (row[c] for c in ("cosine_lo", "cosine_hi", "minus_floor_lo", "minus_floor_hi"))
    if row["directed"] == 0:
        return "no_gradient"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no_interval"
    if hi < 0:
        return "against"
    if lo <= 0:
        return "unresolved"
    if not (math.isfinite(dlo) and math.isfinite(dhi)):
        return "above_zero"
    return "below_floor" if dhi < 0 else "above_floor" if dlo > 0 else "level_with_floor"


def _fmt(estimate: float, lo: float, hi: float) -> str:
    return f"{estimate:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else f"{estimate:.2f}"


def replay_findings(intervals: pl.DataFrame) -> list[str]:
    """One sentence for the noise floor, then one per objective, each claiming only its verdict."""
    _check_columns(intervals, INTERVAL_COLUMNS, "intervals")
    floor = intervals.filter(pl.col("objective") == FRESH_ROW).row(0, named=True)
    floor_text = _fmt(floor["cosine"], floor["cosine_lo"], floor["cosine_hi"])
    n = int(floor["repeats"])
    out = [f"noise floor: a fresh on-policy batch of the stale batch's size reaches cosine {floor_text} to the "
           f"on-policy gradient (mean and 95% interval over {n} batches)"]
    if n < FEW_REPEATS:
        out[0] += f"; with fewer than {FEW_REPEATS} repeats every interval is too narrow, read it as a lower bound"
    if not floor["cosine_lo"] > 0:  # NaN compares False: no interval is no resolved floor either
        out.append("the floor itself is not resolved above 0: the on-policy reference is too noisy at this size "
                   "(raise onpolicy_factor or prompts_per_step) to resolve any direction")
    for row in intervals.filter(pl.col("objective") != FRESH_ROW).iter_rows(named=True):
        verdict = replay_verdict(row)
        if verdict == "no_gradient":
            out.append(f"{row['objective']}: {CLAIMS[verdict]}")
            continue
        text = _fmt(row["cosine"], row["cosine_lo"], row["cosine_hi"])
        out.append(f"cosine of {row['objective']} to the on-policy gradient: {text}, fresh-batch noise floor "
                   f"{floor_text}: {CLAIMS[verdict]}")
    return out


def _mean(frame: pl.DataFrame, column: str) -> dict[str, float]:
    return dict(zip(frame["objective"].to_list(), frame[column].to_list()))


def replay_summary(table: pl.DataFrame) -> dict[str, Any]:
    """Headline numbers of a replay table (JSON-able; NaN stays NaN): means over the repeats, the
    cosine intervals, the verdicts and the findings' sentences."""
    iv = replay_intervals(table)
    objs, floor = iv.filter(pl.col("objective") != FRESH_ROW), iv.filter(pl.col("objective") == FRESH_ROW)
    names = objs["objective"].to_list()
    first = table.filter(pl.col("objective") == names[0]) if names else table.head(0)
    signal = table.filter(pl.col("objective") == FRESH_ROW)  # one row per repeat
    return {"objectives": names, "staleness": int(table["staleness"][0]), "repeats": int(floor["repeats"][0]),
            "sequences": int(table["sequences"][0]), "onpolicy_sequences": int(table["onpolicy_sequences"][0]),
            "signal_tokens": int(signal["signal_tokens"].sum()),  # over every stale batch
            "cosine_to_onpolicy": _mean(objs, "cosine"),
            "cosine_interval": {r["objective"]: [r["cosine_lo"], r["cosine_hi"]] for r in objs.iter_rows(named=True)},
            "verdicts": {r["objective"]: replay_verdict(r) for r in objs.iter_rows(named=True)},
            "grad_norm": _mean(objs, "grad_norm"), "clipfrac": _mean(objs, "clipfrac"),
            "masked_frac": _mean(objs, "masked_frac"), "silenced_frac": _mean(objs, "silenced_frac"),
            "ess_token": float(np.nanmean(first["ess_token"].to_numpy())) if first.height else math.nan,
            "fresh_batch_cosine": float(floor["cosine"][0]),
            "fresh_batch_interval": [float(floor["cosine_lo"][0]), float(floor["cosine_hi"][0])],
            "findings": replay_findings(iv)}


def _json_rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in frame.iter_rows(named=True)]


def replay_chart(table: pl.DataFrame) -> alt.TopLevelMixin:
    """The replay as four panels per objective: cosine to the on-policy gradient (points, 95% interval
    bars, the noise floor's interval as a grey band, 0 as a rule), gradient norm (log axis, each bar
    labelled: no objective is invisible beside a large one), silenced token fraction, token ESS.
    ``table``: the long table of ``same_batch_replay`` or its ``replay_intervals``."""
    iv = replay_intervals(table) if "repeat" in table.columns else table
    _check_columns(iv, INTERVAL_COLUMNS + ("grad_norm", "silenced_frac", "ess_token"), "table")
    objs, floor = iv.filter(pl.col("objective") != FRESH_ROW), iv.filter(pl.col("objective") == FRESH_ROW)
    positive = objs.filter(pl.col("grad_norm_lo") > 0)["grad_norm_lo"]
    left = float(positive.min()) if positive.len() else 1.0  # where a zero norm's label sits on the log axis
    rows = _json_rows(objs.with_columns(
        *(pl.when(pl.col(c) > 0).then(pl.col(c)).otherwise(None).alias(f"{c}_log")
          for c in ("grad_norm", "grad_norm_lo", "grad_norm_hi")),
        pl.when(pl.col("grad_norm") > 0).then(pl.col("grad_norm")).otherwise(left).alias("label_at"),
        pl.col("grad_norm").map_elements(lambda v: f"{v:.3g}" if v > 0 else "0 (no gradient)",
                                         return_dtype=pl.String).alias("norm_label")))
    floor_rows = _json_rows(floor)
    height = 18 * max(1, objs.height)
    y = alt.Y("objective:N", sort=None, title=None, scale=alt.Scale(domain=objs["objective"].to_list()))
    data, floor_data = alt.Data(values=rows), alt.Data(values=floor_rows)
    band = alt.Chart(floor_data).mark_rect(color="#999999", opacity=0.3).encode(x="cosine_lo:Q", x2="cosine_hi:Q")
    floor_rule = alt.Chart(floor_data).mark_rule(color="#555555", strokeDash=[4, 3]).encode(x="cosine:Q")
    zero = alt.Chart(alt.Data(values=[{"x": 0.0}])).mark_rule(color="#000000", opacity=0.4).encode(x="x:Q")
    bars = alt.Chart(data).mark_rule(strokeWidth=2).encode(x=alt.X("cosine_lo:Q", title="cosine to on-policy gradient"),
                                                          x2="cosine_hi:Q", y=y)
    points = alt.Chart(data).mark_point(filled=True, size=40).encode(
        x="cosine:Q", y=y, tooltip=["objective:N", alt.Tooltip("cosine:Q", format=".3f"),
                                    alt.Tooltip("cosine_lo:Q", format=".3f"), alt.Tooltip("cosine_hi:Q", format=".3f")])
    cosine = alt.layer(band, floor_rule, zero, bars, points).properties(
        width=220, height=height, title={"text": "cosine to the on-policy gradient",
                                         "subtitle": "bars: 95% interval; grey band: fresh-batch noise floor"})
    log_x = alt.X("grad_norm_lo_log:Q", scale=alt.Scale(type="log"), title="gradient norm")
    norm = alt.layer(
        alt.Chart(data).mark_rule(strokeWidth=2).encode(x=log_x, x2="grad_norm_hi_log:Q", y=y),
        alt.Chart(data).mark_point(filled=True, size=40).encode(x="grad_norm_log:Q", y=y),
        alt.Chart(data).mark_text(align="left", dx=6, dy=-6, fontSize=9).encode(x="label_at:Q", y=y,
                                                                              text="norm_label:N"),
    ).properties(width=200, height=height, title={"text": "gradient norm (log axis)", "subtitle": "bars: 95% interval"})
    small = [alt.Chart(data).mark_bar().encode(x=alt.X(f"{col}:Q", title=title), y=y).properties(
        width=150, height=height, title=title) for col, title in (("silenced_frac", "silenced token fraction"),
                                                                  ("ess_token", "token ESS"))]
    return alt.hconcat(cosine, norm, *small)


__all__ = ["CLAIMS", "FEW_REPEATS", "FRESH_ROW", "replay_chart", "replay_findings", "replay_intervals",
           "replay_summary", "replay_verdict"]
