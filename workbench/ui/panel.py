"""The control panel: one object a notebook creates in one line, to steer a run while it trains.

    panel = ControlPanel(RunConfig(objective="m2po", staleness=64))
    panel.show()      # widgets + live charts (JupyterLab) or a note (no frontend)
    panel.start()     # JupyterLab: trains in a background thread and returns at once;
                      # no frontend (papermill, plain python): trains here with a progress bar
    panel.finish()    # summary.json, charts.png and tokens.html in the run directory

Widgets (ipywidgets, built in ``workbench.ui.widgets``): objective dropdown (the ``OBJECTIVES``
registry), one slider or field per objective parameter generated from its ``Param`` metadata (range,
liveness, doc as tooltip), staleness slider (0-256) with its mode (fixed lag s, or periodic sync
every n updates), learning rate, temperature, the collapsed "Numerics" group (top-p / top-k, logit
dtypes and noise, the sampling-mask replay: ``ui.widgets``), updates target, Start / Pause / Step / Reset, a status
line (state, update, policy version, tokens/s), the recent knob changes, the live charts
(``workbench.charts`` in ``workbench.ui.live``) and the per-token view of the latest batch
(``workbench.ui.tokens``), and the "Branch here" box (``workbench.ui.branching``: fork the paused
run into paired branches; ``panel.branch_here(...)`` does the same from code).

Every widget change calls ``run.knobs.set(...)`` in the widget's thread; the loop applies it at
the start of the next update and writes it to ``knob_events.jsonl`` with that update's index. The
training thread only appends the row and, when the throttle allows, computes the small per-token
view; a separate render thread rebuilds the charts, so the charts never hold up an update.

Reset starts a new run (new run directory, suffix ``-resetN``) from the initial weights, with the
knob values the panel shows at that moment written into its ``config.json``.
"""

from __future__ import annotations

import copy
import html
import json
import math
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import polars as pl
from tqdm.std import tqdm

from workbench.config import RunConfig
from workbench.loop import Run
from workbench.runs.progress import progress_postfix
from workbench.notebook import has_frontend
from workbench.runs.stop import StopSignals
from workbench.charts import chart_spec, event_label, run_chart, save_png
from workbench.ui.branching import BranchControl
from workbench.ui.live import DEFAULT_EVERY_SECONDS, DEFAULT_EVERY_UPDATES, LiveCharts
from workbench.ui.tokens import token_html, update_view
from workbench.ui.trainer import BackgroundTrainer
from workbench.ui.widgets import PanelWidgets


def load_knob_schedule(schedule: str | Path | list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """A recorded ``knob_events.jsonl`` (path) or a list of events; empty string / None -> None."""
    if schedule is None or schedule == "":
        return None
    if isinstance(schedule, (str, Path)):
        return [json.loads(line) for line in Path(schedule).read_text().splitlines() if line.strip()]
    return list(schedule)


class ControlPanel(PanelWidgets):
    """Widgets + background training + live charts around one ``Run`` (see the module doc)."""

    def __init__(self, config: RunConfig | None = None, *, model=None, tokenizer=None, run=None,
                 headless: bool | None = None, knob_schedule=None,
                 chart_every: int = DEFAULT_EVERY_UPDATES, chart_seconds: float = DEFAULT_EVERY_SECONDS,
                 token_rows: int = 6, log: Callable[[str], None] = print):
        if config is None and run is None:
            config = RunConfig()
        self.config = config if config is not None else run.config
        self.interactive = has_frontend() if headless is None else not headless
        self.log = log
        self.token_rows = token_rows
        self._model_template = copy.deepcopy(model) if model is not None else None
        self._tokenizer = tokenizer
        self._schedule = load_knob_schedule(knob_schedule)
        self._resets = 0
        self._Run = Run
        self.run = run if run is not None else self._new_run(self.config)
        self.charts = LiveCharts(self.interactive, chart_every, chart_seconds)
        self.trainer = BackgroundTrainer(self.run, on_state=self._on_state)
        self.token_view: dict[str, Any] | None = None
        self.last_error: str = ""
        self._suppress = False
        self._wake = threading.Event()
        self._closed = False
        self.run.hooks.append(self._on_row)
        self.widgets: dict[str, Any] = {}
        self.box = None
        self.branching = BranchControl(self)
        if self.interactive:
            self._build_widgets()
            self.box.children = (*self.box.children, self.branching.build())
            self._render_thread = threading.Thread(target=self._render_loop, name="workbench-render", daemon=True)
            self._render_thread.start()

    # ================================================================ runs
    def _new_run(self, config: RunConfig):
        model = copy.deepcopy(self._model_template) if self._model_template is not None else None
        return self._Run(config, model=model, tokenizer=self._tokenizer if model is not None else None,
                         knob_schedule=self._schedule, log=self.log)

    @property
    def knobs(self):
        return self.run.knobs

    @property
    def run_dir(self) -> Path | None:
        return self.run.dir.path if self.run.dir else None

    # ================================================================ commands
    def _refused_while_branching(self, command: str) -> bool:
        """Start, Step and Reset wait for the branches: the worker holds the run between updates."""
        if not self.branching.busy:
            return False
        self.last_error = f"{command} is refused while Branch here trains its branches: wait for its output"
        self._status()
        return True

    def start(self, steps: int | None = None) -> None:
        """Train up to ``steps`` updates in total (default: the config's). See the module doc."""
        if self._refused_while_branching("Start"):
            return
        target = int(steps) if steps is not None else (
            int(self.widgets["steps"].value) if self.widgets else self.config.steps)
        if self.widgets:
            self.widgets["steps"].value = target
        if self.interactive:
            self.trainer.start(until=target)
            return
        self._train_here(target)

    def pause(self) -> None:
        self.trainer.pause()

    def resume(self) -> None:
        self.start(self.trainer.target)

    def step(self, n: int = 1) -> None:
        if self._refused_while_branching("Step"):
            return
        if self.interactive:
            self.trainer.step(n)
        else:
            self._train_here(self.run.version + n)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until training is idle (scripts and tests; in a notebook this blocks the widgets)."""
        return self.trainer.wait(timeout)

    def reset(self) -> None:
        """Stop, then start over from the initial weights in a new run directory (see module doc)."""
        if self._refused_while_branching("Reset"):
            return
        self.trainer.stop()
        self._resets += 1
        name = (self.run.dir.path.name if self.run.dir else (self.config.run_name or "run")).split("-reset")[0]
        cfg = self.config.replace(**self.run.knobs.requested, run_name=f"{name}-reset{self._resets}")
        self.run = self._new_run(cfg)
        self.run.hooks.append(self._on_row)
        self.trainer.run = self.run
        self.token_view = None
        self.charts.throttle.last_version = -10**9
        self._sync_widgets_from_knobs()
        self._set_state_text("idle")
        self._wake.set()

    def branch_here(self, variants: str | None = None, steps: int | None = None, repeats: int | None = None):
        """Fork the paused run now into the control plus each variant x ``repeats``, ``steps`` updates
        each (``workbench.ui.branching``); with a frontend it returns at once and fills the box's output."""
        return self.branching.press(variants, steps, repeats)

    def _train_here(self, target: int) -> None:
        """No frontend: train in the calling thread with a plain progress bar (stderr). An interrupt
        (SIGINT) stops after the update in progress, writes a checkpoint, then raises ``KeyboardInterrupt``."""
        n = max(0, target - self.run.version)
        self.trainer.target = target
        stop = threading.Event()
        with StopSignals(lambda signum: stop.set(), signals=(signal.SIGINT,)), \
                tqdm(total=n, unit="upd", desc=self.run.dir.path.name if self.run.dir else "run", mininterval=2.0) as bar:
            while self.run.version < target and not stop.is_set():
                row = self.run.step()
                bar.update(1)
                bar.set_postfix_str(progress_postfix(row), refresh=False)
        if stop.is_set() and self.run.version < target:
            self.trainer.save_checkpoint()
            self.log(f"interrupted: stopped at update {self.run.version}, checkpoint written")
            raise KeyboardInterrupt

    # ================================================================ outputs
    def chart(self):
        """The live chart of the current run (an Altair chart; renders in any notebook)."""
        return run_chart(self.run.metrics, self._title(), self.run.knob_events)

    def finish(self, charts: bool = True) -> dict[str, Any]:
        """Write summary.json (+ charts.png, tokens.html) to the run directory; returns the summary.

        Does not wait for a background run: in JupyterLab it summarises the updates done so far.
        """
        run = self.run
        summary = run.summary()
        summary.update({
            "objective": run.knobs.applied.objective, "staleness": run.knobs.applied.staleness,
            "sync_every": run.knobs.applied.sync_every,
            "knob_events": len(run.knob_events), "state": self.trainer.state, "interactive": self.interactive,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        })
        if self.run_dir is not None:
            if charts and run.rows:
                spec = chart_spec(run.metrics, run.knob_events, title=self._title())
                summary["charts_png"] = str(save_png(spec, self.run_dir / "charts.png"))
                view = self._compute_token_view()
                if view is not None:
                    (self.run_dir / "tokens.html").write_text(token_html(view, run.tokenizer, self._title()))
                    summary["tokens_html"] = str(self.run_dir / "tokens.html")
            run.dir.write_summary(summary)
        return summary

    def close(self) -> None:
        """Stop training, the branching worker and the render thread."""
        self.branching.wait()
        self.trainer.stop()
        self._closed = True
        self._wake.set()

    # ================================================================ hook (training thread)
    def _on_row(self, run, row: dict[str, Any]) -> None:
        if not self.interactive or run is not self.run:
            return
        if self.charts.throttle.due(run.version):
            self.charts.throttle.mark(run.version)
            self.token_view = self._compute_token_view()
            self._wake.set()

    def _compute_token_view(self) -> dict[str, Any] | None:
        try:  # the latest update's own per-token record, taken before its optimizer step
            return update_view(self.run, n=self.token_rows)
        except Exception as e:  # noqa: BLE001  (a view never stops training)
            self.last_error = f"token view: {type(e).__name__}: {e}"
            return None

    def _on_state(self, state: str) -> None:
        self._set_state_text(state)
        if state != "running":
            self.charts.throttle.last_version = -10**9  # draw the final update
            self.charts.throttle.last_time = -math.inf
            if self.token_view is None or state in ("paused", "done"):
                self.token_view = self._compute_token_view()
            self._wake.set()

    # ================================================================ render thread
    def _render_loop(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=1.0)
            woke = self._wake.is_set()
            self._wake.clear()
            if self._closed:
                return
            try:
                if woke:
                    self.render()
                else:
                    self._status()
            except Exception as e:  # noqa: BLE001
                self.last_error = f"render: {type(e).__name__}: {e}"

    def render(self) -> None:
        """Redraw charts, per-token view, knob log and status (the render thread calls this)."""
        run = self.run
        rows = list(run.rows)
        df = pl.from_dicts(rows, infer_schema_length=None) if rows else pl.DataFrame()
        self.charts.render(df, list(run.knob_events), title=self._title())
        if self.widgets:
            self.widgets["tokens"].value = token_html(self.token_view, run.tokenizer, "latest batch")
            self.widgets["knob_log"].value = self._knob_log_html()
        self._status()

    def _title(self) -> str:
        return self.run.dir.path.name if self.run.dir else ""

    def _knob_log_html(self) -> str:
        events = self.run.knob_events[-8:]
        if not events:
            return "<span style='color:#777'>knob changes: none yet (each change is logged with its update)</span>"
        items = "".join(f"<li>update {e['update']}: {event_label(e['changes'])}</li>" for e in events)
        return f"<b>knob changes</b><ul style='margin:0'>{items}</ul>"

    def status_text(self) -> str:
        run = self.run
        rows = run.rows[-5:]
        tok = sum(r.get("perf/train_tokens", 0.0) for r in rows)
        secs = sum(r.get("perf/time_step", 0.0) for r in rows)
        parts = [self.trainer.state, f"update {run.version} / {self.trainer.target}",
                 f"policy version {run.version}", f"{tok / secs:,.0f} tokens/s" if secs else "- tokens/s",
                 f"objective {run.knobs.applied.objective}", f"staleness {run.knobs.applied.staleness}"]
        if run.knobs.applied.sync_every > 1:
            parts.append(f"sync_every {run.knobs.applied.sync_every}")
        if rows and "eval/accuracy" in run.rows[-1]:
            parts.append(f"held-out acc {run.rows[-1]['eval/accuracy']:.2f}")
        text = " · ".join(parts)
        err = self.trainer.error
        if err is not None:
            text += f" · error: {type(err).__name__}: {err}"
        elif self.last_error:
            text += f" · {self.last_error}"
        return text

    def _status(self) -> None:
        if self.widgets:
            self.widgets["status"].value = f"<code>{html.escape(self.status_text())}</code>"
            self.widgets["health"].value = self.health_html()

    def health_html(self) -> str:
        """A banner of the run's active health warnings, each with the update it started at ('' if none)."""
        lines = self.run.health.banner()
        if not lines:
            return ""
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        return ("<div style='background:#fff4e5;border-left:4px solid #e8590c;padding:4px 8px;margin:4px 0'>"
                f"<b>health</b> (also in health.jsonl)<ul style='margin:0'>{items}</ul></div>")

    def _set_state_text(self, state: str) -> None:
        self._status()

    # ================================================================ display
    def show(self):
        """Display the panel (frontend) or say where the headless outputs go."""
        if self.box is not None:
            from IPython.display import display  # IPython comes with the notebooks extra; a box exists only there

            display(self.box)
        else:
            where = self.run_dir or "(no run directory: out_dir is empty)"
            print(f"no frontend: training runs in the cell with a progress bar; charts.png, tokens.html and "
                  f"summary.json go to {where}")
        return None

    def _ipython_display_(self) -> None:
        self.show()


__all__ = ["ControlPanel", "load_knob_schedule"]
