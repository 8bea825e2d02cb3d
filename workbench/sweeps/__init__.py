"""Sweeps: a grid of runs (or headless notebook executions) on a local process pool or on Ray.

    from workbench.sweeps import sweep
    df = sweep(RunConfig(steps=100), {"staleness": [0, 16, 256], "objective": ["ppo_clip", "m2po"]}, seeds=3)

    python -m workbench sweep --grid staleness=0,4,16,64,256 --grid objective=ppo_clip,is,m2po,topr,cispo \\
        --seeds 3 [--notebook notebooks/<name>.ipynb] [--ray auto|local|ADDRESS [--gpus-per-run G]] [--workers N] [--threads-per-run T] \\
        [any run flag: the base config]

One module per concern, each documenting its part:

    grid      grid and seed text -> values, key checks, cell folder names
    cells     the cells (run or notebook), validated before anything runs; when a cell is complete
    worker    one cell executed in a worker: thread limits, resuming from a checkpoint, warm starts
    backends  in this process, the local process pool, Ray
    results   sweep.parquet (every run's metrics rows) and sweep_runs.parquet (one row per cell)
    driver    ``sweep``: the folder layout, resuming, failures, determinism

The command line (``python -m workbench sweep``) is ``workbench.cli.sweep``.

Left out: retries of cells that raised, per-cell timeouts, GPU scheduling on the local pool,
and continuing an interrupted notebook cell (it starts over).
"""

from __future__ import annotations

from workbench.sweeps.backends import usable_cores
from workbench.sweeps.cells import CELL_FILE, MERGED_FILE, RUNS_FILE, SPEC_FILE, Cell, build_cells, is_complete
from workbench.sweeps.driver import SweepStopped, default_name, sweep
from workbench.sweeps.grid import cell_name, parse_grid, parse_seeds, parse_value, split_values
from workbench.sweeps.results import merge, read_sweep
from workbench.sweeps.worker import limit_threads, run_cell, warm_locked

__all__ = ["CELL_FILE", "Cell", "MERGED_FILE", "RUNS_FILE", "SPEC_FILE", "SweepStopped", "build_cells", "cell_name", "default_name",
           "is_complete", "limit_threads", "merge", "parse_grid", "parse_seeds", "parse_value", "read_sweep",
           "run_cell", "split_values", "sweep", "usable_cores", "warm_locked"]
