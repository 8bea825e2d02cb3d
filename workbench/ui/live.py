"""Live charts in a notebook: ``workbench.charts``' grid in a Jupyter ``JupyterChart`` widget,
refreshed at most every N updates / T seconds.

``LiveCharts`` owns the widget and the throttle: ``due(version)`` is the cheap test the training
thread calls after every update; ``render(metrics, events)`` rebuilds the spec
(``charts.chart_spec``, the same spec the CLI's ``charts.png`` is drawn from: titles, units, the
numerical floor, knob-change rules on every panel, the objective's key statistic) and pushes it to
the widget. ``smooth`` and ``log_scale`` are passed to ``chart_spec`` at every render (defaults: raw
values, linear axes; a control may set them between renders). The JavaScript is loaded offline
from vl-convert's bundle (``JupyterChart.enable_offline()``), never from a CDN:
``charts.network_refs(widget)`` is empty.

Left out: streaming only the new rows (JupyterChart has no data-append API; the whole spec is
resent, which the throttle keeps cheap).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import altair as alt
import polars as pl

from workbench.charts import chart_spec

DEFAULT_EVERY_UPDATES = 1
DEFAULT_EVERY_SECONDS = 3.0
EMPTY_TEXT = "no updates yet: press Start or Step"


class Throttle:
    """At most one refresh every ``every_updates`` updates and every ``every_seconds`` seconds."""

    def __init__(self, every_updates: int = DEFAULT_EVERY_UPDATES, every_seconds: float = DEFAULT_EVERY_SECONDS):
        self.every_updates = max(1, int(every_updates))
        self.every_seconds = float(every_seconds)
        self.last_version = -10**9
        self.last_time = -math.inf

    def due(self, version: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return version - self.last_version >= self.every_updates and now - self.last_time >= self.every_seconds

    def mark(self, version: int, now: float | None = None) -> None:
        self.last_version = version
        self.last_time = time.monotonic() if now is None else now


class LiveCharts:
    """The chart widget of a panel (``widget`` is None when there is no frontend)."""

    def __init__(self, interactive: bool, every_updates: int = DEFAULT_EVERY_UPDATES,
                 every_seconds: float = DEFAULT_EVERY_SECONDS, renderer: str = "svg", *, smooth: int = 0,
                 log_scale: str | Sequence[str] = "off"):
        self.throttle = Throttle(every_updates, every_seconds)
        self.smooth = smooth
        self.log_scale = log_scale
        self.widget = None
        self.renders = 0
        self.last_render_seconds = 0.0
        if interactive:
            enable_offline()
            # svg: the marks are DOM nodes (crisp, and the browser test can read the rule labels)
            placeholder = alt.Chart(alt.Data(values=[{"t": EMPTY_TEXT}])).mark_text(
                size=13).encode(text="t:N")
            self.widget = alt.JupyterChart(placeholder, embed_options={"renderer": renderer, "actions": False})

    def render(self, metrics: pl.DataFrame, knob_events: Sequence[dict[str, Any]], title: str = "") -> dict[str, Any]:
        """Rebuild the spec and push it to the widget (the synced ``spec`` trait, unvalidated)."""
        t0 = time.perf_counter()
        spec = chart_spec(metrics, knob_events, title=title, empty_text=EMPTY_TEXT, smooth=self.smooth,
                          log_scale=self.log_scale)
        if self.widget is not None:
            self.widget.spec = spec
        self.renders += 1
        self.last_render_seconds = time.perf_counter() - t0
        return spec


_OFFLINE = False


def enable_offline() -> None:
    """Load JupyterChart's JavaScript from vl-convert's bundle (no CDN); once per process."""
    global _OFFLINE
    if not _OFFLINE:
        alt.JupyterChart.enable_offline()
        _OFFLINE = True


__all__ = ["DEFAULT_EVERY_SECONDS", "DEFAULT_EVERY_UPDATES", "EMPTY_TEXT", "LiveCharts", "Throttle", "enable_offline"]
