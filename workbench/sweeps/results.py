"""A sweep's results: every cell's metrics rows merged into one parquet file, and one row per cell.

``sweep.parquet``: every run's metrics rows, with ``run``, ``status``, ``error``, one column per
grid key and ``seed`` in front, in cell order; a failed cell's partial rows, if any, appear with
``status == "failed"``; a notebook cell's rows come from the ``metrics.parquet`` its run wrote (or,
if none, one row of its summary). ``sweep_runs.parquet``: one row per cell: status, error,
seconds, whether it was skipped as complete (``resumed``), the update an interrupted run continued
from (``continued_from``), the run's summary.json values, and the uncertainty of its final held-out
accuracy (``summary/eval/final_accuracy``, the last evaluation; ``seed_intervals``):

- ``eval_n``: problems in one evaluation (the config's ``eval_size``, at most the task's held-out set;
  null for notebook cells); ``final_accuracy_wilson_lo`` / ``_hi``: the Wilson 95% interval of that
  one evaluation (``workbench.stats.wilson_interval``), its binomial noise alone;
- per grid point (the grid values without the seed), the same on every row of that point:
  ``seeds_ok`` (successful runs with a final accuracy), ``final_accuracy_mean`` and
  ``final_accuracy_ci_lo`` / ``_ci_hi``, the percentile-bootstrap 95% interval of the mean across
  seeds (``workbench.stats.bootstrap_ci``, seed 0; null with fewer than two seeds).

polars (and the run folder's writer) are imported inside the functions: this package never loads
them at module level, so a spawned worker can set its thread limits first (``workbench.sweeps.worker``);
``workbench.stats`` loads numpy only.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.stats import bootstrap_ci, wilson_interval
from workbench.sweeps.cells import CELL_FILE, MERGED_FILE, RUNS_FILE, Cell
from workbench.sweeps.grid import canon, value_text
from workbench.tasks import make_task

if TYPE_CHECKING:
    import polars as pl

CELL_COLUMNS = ("run", "status", "error")
FINAL = "summary/eval/final_accuracy"  # the run's last held-out evaluation (summary.json)
CONFIDENCE = 0.95
INTERVAL_COLUMNS = ("final_accuracy_wilson_lo", "final_accuracy_wilson_hi", "seeds_ok", "final_accuracy_mean",
                    "final_accuracy_ci_lo", "final_accuracy_ci_hi")


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
                    "run_dir": str(c.run_dir),
                    "eval_n": eval_problems(c.spec["config"]) if c.spec.get("mode") == "run" else None})
        summary = c.run_dir / "summary.json"
        if c.status == "ok" and summary.is_file():
            s = json.loads(summary.read_text())
            row.update({f"summary/{k}": v for k, v in s.items() if isinstance(v, (int, float)) or v is None})
        rows.append(row)
    runs = pl.from_dicts(rows, infer_schema_length=None).with_columns(pl.col("eval_n").cast(pl.Int64))
    return seed_intervals(runs, [k for k in keys if k != "seed"])


def eval_problems(config: dict[str, Any] | None) -> int | None:
    """Problems in one held-out evaluation of a run with ``config`` (``RunConfig.to_dict()``): its
    ``eval_size``, at most the size of the task's held-out set; None when the config does not say."""
    if not config or "eval_size" not in config or "task" not in config:
        return None
    held = _heldout_size(config["task"], canon(config.get("task_params") or {}))
    return None if held is None else min(int(config["eval_size"]), held)


@lru_cache(maxsize=64)
def _heldout_size(task: str, params: str) -> int | None:
    try:
        return len(make_task(task, **json.loads(params)).heldout)
    except (WorkbenchError, OSError, TypeError, ValueError):  # a task that cannot be built here: unknown
        return None


def seed_intervals(runs: "pl.DataFrame", keys: list[str], confidence: float = CONFIDENCE) -> "pl.DataFrame":
    """``runs`` (one row per cell: ``status``, the grid ``keys`` without ``seed``, ``eval_n``, ``FINAL``)
    with ``INTERVAL_COLUMNS`` added (module docstring); null where there is no value or no interval."""
    import polars as pl

    n = len(runs)
    finals = runs[FINAL].cast(pl.Float64).to_list() if FINAL in runs.columns else [None] * n
    sizes = runs["eval_n"].to_list() if "eval_n" in runs.columns else [None] * n
    ok = [s == "ok" and f is not None and math.isfinite(f) for s, f in zip(runs["status"].to_list(), finals)]
    wilson = [wilson_interval(f * m, m, confidence) if good and m else (None, None)
              for good, f, m in zip(ok, finals, sizes)]
    points = [tuple(canon(v) for v in values) for values in zip(*(runs[k].to_list() for k in keys))] if keys \
        else [()] * n
    by_point: dict[tuple, list[float]] = {}
    for point, good, f in zip(points, ok, finals):
        by_point.setdefault(point, []).extend([f] if good else [])
    summary = {p: (len(v), *bootstrap_ci(v, "mean", confidence)) if v else (0, None, None, None)
               for p, v in by_point.items()}

    def real(x):  # NaN (no interval) is stored as null
        return None if x is None or math.isnan(x) else float(x)

    cols = {"final_accuracy_wilson_lo": [real(w[0]) for w in wilson],
            "final_accuracy_wilson_hi": [real(w[1]) for w in wilson],
            "seeds_ok": [summary[p][0] for p in points],
            "final_accuracy_mean": [real(summary[p][1]) for p in points],
            "final_accuracy_ci_lo": [real(summary[p][2]) for p in points],
            "final_accuracy_ci_hi": [real(summary[p][3]) for p in points]}
    schema = {k: pl.Int64 if k == "seeds_ok" else pl.Float64 for k in cols}
    return runs.drop([c for c in cols if c in runs.columns]).hstack(pl.DataFrame(cols, schema=schema))
