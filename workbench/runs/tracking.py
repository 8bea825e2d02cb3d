"""Tracking sinks: copies of every metrics row for TensorBoard and trackio (``RunConfig.tracking``).

``metrics.parquet`` stays the source of truth; a sink only mirrors each row as it is written, so a
live dashboard can follow the run. ``TrackingSink(kinds, run_dir)`` is a ``Run.hooks`` entry
(``hook(run, row)`` after every update) with a ``close()``.

- ``tensorboard``: event files in ``<run dir>/tensorboard/`` (``torch.utils.tensorboard``, which
  needs the ``tensorboard`` package): every numeric column of the row as a scalar at
  step = ``update`` (NaN and None skipped, so ``eval/`` columns appear only at evaluated updates),
  each knob change as a text event ``knobs`` at the update it took effect, the config as text
  ``config`` once per process. Flushed after each update (one buffered file write).
- ``trackio``: local mode only. trackio keeps one SQLite file per project,
  ``<TRACKIO_DIR>/workbench.db``, where ``TRACKIO_DIR`` is that environment variable when trackio is
  first imported, else ``$HF_HOME/trackio`` (``~/.cache/huggingface/trackio``); it has no per-run
  folder. The trackio run is named after the run directory; each row is logged at step = ``update``
  with a ``knobs`` Markdown entry at updates where knobs changed (their numeric values are also the
  ``knob/...`` metrics). trackio holds one current run per process: a second ``Run`` tracked with
  trackio in the same process ends the first one's trackio run.

Never the network: ``TRACKIO_SPACE_ID`` / ``TRACKIO_SERVER_URL`` are hidden from ``trackio.init``
(the only place trackio reads them), and the Hugging Face Hub is in offline mode while it runs, so
its lookup of the user name (``whoami``) fails locally instead of calling the Hub. System-metric
threads and the notebook dashboard are turned off.

Resume: the TensorBoard writer of a resumed run writes a new event file in the same folder with
``purge_step`` = the first update it writes, so TensorBoard drops what an interrupted process wrote
past the checkpoint; trackio continues the latest run of the same name (``resume="allow"``), which
keeps both copies of steps an interrupted process wrote past the checkpoint (trackio cannot purge).

Both packages are optional (``pip install 'workbench[tracking]'``): they are found with
``importlib.util.find_spec`` when the config is validated and imported with
``importlib.import_module`` when a sink opens.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from workbench.errors import WorkbenchError, bad_value

SINK_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio"}
"""Sink name -> the package it needs."""
TRACKIO_PROJECT = "workbench"
TRACKIO_REMOTE_VARIABLES = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL")
INSTALL_HINT = "pip install 'workbench[tracking]'"


def parse_tracking(value: Any) -> tuple[str, ...]:
    """``RunConfig.tracking`` as sink names, in order, duplicates dropped (one-line errors)."""
    if not isinstance(value, str):
        raise bad_value("tracking", value, "a comma-separated string of sinks: tensorboard, trackio ('' = none)")
    names = [p.strip() for p in value.split(",") if p.strip()]
    for name in names:
        if name not in SINK_PACKAGES:
            raise bad_value("tracking", value, f"comma-separated sinks from: {', '.join(SINK_PACKAGES)} ('' = none); "
                                               f"{name!r} is not one")
    return tuple(dict.fromkeys(names))


def validate_tracking(value: Any) -> tuple[str, ...]:
    """Check the sink names and that each sink's package is installed (nothing is imported)."""
    kinds = parse_tracking(value)
    for kind in kinds:
        package = SINK_PACKAGES[kind]
        if importlib.util.find_spec(package) is None:
            raise WorkbenchError(f"tracking={value!r} needs the {package!r} package, which is not installed: "
                                 f"{INSTALL_HINT}")
    return kinds


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The row's real-number columns as floats, without ``update`` (the step), NaN and None."""
    out = {}
    for key, value in row.items():
        if key == "update" or value is None or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if not math.isnan(value):
            out[key] = value
    return out


def knob_text(changes: dict[str, Any]) -> str:
    """A knob change as Markdown: one ``name = value`` line per changed knob."""
    return "\n".join(f"- `{name}` = `{json.dumps(value, sort_keys=True)}`" for name, value in sorted(changes.items()))


def config_text(config: dict[str, Any]) -> str:
    """The config as a Markdown JSON block (4-space indented: TensorBoard's text plugin reads Markdown)."""
    return "\n".join("    " + line for line in json.dumps(config, indent=2, sort_keys=True).splitlines())


@contextlib.contextmanager
def _local_only() -> Iterator[None]:
    """While ``trackio.init`` runs: no remote target from the environment, the Hub offline."""
    hub = importlib.import_module("huggingface_hub.constants")
    hidden = {k: os.environ.pop(k) for k in TRACKIO_REMOTE_VARIABLES if k in os.environ}
    was_offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = was_offline
        os.environ.update(hidden)


class TensorBoardSink:
    """Event files in ``<run dir>/tensorboard/``, opened at the first row (``purge_step`` = its update)."""

    def __init__(self, run_dir: Path):
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = None

    def write(self, row: dict[str, Any], knob_events: list[dict[str, Any]], config: dict[str, Any]) -> None:
        step = int(row["update"])
        if self.writer is None:
            module = importlib.import_module("torch.utils.tensorboard")
            # a resumed run restarts at its checkpoint: events an interrupted process wrote from there on are dropped
            self.writer = module.SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
            self.writer.add_text("config", config_text(config), global_step=step)
        for event in knob_events:
            self.writer.add_text("knobs", knob_text(event["changes"]), global_step=int(event["update"]))
        for key, value in numeric_metrics(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a live TensorBoard sees each update

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TrackioSink:
    """A local trackio run named after the run directory, opened at the first row."""

    def __init__(self, run_dir: Path):
        self.name = Path(run_dir).name
        self.run = None

    def write(self, row: dict[str, Any], knob_events: list[dict[str, Any]], config: dict[str, Any]) -> None:
        trackio = importlib.import_module("trackio")
        if self.run is None:
            # a resumed run (first update > 0) continues its trackio run; a fresh one never joins an
            # earlier run of the same name (keep_previous reuses names)
            resume = "allow" if int(row["update"]) > 0 else "never"
            with _local_only():
                self.run = trackio.init(project=TRACKIO_PROJECT, name=self.name, config=config, resume=resume,
                                        embed=False, auto_log_gpu=False, auto_log_cpu=False)
        entry: dict[str, Any] = numeric_metrics(row)
        changes = [knob_text(e["changes"]) for e in knob_events]
        if changes:  # the changes that took effect at this update
            entry["knobs"] = trackio.Markdown("\n".join(changes))
        self.run.log(entry, step=int(row["update"]))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


SINKS = {"tensorboard": TensorBoardSink, "trackio": TrackioSink}


class TrackingSink:
    """``Run.hooks`` entry mirroring each metrics row to the sinks in ``kinds`` (``RunConfig.tracking``
    or a tuple of names) for the run in ``run_dir``. Call ``close()`` when the run ends."""

    def __init__(self, kinds: str | tuple[str, ...], run_dir: str | Path, *, log: Callable[[str], None] = print):
        names = validate_tracking(kinds if isinstance(kinds, str) else ",".join(kinds))
        hidden = [k for k in TRACKIO_REMOTE_VARIABLES if k in os.environ]
        if "trackio" in names and hidden:
            log(f"tracking: trackio writes locally only; {', '.join(hidden)} ignored")
        self.kinds = names
        self.sinks = [SINKS[name](Path(run_dir)) for name in names]
        self._knob_events_seen: int | None = None  # run.knob_events already written (None: before the first row)
        self._config: dict[str, Any] | None = None

    def __call__(self, run: Any, row: dict[str, Any]) -> None:
        events = run.knob_events
        if self._knob_events_seen is None:  # a resumed run's earlier changes were written by its first process
            self._knob_events_seen = sum(1 for e in events if int(e["update"]) < int(row["update"]))
        new, self._knob_events_seen = events[self._knob_events_seen:], len(events)
        if self._config is None:
            self._config = run.config.to_dict()
        for sink in self.sinks:
            sink.write(row, new, self._config)

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        for sink in self.sinks:
            sink.close()


__all__ = ["INSTALL_HINT", "SINK_PACKAGES", "TrackingSink", "numeric_metrics", "parse_tracking", "validate_tracking"]
