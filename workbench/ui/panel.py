"""The control panel: one object a notebook creates in one line, to steer a run while it trains.

    panel = ControlPanel(RunConfig(objective="m2po", staleness=64))
    panel.show()      # widgets + live charts (JupyterLab) or a note (no frontend)
    panel.start()     # JupyterLab: trains in a background thread and returns at once;
                      # no frontend (papermill, plain python): trains here with a progress bar
    panel.finish()    # summary.json, charts.png and tokens.html in the run directory

Widgets (ipywidgets): objective dropdown (the ``OBJECTIVES`` registry), one slider or field per
objective parameter generated from its ``Param`` metadata (range, liveness, doc as tooltip),
staleness slider (0-256) with its mode (fixed lag s, or periodic sync every n updates), learning
rate, temperature, updates target, Start / Pause / Step / Reset, a status line (state, update,
policy version, tokens/s), the recent knob changes, the live charts (``workbench.ui.live``) and the
per-token view of the latest batch (``workbench.ui.tokens``).

Every widget change calls ``run.knobs.set(...)`` in the widget's thread; the loop applies it at
the start of the next update and writes it to ``knob_events.jsonl`` with that update's index. The
training thread only appends the row and, when the throttle allows, computes the small per-token
view; a separate render thread rebuilds the charts, so the charts never hold up an update.

Reset starts a new run (new run directory, suffix ``-resetN``) from the initial weights, with the
knob values the panel shows at that moment written into its ``config.json``.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from pathlib import Path
from typing import Any, Callable

from workbench.config import RunConfig
from workbench.loop import progress_postfix
from workbench.steps.reweight import OBJECTIVES
from workbench.ui.frontend import has_frontend
from workbench.ui.params import param_widget
from workbench.ui.live import (DEFAULT_EVERY_SECONDS, DEFAULT_EVERY_UPDATES, LiveCharts, event_label, live_chart, live_spec,
                   save_spec_png)
from workbench.ui.tokens import token_html, token_weights
from workbench.ui.trainer import BackgroundTrainer

STALENESS_MAX = 256
MODES = (("fixed lag", "fixed"), ("sync_every", "sync"))


def load_knob_schedule(schedule: str | Path | list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """A recorded ``knob_events.jsonl`` (path) or a list of events; empty string / None -> None."""
    if schedule is None or schedule == "":
        return None
    if isinstance(schedule, (str, Path)):
        return [json.loads(line) for line in Path(schedule).read_text().splitlines() if line.strip()]
    return list(schedule)


class ControlPanel:
    """Widgets + background training + live charts around one ``Run`` (see the module doc)."""

    def __init__(self, config: RunConfig | None = None, *, model=None, tokenizer=None, run=None,
                 headless: bool | None = None, knob_schedule=None,
                 chart_every: int = DEFAULT_EVERY_UPDATES, chart_seconds: float = DEFAULT_EVERY_SECONDS,
                 token_rows: int = 6, log: Callable[[str], None] = print):
        from workbench.loop import Run

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
        if self.interactive:
            self._build_widgets()
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
    def start(self, steps: int | None = None) -> None:
        """Train up to ``steps`` updates in total (default: the config's). See the module doc."""
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
        if self.interactive:
            self.trainer.step(n)
        else:
            self._train_here(self.run.version + n)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until training is idle (scripts and tests; in a notebook this blocks the widgets)."""
        return self.trainer.wait(timeout)

    def reset(self) -> None:
        """Stop, then start over from the initial weights in a new run directory (see module doc)."""
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

    def _train_here(self, target: int) -> None:
        """No frontend: train in the calling thread with a plain progress bar (stderr)."""
        from tqdm.std import tqdm

        n = max(0, target - self.run.version)
        self.trainer.target = target
        with tqdm(total=n, unit="upd", desc=self.run.dir.path.name if self.run.dir else "run",
                  mininterval=2.0) as bar:
            while self.run.version < target:
                row = self.run.step()
                bar.update(1)
                bar.set_postfix_str(progress_postfix(row), refresh=False)

    # ================================================================ outputs
    def chart(self):
        """The live chart of the current run (an Altair chart; renders in any notebook)."""
        return live_chart(self.run.metrics, self.run.knob_events, title=self._title())

    def finish(self, charts: bool = True) -> dict[str, Any]:
        """Write summary.json (+ charts.png, tokens.html) to the run directory; returns the summary.

        Does not wait for a background run: in JupyterLab it summarises the updates done so far.
        """
        run = self.run
        summary = run.summary()
        summary.update({
            "objective": run.knobs.objective, "staleness": run.knobs.staleness, "sync_every": run.knobs.sync_every,
            "knob_events": len(run.knob_events), "state": self.trainer.state, "interactive": self.interactive,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        })
        if self.run_dir is not None:
            if charts and run.rows:
                spec = live_spec(run.metrics, run.knob_events, title=self._title())
                summary["charts_png"] = str(save_spec_png(spec, self.run_dir / "charts.png"))
                view = self._compute_token_view()
                if view is not None:
                    (self.run_dir / "tokens.html").write_text(token_html(view, run.tokenizer, self._title()))
                    summary["tokens_html"] = str(self.run_dir / "tokens.html")
            run.dir.write_summary(summary)
        return summary

    def close(self) -> None:
        """Stop training and the render thread."""
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
        batch = getattr(self.run, "last_batch", None)
        if batch is None or batch.advantages is None:
            return None
        kn = self.run.knobs
        try:
            return token_weights(self.run, batch, kn.objective, kn.objective_params,
                                 temperature=kn.temperature, aggregation=self.run.config.aggregation or None,
                                 n=self.token_rows)
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
        import polars as pl

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
                 f"objective {run.knobs.objective}", f"staleness {run.knobs.staleness}"]
        if run.knobs.sync_every > 1:
            parts.append(f"sync_every {run.knobs.sync_every}")
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
            import html

            self.widgets["status"].value = f"<code>{html.escape(self.status_text())}</code>"

    def _set_state_text(self, state: str) -> None:
        self._status()

    # ================================================================ widgets
    def _build_widgets(self) -> None:
        import ipywidgets as W

        kn = self.run.knobs
        w = self.widgets
        wide = {"description_width": "110px"}
        w["objective"] = W.Dropdown(options=OBJECTIVES.names(), value=kn.objective, description="objective",
                                    style=wide)
        w["objective_doc"] = W.HTML()
        w["params"] = W.VBox()
        mode = "sync" if kn.sync_every > 1 and kn.staleness == 0 else "fixed"
        w["mode"] = W.ToggleButtons(options=MODES, value=mode, description="staleness mode", style=wide,
                                    tooltips=["update k trains on the batch generated by theta_{k-s}",
                                              "the sampler's weights refresh every n updates (staleness 0..n-1)"])
        w["staleness"] = W.IntSlider(value=kn.sync_every if mode == "sync" else kn.staleness, min=0,
                                     max=STALENESS_MAX, description="staleness s", continuous_update=False,
                                     style=wide, layout=W.Layout(width="420px"))
        w["lr"] = W.FloatLogSlider(value=kn.lr, base=10, min=-6, max=-1, step=0.1, description="learning rate",
                                   readout_format=".1e", continuous_update=False, style=wide)
        w["temperature"] = W.FloatSlider(value=kn.temperature, min=0.1, max=2.0, step=0.05,
                                         description="temperature", continuous_update=False, style=wide)
        w["steps"] = W.BoundedIntText(value=self.config.steps, min=1, max=10**6, description="updates",
                                      style=wide, layout=W.Layout(width="220px"))
        for name, icon in (("start", "play"), ("pause", "pause"), ("step", "step-forward"), ("reset", "refresh")):
            w[name] = W.Button(description=name.capitalize(), icon=icon, layout=W.Layout(width="90px"))
        w["status"] = W.HTML()
        w["knob_log"] = W.HTML()
        w["tokens"] = W.HTML()

        w["objective"].observe(self._on_objective, names="value")
        w["mode"].observe(self._on_staleness, names="value")
        w["staleness"].observe(self._on_staleness, names="value")
        w["lr"].observe(lambda ch: self._set_knob(ch, lr=float(ch["new"])), names="value")
        w["temperature"].observe(lambda ch: self._set_knob(ch, temperature=float(ch["new"])), names="value")
        w["steps"].observe(lambda ch: setattr(self.trainer, "target", int(ch["new"])), names="value")
        w["start"].on_click(lambda _: self.start())
        w["pause"].on_click(lambda _: self.pause())
        w["step"].on_click(lambda _: self.step())
        w["reset"].on_click(lambda _: self.reset())
        self._rebuild_params()

        controls = W.VBox([w["objective"], w["objective_doc"], w["params"], w["mode"], w["staleness"], w["lr"],
                           w["temperature"]], layout=W.Layout(width="560px"))
        buttons = W.VBox([W.HBox([w["start"], w["pause"], w["step"], w["reset"]]), w["steps"], w["knob_log"]])
        self.box = W.VBox([W.HBox([controls, buttons]), w["status"], self.charts.widget, w["tokens"]])
        self.box.add_class("workbench-panel")
        self._status()
        self.widgets["tokens"].value = token_html(None, None)
        self.widgets["knob_log"].value = self._knob_log_html()

    def _param_widget(self, p, value):
        return param_widget(p, value, lambda ch, name=p.name: self._set_knob(ch, objective_params={name: ch["new"]}),
                            fixed=not p.live)

    def _rebuild_params(self) -> None:
        kn = self.run.knobs.requested  # what the widgets asked for (in effect from the next update)
        meta = OBJECTIVES.meta(kn["objective"])
        self.widgets["param_widgets"] = {p.name: self._param_widget(p, kn["objective_params"][p.name])
                                         for p in meta.get("params", [])}
        self.widgets["params"].children = tuple(self.widgets["param_widgets"].values())
        import html

        self.widgets["objective_doc"].value = (
            f"<div style='font-size:12px;color:#555;max-width:540px'>{html.escape(meta.get('summary', ''))}"
            f" <i>({html.escape(meta.get('paper', ''))})</i></div>")

    def _set_knob(self, change, **knob) -> None:
        if self._suppress:
            return
        try:
            self.run.knobs.set(**knob)
            self.last_error = ""
        except Exception as e:  # noqa: BLE001  (shown, and the widget snaps back)
            self.last_error = f"{type(e).__name__}: {e}"
            self._suppress = True
            try:
                change["owner"].value = change["old"]
            finally:
                self._suppress = False
        self._status()

    def _on_objective(self, change) -> None:
        if self._suppress:
            return
        self._set_knob(change, objective=change["new"])
        self._rebuild_params()

    def _on_staleness(self, change) -> None:
        if self._suppress:
            return
        v = int(self.widgets["staleness"].value)
        if self.widgets["mode"].value == "sync":
            self._suppress = True
            self.widgets["staleness"].min = 1
            self.widgets["staleness"].description = "sync every n"
            self._suppress = False
            self._set_knob(change, staleness=0, sync_every=max(1, v))
        else:
            self._suppress = True
            self.widgets["staleness"].min = 0
            self.widgets["staleness"].description = "staleness s"
            self._suppress = False
            self._set_knob(change, staleness=v, sync_every=1)

    def _sync_widgets_from_knobs(self) -> None:
        if not self.widgets:
            return
        kn = self.run.knobs
        self._suppress = True
        try:
            self.widgets["objective"].value = kn.objective
            self.widgets["lr"].value = kn.lr
            self.widgets["temperature"].value = kn.temperature
            mode = self.widgets["mode"].value
            self.widgets["staleness"].value = kn.sync_every if mode == "sync" else kn.staleness
        finally:
            self._suppress = False
        self._rebuild_params()

    # ================================================================ display
    def show(self):
        """Display the panel (frontend) or say where the headless outputs go."""
        if self.box is not None:
            from IPython.display import display

            display(self.box)
        else:
            where = self.run_dir or "(no run directory: out_dir is empty)"
            print(f"no frontend: training runs in the cell with a progress bar; charts.png, tokens.html and "
                  f"summary.json go to {where}")
        return None

    def _ipython_display_(self) -> None:
        self.show()




__all__ = ["ControlPanel", "load_knob_schedule"]
