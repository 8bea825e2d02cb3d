"""``lab_report.interval_sentences``: what a lab table's intervals include, on a constructed table
whose every verdict is known by construction."""

from __future__ import annotations

import math

import polars as pl
import pytest

from workbench.errors import WorkbenchError
from workbench.lab_report import FRESH_ROW, REFERENCE_ROW, TABLE_COLUMNS, interval_sentences


def table(rows):
    base = [(FRESH_ROW, 0, "cosine", 0.30, 0.20, 0.40, 4), (REFERENCE_ROW, 0, "relative_se", 0.1, math.nan, math.nan, 4)]
    return pl.DataFrame(base + rows, schema=list(TABLE_COLUMNS), orient="row")


def test_sentences_say_which_values_each_interval_includes():
    t = table([("a", 0, "cosine", 0.35, 0.25, 0.45, 4),      # includes the floor mean 0.30, not 0
               ("a", 3, "cosine", -0.05, -0.10, 0.02, 4),    # includes 0, below the floor mean
               ("b", 3, "cosine", 0.60, 0.50, 0.70, 4),      # above both
               ("c", 3, "cosine", math.nan, math.nan, math.nan, 0)])
    assert interval_sentences(t) == [
        "at staleness 0 the cosine interval of a [0.25, 0.45] does not include 0.00 (it lies above) and includes "
        "the fresh-batch floor mean 0.30",
        "at staleness 3 the cosine interval of a [-0.10, 0.02] includes 0.00 and does not include the fresh-batch "
        "floor mean 0.30 (it lies below)",
        "at staleness 3 the cosine interval of b [0.50, 0.70] does not include 0.00 (it lies above) and does not "
        "include the fresh-batch floor mean 0.30 (it lies above)",
        "at staleness 3 the cosine of c has no interval (undefined (no gradient))"]
    one = interval_sentences(t, value=0.5)[2]  # another reference value: 0.50 is the interval's edge
    assert "includes 0.50 and" in one


def test_a_table_without_the_floor_is_a_one_line_error():
    t = table([("a", 0, "cosine", 0.35, 0.25, 0.45, 4)]).filter(pl.col("objective") != FRESH_ROW)
    with pytest.raises(WorkbenchError, match="no 'fresh batch") as e:
        interval_sentences(t)
    assert "\n" not in str(e.value)
