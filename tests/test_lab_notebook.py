"""Notebook 06 (the estimator lab) executed headless under notebooks/params/ci/06_estimator_lab.yaml,
checked like the other notebooks (tests/test_notebooks.py: time limit, stated times, clean offline
outputs) and on its summary.json: the table it wrote, the reference's precision, the findings it
displays and the chart. About 25-45 s on 2 cores, most of it the kernel importing torch and altair."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import polars as pl
import pytest

from workbench.charts.render import VEGA_MIMETYPE
from workbench.lab import SIZES
from workbench.lab_report import TABLE_COLUMNS
from workbench.notebook import ci_params, run_notebook

from test_notebooks import _check_time

pytestmark = pytest.mark.usefixtures("contention")  # the load factor of the timed checks


def test_06_estimator_lab(tmp_path):
    s = run_notebook("06", params_file=ci_params("06"), cwd=tmp_path)
    _check_time(s)
    lab = SIZES["ci"]["lab"]
    assert s["objectives"] == list(lab["objectives"]) and s["staleness"] == list(lab["staleness"])
    assert s["batches"] == lab["batches"]
    ref = s["reference"]
    assert ref["relative_se"] > 0 and -1.0 <= ref["split_cosine"] <= 1.0
    assert math.isclose(ref["cosine_ceiling"], 1 / math.sqrt(1 + ref["relative_se"] ** 2), rel_tol=1e-12)
    mean, lo, hi = s["floor_cosine"]
    assert lo <= mean <= hi
    d = Path(s["summary_path"]).parent
    table = pl.read_parquet(d / "lab.parquet")
    assert table.columns == list(TABLE_COLUMNS) and table.height == s["rows"]
    assert (d / "lab.png").read_bytes()[:4] == b"\x89PNG"
    nb = nbformat.read(s["executed_notebook"], as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert sum(VEGA_MIMETYPE in o.get("data", {}) for o in outputs) == 1  # the chart, offline
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert s["findings"] and all(f in shown for f in s["findings"])  # the sentences it measured, displayed
    assert len(s["findings"]) == 2 + len(lab["objectives"]) * len(lab["staleness"])
