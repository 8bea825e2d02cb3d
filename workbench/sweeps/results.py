"""A sweep's results: every cell's metrics rows merged into one parquet file, and one row per cell.

``sweep.parquet``: every run's metrics rows, with ``run``, ``status``, ``error``, one column per
grid key and ``seed`` in front, in cell order; a failed cell's partial rows, if any, appear with
``status == "failed"``; a notebook cell's rows come from the ``metrics.parquet`` its run wrote (or,
if none, one row of its summary). ``sweep_runs.parquet``: one row per cell: status, error,
seconds, whether it was skipped as complete (``resumed``), the update an interrupted run continued
from (``continued_from``), and the run's summary.json values.

polars (and the run folder's writer) are imported inside the functions: this package never loads
them at module level, so a spawned worker can set its thread limits first (``workbench.sweeps.worker``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.sweeps.cells import CELL_FILE, MERGED_FILE, RUNS_FILE, Cell
from workbench.sweeps.grid import value_text

if TYPE_CHECKING:
    import polars as pl

CELL_COLUMNS = ("run", "status", "error")


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


def write_results(root: Path, merged: "pl.DataFrame", cells: list[Cell], keys: list[str], with_seed: bool) -> None:
    """``sweep.parquet`` and ``sweep_runs.parquet`` into the sweep folder (atomically)."""
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
    return pl.lit(value_text(v), dtype=pl.String).alias(name)


def _cell_columns(c: Cell, keys: list[str], with_seed: bool) -> list:
    cols = [_lit("run", c.name), _lit("status", c.status), _lit("error", c.error)]
    cols += [_lit(k, c.values[k]) for k in keys]
    if with_seed:
        cols.append(_lit("seed", c.seed))
    return cols


def _cell_rows(c: Cell) -> "pl.DataFrame":
    import polars as pl

    from workbench.runs.metrics import read_metrics

    if c.run_dir.is_dir():
        try:
            df = read_metrics(c.run_dir)
            if df.height:
                return df
        except Exception:  # noqa: BLE001 - unreadable partial file of a failed cell: no rows
            pass
    summary = c.run_dir / "summary.json"
    if c.status == "ok" and summary.is_file():  # a notebook without a Run: one row of its summary
        s = json.loads(summary.read_text())
        return pl.DataFrame([{k: v for k, v in s.items() if isinstance(v, (int, float, str, bool))}])
    return pl.DataFrame({"update": [None]}, schema={"update": pl.Int64})


def _runs_table(cells: list[Cell], keys: list[str], with_seed: bool) -> "pl.DataFrame":
    import polars as pl

    rows = []
    for c in cells:
        row: dict[str, Any] = {"run": c.name, "status": c.status, "error": c.error}
        row.update({k: (v if isinstance(v, (int, float, str, bool)) or v is None else value_text(v))
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
