"""Runs on disk (docs/design.md, "Runs on disk"): config, metrics, knob events, summary, checkpoints.

    runs/<run-id>/config.json         everything needed to rerun
    runs/<run-id>/metrics.parquet     one row per update; holds every row once ``run()`` ends (the
                                      end of Run.run, the CLI, ControlPanel.finish: write_summary)
    runs/<run-id>/metrics.parts/      only while a run is live (or after a crash): the rows appended
    runs/<run-id>/metrics.tail.jsonl  since, as parquet parts of 512 rows + one JSON line per newer
                                      update (O(1) per update). read_metrics(run_dir) reads all three
                                      at any moment: every complete row, none twice (``metrics``)
    runs/<run-id>/knob_events.jsonl   one line per live change, with the update it took effect at
    runs/<run-id>/summary.json        headline numbers, rewritten atomically
    runs/<run-id>/checkpoints/update_000123/
        model.safetensors             weights (shared/tied tensors handled by safetensors)
        optimizer.safetensors + .json AdamW state tensors + param-group hyperparameters
        buffer.safetensors + .json    queued batches and pending minibatches (token ids, log-probs...)
        state.json                    policy version, knobs, RNG states, counters
Everything is safetensors or JSON/JSON lines/parquet: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import WorkbenchError
from workbench.runs.metrics import PARTS, TAIL, MetricsLog, read_metrics


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_parquet(df: pl.DataFrame, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    df.write_parquet(tmp)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True)


def keep_previous(path: Path, log=print) -> Path | None:
    """Move an earlier run at ``path`` aside to ``path.1``, ``path.2``... (never overwrite it)."""
    path = Path(path)
    if not path.exists() or not any(path.iterdir()):
        return None
    k = 1
    while path.with_name(f"{path.name}.{k}").exists():
        k += 1
    moved = path.with_name(f"{path.name}.{k}")
    os.replace(path, moved)
    log(f"an earlier run was in {path}: moved it to {moved}")
    return moved


class RunDir:
    """A run's folder. All writes are atomic or append-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._metrics: MetricsLog | None = None  # opened on the first write: reading never recovers

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.parquet"

    def write_config(self, config_dict: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.json", dumps(config_dict))

    @property
    def metrics_log(self) -> MetricsLog:
        """This folder's metrics writer (one per run directory: the loop's ``RunDir``)."""
        if self._metrics is None:
            self._metrics = MetricsLog(self.path)
        return self._metrics

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One update's row, O(1) in the rows already written."""
        self.metrics_log.append(row)

    def compact_metrics(self) -> None:
        """Fold the live parts and tail into ``metrics.parquet`` (O(rows), once at the end of a run)."""
        if self._metrics is not None or (self.path / TAIL).exists() or (self.path / PARTS).exists():
            self.metrics_log.compact()

    def keep_metrics(self, rows: int) -> None:
        """Keep the first ``rows`` rows on disk (a resume drops the updates after its checkpoint)."""
        self.metrics_log.truncate(rows)

    def read_metrics(self) -> pl.DataFrame:
        return read_metrics(self.path)

    def append_knob_event(self, event: dict[str, Any]) -> None:
        with open(self.path / "knob_events.jsonl", "a") as f:
            f.write(json.dumps(event, sort_keys=True, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite_knob_events(self, events: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(e, sort_keys=True, default=_json_default) + "\n" for e in events)
        atomic_write_text(self.path / "knob_events.jsonl", text)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The end of a run (``Run.run``, the CLI, ``ControlPanel.finish``): the metrics are compacted
        first, so the folder then holds one ``metrics.parquet`` of every row the summary describes."""
        self.compact_metrics()
        atomic_write_text(self.path / "summary.json", dumps(summary))

    # ---- checkpoints ----
    def checkpoint_dirs(self) -> list[Path]:
        return sorted(p for p in (self.path / "checkpoints").glob("update_*") if p.is_dir())

    def latest_checkpoint(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def write_checkpoint(self, update: int, files: dict[str, Any]) -> Path:
        """Write ``files`` (name -> dict of tensors for ``.safetensors``, JSON-able for ``.json``).

        Written into a hidden temp folder and renamed into place, so a half-written checkpoint is
        never picked up by ``latest_checkpoint``.
        """
        final = self.path / "checkpoints" / f"update_{update:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.path / "checkpoints", prefix=".tmp_"))
        try:
            for name, content in files.items():
                if name.endswith(".safetensors"):
                    save_file({k: v.contiguous() for k, v in content.items()}, str(tmp / name))
                else:
                    atomic_write_text(tmp / name, dumps(content))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load every file of a checkpoint folder (safetensors -> tensors, json -> objects)."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise WorkbenchError(f"checkpoint={str(path)!r} is invalid: expected a folder holding state.json")
    out: dict[str, Any] = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            out[f.name] = load_file(str(f))
        elif f.suffix == ".json":
            out[f.name] = json.loads(f.read_text())
    return out


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors and JSON (no pickle)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
