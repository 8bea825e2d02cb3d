"""The weight-curve explorer (notebook 03): every objective's per-token gradient weight w(r) against
the importance ratio r, for positive and negative advantages, with a widget per parameter.

w comes from ``workbench.steps.reweight.curves.weight_curve`` (autograd through the registered objective:
d loss / d logp = -w A; REINFORCE has w = 1, plain IS w = r, a clipped or masked token w = 0).

Objectives whose weight depends on batch statistics (M2PO's second moment, covariance selection,
adaptive bounds) are evaluated one ratio at a time, i.e. the weight a token gets *alone*;
row-separable objectives are evaluated in one batch (identical and ~50x faster). Which is which
is probed per objective (``separable``: the batched curve must not change on very different
sub-batches, nor at 9 points evaluated alone), so a newly registered objective needs nothing here.

Layout (frontend): the dropdown, the selected objective's doc and sliders, and that objective's
curve drawn large beside them (``focus_spec``), so a slider and the curve it moves are side by
side; below, the grid of every objective (``curves_spec``). Every panel's y axis is scaled to its
own curve (a curve that silences tokens reaches w = 0), and one legend names the two signs.

    ex = CurveExplorer(); ex.show()                # widgets + charts (frontend)
    ex.select("m2po")                              # what the dropdown does (it starts on ppo_clip)
    ex.set_params("ppo_clip", clip_high=0.28)      # what a slider does
    ex.save_png("curves.png"); ex.frame()          # headless / for analysis
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Sequence

import polars as pl
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import OBJECTIVES, validate_params
from workbench.notebook import has_frontend
from workbench.charts import save_png
from workbench.steps.reweight.curves import weight_curve
from workbench.ui.live import enable_offline
from workbench.ui.params import param_widget

DEFAULT_OBJECTIVE = "ppo_clip"  # the dropdown starts here: the clip every other rule is compared with


def separable(name: str, params: dict[str, Any], ratios: torch.Tensor, probes: int = 9) -> tuple[bool, dict]:
    """Does evaluating ``ratios`` in one batch give each ratio the weight it gets *alone*?

    A row-separable objective gives every ratio the same weight whatever else is in the batch, so
    the batched curve must be unchanged on four very different sub-batches (even / odd points,
    lower / upper half) and at ``probes`` points evaluated alone; a batch statistic (M2, a
    covariance rank, an adaptive bound) changes with the batch's composition. Returns (answer,
    the batched curves): a separable objective costs 6 batched calls per sign + ``probes`` single ones.
    """
    n = len(ratios)
    subsets = [torch.arange(0, n, 2), torch.arange(1, n, 2), torch.arange(0, n // 2), torch.arange(n // 2, n)]
    probe = torch.linspace(0, n - 1, probes).round().long().unique()
    batched = {}
    ok = True
    for sign in (1, -1):
        full = batched[sign] = weight_curve(name, ratios, sign, batched=True, **params)
        for idx in subsets:
            if len(idx) and ok:
                part = weight_curve(name, ratios[idx], sign, batched=True, **params)
                ok = torch.allclose(full[idx], part, atol=1e-9, equal_nan=True)
        if ok:
            alone = weight_curve(name, ratios[probe], sign, batched=False, **params)
            ok = torch.allclose(full[probe], alone, atol=1e-9, equal_nan=True)
    return ok, batched


def curves_for(name: str, ratios: torch.Tensor, params: dict[str, Any], batched: bool) -> dict[int, torch.Tensor]:
    return {s: weight_curve(name, ratios, s, batched=batched, **params) for s in (1, -1)}


SIGNS = ["A > 0", "A < 0"]  # legend entries: colour and dash (green solid, red dashed)
FOCUS_SIZE = (360, 230)  # the edited objective's curve, next to its sliders


def _curve_panel(name: str, subtitle: str, width: int, height: int) -> dict[str, Any]:
    """One objective's w(r) for both advantage signs (y scaled to the curve) and the r = 1 rule."""
    sign = {"field": "s", "type": "nominal", "title": "advantage", "scale": {"domain": SIGNS}}
    return {
        "title": {"text": name, "subtitle": subtitle, "subtitleFontSize": 9},
        "width": width, "height": height,
        "layer": [
            {"transform": [{"filter": {"field": "o", "equal": name}}],
             "mark": {"type": "line", "strokeWidth": 2},
             "encoding": {
                 "x": {"field": "r", "type": "quantitative", "title": "ratio r = pi / mu"},
                 "y": {"field": "w", "type": "quantitative", "title": "gradient weight w",
                       "scale": {"zero": False}},
                 "color": {**sign, "scale": {"domain": SIGNS, "range": ["#2ca02c", "#d62728"]}},
                 "strokeDash": {**sign, "scale": {"domain": SIGNS, "range": [[1, 0], [5, 3]]}},
                 "tooltip": [{"field": "s", "title": "advantage"}, {"field": "r", "title": "ratio r", "format": ".3f"},
                             {"field": "w", "title": "weight w", "format": ".4~g"}]}},
            {"data": {"values": [{"x": 1.0}]}, "mark": {"type": "rule", "color": "#999", "strokeDash": [2, 2]},
             "encoding": {"x": {"field": "x", "type": "quantitative"}}},
        ]}


CURVE_NOISE = 1e-9  # |w| below this times the curve's largest |w| is float64 round-off: drawn as 0


def _rows(frame: pl.DataFrame, objectives: Sequence[str]) -> list[dict[str, Any]]:
    """The drawn points: w to 6 significant digits, round-off near 0 drawn as 0 (an axis scaled to the
    curve must not zoom onto 1e-17), non-finite weights as gaps."""
    keep = frame.filter(pl.col("objective").is_in(list(objectives))).with_columns(
        pl.col("weight").abs().filter(pl.col("weight").is_finite()).max().over("objective").alias("top"))
    return [{"o": o, "s": SIGNS[0] if s > 0 else SIGNS[1], "r": round(r, 4),
             "w": (0.0 if abs(w) <= CURVE_NOISE * (top or 0.0) else float(f"{w:.6g}")) if math.isfinite(w) else None}
            for o, s, r, w, top in keep.select("objective", "advantage_sign", "ratio", "weight", "top").iter_rows()]


def curves_spec(frame: pl.DataFrame, objectives: Sequence[str], params: dict[str, dict[str, Any]] | None = None,
                columns: int = 4, width: int = 170, height: int = 120, title: str = "") -> dict[str, Any]:
    """Vega-Lite grid: one panel per objective, w(r) for A > 0 (green, solid) and A < 0 (red, dashed)
    with one legend for both, an r = 1 rule; every panel's y axis is scaled to its own curve."""
    panels = [_curve_panel(n, _params_text(n, (params or {}).get(n, {})), width, height) for n in objectives]
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"name": "curves"},
            "datasets": {"curves": _rows(frame, objectives)}, "concat": panels, "columns": columns,
            "resolve": {"scale": {"y": "independent"}},
            "config": {"legend": {"orient": "top", "symbolStrokeWidth": 2, "symbolType": "stroke"}}}
    if title:
        spec["title"] = title
    return spec


def focus_spec(frame: pl.DataFrame, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The curve of ``name`` alone and larger (``FOCUS_SIZE``): what the notebook shows next to its sliders."""
    width, height = FOCUS_SIZE
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"name": "curves"},
            "datasets": {"curves": _rows(frame, [name])},
            **_curve_panel(name, _params_text(name, params or {}, limit=70), width, height),
            "config": {"legend": {"orient": "top", "symbolStrokeWidth": 2, "symbolType": "stroke"}}}


def _params_text(name: str, params: dict[str, Any], limit: int = 48) -> str:
    if not params:
        return "(no parameters)"
    text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return text if len(text) <= limit else text[:limit - 2] + "..."


class CurveExplorer:
    """Weight curves of ``objectives`` (default: all registered) with per-parameter widgets."""

    def __init__(self, objectives: Sequence[str] | None = None, *, r_min: float = 0.05, r_max: float = 3.0,
                 points: int = 121, params: dict[str, dict[str, Any]] | None = None, headless: bool | None = None,
                 columns: int = 4):
        self.objectives = list(objectives or OBJECTIVES.names())
        self.ratios = torch.linspace(r_min, r_max, points, dtype=torch.float64)
        self.params = {n: validate_params(n, (params or {}).get(n, {})) for n in self.objectives}
        self.columns = columns
        self.selected = DEFAULT_OBJECTIVE if DEFAULT_OBJECTIVE in self.objectives else self.objectives[0]
        self.interactive = has_frontend() if headless is None else not headless
        self._separable: dict[str, bool] = {}
        self._curves: dict[str, dict[int, torch.Tensor]] = {}
        self._lock = threading.Lock()
        for name in self.objectives:
            self._compute(name)
        self.widgets: dict[str, Any] = {}
        self.box = None
        if self.interactive:
            self._build_widgets()

    # ------------------------------------------------------------------ data
    def _compute(self, name: str) -> None:
        p = self.params[name]
        if self._separable.get(name) is False:
            self._curves[name] = curves_for(name, self.ratios, p, batched=False)
            return
        ok, batched = separable(name, p, self.ratios)
        self._separable[name] = ok
        self._curves[name] = batched if ok else curves_for(name, self.ratios, p, batched=False)

    def set_params(self, name: str, **params: Any) -> dict[str, Any]:
        """Change ``name``'s parameters (validated), recompute its curves, redraw; returns them."""
        with self._lock:
            new = validate_params(name, {**self.params[name], **params})
            self.params[name] = new
            self._compute(name)
        self.render()
        return new

    def frame(self) -> pl.DataFrame:
        """Long frame: objective, advantage_sign, ratio, weight (one row per point)."""
        r = self.ratios.tolist()
        parts = []
        for name in self.objectives:
            for sign, w in self._curves[name].items():
                parts.append(pl.DataFrame({"objective": [name] * len(r), "advantage_sign": [sign] * len(r),
                                           "ratio": r, "weight": w.tolist()}))
        return pl.concat(parts)

    def weight_at(self, name: str, ratio: float, sign: int) -> float:
        """w(ratio) of ``name`` for advantage sign ``sign`` with the current parameters."""

        return float(weight_curve(name, torch.tensor([ratio], dtype=torch.float64), sign, **self.params[name])[0])

    def table(self, ratios: Sequence[float] = (0.5, 0.8, 1.0, 1.2, 2.0)) -> pl.DataFrame:
        """w at a few ratios, one row per objective: columns ``A>0 r=...`` and ``A<0 r=...``."""
        rows = []
        for name in self.objectives:
            row: dict[str, Any] = {"objective": name}
            for sign, label in ((1, "A>0"), (-1, "A<0")):
                for r in ratios:
                    row[f"{label} r={r:g}"] = self.weight_at(name, r, sign)
            rows.append(row)
        return pl.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """Headline numbers: objectives drawn, grid, w at r = 1 per sign, finiteness, which were
        evaluated one ratio at a time (batch-statistic objectives)."""
        df = self.frame()
        at_one = {n: {"pos": self.weight_at(n, 1.0, 1), "neg": self.weight_at(n, 1.0, -1)} for n in self.objectives}
        return {"objectives": self.objectives, "points": len(self.ratios),
                "ratio_range": [float(self.ratios[0]), float(self.ratios[-1])],
                "all_finite": bool(df["weight"].is_finite().all()), "weight_at_ratio_1": at_one,
                "evaluated_alone": sorted(n for n, ok in self._separable.items() if not ok),
                "params": self.params}

    def spec(self) -> dict[str, Any]:
        return curves_spec(self.frame(), self.objectives, self.params, columns=self.columns)

    def focus(self) -> dict[str, Any]:
        """The selected objective's curve alone (``focus_spec``), drawn next to its sliders."""
        return focus_spec(self.frame(), self.selected, self.params[self.selected])

    def select(self, name: str) -> None:
        """Show ``name``'s sliders and its curve next to them (what the dropdown does)."""
        if name not in self.objectives:
            raise WorkbenchError(f"objective={name!r} is not drawn here: expected one of {', '.join(self.objectives)}")
        self.selected = name
        if self.widgets:
            self._show_params(name)
            self.widgets["focus"].spec = self.focus()

    def save_png(self, path: str | Path) -> Path:
        return save_png(self.spec(), path)

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        import altair as alt
        import ipywidgets as W

        enable_offline()
        self.widgets["objective"] = W.Dropdown(options=self.objectives, value=self.selected,
                                               description="parameters of", style={"description_width": "110px"})
        self.widgets["doc"] = W.HTML()
        self.widgets["params"] = W.VBox()
        placeholder = alt.Chart(alt.Data(values=[{"t": "drawing..."}])).mark_text().encode(text="t:N")
        options = {"renderer": "svg", "actions": False}
        self.widgets["focus"] = alt.JupyterChart(placeholder, embed_options=options)
        self.widgets["chart"] = alt.JupyterChart(placeholder, embed_options=options)
        self.widgets["objective"].observe(lambda ch: self.select(ch["new"]), names="value")
        self._show_params(self.selected)
        controls = W.VBox([self.widgets["objective"], self.widgets["doc"], self.widgets["params"]],
                          layout=W.Layout(width="460px"))
        self.box = W.VBox([W.HBox([controls, self.widgets["focus"]]), self.widgets["chart"]])
        self.render()

    def _show_params(self, name: str) -> None:
        import html

        meta = OBJECTIVES.meta(name)
        ws = [param_widget(p, self.params[name][p.name], lambda ch, n=name, k=p.name: self._on_param(ch, n, k))
              for p in meta.get("params", [])]
        self.widgets["params"].children = tuple(ws)
        self.widgets["doc"].value = (f"<div style='font-size:12px;color:#555;max-width:420px'>"
                                     f"{html.escape(meta.get('summary', ''))} <i>({html.escape(meta.get('paper', ''))})"
                                     f"</i></div>" + ("" if ws else "<i>no parameters</i>"))

    def _on_param(self, change, name: str, key: str) -> None:
        try:
            self.set_params(name, **{key: change["new"]})
        except Exception as e:  # noqa: BLE001  (invalid combination: snap back, say why)
            self.widgets["doc"].value += f"<div style='color:#c33'>{type(e).__name__}: {e}</div>"
            change["owner"].value = change["old"]

    def render(self) -> None:
        if self.widgets.get("chart") is not None:
            self.widgets["focus"].spec = self.focus()
            self.widgets["chart"].spec = self.spec()

    def show(self):
        if self.box is not None:
            from IPython.display import display

            display(self.box)
        else:
            print("no frontend: the curves are saved as PNG (save_png) and as a table (frame)")

    def _ipython_display_(self) -> None:
        self.show()


__all__ = ["DEFAULT_OBJECTIVE", "CurveExplorer", "curves_spec", "focus_spec", "separable"]
