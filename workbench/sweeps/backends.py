"""Where a sweep's cells run: in this process, on a local process pool, or on Ray.

**Local pool** (default): ``ProcessPoolExecutor`` with the ``spawn`` start method, ``workers``
processes (default: usable cores // ``threads_per_run``), each limited to ``threads_per_run``
threads (``workbench.sweeps.worker``). A worker process that dies (out of memory, segfault) breaks
the pool: the pool is rebuilt and the unfinished cells are resubmitted once, then reported failed.
``workers=0`` runs the cells one after another in this process (debugging; no isolation).

**Ray** (``ray="local"`` starts a local instance, ``"auto"`` connects to a running cluster or else
starts a local one, anything else is a cluster address; an already initialised Ray is used as is;
``ray_session``): each cell is a task with ``num_cpus=threads_per_run`` and, with ``gpus_per_run``,
``num_gpus=gpus_per_run`` (a fraction below 1 shares a GPU between runs; Ray sets the task's
``CUDA_VISIBLE_DEVICES`` to the GPU it assigned, so the run's ``cuda`` is that GPU). A request no
node can meet is a one-line error before anything is written (Ray would queue it forever). The
run's small files (config, metrics, summary, knob events) come back to the driver, which writes
them into the sweep folder, with ``ray_task.json``: the node that ran the cell and the resources
Ray assigned it (read inside the task from ``ray.get_runtime_context()``). Checkpoints stay where
the task ran: on a cluster without a shared filesystem, on that node (``ray_task.json`` says which).

Every finished cell goes through ``finish``: its status, its error reported as one line, the bar.

**Stopping** (SIGINT or SIGTERM to the driver; a Ctrl-C in the terminal reaches the workers too,
which ignore it): no new cell starts, the cells training stop after their update in progress with a
checkpoint (the next sweep continues them exactly), and the back-end returns the signal; the driver
then writes the results so far and raises ``SweepStopped``. In this process the running cell's own
handler stops it; on the pool the driver sets a flag the workers share (a cell checks it after
every update, a queued cell before it starts); on Ray the tasks in flight finish. A second signal
ends at once (pool workers are terminated).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.runs.stop import STOP_SIGNALS, StopSignals, exit_now
from workbench.sweeps.cells import CELL_FILE, Cell
from workbench.sweeps.grid import one_line
from workbench.sweeps.worker import init_worker, ray_task, run_cell


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def progress_bar(total: int, initial: int, enabled: bool, unit: str = "upd"):
    """A tqdm bar, or None: over the updates of run cells (advanced after every update, in any
    back-end but Ray, where a cell's updates count when it finishes), over the cells of notebooks."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # tqdm.auto probes for IPython and ipywidgets: only when a bar is shown

    return tqdm(total=total, initial=initial, unit=unit, desc="sweep")


def steps_of(cell: Cell) -> int:
    """The bar's units of a cell: its updates (a run), or 1 (a notebook)."""
    return int(cell.spec["config"]["steps"]) if cell.spec["mode"] == "run" else 1


def finish(cell: Cell, result: dict[str, Any], bar, log: Callable[[str], None], counted: bool = True) -> None:
    """Record a cell's result (and, from Ray, write its files), report a failure, advance the bar
    (by the cell's units unless ``counted``: its updates were counted as they happened).
    A ``pending`` result (a queued cell the stop kept from starting) only stays pending."""
    if result["status"] == "pending":
        return
    cell.status, cell.error, cell.seconds = result["status"], result.get("error"), result.get("seconds")
    files = result.get("files") or {}
    if files:
        _write_back(cell.run_dir, files)
    if cell.status != "ok":
        msg = f"failed {cell.name}: {cell.error}"
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            log(msg)
    if bar is not None and not (counted and cell.spec["mode"] == "run"):
        bar.update(steps_of(cell) if cell.status == "ok" else 0)


def run_serial(cells: list[Cell], bar, log: Callable[[str], None]) -> int | None:
    """``workers=0``: one after another in this process. Returns the signal that stopped it (or None)."""
    with StopSignals(lambda signum: None) as between:  # a signal between cells: recorded, no cell starts
        for c in cells:
            if between.signum is not None:
                return between.signum
            result = run_cell(c.spec, str(c.run_dir), None, signals=STOP_SIGNALS,  # its own handlers inside
                              advance=bar.update if bar is not None else (lambda n: None))
            finish(c, result, bar, log)
            if result.get("stopped"):
                return result["stopped"]
        return between.signum


def run_pool(cells: list[Cell], workers: int, threads: int, bar, log: Callable[[str], None]) -> int | None:
    """Spawned worker processes; a dead worker breaks the pool: rebuild it, resubmit unfinished cells once.
    Returns the signal that stopped the sweep (or None).

    When every result is in, the pool is shut down without waiting for the workers' interpreters to
    tear down (results are already written; the processes exit on their own)."""
    ctx = mp.get_context("spawn")
    flag = ctx.Value("i", 0, lock=False)  # an int store is atomic; the handler must not take a lock

    def stop(signum: int) -> None:
        flag.value = signum

    def again(signum: int) -> None:
        for p in mp.active_children():
            p.terminate()
        exit_now(signum)

    updates = ctx.Value("q", 0)  # updates done by the workers' runs: the bar follows it

    def follow() -> None:
        if bar is not None and updates.value > bar.n - bar.initial:
            bar.update(updates.value - (bar.n - bar.initial))

    with StopSignals(stop, on_again=again):
        _pool_loop(cells, workers, threads, bar, log, (ctx, flag, updates, follow))
    follow()
    return flag.value or None


def _pool_loop(cells, workers, threads, bar, log, shared) -> None:
    ctx, flag, updates, follow = shared
    pending = list(cells)
    attempts = {c.index: 0 for c in cells}
    while pending and not flag.value:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=ctx,
                                   initializer=init_worker, initargs=(threads, flag, updates))
        broken: list[Cell] = []
        try:
            # workers are spawned by submit and keep an ignored SIGINT through exec: a Ctrl-C while
            # they import is then no KeyboardInterrupt traceback in a worker (the driver decides)
            sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                futures = {pool.submit(run_cell, c.spec, str(c.run_dir), threads): c for c in pending}
            finally:
                signal.signal(signal.SIGINT, sigint)
            for c in pending:
                attempts[c.index] += 1
            for fut in _completed(futures, follow):
                c = futures[fut]
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken.append(c)
                    continue
                finish(c, result, bar, log)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        if flag.value:  # stopped: wait for the workers (one still starting must not outlive the driver,
            pool.shutdown(wait=True, cancel_futures=True)  # whose shared flag and count it unpickles)
            return
        pool.shutdown(wait=bool(broken))
        pending = [c for c in broken if attempts[c.index] < 2]
        for c in broken:
            if attempts[c.index] >= 2:
                finish(c, {"status": "failed", "error": "worker process died twice (BrokenProcessPool: out of "
                           "memory, a crash, or a script without an if __name__ == '__main__' guard)"}, bar, log)
        if pending:
            log(f"a worker process died: restarting the pool for {len(pending)} unfinished runs")


def _completed(futures, tick: Callable[[], None], every: float = 0.5):
    """``as_completed``, calling ``tick()`` at least every ``every`` seconds while waiting."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=every, return_when=FIRST_COMPLETED)
        tick()
        yield from done


RAY_TASK_FILE = "ray_task.json"  # in a Ray cell's run folder: where it ran, what Ray assigned it


@contextlib.contextmanager
def ray_session(address: str, gpus_per_run: float | None, log: Callable[[str], None]) -> Iterator[Any]:
    """Ray connected (``address``: local | auto | a cluster address) and, with ``gpus_per_run``, a node
    able to hold one run checked; yields the ``ray`` module. A Ray this started is shut down after."""
    try:
        import ray as ray_mod  # an optional extra: only Ray sweeps need it
    except ImportError:
        raise WorkbenchError("ray is not installed: pip install 'workbench[ray]'") from None
    started = not ray_mod.is_initialized()
    if started:
        if address == "local":
            ray_mod.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False)
        elif address == "auto":
            try:
                ray_mod.init(address="auto", log_to_driver=False)
            except ConnectionError:
                log("ray: no running cluster found, starting a local instance")
                ray_mod.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False)
        else:
            ray_mod.init(address=address, log_to_driver=False)
    try:
        if gpus_per_run is not None:
            check_gpus(ray_mod, gpus_per_run)
        yield ray_mod
    finally:
        if started:
            ray_mod.shutdown()


def check_gpus(ray_mod: Any, gpus_per_run: float) -> None:
    """One-line error when no alive node has ``gpus_per_run`` GPUs (a task is placed on one node, so the
    cluster's total is not enough; an autoscaler's future nodes are not counted)."""
    total = float(ray_mod.cluster_resources().get("GPU", 0))
    largest = max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray_mod.nodes() if n.get("Alive")),
                  default=0.0)
    if largest < gpus_per_run:
        raise WorkbenchError(f"gpus_per_run={gpus_per_run:g} is invalid on this Ray cluster: it has {total:g} "
                             f"GPUs, at most {largest:g} on one node; ask for at most {largest:g} per run, or "
                             "start the cluster with GPU nodes (ray start --num-gpus N)")


def ray_cell_task(spec: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    """The Ray task of one cell: ``ray_task``, plus ``ray_task.json`` (node, assigned resources, GPU ids,
    ``CUDA_VISIBLE_DEVICES``) among the files returned to the driver."""
    import ray as ray_mod  # in a Ray worker: Ray is installed

    ctx = ray_mod.get_runtime_context()
    placement = {"node_id": ctx.get_node_id(), "node_ip": ray_mod.util.get_node_ip_address(),
                 "assigned_resources": ctx.get_assigned_resources(),
                 "gpu_ids": [str(i) for i in ray_mod.get_gpu_ids()],
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    out = ray_task(spec, run_dir, threads)
    out["files"][RAY_TASK_FILE] = json.dumps(placement, indent=2, sort_keys=True).encode()
    return out


def run_ray(cells: list[Cell], ray_mod: Any, workers: int | None, threads: int, gpus_per_run: float | None,
            bar, log: Callable[[str], None]) -> int | None:
    """Each cell a Ray task (``num_cpus=threads``, ``num_gpus=gpus_per_run``) on the connected Ray
    (``ray_session``); at most ``workers`` in flight (None: all). Returns the stop signal (or None)."""
    stopped = StopSignals(lambda signum: None)
    try:
        stopped.__enter__()  # a signal: no new task is submitted, the ones in flight finish
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
               "POLARS_MAX_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        task = ray_mod.remote(ray_cell_task).options(num_cpus=threads, num_gpus=gpus_per_run or 0,
                                                     runtime_env={"env_vars": env})
        queue = list(cells)
        inflight: dict[Any, Cell] = {}
        limit = workers or len(cells)
        while (queue and stopped.signum is None) or inflight:
            while queue and len(inflight) < limit and stopped.signum is None:
                c = queue.pop(0)
                inflight[task.remote(c.spec, str(c.run_dir), threads)] = c
            ready, _ = ray_mod.wait(list(inflight), num_returns=1)
            for ref in ready:
                c = inflight.pop(ref)
                try:
                    result = ray_mod.get(ref)
                except Exception as e:  # noqa: BLE001 - worker crash, lost node: report, go on
                    result = {"status": "failed", "error": one_line(e)}
                finish(c, result, bar, log, counted=False)
    finally:
        stopped.__exit__(None, None, None)
    return stopped.signum


def _write_back(run_dir: Path, files: dict[str, bytes]) -> None:
    """Driver side of a Ray task: write the returned files unless this filesystem already has them.

    ``sweep_cell.json`` goes last: it is what marks the cell complete."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n == CELL_FILE):
        p = run_dir / name
        if p.is_file() and p.read_bytes() == files[name]:
            continue
        tmp = p.with_name(f".{name}.tmp-{os.getpid()}")
        tmp.write_bytes(files[name])
        os.replace(tmp, p)
