"""``sweep``: build the cells, skip the complete ones, run the rest, merge; the driver side of a sweep.

**Where things go.** ``<base.out_dir>/<name>/`` (``name`` defaults to ``sweep-<hash>`` of the base
config, grid, seeds and notebook, so re-running the same command finds the same folder):
``sweep.json`` (the spec), ``runs/<cell>/`` (one ordinary run directory per cell, plus
``sweep_cell.json``, written last, when the cell succeeded), ``sweep.parquet`` and
``sweep_runs.parquet`` (``workbench.sweeps.results``).

**Resumable.** Re-running a sweep skips complete cells (``workbench.sweeps.cells.is_complete``);
an interrupted run cell continues from its latest checkpoint (``workbench.sweeps.worker``).

**Warm starts.** The built-in model's warm start is trained (or found) once here, before fanning
out. The sweep cannot know which model a notebook builds, so it prepares no warm start for it:
parallel first runs of the built-in model may each train it once (safe: the cache entry is renamed
into place).

**Failures.** A cell that raises is reported (one line: ``ExceptionType: first line``) and the rest
go on. ``sweep`` returns normally; the CLI exits 1 when a cell failed.

**GPUs** (Ray only: ``gpus_per_run``, e.g. 0.5 puts two runs on each GPU). A run cell's device is
then ``cuda`` (a base ``device="auto"`` becomes ``cuda``, so a worker without CUDA fails the cell in
one line instead of training on its CPU); ``cpu`` or ``cuda:N`` is refused (the GPU is the one Ray
assigned). A notebook cell's device is the notebook's own (``auto`` finds the GPU Ray assigned).
The local pool and ``workers=0`` schedule no GPUs: ``gpus_per_run`` there is refused (a run's
``--device cuda`` alone puts every parallel run on the same GPU).

**Determinism.** A cell's metrics depend only on its config and its thread count, never on the
worker it ran in or on the other cells: the same sweep twice gives identical ``sweep.parquet``
metric columns (the ``perf/`` wall-clock columns excepted).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.runs.stop import exit_code, signal_name
from workbench.sweeps.backends import (progress_bar, ray_session, run_pool, run_ray, run_serial, steps_of,
                                      usable_cores)
from workbench.sweeps.cells import MERGED_FILE, SPEC_FILE, Cell, build_cells, is_complete
from workbench.sweeps.grid import RESERVED, canon, describe, one_line, short_hash
from workbench.sweeps.results import merge, write_results
from workbench.sweeps.worker import warm_locked

if TYPE_CHECKING:
    import polars as pl


def sweep(base: RunConfig, grid: dict[str, list[Any]], seeds: int | list[int] | None = None, *,
          notebook: str | Path | None = None, params_file: str | Path | None = None,
          ray: str | None = None, workers: int | None = None, gpus_per_run: float | None = None,
          threads_per_run: int | None = None, name: str | None = None, sweep_dir: str | Path | None = None,
          progress: bool = True, log: Callable[[str], None] = print) -> "pl.DataFrame":
    """Run every cell of ``grid`` x ``seeds`` over ``base``; returns the merged ``sweep.parquet``.

    ``seeds``: an int n (seeds ``base.seed .. base.seed + n - 1``), a list of seeds, or None (just
    ``base.seed``). ``notebook``: run each cell as a headless notebook instead of ``Run``
    (``params_file``: a YAML of notebook parameters under the cell's, as ``run_notebook``). ``ray``:
    ``"local"``, ``"auto"`` or a cluster address (None = local process pool). ``workers``: parallel
    cells (default: usable cores // threads_per_run on the pool, unlimited on Ray; 0 = in this
    process, serially). ``gpus_per_run``: GPUs per cell on Ray (fractions share a GPU; module docstring,
    "GPUs"). ``threads_per_run``: torch threads per cell (default ``base.threads`` or 1).
    ``sweep_dir`` (default ``<base.out_dir or "runs">/<name>``) holds everything (module docstring).
    """
    from workbench.runs.rundir import atomic_write_text  # torch and polars: never at module level here

    if threads_per_run is None:
        threads_per_run = base.threads or 1
    if not isinstance(threads_per_run, int) or threads_per_run < 1:
        raise WorkbenchError(f"threads_per_run={threads_per_run!r} is invalid: expected an int >= 1")
    if base.threads and base.threads != threads_per_run:
        raise WorkbenchError(f"threads={base.threads} and threads_per_run={threads_per_run} disagree: "
                             "give only --threads-per-run")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise WorkbenchError(f"workers={workers!r} is invalid: expected an int >= 0 (0 = in this process)")
    if ray is not None and workers == 0:
        raise WorkbenchError("workers=0 (in this process) cannot be combined with ray")
    if gpus_per_run is not None:
        base = _gpu_base(base, gpus_per_run, ray, notebook)
    name = name or default_name(base, grid, seeds, [str(notebook), str(params_file)] if notebook else None)
    if not re.fullmatch(r"[A-Za-z0-9._=+\-]+", name):
        raise WorkbenchError(f"name={name!r} is invalid: expected letters, digits and ._=+-")
    root = Path(sweep_dir) if sweep_dir is not None else Path(base.out_dir or "runs") / name
    cells = build_cells(base, grid, seeds, root.resolve(), notebook, params_file)
    if gpus_per_run is not None:
        _check_gpu_cells(cells)
    todo = [c for c in cells if not is_complete(c)]
    # Ray first: a GPU request no node can meet is an error before anything is written
    session = ray_session(ray, gpus_per_run, log) if ray is not None and todo else contextlib.nullcontext()
    with session as ray_mod:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / SPEC_FILE, json.dumps(
            {"name": name, "base": base.to_dict(), "grid": grid, "seeds": seeds, "gpus_per_run": gpus_per_run,
             "notebook": str(notebook) if notebook else None,
             "params_file": str(params_file) if params_file else None, "cells": [c.name for c in cells]},
            indent=2, sort_keys=True, default=str))
        pending = {c.index for c in todo}
        for c in cells:
            if c.index not in pending:
                c.status, c.resumed = "ok", True
        done = len(cells) - len(todo)
        engine = "ray" if ray is not None else ("this process" if workers == 0 else "local pool")
        log(f"sweep {root}: {len(cells)} runs, {done} already complete, {len(todo)} to run on {engine}")
        if todo and notebook is None:
            for c, cfg in _distinct_warm_starts(todo):
                try:
                    warm_locked(cfg, log=log)  # once, here, before any worker could race on the cache entry
                except Exception as e:  # noqa: BLE001 - bad model/sft params: one line naming the cell
                    raise WorkbenchError(f"sweep cell {describe(c.values, c.seed)}: warm start of the built-in "
                                         f"model failed: {one_line(e)}") from None
        signum = _run_cells(cells, todo, ray_mod, workers, threads_per_run, gpus_per_run, progress,
                            notebook is None, log)

    merged = merge(cells, list(grid), "seed" not in grid)
    write_results(root, merged, cells, list(grid), "seed" not in grid)
    ok = sum(c.status == "ok" for c in cells)
    if signum is not None:
        raise SweepStopped(signum, f"sweep {root} stopped by {signal_name(signum)}: {ok} of {len(cells)} runs "
                                   f"complete, results so far in {root / MERGED_FILE}; the same sweep (same "
                                   f"command, or name={name!r}) continues where it stopped")
    log(f"sweep {root}: {ok} ok, {len(cells) - ok} failed, {done} resumed -> {root / MERGED_FILE}")
    return merged


def _run_cells(cells: list[Cell], todo: list[Cell], ray_mod: Any, workers: int | None, threads: int,
               gpus_per_run: float | None, progress: bool, runs: bool, log: Callable[[str], None]) -> int | None:
    """The ``todo`` cells on their back-end, under the progress bar; returns the stop signal (or None)."""
    bar = progress_bar(sum(steps_of(c) for c in cells), sum(steps_of(c) for c in cells if c.status == "ok"),
                       progress, unit="upd" if runs else "run")
    try:
        if not todo:
            return None
        if ray_mod is not None:
            return run_ray(todo, ray_mod, workers, threads, gpus_per_run, bar, log)
        if workers == 0:
            return run_serial(todo, bar, log)
        return run_pool(todo, min(workers or max(1, usable_cores() // threads), len(todo)), threads, bar, log)
    finally:
        if bar is not None:
            bar.close()


def _gpu_base(base: RunConfig, gpus_per_run: Any, ray: str | None, notebook: Any) -> RunConfig:
    """``gpus_per_run`` checked (a number Ray accepts, Ray given); a run sweep's base device made ``cuda``."""
    ok = (isinstance(gpus_per_run, (int, float)) and not isinstance(gpus_per_run, bool)
          and math.isfinite(gpus_per_run) and gpus_per_run > 0
          and (gpus_per_run <= 1 or gpus_per_run == int(gpus_per_run))
          and abs(gpus_per_run * 10_000 - round(gpus_per_run * 10_000)) < 1e-6)
    if not ok:
        raise WorkbenchError(f"gpus_per_run={gpus_per_run!r} is invalid: expected a number > 0: a fraction "
                             "below 1 (at most 4 decimals, e.g. 0.5 shares a GPU) or a whole number")
    if ray is None:
        raise WorkbenchError(f"gpus_per_run={gpus_per_run:g} is invalid without ray: the local pool schedules no "
                             "GPUs; give ray (--ray local|auto|ADDRESS), or drop it and set the runs' --device")
    if notebook is not None:
        return base
    if base.device not in ("auto", "cuda"):
        raise WorkbenchError(f"device={base.device!r} is invalid with gpus_per_run={gpus_per_run:g}: a run "
                             "trains on the GPU Ray assigned it; expected auto or cuda")
    return base.replace(device="cuda")


def _check_gpu_cells(cells: list[Cell]) -> None:
    """With ``gpus_per_run``, every run cell trains on cuda (a grid over ``device`` may say otherwise)."""
    for c in cells:
        if c.spec["mode"] == "run" and c.spec["config"]["device"] != "cuda":
            raise WorkbenchError(f"sweep cell {describe(c.values, c.seed)}: device={c.spec['config']['device']!r} "
                                 "is invalid with gpus_per_run: expected cuda (the GPU Ray assigned the run)")


class SweepStopped(Exception):
    """A sweep stopped by SIGINT / SIGTERM after its running cells checkpointed (``exit_code``: 128 + signal)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, exit_code(signum)


def default_name(base: RunConfig, grid: dict[str, list[Any]], seeds: Any, notebook: Any) -> str:
    """``sweep-<hash>`` of the command's inputs: the same command finds the same folder."""
    d = {k: v for k, v in base.to_dict().items() if k not in RESERVED}
    return "sweep-" + short_hash({"base": d, "grid": grid, "seeds": seeds,
                                  "notebook": str(notebook) if notebook else None})


def _distinct_warm_starts(cells: list[Cell]) -> list[tuple[Cell, RunConfig]]:
    """One built-in-model cell per distinct (task, model, SFT) combination: each warm start trains once."""
    seen, out = set(), []
    for c in cells:
        cfg = c.spec["config"]
        if cfg["model"] != "builtin":
            continue
        key = canon([cfg["task"], cfg["task_params"], cfg["model_params"], cfg["sft_params"]])
        if key not in seen:
            seen.add(key)
            out.append((c, RunConfig.from_dict(cfg)))
    return out
