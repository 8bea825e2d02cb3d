"""The control panel's "Branch here" box: fork the paused run into paired branches (``workbench.branch``).

    panel.branch_here("staleness=8 lr=4e-4; staleness=16", steps=10, repeats=2)

or, with a frontend, the box under the buttons: the variants (the ``--set`` syntax of ``python -m
workbench fork``: ``KEY=VALUE`` pairs change knobs together, ``;`` separates variants; the control
is always added), the updates each branch trains after the fork, the repeats, the button and an
output area. Pressing it while training runs is refused (Pause first: a checkpoint is only
consistent between updates), and so is text that does not parse or names a knob that is not live;
each refusal is one line in the output area and the status line, and nothing is written.

Otherwise ``branch.branch_here`` runs in a worker thread (the kernel stays free, as while training)
and holds the trainer's update lock, so no update of the parent can interleave; Start, Step and
Reset are refused until it is done. The output then shows what ``python -m workbench fork`` prints:
the paired-difference table of the final held-out accuracy (variant - control with 95% intervals,
``branch_report``), what the intervals are, one sentence per variant, the folders written and the
chart of the per-update differences, which is drawn by a ``JupyterChart`` widget exactly as the
live chart is (offline JavaScript, ``ui.live.enable_offline``) and saved as PNG in the set's folder.
The parent run is left as it was: Start continues it exactly where it paused (the branches train
copies restored from the checkpoint; the parent's random streams are not touched).

Without a frontend ``branch_here`` runs in the calling thread and prints the same text.
Knob changes set on the panel but not yet applied by an update are not part of the checkpoint, so
not of the branches; the output says so when there are any.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import altair as alt

from workbench.branch import MANIFEST, BranchSet, branch_here, check_knob_changes, nest_changes
from workbench.branch_report import interval_note, markdown_table, paired_chart_spec, paired_differences, sentences
from workbench.charts import save_png
from workbench.config import RunConfig
from workbench.knobs import LIVE_FIELDS, Knobs
from workbench.errors import WorkbenchError, one_line, short_repr
from workbench.ui.live import enable_offline

METRIC = "eval/accuracy"  # the CLI's default metric
DEFAULT_STEPS = 10
DEFAULT_REPEATS = 1
SYNTAX = "KEY=VALUE pairs such as 'staleness=8 lr=4e-4', several variants separated by ';'"


def parse_variants(text: str) -> list[dict[str, Any]]:
    """``"staleness=8 lr=4e-4; objective_params.tau=0.1"`` -> ``[{}, {"staleness": 8, "lr": 0.0004},
    {"objective_params": {"tau": 0.1}}]``: the control first, then one dict per ``;``-separated group.
    Values parse as JSON, else stay strings (as ``python -m workbench fork --set`` reads them)."""
    if not isinstance(text, str):
        raise WorkbenchError(f"variants={short_repr(text)} is invalid: expected text of {SYNTAX}")
    out: list[dict[str, Any]] = [{}]
    for group in (g.strip() for g in text.split(";")):
        if not group:
            continue  # a trailing ';' names no variant
        pairs: dict[str, Any] = {}
        for pair in group.split():
            key, sep, value = pair.partition("=")
            if not sep or not key or not value:
                raise WorkbenchError(f"variants={short_repr(text)} is invalid at {pair!r}: expected {SYNTAX}")
            pairs[key] = _value(value)
        out.append(nest_changes(pairs))
    if len(out) == 1:
        raise WorkbenchError(f"variants={short_repr(text)} is invalid: expected {SYNTAX}")
    return out


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def check_variants(run, variants: list[dict[str, Any]]) -> None:
    """Refuse a variant that names a knob that is not live or a value the knobs refuse, against the
    knob values the next update would start from (those the checkpoint holds), before anything is written."""
    try:
        check_knob_changes(variants, run.config, run.knobs.applied.as_dict())
    except WorkbenchError as e:
        raise WorkbenchError(f"variants: {one_line(e)}") from None


def check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkbenchError(f"{name}={short_repr(value)} is invalid: expected an integer >= 1")
    return value


def free_folder(run_dir: Path, at: int) -> Path:
    """``<run>-branches-at<K>`` beside the run, or ``...-2``, ``-3``: pressing twice at one update keeps both sets."""
    base = run_dir.with_name(f"{run_dir.name}-branches-at{at}")
    folder, n = base, 1
    while folder.exists() and any(folder.iterdir()):
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def report_lines(bs: BranchSet, title: str) -> tuple[list[str], dict[str, Any] | None]:
    """What ``python -m workbench fork`` prints for the set, and the chart spec (None: nothing per update)."""
    diffs = paired_differences(bs, METRIC)
    spec = None
    lines = ["", markdown_table(diffs), "", interval_note(diffs)]
    lines += [f"- {s}" for s in sentences(diffs)]
    lines += ["", f"branch set: {bs.folder}"] + [f"branch: {b.path}" for b in bs.branches]
    if diffs.filter(~diffs["final"]).height:
        spec = paired_chart_spec(diffs, title=f"{title} at update {bs.at}: {METRIC}")
        path = bs.folder / f"paired-{METRIC.replace('/', '_')}.png"
        save_png(spec, path)
        lines.append(f"chart: {path}")
    else:
        lines.append(f"chart: none ({METRIC} was not evaluated within the branches' updates)")
    return lines, spec


class BranchControl:
    """The "Branch here" box of one ``ControlPanel`` (its run, trainer, widgets and status line)."""

    def __init__(self, panel):
        self.panel = panel
        self.widgets: dict[str, Any] = {}
        self.result: BranchSet | None = None  # the latest set written
        self.lines: list[str] = []  # the latest press's output, one entry a line
        self.message = ""  # the latest refusal or failure ('' if none)
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no branching runs (scripts and tests); True if none does."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    # ------------------------------------------------------------------ widgets
    def build(self):
        """The box (only with a frontend; built in the kernel's thread like the other widgets)."""
        import ipywidgets as W  # only with a frontend: headless runs never load it

        w = self.widgets
        wide = {"description_width": "110px"}
        w["variants"] = W.Text(value="", placeholder="staleness=8 lr=4e-4; staleness=16", description="variants",
                               style=wide, layout=W.Layout(width="420px"),
                               tooltip="live knobs per variant, ';' between variants; the control is added")
        w["steps"] = W.BoundedIntText(value=DEFAULT_STEPS, min=1, max=10**6, description="updates after",
                                      style=wide, layout=W.Layout(width="220px"))
        w["repeats"] = W.BoundedIntText(value=DEFAULT_REPEATS, min=1, max=64, description="repeats", style=wide,
                                        layout=W.Layout(width="220px"))
        w["button"] = W.Button(description="Branch here", icon="code-fork", layout=W.Layout(width="130px"),
                               tooltip="Pause first: fork the run now into the control and each variant")
        w["output"] = W.Output(layout=W.Layout(max_height="360px", overflow="auto"))
        enable_offline()
        w["chart"] = alt.JupyterChart(alt.Chart(alt.Data(values=[{}])).mark_point(),
                                      embed_options={"renderer": "svg", "actions": False})
        w["chart"].layout.display = "none"  # shown once a set has per-update differences
        w["button"].on_click(lambda _: self.press())
        return W.VBox([W.HTML("<b>Branch here</b>"), W.HBox([w["variants"], w["button"]]),
                       W.HBox([w["steps"], w["repeats"]]), w["output"], w["chart"]])

    # ------------------------------------------------------------------ press
    def press(self, variants: str | None = None, steps: int | None = None,
              repeats: int | None = None) -> BranchSet | None:
        """Fork now (module doc). Arguments default to the box's values. With a frontend it returns
        at once (None) and the worker thread writes the output; without one, returns the set."""
        w = self.widgets
        text = variants if variants is not None else (w["variants"].value if w else "")
        steps = steps if steps is not None else (int(w["steps"].value) if w else DEFAULT_STEPS)
        repeats = repeats if repeats is not None else (int(w["repeats"].value) if w else DEFAULT_REPEATS)
        self.lines = []
        if w:
            w["output"].outputs = ()
        try:
            plan = self._validate(text, steps, repeats)
        except WorkbenchError as e:
            self._refuse(one_line(e))
            return None
        self.message = ""
        if self.panel.interactive:
            self._thread = threading.Thread(target=self._work, args=plan, name="workbench-branch", daemon=True)
            self._thread.start()
            return None
        return self._work(*plan)

    def _validate(self, text: str, steps: Any, repeats: Any) -> tuple:
        panel = self.panel
        if panel.trainer.running:
            raise WorkbenchError("Branch here is refused while training runs: press Pause, then Branch here "
                                 "(a checkpoint is only consistent between updates)")
        if self.busy:
            raise WorkbenchError("Branch here is refused: the branches of the last press are still training")
        if panel.run.dir is None:
            raise WorkbenchError("Branch here needs a run directory: out_dir='' writes no checkpoint")
        if panel.run.version == 0:
            raise WorkbenchError("Branch here is refused at update 0: train at least one update first")
        variants = parse_variants(text)
        check_variants(panel.run, variants)
        return variants, check_count("steps", steps), check_count("repeats", repeats)

    def _refuse(self, message: str) -> None:
        self.message = message
        self._say(f"branch here: {message}")
        self.panel.last_error = f"branch here: {message}"
        self.panel._status()

    def _say(self, line: str) -> None:
        self.lines.append(line)
        if self.widgets:
            self.widgets["output"].append_stdout(line + "\n")
        elif not self.panel.interactive:
            self.panel.log(line)

    def _work(self, variants: list[dict[str, Any]], steps: int, repeats: int) -> BranchSet | None:
        panel = self.panel
        run = panel.run
        pending = [c for c in run.knobs.pending]
        if pending:
            self._say(f"note: knob changes not yet applied by an update are not in the branches: {pending}")
        self._say(f"branching {run.dir.path.name} at update {run.version}: {len(variants)} variants x "
                  f"{repeats} repeats, {steps} updates each")
        try:
            with panel.trainer._lock:  # no update of the parent interleaves with the checkpoint
                bs = branch_here(run, variants, steps=steps, repeats=repeats,
                                 out_dir=free_folder(run.dir.path, run.version), log=self._say)
            lines, spec = report_lines(bs, run.dir.path.name)
        except Exception as e:  # noqa: BLE001  (one line in the output; the parent is untouched)
            self._refuse(one_line(e) if isinstance(e, WorkbenchError) else f"{type(e).__name__}: {one_line(e)}")
            return None
        for line in lines:
            self._say(line)
        if spec is not None and self.widgets:
            self.widgets["chart"].spec = spec  # pushed as the live chart's spec is (ui.live)
            self.widgets["chart"].layout.display = None
        self.result = bs
        panel.last_error = ""
        panel._status()
        return bs


__all__ = ["BranchControl", "check_variants", "free_folder", "parse_variants", "report_lines"]
