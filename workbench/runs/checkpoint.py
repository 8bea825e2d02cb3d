"""Checkpoint and resume a ``Run`` exactly: weights, optimizer, buffer, RNG states, knobs, metrics,
the objective state (``Run.objective_state``, e.g. R2VPO's dual variable).

A run resumed from the checkpoint written after N updates produces the same metrics for updates
N.. as the uninterrupted run (tested). Files are safetensors and JSON only (see ``rundir``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.rollouts import Rollouts
from workbench.runs.rundir import RunDir, load_optimizer_state, optimizer_state, read_checkpoint

# ``run`` below is a ``workbench.loop.Run``: this module reads and restores its public attributes
# (``Run``'s docstring lists them) and never imports the loop, which imports this module.


def save(run: Any) -> Path:
    """Write a checkpoint of ``run`` after its latest update; returns the checkpoint folder."""
    if run.dir is None:
        raise WorkbenchError("out_dir='' is invalid for checkpointing: expected a run directory")
    buf_tensors, buf_meta = run.buffer.state()
    mb_meta = []
    for i, mb in enumerate(run.minibatches):
        t, m = mb.to_state(prefix=f"minibatch{i}.")
        buf_tensors.update(t)
        mb_meta.append(m)
    opt_tensors, opt_meta = optimizer_state(run.optimizer)
    state = {
        "version": run.version,
        "knobs": run.knobs.applied.as_dict(),
        "prompt_rng": _encode_random_state(run.prompt_rng.getstate()),
        "rows": len(run.rows),
        "knob_events": run.knob_events,
        "initial_accuracy": run.initial_accuracy,
        "objective_state": _objective_state(run.objective_state),
        "torch_version": torch.__version__,
    }
    files = {
        # clone: tied embeddings share storage, which safetensors refuses to write twice
        "model.safetensors": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "optimizer.safetensors": opt_tensors,
        "optimizer.json": opt_meta,
        "buffer.safetensors": buf_tensors,
        "buffer.json": {**buf_meta, "minibatches": mb_meta},
        "rng.safetensors": {"generator": run.generator.get_state()},
        "state.json": state,
    }
    return run.dir.write_checkpoint(run.version, files)


def load(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """The run's config (pointing at ``run_dir``) and the files of its latest (or the given) checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise WorkbenchError(f"run_dir={str(run_dir)!r} is invalid: expected a run folder holding config.json")
    config = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    rd = RunDir(run_dir)
    path = Path(checkpoint) if checkpoint else rd.latest_checkpoint()
    if path is None:
        raise WorkbenchError(f"run_dir={str(run_dir)!r} has no checkpoint: expected checkpoints/update_*")
    files = read_checkpoint(path)
    return config.replace(out_dir=str(run_dir.parent), run_name=run_dir.name), files


def restore(run: Any, files: dict[str, Any]) -> None:
    """Put a freshly built ``run`` (same config, ``_resuming=True``) into the checkpoint's state."""
    state = files["state.json"]
    rd = run.dir
    run.model.load_state_dict(files["model.safetensors"])
    load_optimizer_state(run.optimizer, files["optimizer.safetensors"], files["optimizer.json"])
    buf = files["buffer.json"]
    run.buffer.load_state(files["buffer.safetensors"], buf)
    run.minibatches = [Rollouts.from_state(files["buffer.safetensors"], m, prefix=f"minibatch{i}.")
                       for i, m in enumerate(buf["minibatches"])]
    run.generator.set_state(files["rng.safetensors"]["generator"])
    run.prompt_rng.setstate(_decode_random_state(state["prompt_rng"]))
    run.version = int(state["version"])
    run.initial_accuracy = state["initial_accuracy"]
    run.objective_state.clear()
    run.objective_state.update(state.get("objective_state", {}))  # absent in older checkpoints
    run.knobs.set(**state["knobs"])
    run.knobs.take_pending()  # restoring is not a live change
    run.knob_events = list(state["knob_events"])
    rows = rd.read_metrics()
    run.rows = rows.filter(pl.col("update") < run.version).to_dicts() if len(rows) else []
    if len(run.rows) != state["rows"]:
        raise WorkbenchError(
            f"metrics.parquet={str(rd.metrics_path)!r} is invalid: holds {len(run.rows)} rows before "
            f"update {run.version}, the checkpoint expects {state['rows']}")
    rd.keep_metrics(len(run.rows))  # rows of updates after the checkpoint are re-recorded live
    # the journal keeps only what happened up to the checkpoint: later events are re-recorded live
    rd.rewrite_knob_events(run.knob_events)


def _objective_state(state: dict[str, Any]) -> dict[str, Any]:
    """``Run.objective_state`` for state.json: str keys, JSON numbers only (floats round-trip exactly)."""
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise WorkbenchError(f"objective_state[{k!r}]={v!r} is invalid for a checkpoint: expected a number "
                                 f"under a str key")
        out[k] = v
    return out


def _encode_random_state(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _decode_random_state(st: list) -> tuple:
    return (st[0], tuple(st[1]), st[2])
