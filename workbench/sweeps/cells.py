"""A sweep's cells: every grid point x seed, built and validated before anything runs.

Cells are the cross product of the grid values in the order given, with the seeds innermost. A
cell is either a run (``spec = {"mode": "run", "config": {...}}``) or, with ``notebook=``, a
headless notebook execution (``{"mode": "notebook", "notebook": path, "parameters": {...}}``).

**Run cells.** When a cell changes ``objective``, its ``objective_params`` start from that
objective's defaults (as when the objective knob is switched live); base parameters that differ
from the base objective's defaults are kept when the new objective has them. Every cell's config is
built and validated, every distinct task is built once, every model folder must exist: bad keys or
values are one-line ``WorkbenchError``\\ s naming the cell, and nothing has run.

**Notebook cells.** The parameters are the grid values, ``seed``, ``out_dir`` (the sweep's
``runs/``) and ``run_name`` (the cell), over the base config fields that differ from
``RunConfig``'s defaults, over ``params_file`` (papermill's flat YAML as for ``run_notebook``, e.g.
``notebooks/params/ci/05_prosperity_before_collapse.yaml``); each must be a declared notebook parameter.

**Complete.** A cell is complete when its ``summary.json`` exists and its ``sweep_cell.json``
(written last, by the worker, when the cell succeeded) records exactly the cell's spec.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.notebook import find_notebook, load_params_file
from workbench.sweeps.grid import (RESERVED, apply_values, canon, cell_name, describe, first_line, seed_list,
                                   validate_keys)
from workbench.tasks import make_task

CELL_FILE = "sweep_cell.json"  # in a cell's run folder: the spec it completed
SPEC_FILE = "sweep.json"  # in the sweep folder: the sweep's spec
MERGED_FILE = "sweep.parquet"  # every cell's metrics rows
RUNS_FILE = "sweep_runs.parquet"  # one row per cell


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


def build_cells(base: RunConfig, grid: dict[str, list[Any]], seeds: int | list[int] | None, sweep_dir: Path,
                notebook: str | Path | None = None, params_file: str | Path | None = None) -> list[Cell]:
    """Every cell of the grid, validated (raises a one-line WorkbenchError on the first bad cell)."""
    grid = {k: list(v) for k, v in grid.items()}
    declared = nb_path = None
    if notebook is not None:
        nb_path, declared = _notebook_params(notebook)
    elif params_file is not None:
        raise WorkbenchError("params_file is only read with notebook=")
    validate_keys(grid, declared)
    seeds_ = seed_list(base.seed, seeds, grid)
    runs_dir = sweep_dir / "runs"
    keys = list(grid)
    base_nb = _notebook_base(base, declared, nb_path, seeds_, params_file) if declared is not None else {}
    cells: list[Cell] = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        for seed in seeds_:
            seed_col = None if "seed" in values else seed
            seed = values.get("seed", seed)
            name = cell_name(values, seed_col)
            if declared is None:
                spec = {"mode": "run", "config": _run_config(base, values, seed, runs_dir, name).to_dict()}
            else:
                params = apply_values(base_nb, values)
                if "seed" in declared:
                    params["seed"] = seed
                params.update(out_dir=str(runs_dir), run_name=name)
                spec = {"mode": "notebook", "notebook": str(nb_path), "parameters": params}
            cells.append(Cell(len(cells), values, seed, name, runs_dir / name, json.loads(canon(spec))))
    if len({c.name for c in cells}) != len(cells):
        raise WorkbenchError("grid gives two cells the same folder name: make the values distinct")
    if declared is None:
        _check_inputs(cells)
    return cells


def is_complete(cell: Cell) -> bool:
    """summary.json exists and sweep_cell.json records exactly this cell's spec."""
    marker = cell.run_dir / CELL_FILE
    if not (cell.run_dir / "summary.json").is_file() or not marker.is_file():
        return False
    try:
        return canon(json.loads(marker.read_text()).get("spec")) == canon(cell.spec)
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------------- run cells
def _run_config(base: RunConfig, values: dict[str, Any], seed: int, runs_dir: Path, name: str) -> RunConfig:
    """The cell's validated config; any error names the cell."""
    where = f"sweep cell {describe(values, seed)}"
    try:
        return _cell_config(base, values, seed, runs_dir, name)
    except WorkbenchError as e:
        raise WorkbenchError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise WorkbenchError(f"{where}: {type(e).__name__}: {first_line(e)}") from None


def _cell_config(base: RunConfig, values: dict[str, Any], seed: int, runs_dir: Path, name: str) -> RunConfig:
    # the objective registry loads torch: imported when a cell is built, never when a worker imports this
    # module (a worker sets its thread limits before torch loads)
    from workbench.steps.reweight import OBJECTIVES, validate_params

    d = base.to_dict()
    new_obj = values.get("objective", base.objective)
    if new_obj != base.objective and "objective_params" not in values:
        OBJECTIVES.entry(new_obj)  # unknown objective: the registry's one-line error
        defaults = validate_params(base.objective, {})
        accepted = {p.name for p in OBJECTIVES.meta(new_obj).get("params", [])}
        d["objective_params"] = {k: v for k, v in base.objective_params.items()
                                 if k in accepted and v != defaults.get(k)}
    d = apply_values(d, values)
    d.update(seed=seed, out_dir=str(runs_dir), run_name=name)
    return RunConfig.from_dict(d)


def _check_inputs(cells: list[Cell]) -> None:
    """Build every distinct task once and check every model folder exists (before anything runs)."""
    seen: set[str] = set()
    for c in cells:
        cfg = c.spec["config"]
        if cfg["model"] != "builtin" and not Path(cfg["model"]).expanduser().is_dir():
            raise WorkbenchError(f"sweep cell {describe(c.values, c.seed)}: model={cfg['model']!r} is invalid: "
                                 "expected 'builtin' or a local checkpoint folder")
        key = canon([cfg["task"], cfg["task_params"]])
        if key in seen:
            continue
        seen.add(key)
        try:
            make_task(cfg["task"], **cfg["task_params"])
        except WorkbenchError as e:
            raise WorkbenchError(f"sweep cell {describe(c.values, c.seed)}: {e}") from None
        except (TypeError, ValueError, OSError) as e:
            raise WorkbenchError(f"sweep cell {describe(c.values, c.seed)}: task {cfg['task']!r}: "
                                 f"{type(e).__name__}: {first_line(e)}") from None


# ------------------------------------------------------------------------------ notebook cells
def _notebook_params(notebook: str | Path) -> tuple[Path, dict[str, Any]]:
    """The notebook's path and its declared parameters; it must declare ``out_dir`` and ``run_name``."""
    try:
        import papermill as pm  # an optional extra: only notebook sweeps need it
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


def _notebook_base(base: RunConfig, declared: dict[str, Any], nb_path: Path, seeds: list[int],
                   params_file: str | Path | None) -> dict[str, Any]:
    """Every cell's notebook parameters before its grid values: the params file, under the base config's
    non-default fields; each must be declared by the notebook."""
    base_nb: dict[str, Any] = {}
    default = RunConfig().to_dict()
    for k, v in base.to_dict().items():
        if k in RESERVED or k == "seed" or v == default[k]:
            continue
        if k not in declared:
            raise WorkbenchError(f"base config {k}={v!r} cannot be passed: the notebook declares no "
                                 f"parameter {k!r}")
        base_nb[k] = v
    if "seed" not in declared and (len(seeds) > 1 or seeds[0] != 0):
        raise WorkbenchError("seeds cannot be passed: the notebook declares no parameter 'seed'")
    if params_file is not None:
        base_nb = {**load_params_file(params_file, nb_path.stem, declared), **base_nb}
        unknown = sorted(set(base_nb) - set(declared))
        if unknown:
            raise WorkbenchError(f"params_file={str(params_file)!r}: the notebook declares no parameter "
                                 f"{unknown[0]!r}")
    return base_nb
