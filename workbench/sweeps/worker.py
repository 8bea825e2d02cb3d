"""A sweep's worker side: execute one cell in this process and record it.

``run_cell`` (pool and serial), ``init_worker`` (the pool's initializer) and ``ray_task`` (a Ray
task) are module-level functions: spawned processes and Ray find them by import.

**Thread limits first.** A worker is limited to ``threads`` threads (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``POLARS_MAX_THREADS`` and ``OMP_WAIT_POLICY=PASSIVE`` set before torch is
imported, then ``torch.set_num_threads``). torch and polars read those variables when they load,
so nothing under ``workbench.sweeps`` imports them at module level: a spawned worker imports this
package (to find ``init_worker``) before the limits are set. The imports of torch, polars and of
the modules that load them (the loop, the policy, the run folder) are inside the functions here.

**Resuming.** An incomplete run cell whose folder holds the same config and a checkpoint (written
every ``checkpoint_every`` updates) continues from that checkpoint, exactly; otherwise it reruns
from scratch (``Run`` moves the old folder aside to ``<cell>.1``). Notebook cells always rerun.

**Stopping.** A SIGTERM to a worker (a scheduler preempting it, ``kill PID``) while its cell trains
stops the run after the update in progress, with a checkpoint and summary written: the cell is
reported failed in one line (``stopped by SIGTERM at update N of M ...``) and, being incomplete,
continues from that checkpoint on the next sweep. A second SIGTERM ends the process at once. Pool
workers ignore SIGINT: a Ctrl-C in the terminal reaches the whole process group, and the driver
alone decides (it forwards a SIGTERM to every worker, ``backends.run_pool``). In this process
(``workers=0``) a cell stops on SIGINT too, and the result says which signal stopped it.

**Warm starts.** The built-in model's warm start is trained (or found) under a file lock on its
cache entry, so parallel first runs never race.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.notebook import run_notebook
from workbench.runs.stop import StopSignals, signal_name
from workbench.sweeps.cells import CELL_FILE
from workbench.sweeps.grid import one_line

class CellStopped(Exception):
    """A run cell stopped by a signal after a clean checkpoint (reported in one line, no traceback file)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


RETURNED_FILES = ("config.json", "metrics.parquet", "summary.json", "knob_events.jsonl", CELL_FILE,
                  "sweep_error.txt", "notebook.ipynb")  # what a Ray task sends back to the driver


def limit_threads(threads: int) -> None:
    """Thread limits for a worker: env vars first (read when torch/polars load), then torch's pool."""
    t = str(int(threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "POLARS_MAX_THREADS"):
        os.environ[var] = t
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch  # after the env vars above: torch reads them when it loads

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started in this process
        pass


_SWEEP_STOP: Any = None  # in a pool worker: the driver's shared stop flag (0, or the signal that stopped it)
_SWEEP_UPDATES: Any = None  # in a pool worker: the driver's shared count of updates done (its progress bar)


def count_updates(n: int) -> None:
    """Add ``n`` updates to the driver's shared count (a pool worker; elsewhere nothing)."""
    if _SWEEP_UPDATES is not None:
        with _SWEEP_UPDATES.get_lock():
            _SWEEP_UPDATES.value += n


def stop_requested() -> int:
    """The signal the sweep's driver was stopped by (0: none, or not in a pool worker)."""
    return int(_SWEEP_STOP.value) if _SWEEP_STOP is not None else 0


def init_worker(threads: int, stop: Any = None, updates: Any = None) -> None:
    """Pool initializer: the driver's stop flag and update count, thread limits, then the imports
    every cell needs (paid once per worker)."""
    global _SWEEP_STOP, _SWEEP_UPDATES
    _SWEEP_STOP, _SWEEP_UPDATES = stop, updates
    limit_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver forwards a stop as SIGTERM (module docstring)
    try:
        import workbench.loop  # noqa: F401  (warm-up, after the thread limits)
    except Exception:  # noqa: BLE001 - the cell reports the import error itself
        pass


def warm_locked(config: RunConfig, log: Callable[[str], None] = lambda s: None) -> None:
    """Build (or find) the built-in model's cached warm start under a file lock on its cache entry."""
    if config.model != "builtin":
        return
    # torch and transformers: only once the thread limits are set (module docstring)
    from filelock import FileLock

    from workbench.policy.build import build_task
    from workbench.policy.model import ModelConfig
    from workbench.cache import cache_root
    from workbench.policy.warm_start import SFTConfig, cache_key, warm_start

    task = build_task(config)
    mcfg, scfg = ModelConfig(**config.model_params), SFTConfig(**config.sft_params)
    lock_dir = cache_root() / "warm_start"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f".{cache_key(task, mcfg, scfg)}.lock")):
        warm_start(task, mcfg, scfg, log=log)


def run_cell(spec: dict[str, Any], run_dir: str, threads: int | None = None,
             signals: tuple[int, ...] = (signal.SIGTERM,),
             advance: Callable[[int], None] = count_updates) -> dict[str, Any]:
    """Execute one cell in this process; never raises for a failing run (the error is returned).

    ``signals`` stop a run cell after the update in progress (the result's ``stopped`` is the signal);
    ``advance(n)`` is told of every ``n`` updates done (a continued run: its checkpoint's first)."""
    if threads:
        limit_threads(threads)
    from workbench.runs.rundir import atomic_write_text  # loads torch and polars: after the thread limits

    t0 = time.perf_counter()
    path = Path(run_dir)
    if stop_requested():  # queued before the driver stopped: not started, the next sweep runs it
        return {"status": "pending", "error": None, "seconds": 0.0}
    try:
        continued, signum = _execute(spec, path, signals, advance)
        seconds = time.perf_counter() - t0
        atomic_write_text(path / CELL_FILE, json.dumps({"spec": spec, "seconds": seconds, "threads": threads,
                                                        "continued_from": continued}, indent=2, sort_keys=True))
        return {"status": "ok", "error": None, "seconds": seconds, "continued_from": continued, "stopped": signum}
    except CellStopped as e:
        return {"status": "failed", "error": str(e), "seconds": time.perf_counter() - t0, "stopped": e.signum}
    except Exception as e:  # noqa: BLE001 - a failing cell is reported, the sweep goes on
        tb = traceback.format_exc()
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "sweep_error.txt").write_text(tb)
        except OSError:
            pass
        return {"status": "failed", "error": one_line(e), "seconds": time.perf_counter() - t0}


def ray_task(spec: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    """A Ray task: run the cell, return its result and the run's small files (bytes) to the driver."""
    out = run_cell(spec, run_dir, threads)
    from workbench.runs.rundir import RunDir  # torch: after the thread limits (module docstring)

    if out["status"] != "ok" and Path(run_dir).is_dir():
        try:  # a failed cell's rows so far travel as one metrics.parquet
            RunDir(run_dir).compact_metrics()
        except Exception:  # noqa: BLE001 - unreadable rows: the error file still goes back
            pass
    files = {}
    for name in RETURNED_FILES:
        p = Path(run_dir) / name
        if p.is_file():
            files[name] = p.read_bytes()
    out["files"] = files
    return out


def _execute(spec: dict[str, Any], run_dir: Path, signals: tuple[int, ...],
             advance: Callable[[int], None]) -> tuple[int | None, int | None]:
    """Run the cell; returns the update a run continued from (None when it started from scratch) and
    the stop signal that came during its last update (None: none came)."""
    if spec["mode"] == "run":
        from workbench.loop import Run  # torch: after the thread limits (module docstring)

        cfg = RunConfig.from_dict(spec["config"])
        warm_locked(cfg)
        run = _continue_run(cfg, run_dir)
        continued = run.version if run is not None else None
        run = run if run is not None else Run(cfg, log=lambda s: None)
        advance(run.version)
        run.hooks.append(lambda r, row: (advance(1), r.request_stop() if stop_requested() else None))
        with StopSignals(lambda signum: run.request_stop(), signals=signals, on_again=_die) as stop:
            run.run(progress=False)
        signum = stop.signum or stop_requested() or None
        if signum is not None and run.version < cfg.steps:  # run() wrote the checkpoint and summary
            raise CellStopped(f"stopped by {signal_name(signum)} at update {run.version} of {cfg.steps}; "
                              f"checkpoint written: the next sweep continues from it", signum)
        run.write_summary()
        return continued, signum
    elif spec["mode"] == "notebook":
        run_dir.mkdir(parents=True, exist_ok=True)
        run_notebook(spec["notebook"], parameters=spec["parameters"], output=run_dir / "notebook.ipynb")
        return None, None
    else:  # pragma: no cover
        raise WorkbenchError(f"sweep cell mode={spec['mode']!r} is invalid: expected run | notebook")


def _die(signum: int) -> None:
    """A second signal: end the process the way the signal itself would (the pool sees a dead worker)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _continue_run(cfg: RunConfig, run_dir: Path):
    """The interrupted run of this cell, reopened at its latest checkpoint, or None (start over).

    Only when the folder's ``config.json`` is exactly this cell's config and a complete checkpoint
    exists (``checkpoint_every`` > 0 writes them during the run); resuming is exact, so the merged
    metrics are those of an uninterrupted run. An unreadable checkpoint means starting over.
    """
    from workbench.loop import Run  # torch: after the thread limits (module docstring)
    from workbench.runs.rundir import RunDir

    try:
        if RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())) != cfg:
            return None
        if RunDir(run_dir).latest_checkpoint() is None:
            return None
        return Run.resume(run_dir, log=lambda s: None)
    except Exception:  # noqa: BLE001 - no folder, another config, a torn checkpoint: start over
        return None
