"""Tests for workbench.charts: panel selection, gaps, offline PNG and HTML export. What the panels say
(titles, units, legend names, the numerical floor, knob rules, key statistics) is in
tests/test_charts_honest.py; the offline display path in tests/test_charts_offline.py."""

from __future__ import annotations

import math
import re
import struct

import polars as pl
import pytest
import torch

from workbench.charts import PANELS, network_refs, run_chart, save_html, save_png
from workbench.errors import WorkbenchError

torch.set_num_threads(1)

N = 30


@pytest.fixture(scope="module")
def metrics() -> pl.DataFrame:
    return pl.DataFrame({
        "update": list(range(N)),
        "eval/accuracy": [0.3 + 0.01 * i if i % 10 == 0 else None for i in range(N)],  # every 10
        "reward/accuracy": [0.3 + 0.005 * i for i in range(N)],
        "reward/mean": [float("nan") if i in (4, 5) else 0.2 + 0.01 * i for i in range(N)],
        "offpolicy/clipfrac": [0.01 * math.sin(i) ** 2 for i in range(N)],
        "offpolicy/masked_frac": pl.Series([None] * N, dtype=pl.Float64),  # all null: skipped
        "offpolicy/m2": [0.001 * i for i in range(N)],
        "loss/entropy": [2.0 - 0.02 * i if i != 12 else None for i in range(N)],
        "loss/policy": [0.1] * N,  # not in any panel
    })


def _panels(chart) -> dict[str, list[dict]]:
    """panel title -> its long-form rows {step, series, value, sparse}, read off the chart's spec.

    Every panel folds its columns out of the one wide ``metrics`` dataset; a row whose value is
    null is a gap, except for sparse (``eval/``) series, whose null rows are filtered out.
    """
    spec = chart.to_dict()
    table = spec["datasets"]["metrics"]
    out = {}
    for panel in spec["concat"]:
        cols = panel["layer"][0]["transform"][0]["fold"]
        rows = []
        for col in cols:
            sparse = col.startswith("eval/")
            for r in table:
                if sparse and r[col] is None:
                    continue
                rows.append({"step": float(r["update"]), "series": col, "value": r[col], "sparse": sparse})
        title = panel["title"]
        out[title if isinstance(title, str) else title["text"]] = rows
    return out


def test_panels_skip_missing_and_all_null_columns(metrics):
    panels = _panels(run_chart(metrics, "run"))
    assert list(panels) == ["accuracy (held-out, train)", "reward", "clip / masked fraction",
                            "M2 = mean (log r)^2", "entropy"]
    series = {t: sorted({r["series"] for r in rows}) for t, rows in panels.items()}
    assert series["clip / masked fraction"] == ["offpolicy/clipfrac"]  # masked_frac all null
    assert series["accuracy (held-out, train)"] == ["eval/accuracy", "reward/accuracy"]
    assert all(c in {c for p in PANELS for c in p.columns} for s in series.values() for c in s)
    for panel in run_chart(metrics).to_dict()["concat"]:
        # no fixed-precision tick format: Vega's default follows the tick step, so ticks never read
        # "1, 1, 1" (float noise that would need a short format is flattened by the floor instead)
        assert "format" not in panel["layer"][0]["encoding"]["y"].get("axis", {})


def test_sparse_eval_rows_are_points_and_gaps_are_nulls(metrics):
    panels = _panels(run_chart(metrics))
    acc = panels["accuracy (held-out, train)"]
    ev = [r for r in acc if r["series"] == "eval/accuracy"]
    assert [r["step"] for r in ev] == [0.0, 10.0, 20.0] and all(r["sparse"] for r in ev)
    assert ev[1]["value"] == pytest.approx(40.0)  # accuracy is drawn in % (0.40 logged)
    rew = {r["step"]: r["value"] for r in panels["reward"]}
    assert len(rew) == N and rew[4.0] is None and rew[5.0] is None and rew[6.0] == pytest.approx(0.26)
    assert {r["step"]: r["value"] for r in panels["entropy"]}[12.0] is None


def test_png_written_offline(metrics, tmp_path):
    path = save_png(run_chart(metrics, "run"), tmp_path / "sub" / "run.png")
    data = path.read_bytes()
    assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    # 3 columns of 220 px panels (+ axes) by 2 rows of 150 px panels (+ titles, legend)
    assert 700 <= width <= 1100 and 350 <= height <= 800


def test_html_is_self_contained(metrics, tmp_path):
    path = save_html(run_chart(metrics), tmp_path / "run.html")
    html = path.read_text()
    assert "cdn.jsdelivr" not in html and network_refs(html) == []
    assert not re.search(r"<script[^>]*\bsrc\s*=", html)  # no external script at all
    assert "eval/accuracy" in html and len(html) > 100_000  # data and the inlined JS bundle


def test_no_chartable_columns_and_bad_input():
    only_step = pl.DataFrame({"update": [0, 1], "loss/x": [1.0, 2.0]})
    assert run_chart(only_step).to_dict()["mark"]["type"] == "text"
    assert run_chart(pl.DataFrame()).to_dict()["mark"]["type"] == "text"  # no updates yet
    with pytest.raises(WorkbenchError, match="step='update'"):
        run_chart(pl.DataFrame({"step": [0]}))
    with pytest.raises(WorkbenchError, match="metrics"):
        run_chart({"update": [0]})
    for bad, match in ((dict(smooth=-1), "smooth=-1"), (dict(smooth=2.5), "smooth=2.5"),
                       (dict(log_scale="yes"), "log_scale='yes'"), (dict(log_scale=[3]), "log_scale="),
                       (dict(log_scale=["m2", "M2"]), "log_scale='M2' is invalid: expected a panel id")):
        with pytest.raises(WorkbenchError, match=match) as err:
            run_chart(only_step, **bad)
        assert "\n" not in str(err.value)


def test_custom_panels(metrics):
    chart = run_chart(metrics, panels=[("policy loss", ["loss/policy"]), ("none", ["nope"])])
    assert list(_panels(chart)) == ["policy loss"]
