"""Runs on disk (DESIGN.md section 7): config, metrics, knob events, summary, checkpoints.

    runs/<run-id>/config.json         everything needed to rerun
    runs/<run-id>/metrics.parquet     one row per update; rewritten atomically (temp file + rename),
                                      so a crash at any moment leaves the previous complete file
    runs/<run-id>/knob_events.jsonl   one line per live change, with the update it took effect at
    runs/<run-id>/summary.json        headline numbers, rewritten atomically
    runs/<run-id>/checkpoints/update_000123/
        model.safetensors             weights (shared/tied tensors handled by safetensors)
        optimizer.safetensors + .json AdamW state tensors + param-group hyperparameters
        buffer.safetensors + .json    queued batches and pending minibatches (token ids, log-probs...)
        state.json                    policy version, knobs, RNG states, counters
Everything is safetensors or JSON/parquet: nothing is ever unpickled.
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

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.parquet"

    def write_config(self, config_dict: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.json", dumps(config_dict))

    def write_metrics(self, df: pl.DataFrame) -> None:
        atomic_write_parquet(df, self.metrics_path)

    def read_metrics(self) -> pl.DataFrame:
        return pl.read_parquet(self.metrics_path) if self.metrics_path.exists() else pl.DataFrame()

    def append_knob_event(self, event: dict[str, Any]) -> None:
        with open(self.path / "knob_events.jsonl", "a") as f:
            f.write(json.dumps(event, sort_keys=True, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite_knob_events(self, events: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(e, sort_keys=True, default=_json_default) + "\n" for e in events)
        atomic_write_text(self.path / "knob_events.jsonl", text)

    def write_summary(self, summary: dict[str, Any]) -> None:
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
