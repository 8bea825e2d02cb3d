"""Bookkeeping of the prosperity sweeps' folders: how many seeds each records, and their wall time.

The report's two sweeps (``workbench.studies.prosperity.run_sweeps``) live in
``<out_dir>/<prefix>-onpolicy`` and ``<out_dir>/<prefix>-stale``. A named size's prefix does not
depend on its seed count (``prosperity`` for the ``cpu`` size), so a folder made with two seeds
is the folder a three-seed run resumes. Resuming reuses the complete runs whose config is
unchanged (``workbench.sweeps.cells.is_complete``: a run is reused only when its recorded spec is
exactly the new one) and runs the rest, and the merged results hold exactly the seeds asked for.
What must not happen silently is a report from a folder whose seed count differs from the size's,
or from two folders that disagree: ``seed_change`` says so before a run, ``check_seed_counts``
refuses two folders that disagree, and the report states the seed count it was made from.

Wall time. A sweep folder records its runs' seconds (``sweep_runs.parquet``), not how long the
sweep took; ``record_wall`` appends the wall time of each ``run_sweeps`` call to
``<prefix>-stale/WALL_FILE`` and ``wall_seconds`` sums them (None for folders made before).

Left out: reconciling folders made by different versions of the code (the run configs decide).
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.runs.rundir import atomic_write_text
from workbench.sweeps import SPEC_FILE

WALL_FILE = "prosperity_wall.json"  # {"calls": [{"seconds": s}, ...]}: one entry per run_sweeps call
KINDS = ("onpolicy", "stale")


def recorded_seeds(folder: str | Path) -> int | None:
    """How many seeds the sweep in ``folder`` was last run with (its ``sweep.json``); None if unknown."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        return None
    seeds = json.loads(path.read_text()).get("seeds")
    if isinstance(seeds, list):
        return len(seeds)
    return seeds if isinstance(seeds, int) else None


def seed_change(out_dir: str | Path, prefix: str, seeds: int) -> list[str]:
    """One line per existing folder of ``prefix`` whose recorded seed count differs from ``seeds``
    (what a run with ``seeds`` does to it); empty when none does."""
    lines = []
    for kind in KINDS:
        folder = Path(out_dir) / f"{prefix}-{kind}"
        old = recorded_seeds(folder)
        if old is not None and old != seeds:
            lines.append(f"{folder} holds a {old}-seed sweep; this grid runs {seeds} seed(s): its complete runs of "
                         f"the shared seeds are reused (same configs), the rest run now, and the results hold "
                         f"exactly {seeds} seed(s) per cell")
    return lines


def check_seed_counts(out_dir: str | Path, prefix: str) -> int | None:
    """The seed count both folders of ``prefix`` record (None if neither records one); a
    ``WorkbenchError`` when they disagree, so a report never mixes a 2-seed and a 3-seed sweep."""
    counts = {kind: recorded_seeds(Path(out_dir) / f"{prefix}-{kind}") for kind in KINDS}
    known = {k: v for k, v in counts.items() if v is not None}
    if len(set(known.values())) > 1:
        raise WorkbenchError(f"prefix={prefix!r} is invalid: {prefix}-onpolicy records {counts['onpolicy']} seed(s) "
                             f"and {prefix}-stale {counts['stale']}: a report would mix them; run both with the "
                             "same size (python -m workbench report) first")
    return next(iter(known.values()), None)


def record_wall(out_dir: str | Path, prefix: str, seconds: float) -> None:
    """Append one ``run_sweeps`` call's wall time to ``<prefix>-stale/WALL_FILE``."""
    folder = Path(out_dir) / f"{prefix}-stale"
    if not folder.is_dir():
        return
    path = folder / WALL_FILE
    calls = json.loads(path.read_text()).get("calls", []) if path.is_file() else []
    calls.append({"seconds": round(float(seconds), 3)})
    atomic_write_text(path, json.dumps({"calls": calls}, indent=2))


def wall_seconds(out_dir: str | Path, prefix: str) -> float | None:
    """The summed wall time of every recorded ``run_sweeps`` call on ``prefix``; None when not recorded."""
    path = Path(out_dir) / f"{prefix}-stale" / WALL_FILE
    if not path.is_file():
        return None
    calls = json.loads(path.read_text()).get("calls", [])
    return float(sum(c["seconds"] for c in calls)) if calls else None


__all__ = ["KINDS", "WALL_FILE", "check_seed_counts", "record_wall", "recorded_seeds", "seed_change", "wall_seconds"]
