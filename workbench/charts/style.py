"""What the run charts say, as data: the metric table (key -> legend name, unit, on-policy value,
float noise), the panels, and the pure frame functions ``workbench.charts`` applies before drawing.

``METRICS`` is the one mapping from a metric key to what a reader sees: its legend name, its unit
(the panels' axis titles carry it), the value it has on-policy by definition (``nominal``: 1 for
ratios and ESS, 0 for M2, KL and token fractions) and its float noise around that value.

**The numerical floor** (``apply_floor``). On-policy the ratio is exp(log pi - log mu) of two
float32 forward passes of the same policy, so log r is round-off of order 1e-7 (a log-prob of
magnitude up to ~10 at float32's 6e-8 relative precision). A chart auto-zoomed onto that round-off
draws noise as signal (M2 ~ 1e-14, KL ~ 3e-8). The rule, over the plotted window:

- a metric with a nominal value whose every finite value lies within ``noise * max(1, |nominal|)``
  of it is drawn as exactly the nominal value, and its panel's subtitle says so
  ("on-policy: ratio = 1"). ``noise`` is 1e-6 (``LINEAR``) for quantities linear in log r (ratio
  quantiles, k1), 1e-12 (``QUADRATIC``, its square) for quadratic ones (M2, k3, 1 - ESS) and 0 for token
  fractions, which are counts;
- any other column whose spread max - min is at most ``noise * max(1, |mean|)`` (a metric without a
  nominal value: ``FLAT_RELATIVE`` = 1e-6) is drawn as its mean to 6 significant digits
  ("constant: entropy = 0.531").

A real spread (1e-3 in a ratio quantile, 1e-8 in M2) is above every floor and is drawn as logged,
except that its points within the noise of the nominal value are drawn as that value.

**Smoothing** (``smooth_frame``): off by default; ``smooth=N`` draws the trailing mean over N
updates of every dense metric (``eval/`` points and knob values are drawn as logged, gaps stay gaps).
**Log scale** (``y_scale``): ``log_scale="auto"`` gives a log axis (symlog when a value is <= 0) to
the panels whose positive values span at least ``LOG_DECADES`` decades.
**Key statistics** (``key_panels``): the objectives a run used (its ``knob/objective`` column)
that declare a ``KeyMetric`` (``workbench/steps/reweight/core.py``) get a panel of that statistic,
with the declared parameter (``knob/<param>``, logged every update) as a dashed reference line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl

from workbench.steps.reweight import OBJECTIVES

LINEAR, QUADRATIC, COUNT = 1e-6, 1e-12, 0.0  # float noise of a metric around its nominal value
FLAT_RELATIVE = 1e-6  # a metric without a nominal value is flat when max - min <= this * max(1, |mean|)
LOG_DECADES = 2.0  # log_scale="auto": a log axis when the positive values span this many decades
# a metric's interval columns (logged beside it): drawn as error bars on its points, never as lines
BANDS: dict[str, tuple[str, str]] = {"eval/accuracy": ("eval/accuracy_lo", "eval/accuracy_hi")}
REF_PREFIX = "ref/"  # derived reference columns: ref/<objective>/<param>
SPARSE_PREFIXES: tuple[str, ...] = ("eval/",)  # logged every N updates: points + line over non-null
STEP_PREFIXES: tuple[str, ...] = ("knob/", REF_PREFIX)  # step functions: never smoothed


@dataclass(frozen=True)
class Metric:
    """How one metric key is drawn: ``name`` (legend), ``quantity`` (in notes: "ratio = 1"), ``unit``,
    ``nominal`` (on-policy value by definition, or None), ``noise`` (see the module doc), the
    physical range ``low`` / ``high`` (bounds a flat panel's axis) and ``scale`` (drawn = logged *
    scale: accuracy in %)."""

    name: str
    unit: str
    nominal: float | None = None
    noise: float = LINEAR
    quantity: str = ""
    low: float | None = None
    high: float | None = None
    scale: float = 1.0


def _ratio(name: str) -> Metric:
    return Metric(name, "ratio pi/mu", 1.0, LINEAR, "ratio", low=0.0)


def _tokens(name: str) -> Metric:
    return Metric(name, "fraction of tokens", 0.0, COUNT, name, 0.0, 1.0)


METRICS: dict[str, Metric] = {
    "eval/accuracy": Metric("held-out", "%", quantity="accuracy", low=0.0, high=100.0, scale=100.0),
    "reward/accuracy": Metric("train batch", "%", quantity="accuracy", low=0.0, high=100.0, scale=100.0),
    "reward/mean": Metric("mean reward", "reward per sample"),
    "offpolicy/clipfrac": _tokens("clipped"),
    "offpolicy/masked_frac": _tokens("masked"),
    "offpolicy/truncated_frac": _tokens("truncated"),
    "offpolicy/ratio_pos_q05": _ratio("5th percentile"),
    "offpolicy/ratio_pos_q50": _ratio("median"),
    "offpolicy/ratio_pos_q95": _ratio("95th percentile"),
    "offpolicy/ratio_neg_q05": _ratio("5th percentile"),
    "offpolicy/ratio_neg_q50": _ratio("median"),
    "offpolicy/ratio_neg_q95": _ratio("95th percentile"),
    "offpolicy/m2": Metric("M2, all tokens", "nats^2", 0.0, QUADRATIC, "M2", low=0.0),
    "offpolicy/m2_after": Metric("M2 after masking", "nats^2", 0.0, QUADRATIC, "M2", low=0.0),
    "offpolicy/ess_token": Metric("per token", "fraction of samples", 1.0, QUADRATIC, "ESS", 0.0, 1.0),
    "offpolicy/ess_seq": Metric("per sequence", "fraction of samples", 1.0, QUADRATIC, "ESS", 0.0, 1.0),
    "offpolicy/kl_k1": Metric("k1 estimate", "nats", 0.0, LINEAR, "KL"),
    "offpolicy/kl_k3": Metric("k3 estimate", "nats", 0.0, QUADRATIC, "KL", low=0.0),
    "loss/entropy": Metric("entropy", "nats per token", low=0.0),
    "knob/staleness": Metric("lag knob s", "updates", quantity="staleness", low=0.0),
    "offpolicy/staleness_mean": Metric("mean age", "updates", quantity="staleness", low=0.0),
    "offpolicy/staleness_max": Metric("max age", "updates", quantity="staleness", low=0.0),
    "reward/response_len_mean": Metric("mean length", "tokens", low=0.0),
    "reward/zero_var_group_frac": Metric("zero-variance groups", "fraction of groups", low=0.0, high=1.0),
    "loss/grad_norm": Metric("grad norm", "L2 norm", low=0.0),
    "offpolicy/pos_share": Metric("positive share", "fraction of |loss|", low=0.0, high=1.0),
    # the objectives' key statistics (KeyMetric in workbench/steps/reweight/core.py)
    "bapo/pos_share": Metric("BAPO's share at its bounds", "fraction of |loss|", low=0.0, high=1.0),
    "r2vpo/lambda": Metric("lambda", "penalty weight", quantity="lambda", low=0.0),
    "clipcov/selected_frac": Metric("selected", "fraction of tokens", 0.0, COUNT, "selected", 0.0, 1.0),
    "klcov/selected_frac": Metric("selected", "fraction of tokens", 0.0, COUNT, "selected", 0.0, 1.0),
}


def metric(key: str) -> Metric:
    """The table entry of ``key``; a reference column ``ref/<objective>/<param>`` is named after its
    param (with the unit of the objective's statistic); an unknown key is drawn under its own name."""
    if key.startswith(REF_PREFIX):
        objective, param = key[len(REF_PREFIX):].rsplit("/", 1)
        km = OBJECTIVES.meta(objective)["key_metric"]
        unit = METRICS[km.columns[0]].unit if km.columns[0] in METRICS else ""
        return Metric(f"{param} (parameter)", unit, quantity=param)
    return METRICS.get(key) or Metric(key, "")


@dataclass(frozen=True)
class Panel:
    """One chart panel: an id (``log_scale`` may name it), its title, the y-axis title (with unit)
    and the metric columns it draws (absent ones are skipped)."""

    id: str
    title: str
    axis: str
    columns: tuple[str, ...]


_RATIO_POS = ("offpolicy/ratio_pos_q05", "offpolicy/ratio_pos_q50", "offpolicy/ratio_pos_q95")
_RATIO_NEG = ("offpolicy/ratio_neg_q05", "offpolicy/ratio_neg_q50", "offpolicy/ratio_neg_q95")
PANELS: list[Panel] = [
    Panel("accuracy", "accuracy (held-out, train)", "accuracy (%)", ("eval/accuracy", "reward/accuracy")),
    Panel("reward", "reward", "reward per sample", ("reward/mean",)),
    Panel("zeroed", "clip / masked fraction", "fraction of tokens",
          ("offpolicy/clipfrac", "offpolicy/masked_frac")),
    Panel("ratio_pos", "ratio quantiles, A > 0", "ratio pi/mu", _RATIO_POS),
    Panel("ratio_neg", "ratio quantiles, A < 0", "ratio pi/mu", _RATIO_NEG),
    Panel("m2", "M2 = mean (log r)^2", "M2 (nats^2)", ("offpolicy/m2", "offpolicy/m2_after")),
    Panel("ess", "effective sample size", "ESS (fraction of samples)", ("offpolicy/ess_token", "offpolicy/ess_seq")),
    Panel("kl", "KL(mu || pi) estimates", "KL (nats)", ("offpolicy/kl_k1", "offpolicy/kl_k3")),
    Panel("entropy", "entropy", "entropy (nats per token)", ("loss/entropy",)),
    Panel("staleness", "staleness (knob, mean, max)", "age (updates)",
          ("knob/staleness", "offpolicy/staleness_mean", "offpolicy/staleness_max")),
    Panel("length", "response length", "length (tokens)", ("reward/response_len_mean",)),
    Panel("zero_var", "zero-variance groups", "fraction of groups", ("reward/zero_var_group_frac",)),
    Panel("grad_norm", "grad norm (pre-clip)", "L2 norm", ("loss/grad_norm",)),
    Panel("pos_share", "positive share of the loss", "fraction of |loss|", ("offpolicy/pos_share",)),
]


def as_panel(panel: Panel | tuple[str, Sequence[str]]) -> Panel:
    """A ``Panel``, or a (title, columns) pair drawn with the first column's unit as axis title."""
    if isinstance(panel, Panel):
        return panel
    title, cols = panel
    unit = metric(cols[0]).unit if cols else ""
    return Panel(title, title, unit or title, tuple(cols))


def panel_ids(panels: Sequence[Panel | tuple[str, Sequence[str]]]) -> set[str]:
    """The ids ``log_scale`` may name: those of ``panels`` and ``key/<objective>`` of every objective."""
    return {as_panel(p).id for p in panels} | {f"key/{name}" for name in OBJECTIVES.names()}


def chartable(metrics: pl.DataFrame, col: str) -> bool:
    """Present, numeric and holding at least one finite value."""
    return (col in metrics.columns and metrics.schema[col].is_numeric()
            and bool(metrics.get_column(col).cast(pl.Float64).is_finite().any()))


# ----------------------------------------------------------------------------- the floor
@dataclass(frozen=True)
class Flat:
    """A column drawn as one value: ``value``, and whether it is the metric's on-policy nominal."""

    value: float
    nominal: bool


def flat_value(values: Sequence[float] | pl.Series, m: Metric) -> Flat | None:
    """The value a column is drawn as when it is flat within float noise (module doc), else None."""
    s = pl.Series(values, dtype=pl.Float64) if not isinstance(values, pl.Series) else values.cast(pl.Float64)
    finite = s.filter(s.is_finite())
    if not finite.len():
        return None
    lo, hi, mean = float(finite.min()), float(finite.max()), float(finite.mean())  # type: ignore[arg-type]
    if m.nominal is not None:
        tol = m.noise * max(1.0, abs(m.nominal))
        if abs(lo - m.nominal) <= tol and abs(hi - m.nominal) <= tol:
            return Flat(float(m.nominal), True)
    spread = m.noise if m.nominal is not None else FLAT_RELATIVE  # a metric's own noise, where it has one
    if hi - lo <= spread * max(1.0, abs(mean)):
        return Flat(float(f"{mean:.6g}"), False)
    return None


def apply_floor(frame: pl.DataFrame, columns: Sequence[str]) -> tuple[pl.DataFrame, dict[str, Flat]]:
    """``frame`` with every flat column of ``columns`` replaced by its value (nulls and non-finite
    values stay gaps), and {column: Flat} for those columns. In a column that is not flat, the
    values within float noise of the nominal value are drawn as it too (on-policy updates of a run
    that later goes off-policy: a log axis must not show 1e-14 as data). Pure: ``frame`` is unchanged."""
    flats: dict[str, Flat] = {}
    exprs = []
    for col in columns:
        if col not in frame.columns or not frame.schema[col].is_numeric() or col.startswith(REF_PREFIX):
            continue
        m, x = metric(col), pl.col(col).cast(pl.Float64)
        flat = flat_value(frame.get_column(col), m)
        if flat is not None:
            flats[col] = flat
            exprs.append(pl.when(x.is_finite()).then(pl.lit(flat.value)).otherwise(x).alias(col))
        elif m.nominal is not None and m.noise > 0:
            near = (x - m.nominal).abs() <= m.noise * max(1.0, abs(m.nominal))
            exprs.append(pl.when(near).then(pl.lit(float(m.nominal))).otherwise(x).alias(col))
    return (frame.with_columns(exprs) if exprs else frame), flats


def floor_note(columns: Sequence[str], flats: dict[str, Flat]) -> str:
    """The subtitle of a panel with flat columns: "on-policy: ratio = 1" / "constant: entropy = 0.531"."""
    parts: dict[bool, list[str]] = {True: [], False: []}
    for col in columns:
        if col in flats:
            m, f = metric(col), flats[col]
            text = f"{m.quantity or m.name} = {f.value * m.scale:g}"
            if text not in parts[f.nominal]:
                parts[f.nominal].append(text)
    notes = [f"{label}: {', '.join(parts[k])}" for k, label in ((True, "on-policy"), (False, "constant")) if parts[k]]
    return "; ".join(notes) + (" (within float noise)" if parts[True] else "")


def flat_domain(columns: Sequence[str], flats: dict[str, Flat]) -> list[float] | None:
    """A y domain around the value(s) of a panel whose every column is flat (None otherwise): +-max(0.5,
    |v| / 2) in logged units, clipped to the metrics' physical range, so a flat line sits on a readable axis."""
    if not columns or not all(c in flats for c in columns):
        return None
    values = [flats[c].value * metric(c).scale for c in columns]
    pad = max(0.5 * max(metric(c).scale for c in columns), max(abs(v) for v in values) / 2)
    lo, hi = min(values) - pad, max(values) + pad
    lows = [metric(c).low for c in columns]
    highs = [metric(c).high for c in columns]
    if all(x is not None for x in lows):
        lo = max(lo, min(lows))  # type: ignore[type-var]
    if all(x is not None for x in highs):
        hi = min(hi, max(highs))  # type: ignore[type-var]
    return [lo, hi]


# ----------------------------------------------------------------------------- smoothing, log scale
def smooth_frame(frame: pl.DataFrame, columns: Sequence[str], window: int) -> pl.DataFrame:
    """Trailing mean over ``window`` rows of each dense column (``window`` <= 1: unchanged); sparse
    (``eval/``) and step (``knob/``, ``ref/``) columns are left as logged, null rows stay null."""
    dense = [c for c in columns if c in frame.columns and not c.startswith(SPARSE_PREFIXES + STEP_PREFIXES)]
    if window <= 1 or not dense:
        return frame
    return frame.with_columns(
        pl.when(pl.col(c).is_null()).then(None)
        .otherwise(pl.col(c).cast(pl.Float64).fill_nan(None).rolling_mean(window, min_samples=1)).alias(c)
        for c in dense)


def y_scale(values: Sequence[float], log: bool) -> dict[str, Any]:
    """The Vega-Lite y scale of a panel: linear (``zero: false``), or with ``log`` a log scale when every
    value is > 0 and a symlog one (its linear zone the smallest non-zero |value|) when one is <= 0."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not log or not finite:
        return {"zero": False}
    nonzero = [abs(v) for v in finite if v != 0]
    if min(finite) > 0:
        return {"type": "log"}
    return {"type": "symlog", "constant": min(nonzero) if nonzero else 1.0}


def spans_decades(values: Sequence[float], decades: float = LOG_DECADES) -> bool:
    """Do the positive finite values span at least ``decades`` powers of ten?"""
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return bool(pos) and math.log10(max(pos) / min(pos)) >= decades


# ----------------------------------------------------------------------------- key statistics
def run_objectives(metrics: pl.DataFrame) -> list[str]:
    """The objectives of a run in the order it used them (its ``knob/objective`` column)."""
    if "knob/objective" not in metrics.columns:
        return []
    return [o for o in metrics.get_column("knob/objective").drop_nulls().unique(maintain_order=True).to_list()
            if o in OBJECTIVES]


def key_panels(metrics: pl.DataFrame, objectives: Sequence[str] | None = None) -> tuple[list[Panel], list[pl.Expr]]:
    """A panel per objective (``objectives``, default the run's own) that declares a ``KeyMetric``
    whose columns the run logged, and the expressions of their reference columns
    (``ref/<objective>/<param>``: ``knob/<param>`` on the updates that objective trained, else null;
    the param's registered default where the run logged no knob column)."""
    panels, refs = [], []
    names = list(objectives) if objectives is not None else run_objectives(metrics)
    for name in names:
        km = OBJECTIVES.meta(name).get("key_metric")
        cols = [c for c in km.columns if chartable(metrics, c)] if km is not None else []
        if not cols:
            continue
        if km.reference is not None:
            ref = f"{REF_PREFIX}{name}/{km.reference}"
            knob = f"knob/{km.reference}"
            default = next(p.default for p in OBJECTIVES.meta(name)["params"] if p.name == km.reference)
            value = pl.col(knob).cast(pl.Float64) if knob in metrics.columns else pl.lit(float(default))
            if "knob/objective" in metrics.columns:
                value = pl.when(pl.col("knob/objective") == name).then(value).otherwise(None)
            refs.append(value.alias(ref))
            cols.append(ref)
        first = metric(cols[0])
        axis = f"{first.quantity or first.name} ({first.unit})" if first.unit else cols[0]
        panels.append(Panel(f"key/{name}", f"{name}: {km.title or 'key statistic'}", axis, tuple(cols)))
    return panels, refs


__all__ = ["COUNT", "FLAT_RELATIVE", "LINEAR", "LOG_DECADES", "METRICS", "PANELS", "QUADRATIC", "REF_PREFIX",
           "SPARSE_PREFIXES", "Flat", "Metric", "Panel", "apply_floor", "as_panel", "chartable", "flat_domain",
           "flat_value", "floor_note", "key_panels", "metric", "panel_ids", "run_objectives", "smooth_frame",
           "spans_decades", "y_scale"]
