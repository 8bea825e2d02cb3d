"""Sweeps: a grid of runs (or headless notebook executions) on a local process pool or on Ray.

    from workbench.sweeps import sweep
    df = sweep(RunConfig(steps=100), {"staleness": [0, 16, 256], "objective": ["ppo_clip", "m2po"]}, seeds=3)

    python -m workbench sweep --grid staleness=0,4,16,64,256 --grid objective=ppo_clip,is,m2po,topr,cispo \\
        --seeds 3 [--notebook notebooks/X.ipynb] [--ray auto|local|ADDRESS] [--workers N] [--threads-per-run T] \\
        [any run flag: the base config]

**Cells.** Grid keys are ``RunConfig`` fields, or ``field.key`` for a dict field
(``objective_params.tau=0.02,0.04``, ``task_params.max_digits=2,3``). Cells are the cross product
of the grid values in the order given, with the seeds innermost (``seeds=3`` means
``base.seed + 0, 1, 2``; a list gives the seeds themselves). When a cell changes ``objective``, its
``objective_params`` start from that objective's defaults (as when the objective knob is switched
live); base parameters that differ from the base objective's defaults are kept when the new
objective has them. Every cell's config is built and validated before anything runs, every
distinct task is built once, every model folder must exist and the built-in model's warm starts are
ready: bad keys or values are one-line ``WorkbenchError``\\ s naming the cell, and nothing has run.

**Where things go.** ``<base.out_dir>/<name>/`` (``name`` defaults to ``sweep-<hash>`` of the base
config, grid, seeds and notebook, so re-running the same command finds the same folder):
``sweep.json`` (the spec), ``runs/<cell>/`` (one ordinary run directory per cell, plus
``sweep_cell.json``, written last, when the cell succeeded), ``sweep.parquet`` (every run's metrics
rows, with ``run``, ``status``, ``error``, one column per grid key and ``seed`` in front) and
``sweep_runs.parquet`` (one row per cell: status, error, seconds, whether it was skipped as
complete (``resumed``), the update an interrupted run continued from (``continued_from``), and the
run's summary.json values).

**Resumable.** A cell is complete when its ``summary.json`` exists and its ``sweep_cell.json``
matches the cell's spec (full config, or notebook + parameters); re-running a sweep skips complete
cells. An incomplete run cell whose folder holds the same config and a checkpoint (written every
``checkpoint_every`` updates) continues from that checkpoint, exactly; otherwise it reruns from
scratch (``Run`` moves the old folder aside to ``<cell>.1``). Notebook cells always rerun.

**Failures.** A cell that raises is reported (one line: ``ExceptionType: first line``) and the rest
go on; its partial metrics rows, if any, appear with ``status == "failed"``. A worker process that
dies (out of memory, segfault) breaks the local pool: the pool is rebuilt and the unfinished cells are
resubmitted once, then reported failed. ``sweep`` returns normally; the CLI exits 1 when a cell failed.

**Parallelism.** Local pool (default): ``ProcessPoolExecutor`` with the ``spawn`` start method,
``workers`` processes (default: usable cores // ``threads_per_run``), each limited to
``threads_per_run`` threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``POLARS_MAX_THREADS`` and
``OMP_WAIT_POLICY=PASSIVE`` set before torch is imported, then ``torch.set_num_threads``). The
built-in model's warm start is trained (or found) once in the parent before fanning out, and each
worker takes a file lock on the cache entry as well, so parallel first runs never race.
``workers=0`` runs the cells one after another in this process (debugging; no isolation).
Ray (``ray="local"`` starts a local instance, ``"auto"`` connects to a running cluster or else starts
a local one, anything else is a cluster address; an already initialised Ray is used as is): each
cell is a task with ``num_cpus=threads_per_run``; the run's small files (config, metrics, summary,
knob events) come back to the driver, which writes them into the sweep folder (checkpoints stay
where the task ran: on a cluster without a shared filesystem, on the worker node).

**Determinism.** A cell's metrics depend only on its config and its thread count, never on the
worker it ran in or on the other cells: the same sweep twice gives identical ``sweep.parquet``
metric columns (the ``perf/`` wall-clock columns excepted).

**Notebooks.** ``notebook=`` runs each cell as a headless papermill execution
(``workbench.notebook.run_notebook``). The cell's parameters are the grid values, ``seed``,
``out_dir`` (the sweep's ``runs/``) and ``run_name`` (the cell), over the base config fields that
differ from ``RunConfig``'s defaults, over ``params_file`` (a YAML as for ``run_notebook``, e.g.
``notebooks/params/ci.yaml``); each must be a declared notebook parameter (checked before anything
runs). The executed notebook is saved as ``runs/<cell>/notebook.ipynb``; the cell's rows
come from the ``metrics.parquet`` the notebook's run wrote (or, if none, one row of its summary).
The sweep cannot know which model a notebook builds, so it prepares no warm start for it: parallel
first runs of the built-in model may each train it once (safe: the cache entry is renamed into place).

Left out: retries of cells that raised, per-cell timeouts, GPU scheduling on Ray (``num_gpus``),
and continuing an interrupted notebook cell (it starts over).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from workbench.errors import WorkbenchError

if TYPE_CHECKING:  # polars and torch are imported lazily: a worker sets its thread limits first
    import polars as pl

    from workbench.config import RunConfig

CELL_FILE = "sweep_cell.json"
SPEC_FILE = "sweep.json"
MERGED_FILE = "sweep.parquet"
RUNS_FILE = "sweep_runs.parquet"
CELL_COLUMNS = ("run", "status", "error")
_RESERVED = {"out_dir", "run_name", "threads"}  # the sweep sets these per cell / per worker


# ------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One point of the grid: its values, seed, run folder and what the worker executes."""

    index: int
    values: dict[str, Any]  # grid key -> value (dotted keys kept dotted)
    seed: int
    name: str
    run_dir: Path
    spec: dict[str, Any]  # {"mode": "run", "config": {...}} or {"mode": "notebook", ...}
    status: str = "pending"  # pending | ok | failed
    error: str | None = None
    seconds: float | None = None
    resumed: bool = False
    files: dict[str, bytes] = field(default_factory=dict, repr=False)


def split_values(text: str) -> list[str]:
    """Split ``a,b,[1,2],"x,y"`` at top-level commas (brackets, braces and quotes are respected)."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["staleness=0,4", "objective=m2po,is"]`` -> ``{"staleness": [0, 4], "objective": ["m2po", "is"]}``.

    Each value is read as JSON when it parses (numbers, true/false, lists, dicts), else as a string.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise WorkbenchError(f"--grid {item!r} is invalid: expected KEY=V1,V2,...")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in grid:
            raise WorkbenchError(f"--grid {key!r} is given twice: give all its values in one --grid {key}=V1,V2")
        vals = [v for v in split_values(text)]
        if not text.strip() or any(v == "" for v in vals):
            raise WorkbenchError(f"--grid {item!r} is invalid: expected KEY=V1,V2,... with no empty value")
        grid[key] = [_parse_value(v) for v in vals]
    return grid


def parse_seeds(text: str | None) -> int | list[int] | None:
    """``"3"`` -> 3 (three seeds); ``"0,5,7"`` -> [0, 5, 7]."""
    if text is None:
        return None
    parts = split_values(text)
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise WorkbenchError(f"--seeds {text!r} is invalid: expected a count (3) or a list of seeds (0,5,7)") from None
    return nums[0] if len(parts) == 1 else nums


def _seed_list(base_seed: int, seeds: int | list[int] | None, grid: dict[str, list[Any]]) -> list[int]:
    if seeds is None:
        return [base_seed]
    if "seed" in grid:
        raise WorkbenchError("grid key 'seed' and seeds= are both given: use one of them")
    if isinstance(seeds, bool):
        raise WorkbenchError(f"seeds={seeds!r} is invalid: expected an int >= 1 or a list of ints >= 0")
    if isinstance(seeds, int):
        if seeds < 1:
            raise WorkbenchError(f"seeds={seeds!r} is invalid: expected an int >= 1 or a list of ints >= 0")
        return [base_seed + i for i in range(seeds)]
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise WorkbenchError(f"seeds={seeds!r} is invalid: expected an int >= 1 or a list of ints >= 0")
    if len(set(seeds)) != len(seeds):
        raise WorkbenchError(f"seeds={seeds!r} is invalid: a seed is repeated")
    return seeds


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _short_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(_canon(obj).encode()).hexdigest()[:n]


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))


def cell_name(values: dict[str, Any], seed: int | None) -> str:
    """A readable, filesystem-safe folder name: ``staleness=4__objective=m2po__seed=0``."""
    parts = [f"{k}={_value_text(v)}" for k, v in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    raw = "__".join(parts) or "base"
    safe = re.sub(r"[^A-Za-z0-9._=+\-]", "_", raw)
    if safe != raw or len(safe) > 120:
        safe = f"{safe[:100]}-{_short_hash([values, seed], 8)}"
    return safe


def _validate_keys(grid: dict[str, list[Any]], notebook_params: dict[str, Any] | None) -> None:
    import dataclasses

    from workbench.config import RunConfig

    if not isinstance(grid, dict):
        raise WorkbenchError(f"grid={grid!r} is invalid: expected a dict of key -> list of values")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    dict_fields = sorted(n for n, f in fields.items() if f.default_factory is dict)  # type: ignore[comparison-overlap]
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise WorkbenchError(f"grid {key}={values!r} is invalid: expected a non-empty list of values")
        if len({_canon(v) for v in values}) != len(values):
            raise WorkbenchError(f"grid {key}={list(values)!r} is invalid: a value is repeated")
        head = key.split(".", 1)[0]
        if head in _RESERVED:
            raise WorkbenchError(f"grid key {key!r} is invalid: the sweep sets {head} itself")
        if notebook_params is not None:
            if head not in notebook_params:
                raise WorkbenchError(f"grid key {key!r} is invalid: the notebook declares no parameter {head!r} "
                                     f"(parameters: {', '.join(notebook_params)})")
            continue
        if "." in key:
            if head not in dict_fields or not key.split(".", 1)[1]:
                raise WorkbenchError(f"grid key {key!r} is invalid: a dotted key must be FIELD.KEY of a dict field "
                                     f"({', '.join(dict_fields)})")
        elif key not in fields:
            raise WorkbenchError(f"grid key {key!r} is invalid: expected a RunConfig field "
                                 f"({', '.join(sorted(fields))}) or FIELD.KEY of a dict field")


def _apply(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Grid values over a dict of fields: plain keys replace, dotted keys merge into dict fields."""
    out = dict(base)
    for k, v in values.items():
        if "." not in k:
            out[k] = v
    for k, v in values.items():
        if "." in k:
            head, sub = k.split(".", 1)
            cur = out.get(head) or {}
            if not isinstance(cur, dict):
                raise WorkbenchError(f"grid key {k!r} is invalid: {head} is not a dict in this cell ({cur!r})")
            out[head] = {**cur, sub: v}
    return out


def _cell_config(base: "RunConfig", values: dict[str, Any], seed: int, runs_dir: Path, name: str) -> "RunConfig":
    from workbench.config import RunConfig
    from workbench.steps.reweight import OBJECTIVES, validate_params

    d = base.to_dict()
    new_obj = values.get("objective", base.objective)
    if new_obj != base.objective and "objective_params" not in values:
        OBJECTIVES.entry(new_obj)  # unknown objective: the registry's one-line error
        defaults = validate_params(base.objective, {})
        accepted = {p.name for p in OBJECTIVES.meta(new_obj).get("params", [])}
        d["objective_params"] = {k: v for k, v in base.objective_params.items()
                                 if k in accepted and v != defaults.get(k)}
    d = _apply(d, values)
    d.update(seed=seed, out_dir=str(runs_dir), run_name=name)
    return RunConfig.from_dict(d)


def _describe(values: dict[str, Any], seed: int) -> str:
    return ", ".join([f"{k}={_value_text(v)}" for k, v in values.items()] + [f"seed={seed}"])


def _notebook_params(notebook: str | Path) -> tuple[Path, dict[str, Any]]:
    try:
        from workbench.notebook import find_notebook
    except ImportError as e:  # pragma: no cover - notebook support not installed
        raise WorkbenchError(f"notebook={str(notebook)!r}: headless notebooks are unavailable ({e})") from None
    try:
        import papermill as pm
    except ImportError:
        raise WorkbenchError(f"notebook={str(notebook)!r}: papermill is not installed "
                             "(pip install 'workbench[notebooks]')") from None
    path = find_notebook(notebook)
    declared = {p["name"]: p for p in pm.inspect_notebook(str(path)).values()}
    for need in ("out_dir", "run_name"):
        if need not in declared:
            raise WorkbenchError(f"notebook={str(notebook)!r} is invalid: it declares no {need!r} parameter, "
                                 "so a sweep cannot place its run")
    return path, declared


def build_cells(base: "RunConfig", grid: dict[str, list[Any]], seeds: int | list[int] | None, sweep_dir: Path,
                notebook: str | Path | None = None, params_file: str | Path | None = None) -> list[Cell]:
    """Every cell of the grid, validated (raises a one-line WorkbenchError on the first bad cell)."""
    from workbench.config import RunConfig

    grid = {k: list(v) for k, v in grid.items()}
    declared = None
    nb_path = None
    if notebook is not None:
        nb_path, declared = _notebook_params(notebook)
    elif params_file is not None:
        raise WorkbenchError("params_file is only read with notebook=")
    _validate_keys(grid, declared)
    seed_list = _seed_list(base.seed, seeds, grid)
    runs_dir = sweep_dir / "runs"
    keys = list(grid)
    cells: list[Cell] = []
    base_nb: dict[str, Any] = {}
    if declared is not None:
        default = RunConfig().to_dict()
        for k, v in base.to_dict().items():
            if k in _RESERVED or k == "seed" or v == default[k]:
                continue
            if k not in declared:
                raise WorkbenchError(f"base config {k}={v!r} cannot be passed: the notebook declares no "
                                     f"parameter {k!r}")
            base_nb[k] = v
        if "seed" not in declared and (len(seed_list) > 1 or seed_list[0] != 0):
            raise WorkbenchError("seeds cannot be passed: the notebook declares no parameter 'seed'")
        if params_file is not None:
            from workbench.notebook import load_params_file

            assert nb_path is not None
            base_nb = {**load_params_file(params_file, nb_path.stem, declared), **base_nb}
            unknown = sorted(set(base_nb) - set(declared))
            if unknown:
                raise WorkbenchError(f"params_file={str(params_file)!r}: the notebook declares no parameter "
                                     f"{unknown[0]!r}")
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        for seed in seed_list:
            seed_col = None if "seed" in values else seed
            seed = values.get("seed", seed)
            name = cell_name(values, seed_col)
            where = f"sweep cell {_describe(values, seed)}"
            if declared is None:
                try:
                    cfg = _cell_config(base, values, seed, runs_dir, name)
                except WorkbenchError as e:
                    raise WorkbenchError(f"{where}: {e}") from None
                except (TypeError, ValueError) as e:
                    raise WorkbenchError(f"{where}: {type(e).__name__}: {_first_line(e)}") from None
                spec = {"mode": "run", "config": cfg.to_dict()}
            else:
                params = _apply(base_nb, values)
                if "seed" in declared:
                    params["seed"] = seed
                params.update(out_dir=str(runs_dir), run_name=name)
                spec = {"mode": "notebook", "notebook": str(nb_path), "parameters": params}
            cells.append(Cell(len(cells), values, seed, name, runs_dir / name, json.loads(_canon(spec))))
    if len({c.name for c in cells}) != len(cells):
        raise WorkbenchError("grid gives two cells the same folder name: make the values distinct")
    if declared is None:
        _check_inputs(cells)
    return cells


def _check_inputs(cells: list[Cell]) -> None:
    """Build every distinct task once and check every model folder exists (before anything runs)."""
    from workbench.tasks import make_task

    seen: set[str] = set()
    for c in cells:
        cfg = c.spec["config"]
        if cfg["model"] != "builtin" and not Path(cfg["model"]).expanduser().is_dir():
            raise WorkbenchError(f"sweep cell {_describe(c.values, c.seed)}: model={cfg['model']!r} is invalid: "
                                 "expected 'builtin' or a local checkpoint folder")
        key = _canon([cfg["task"], cfg["task_params"]])
        if key in seen:
            continue
        seen.add(key)
        try:
            make_task(cfg["task"], **cfg["task_params"])
        except WorkbenchError as e:
            raise WorkbenchError(f"sweep cell {_describe(c.values, c.seed)}: {e}") from None
        except (TypeError, ValueError, OSError) as e:
            raise WorkbenchError(f"sweep cell {_describe(c.values, c.seed)}: task {cfg['task']!r}: "
                                 f"{type(e).__name__}: {_first_line(e)}") from None


def is_complete(cell: Cell) -> bool:
    """summary.json exists and sweep_cell.json records exactly this cell's spec."""
    marker = cell.run_dir / CELL_FILE
    if not (cell.run_dir / "summary.json").is_file() or not marker.is_file():
        return False
    try:
        return _canon(json.loads(marker.read_text()).get("spec")) == _canon(cell.spec)
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------- worker side
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _one_line(e: BaseException) -> str:
    if isinstance(e, WorkbenchError):
        return _first_line(e) or type(e).__name__
    msg = _first_line(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def limit_threads(threads: int) -> None:
    """Thread limits for a worker: env vars first (read when torch/polars load), then torch's pool."""
    t = str(int(threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "POLARS_MAX_THREADS"):
        os.environ[var] = t
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started in this process
        pass


def _init_worker(threads: int) -> None:
    """Pool initializer: thread limits, then the imports every cell needs (paid once per worker)."""
    limit_threads(threads)
    try:
        import workbench.loop  # noqa: F401
    except Exception:  # noqa: BLE001 - the cell reports the import error itself
        pass


def warm_locked(config: "RunConfig", log: Callable[[str], None] = lambda s: None) -> None:
    """Build (or find) the built-in model's cached warm start under a file lock on its cache entry."""
    if config.model != "builtin":
        return
    from filelock import FileLock

    from workbench.policy.build import build_task
    from workbench.policy.model import ModelConfig
    from workbench.policy.warm_start import SFTConfig, cache_key, cache_root, warm_start

    task = build_task(config)
    mcfg, scfg = ModelConfig(**config.model_params), SFTConfig(**config.sft_params)
    lock_dir = cache_root() / "warm_start"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f".{cache_key(task, mcfg, scfg)}.lock")):
        warm_start(task, mcfg, scfg, log=log)


def _continue_run(cfg: "RunConfig", run_dir: Path):
    """The interrupted run of this cell, reopened at its latest checkpoint, or None (start over).

    Only when the folder's ``config.json`` is exactly this cell's config and a complete checkpoint
    exists (``checkpoint_every`` > 0 writes them during the run); resuming is exact, so the merged
    metrics are those of an uninterrupted run. An unreadable checkpoint means starting over.
    """
    from workbench.config import RunConfig
    from workbench.loop import Run
    from workbench.runs.rundir import RunDir

    try:
        if RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())) != cfg:
            return None
        if RunDir(run_dir).latest_checkpoint() is None:
            return None
        return Run.resume(run_dir, log=lambda s: None)
    except Exception:  # noqa: BLE001 - no folder, another config, a torn checkpoint: start over
        return None


def _execute(spec: dict[str, Any], run_dir: Path) -> int | None:
    """Run the cell; returns the update a run continued from (None when it started from scratch)."""
    if spec["mode"] == "run":
        from workbench.config import RunConfig
        from workbench.loop import Run

        cfg = RunConfig.from_dict(spec["config"])
        warm_locked(cfg)
        run = _continue_run(cfg, run_dir)
        continued = run.version if run is not None else None
        run = run if run is not None else Run(cfg, log=lambda s: None)
        run.run(progress=False)
        run.write_summary()
        return continued
    elif spec["mode"] == "notebook":
        try:
            from workbench.notebook import run_notebook
        except ImportError as e:  # pragma: no cover
            raise WorkbenchError(f"headless notebooks are unavailable: {e}") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        run_notebook(spec["notebook"], parameters=spec["parameters"], output=run_dir / "notebook.ipynb")
        return None
    else:  # pragma: no cover
        raise WorkbenchError(f"sweep cell mode={spec['mode']!r} is invalid: expected run | notebook")


def run_cell(spec: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Execute one cell in this process; never raises for a failing run (the error is returned)."""
    from workbench.runs.rundir import atomic_write_text

    if threads:
        limit_threads(threads)
    t0 = time.perf_counter()
    path = Path(run_dir)
    try:
        continued = _execute(spec, path)
        seconds = time.perf_counter() - t0
        atomic_write_text(path / CELL_FILE, json.dumps({"spec": spec, "seconds": seconds, "threads": threads,
                                                        "continued_from": continued}, indent=2, sort_keys=True))
        return {"status": "ok", "error": None, "seconds": seconds, "continued_from": continued}
    except Exception as e:  # noqa: BLE001 - a failing cell is reported, the sweep goes on
        tb = traceback.format_exc()
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "sweep_error.txt").write_text(tb)
        except OSError:
            pass
        return {"status": "failed", "error": _one_line(e), "seconds": time.perf_counter() - t0}


_RETURNED_FILES = ("config.json", "metrics.parquet", "summary.json", "knob_events.jsonl", CELL_FILE,
                   "sweep_error.txt", "notebook.ipynb")


def _ray_task(spec: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    """A Ray task: run the cell, return its result and the run's small files (bytes) to the driver."""
    out = run_cell(spec, run_dir, threads)
    files = {}
    for name in _RETURNED_FILES:
        p = Path(run_dir) / name
        if p.is_file():
            files[name] = p.read_bytes()
    out["files"] = files
    return out


# ------------------------------------------------------------------------------- driver side
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_name(base: "RunConfig", grid: dict[str, list[Any]], seeds: Any, notebook: Any) -> str:
    d = {k: v for k, v in base.to_dict().items() if k not in _RESERVED}
    return "sweep-" + _short_hash({"base": d, "grid": grid, "seeds": seeds,
                                   "notebook": str(notebook) if notebook else None})


def sweep(base: "RunConfig", grid: dict[str, list[Any]], seeds: int | list[int] | None = None, *,
          notebook: str | Path | None = None, params_file: str | Path | None = None,
          ray: str | None = None, workers: int | None = None,
          threads_per_run: int | None = None, name: str | None = None, sweep_dir: str | Path | None = None,
          progress: bool = True, log: Callable[[str], None] = print) -> "pl.DataFrame":
    """Run every cell of ``grid`` x ``seeds`` over ``base``; returns the merged ``sweep.parquet``.

    ``seeds``: an int n (seeds ``base.seed .. base.seed + n - 1``), a list of seeds, or None (just
    ``base.seed``). ``notebook``: run each cell as a headless notebook instead of ``Run``
    (``params_file``: a YAML of notebook parameters under the cell's, as ``run_notebook``). ``ray``:
    ``"local"``, ``"auto"`` or a cluster address (None = local process pool). ``workers``: parallel
    cells (default: usable cores // threads_per_run on the pool, unlimited on Ray; 0 = in this
    process, serially). ``threads_per_run``: torch threads per cell (default ``base.threads`` or 1).
    ``sweep_dir`` (default ``<base.out_dir or "runs">/<name>``) holds everything (module docstring).
    """
    from workbench.runs.rundir import atomic_write_text

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
    name = name or default_name(base, grid, seeds, [str(notebook), str(params_file)] if notebook else None)
    if not re.fullmatch(r"[A-Za-z0-9._=+\-]+", name):
        raise WorkbenchError(f"name={name!r} is invalid: expected letters, digits and ._=+-")
    root = Path(sweep_dir) if sweep_dir is not None else Path(base.out_dir or "runs") / name
    cells = build_cells(base, grid, seeds, root.resolve(), notebook, params_file)

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / SPEC_FILE, json.dumps(
        {"name": name, "base": base.to_dict(), "grid": grid, "seeds": seeds,
         "notebook": str(notebook) if notebook else None, "params_file": str(params_file) if params_file else None,
         "cells": [c.name for c in cells]},
        indent=2, sort_keys=True, default=str))
    todo = []
    for c in cells:
        if is_complete(c):
            c.status, c.resumed = "ok", True
        else:
            todo.append(c)
    done = len(cells) - len(todo)
    engine = "ray" if ray is not None else ("this process" if workers == 0 else "local pool")
    log(f"sweep {root}: {len(cells)} runs, {done} already complete, {len(todo)} to run on {engine}")

    if todo and notebook is None:
        for c, cfg in _distinct_warm_starts(todo):
            try:
                warm_locked(cfg, log=log)  # once, here, before any worker could race on the cache entry
            except Exception as e:  # noqa: BLE001 - bad model/sft params: one line naming the cell
                raise WorkbenchError(f"sweep cell {_describe(c.values, c.seed)}: warm start of the built-in "
                                     f"model failed: {_one_line(e)}") from None

    bar = _bar(len(cells), done, progress)
    try:
        if not todo:
            pass
        elif ray is not None:
            _run_ray(todo, ray, workers, threads_per_run, bar, log)
        elif workers == 0:
            for c in todo:
                _finish(c, run_cell(c.spec, str(c.run_dir), None), bar, log)
        else:
            n = min(workers or max(1, usable_cores() // threads_per_run), len(todo))
            _run_pool(todo, n, threads_per_run, bar, log)
    finally:
        if bar is not None:
            bar.close()

    merged = merge(cells, list(grid), "seed" not in grid)
    _write(root, merged, cells, list(grid), "seed" not in grid)
    failed = [c for c in cells if c.status != "ok"]
    log(f"sweep {root}: {len(cells) - len(failed)} ok, {len(failed)} failed, {done} resumed -> "
        f"{root / MERGED_FILE}")
    return merged


def _distinct_warm_starts(cells: list[Cell]) -> list[tuple[Cell, "RunConfig"]]:
    from workbench.config import RunConfig

    seen, out = set(), []
    for c in cells:
        cfg = c.spec["config"]
        if cfg["model"] != "builtin":
            continue
        key = _canon([cfg["task"], cfg["task_params"], cfg["model_params"], cfg["sft_params"]])
        if key not in seen:
            seen.add(key)
            out.append((c, RunConfig.from_dict(cfg)))
    return out


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="run", desc="sweep")


def _finish(cell: Cell, result: dict[str, Any], bar, log: Callable[[str], None]) -> None:
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
    if bar is not None:
        bar.update(1)


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


def _run_pool(cells: list[Cell], workers: int, threads: int, bar, log: Callable[[str], None]) -> None:
    """Spawned worker processes; a dead worker breaks the pool: rebuild it, resubmit unfinished cells once.

    When every result is in, the pool is shut down without waiting for the workers' interpreters to
    tear down (results are already written; the processes exit on their own)."""
    import multiprocessing as mp

    pending = list(cells)
    attempts = {c.index: 0 for c in cells}
    while pending:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads,))
        broken: list[Cell] = []
        try:
            futures = {pool.submit(run_cell, c.spec, str(c.run_dir), threads): c for c in pending}
            for c in pending:
                attempts[c.index] += 1
            for fut in as_completed(futures):
                c = futures[fut]
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken.append(c)
                    continue
                _finish(c, result, bar, log)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=bool(broken))
        pending = [c for c in broken if attempts[c.index] < 2]
        for c in broken:
            if attempts[c.index] >= 2:
                _finish(c, {"status": "failed", "error": "worker process died twice (BrokenProcessPool: out of "
                            "memory, a crash, or a script without an if __name__ == '__main__' guard)"}, bar, log)
        if pending:
            log(f"a worker process died: restarting the pool for {len(pending)} unfinished runs")


def _run_ray(cells: list[Cell], address: str, workers: int | None, threads: int, bar,
             log: Callable[[str], None]) -> None:
    try:
        import ray as ray_mod
    except ImportError:
        raise WorkbenchError("ray is not installed: pip install 'workbench[ray]'") from None
    started = False
    if not ray_mod.is_initialized():
        started = True
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
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
               "POLARS_MAX_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        task = ray_mod.remote(_ray_task).options(num_cpus=threads, runtime_env={"env_vars": env})
        queue = list(cells)
        inflight: dict[Any, Cell] = {}
        limit = workers or len(cells)
        while queue or inflight:
            while queue and len(inflight) < limit:
                c = queue.pop(0)
                inflight[task.remote(c.spec, str(c.run_dir), threads)] = c
            ready, _ = ray_mod.wait(list(inflight), num_returns=1)
            for ref in ready:
                c = inflight.pop(ref)
                try:
                    result = ray_mod.get(ref)
                except Exception as e:  # noqa: BLE001 - worker crash, lost node: report, go on
                    result = {"status": "failed", "error": _one_line(e)}
                _finish(c, result, bar, log)
    finally:
        if started:
            ray_mod.shutdown()


# ------------------------------------------------------------------------------- merging
def _lit(name: str, v: Any):
    import polars as pl

    if v is None:
        return pl.lit(None, dtype=pl.String).alias(name)
    if isinstance(v, bool):
        return pl.lit(v, dtype=pl.Boolean).alias(name)
    if isinstance(v, int):
        return pl.lit(v, dtype=pl.Int64).alias(name)
    if isinstance(v, float):
        return pl.lit(v, dtype=pl.Float64).alias(name)
    return pl.lit(_value_text(v), dtype=pl.String).alias(name)


def _cell_columns(c: Cell, keys: list[str], with_seed: bool) -> list:
    cols = [_lit("run", c.name), _lit("status", c.status), _lit("error", c.error)]
    cols += [_lit(k, c.values[k]) for k in keys]
    if with_seed:
        cols.append(_lit("seed", c.seed))
    return cols


def _cell_rows(c: Cell) -> "pl.DataFrame":
    import polars as pl

    metrics = c.run_dir / "metrics.parquet"
    if metrics.is_file():
        try:
            df = pl.read_parquet(metrics)
            if df.height:
                return df
        except Exception:  # noqa: BLE001 - unreadable partial file of a failed cell: no rows
            pass
    summary = c.run_dir / "summary.json"
    if c.status == "ok" and summary.is_file():  # a notebook without a Run: one row of its summary
        s = json.loads(summary.read_text())
        return pl.DataFrame([{k: v for k, v in s.items() if isinstance(v, (int, float, str, bool))}])
    return pl.DataFrame({"update": [None]}, schema={"update": pl.Int64})


def merge(cells: list[Cell], keys: list[str], with_seed: bool = True) -> "pl.DataFrame":
    """Every cell's metrics rows with the cell's columns in front, in cell order."""
    import polars as pl

    frames = []
    front = list(CELL_COLUMNS) + keys + (["seed"] if with_seed else [])
    for c in cells:
        df = _cell_rows(c)
        df = df.drop([k for k in front if k in df.columns]).with_columns(_cell_columns(c, keys, with_seed))
        frames.append(df.select(front + [k for k in df.columns if k not in front]))
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="diagonal_relaxed")


def _runs_table(cells: list[Cell], keys: list[str], with_seed: bool) -> "pl.DataFrame":
    import polars as pl

    rows = []
    for c in cells:
        row: dict[str, Any] = {"run": c.name, "status": c.status, "error": c.error}
        row.update({k: (v if isinstance(v, (int, float, str, bool)) or v is None else _value_text(v))
                    for k, v in c.values.items()})
        if with_seed:
            row["seed"] = c.seed
        seconds, continued = c.seconds, None
        try:
            record = json.loads((c.run_dir / CELL_FILE).read_text()) if c.status == "ok" else {}
        except (OSError, json.JSONDecodeError):
            record = {}
        if c.resumed:
            seconds = record.get("seconds")
        continued = record.get("continued_from")
        row.update({"seconds": seconds, "resumed": c.resumed, "continued_from": continued,
                    "run_dir": str(c.run_dir)})
        summary = c.run_dir / "summary.json"
        if c.status == "ok" and summary.is_file():
            s = json.loads(summary.read_text())
            row.update({f"summary/{k}": v for k, v in s.items() if isinstance(v, (int, float)) or v is None})
        rows.append(row)
    return pl.from_dicts(rows, infer_schema_length=None)


def _write(root: Path, merged: "pl.DataFrame", cells: list[Cell], keys: list[str], with_seed: bool) -> None:
    from workbench.runs.rundir import atomic_write_parquet

    atomic_write_parquet(merged, root / MERGED_FILE)
    atomic_write_parquet(_runs_table(cells, keys, with_seed), root / RUNS_FILE)


def read_sweep(path: str | Path) -> "pl.DataFrame":
    """The merged metrics of a sweep folder (or of a ``sweep.parquet`` path)."""
    import polars as pl

    p = Path(path)
    p = p / MERGED_FILE if p.is_dir() else p
    if not p.is_file():
        raise WorkbenchError(f"path={str(path)!r} is invalid: expected a sweep folder holding {MERGED_FILE}")
    return pl.read_parquet(p)


# ------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    """The sweep-specific flags (the run flags are added by ``cli._add_config_flags``)."""
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a grid dimension: a RunConfig field (or FIELD.KEY of a dict field, e.g. "
                             "objective_params.tau=0.02,0.04, or a notebook parameter with --notebook) and its "
                             "values; repeat for more dimensions (cells are the cross product)")
    parser.add_argument("--seeds", default=None, metavar="N|S1,S2,...",
                        help="N seeds (base seed, +1, ...) or a list of seeds; each grid cell runs once per seed")
    parser.add_argument("--notebook", default=None, help="run each cell as a headless notebook (path, stem or number)")
    parser.add_argument("--params-file", default=None,
                        help="with --notebook: YAML of notebook parameters (all: + per notebook), under the cell's")
    parser.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                        help="run the cells as Ray tasks: auto (a running cluster, else a local instance), local, "
                             "or a cluster address (pip install 'workbench[ray]')")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel runs (default: usable cores // threads-per-run; 0 = one after another "
                             "in this process)")
    parser.add_argument("--threads-per-run", type=int, default=None, help="torch threads per run (default 1)")
    parser.add_argument("--name", default=None,
                        help="sweep folder name under --out-dir (default: sweep-<hash of the command>, so the "
                             "same command resumes the same sweep)")
    parser.add_argument("--config", help="a config.json to start the base config from (flags override it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cli_main(args) -> int:
    """``python -m workbench sweep``: returns the exit code (1 when a run failed)."""
    from workbench.cli import config_from_args

    base = config_from_args(args)
    grid = parse_grid(args.grid)
    seeds = parse_seeds(args.seeds)
    log = lambda s: print(s, flush=True)  # noqa: E731
    merged = sweep(base, grid, seeds, notebook=args.notebook, params_file=args.params_file, ray=args.ray,
                   workers=args.workers,
                   threads_per_run=args.threads_per_run, name=args.name, progress=not args.no_progress, log=log)
    failed = (merged.filter(merged["status"] != "ok")["run"].unique(maintain_order=True).to_list()
              if merged.height else [])
    for run in failed:
        err = merged.filter(merged["run"] == run)["error"][0]
        print(f"failed {run}: {err}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["Cell", "build_cells", "cell_name", "cli_main", "is_complete", "merge", "parse_grid", "parse_seeds",
           "read_sweep", "run_cell", "sweep", "usable_cores", "warm_locked"]
