"""Tests for workbench.studies.throughput: the closed-form sync / async model on hand-computed cases,
the straggler effect against a closed form, the staleness bound, wall-clock columns, the published
table, the chart's fields and the CLI's one-line errors."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from workbench.cli import OneLineParser
from workbench.cli import throughput as cli
from workbench.errors import WorkbenchError
from workbench.studies import throughput as tp

STEP, L = 0.01, 100


def constant(**kw) -> tp.ThroughputSpec:
    """Every response L = 100 tokens long, B = 8 in groups of 4, W = 8 slots, 10 ms per decode step."""
    return tp.ThroughputSpec(**{"batch": 8, "group_size": 4, "workers": 8, "decode_step_s": STEP, "update_s": 2.0,
                                "lengths": (L,), "length_max": 0, "bound": 4, **kw})


def test_constant_lengths_training_bound():
    spec = constant()
    c = tp.compare(spec)
    assert c["sync_s"] == pytest.approx(L * STEP + 2.0)  # 1.0 s generation + 2.0 s update
    assert c["async_s"] == pytest.approx(max(2.0, 8 * L * STEP / 8))  # = 2.0: the learner is the bottleneck
    assert c["speedup"] == pytest.approx(3.0 / 2.0)
    assert c["regime"] == "training-bound"
    assert c["staleness"] == 4.0  # the generator runs ahead until the bound stops it
    assert c["straggler_factor"] == pytest.approx(1.0)


def test_constant_lengths_generation_bound():
    spec = constant(update_s=0.25, workers=4)  # W < B: 2 waves of 4 synchronously
    c = tp.compare(spec)
    assert c["sync_s"] == pytest.approx(2 * L * STEP + 0.25)
    assert c["async_s"] == pytest.approx(8 * L * STEP / 4)  # 2.0 s of generation at 4 slots' throughput
    assert c["regime"] == "generation-bound"
    assert c["staleness"] == pytest.approx(4 / 8 + 0.5)  # W_eff / B update periods decoding + half a period waiting


def test_waves_with_a_partial_last_wave():
    spec = constant(workers=3)  # 8 = 3 + 3 + 2: three waves of L steps
    assert tp.sync_generation_s(spec) == pytest.approx(3 * L * STEP)
    assert tp.async_generation_s(spec) == pytest.approx(8 * L * STEP / 3)


def test_lognormal_with_sigma_zero_is_constant():
    spec = tp.ThroughputSpec(batch=8, group_size=4, workers=8, length_median=100.0, length_sigma=0.0, samples=50)
    assert tp.mean_length(spec) == 100.0 and tp.expected_max(spec, 8) == 100.0


def test_two_point_lengths_expected_max_matches_the_closed_form():
    # lengths 10 or 30 with probability 1/2: P(max of n = 10) = 2^-n, so E[max] = 30 - 20 * 2^-n
    spec = tp.ThroughputSpec(batch=4, group_size=2, workers=4, decode_step_s=STEP, update_s=0.0, lengths=(10, 30),
                             length_max=0)
    for n in (1, 2, 3, 4, 10):
        assert tp.expected_max(spec, n) == pytest.approx(30 - 20 * 0.5 ** n, rel=1e-12)
    assert tp.sync_generation_s(spec) == pytest.approx((30 - 20 / 16) * STEP)  # one wave of 4: 28.75 steps
    assert tp.async_generation_s(spec) == pytest.approx(4 * 20 * STEP / 4)  # the mean, 20, not the max
    assert tp.compare(spec)["speedup"] == pytest.approx(28.75 / 20)
    waves = spec.replace(workers=3)  # a wave of 3 then a wave of 1: E[max of 3] + E[L]
    assert tp.sync_generation_s(waves) == pytest.approx((30 - 20 / 8 + 20) * STEP)


def test_expected_max_agrees_with_a_monte_carlo_of_the_same_distribution():
    spec = tp.ThroughputSpec(length_median=1000.0, length_sigma=1.0, length_max=0, samples=20_000, seed=3)
    x = tp.length_distribution(spec)
    draws = np.random.default_rng(1).choice(x, size=(4000, 64)).max(axis=1)  # [4000] maxima of 64 draws
    se = draws.std() / math.sqrt(draws.size)
    assert abs(tp.expected_max(spec, 64) - draws.mean()) < 4 * se


def test_heavy_tails_raise_the_sync_time_by_the_expected_max_not_the_async_one():
    narrow = tp.ThroughputSpec(length_sigma=0.0, length_max=0, samples=20_000)
    wide = narrow.replace(length_sigma=1.0)
    grow_sync = tp.sync_generation_s(wide) - tp.sync_generation_s(narrow)
    assert grow_sync == pytest.approx((tp.expected_max(wide, 256) - 4000) * wide.decode_step_s)
    assert tp.expected_max(wide, 256) > 10 * 4000  # the 256th-of-256 draw of lognormal(., 1): ~ e^2.9 the median
    ratio_async = tp.async_generation_s(wide) / tp.async_generation_s(narrow)
    assert ratio_async == pytest.approx(tp.mean_length(wide) / 4000)  # only E[L] = e^(1/2) m enters
    assert ratio_async == pytest.approx(math.exp(0.5), rel=0.03)


def test_the_length_limit_truncates():
    spec = tp.ThroughputSpec(length_median=4000.0, length_sigma=1.5, length_max=8000, samples=20_000)
    assert tp.length_distribution(spec).max() == 8000.0
    assert tp.expected_max(spec, 256) == pytest.approx(8000.0)  # P(all 256 under the limit) ~ 0


def test_the_bound_caps_staleness_and_the_overlap():
    assert tp.expected_staleness(constant(bound=None)) == math.inf  # training-bound, unbounded: the lead grows
    assert tp.expected_staleness(constant(bound=2)) == 2.0
    wide = constant(workers=32, update_s=0.0, bound=1)  # 4 B slots, but at most 1 B may decode
    assert tp.effective_workers(wide) == 8
    assert tp.async_generation_s(wide) == pytest.approx(8 * L * STEP / 8)  # not / 32: the bound caps the overlap
    assert tp.expected_staleness(wide) == 1.0  # min(eta, W_eff / B + 1/2) = min(1, 1.5)
    free = wide.replace(bound=None)
    assert tp.async_generation_s(free) == pytest.approx(8 * L * STEP / 32)
    assert tp.expected_staleness(free) == pytest.approx(32 / 8 + 0.5)
    sync = constant(bound=0)  # AReaL's eta = 0 is synchronous training
    assert tp.async_update_time(sync) == tp.sync_update_time(sync) and tp.expected_staleness(sync) == 0.0
    assert tp.regime(sync) == "synchronous"


def test_wall_clock_columns():
    spec = constant(update_s=0.25)  # async: start-up 1.0 s, then 1.0 s per update
    metrics = pl.DataFrame({"update": [0, 1, 2, 3], "eval/accuracy": [0.1, None, 0.2, None]})
    sync = tp.wall_clock(metrics, spec, "sync")
    assert sync.name == tp.WALL_COLUMN and sync.to_list() == pytest.approx([1.25, 2.5, 3.75, 5.0])
    # start-up (one synchronous generation, 1.0) + update (0.25) + k steady-state periods (1.0 each)
    assert tp.wall_clock(metrics, spec, "async").to_list() == pytest.approx([1.25, 2.25, 3.25, 4.25])
    with pytest.raises(WorkbenchError, match="mode='fast' is invalid"):
        tp.wall_clock(metrics, spec, "fast")
    with pytest.raises(WorkbenchError, match="step='step' is invalid"):
        tp.wall_clock(metrics, spec, "sync", step="step")
    with pytest.raises(WorkbenchError, match="update="):
        tp.wall_clock(pl.DataFrame({"update": [-1, 0]}), spec, "sync")


@pytest.mark.parametrize("kw, needle", [
    ({"batch": 10}, "batch=10 is invalid: expected a multiple of group_size=16"),
    ({"workers": 0}, "workers=0 is invalid"),
    ({"batch": True}, "batch=True is invalid"),
    ({"update_s": -1.0}, "update_s=-1.0 is invalid"),
    ({"decode_step_s": float("inf")}, "decode_step_s=inf is invalid"),
    ({"length_median": 0.0}, "length_median=0.0 is invalid"),
    ({"length_median": 30_000.0}, "at most length_max=27648"),
    ({"bound": -1}, "bound=-1 is invalid"),
    ({"lengths": (10, 0)}, "lengths=0 is invalid"),
    ({"lengths": [10]}, "lengths=[10] is invalid"),
])
def test_bad_specs_are_one_line_errors(kw, needle):
    with pytest.raises(WorkbenchError) as e:
        tp.ThroughputSpec(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_published_table_and_the_specs_that_reproduce_it():
    table = tp.published_speedups()
    assert {"system", "source", "reported_speedup", "reported_as", "setting", "baseline"} <= set(table.columns)
    areal = table.filter(pl.col("system") == "AReaL")["reported_speedup"].to_list()
    assert 2.77 in areal and "arXiv:2505.24298" in table["source"][0]
    assert table.filter(pl.col("system") == "verl fully-async")["reported_speedup"].to_list() == [2.35, 2.67]
    assert 41.0 / 14.8 == pytest.approx(2.77, abs=0.005)  # the AReaL pair behind "up to 2.77x"
    model = {r["spec"]: r for r in tp.published_comparison().iter_rows(named=True)}
    assert model["AReaL 1.5B"]["model_speedup"] == pytest.approx(41.0 / 14.8, rel=1e-3)
    assert model["verl fully-async 128 GPUs"]["model_speedup"] == pytest.approx(356.30 / 178.45, rel=1e-3)
    assert model["PipelineRL"]["model_speedup"] == pytest.approx(2.0, abs=0.01)
    assert all(2.0 - 0.01 <= r["model_speedup"] <= 2.8 for r in model.values())
    assert 2.0 <= tp.compare(tp.ThroughputSpec())["speedup"] <= 2.8  # the default spec lands in the range


def _runs() -> dict[str, pl.DataFrame]:
    updates = list(range(10))
    acc = [0.2 + 0.02 * k if k % 3 == 2 else None for k in updates]
    lo = [a - 0.05 if a is not None else None for a in acc]
    hi = [a + 0.05 if a is not None else None for a in acc]
    frame = pl.DataFrame({"update": updates, "eval/accuracy": acc, "eval/accuracy_lo": lo, "eval/accuracy_hi": hi})
    return {"on-policy": frame, "stale": frame.drop("eval/accuracy_lo", "eval/accuracy_hi")}


def test_the_chart_has_wall_clock_accuracy_band_and_tooltips():
    spec = tp.ThroughputSpec()  # 154.5 s sync, 60 s async per update: 10 updates ~ 26 minutes
    chart = tp.accuracy_vs_wall_clock(_runs(), {"on-policy": (spec, "sync"), "stale": (spec, "async")})
    d = chart.to_dict()
    band, line = d["layer"]
    assert band["mark"]["type"] == "area" and band["encoding"]["y"]["field"] == "lo"
    assert band["encoding"]["y2"]["field"] == "hi"
    assert line["encoding"]["x"]["title"] == "simulated wall-clock (min)"
    assert line["encoding"]["y"]["field"] == "accuracy" and band["encoding"]["y"]["title"] == "held-out accuracy (%)"
    assert {t["field"] for t in line["encoding"]["tooltip"]} == {"run", "mode", "update", "wall", "accuracy", "lo", "hi"}
    rows = d["data"]["values"]
    assert len(rows) == 6  # 3 evaluations per run
    first = next(r for r in rows if r["run"] == "on-policy" and r["update"] == 2)
    assert first["accuracy"] == pytest.approx(24.0) and first["lo"] == pytest.approx(19.0)
    assert first["wall"] == pytest.approx(3 * tp.sync_update_time(spec) / 60)
    assert first["series"] == "on-policy (sync)"
    assert all(r["lo"] is None for r in rows if r["run"] == "stale")  # no interval columns: no band


def test_the_chart_refuses_bad_input():
    spec = tp.ThroughputSpec()
    with pytest.raises(WorkbenchError, match=r"specs\['stale'\]"):
        tp.accuracy_vs_wall_clock(_runs(), {"on-policy": (spec, "sync")})
    with pytest.raises(WorkbenchError, match="runs="):
        tp.accuracy_vs_wall_clock({}, (spec, "sync"))
    with pytest.raises(WorkbenchError, match="eval/accuracy"):
        tp.accuracy_vs_wall_clock({"x": pl.DataFrame({"update": [0]})}, (spec, "sync"))


def _parse(argv: list[str]):
    parser = OneLineParser(prog="python -m workbench", allow_abbrev=False)
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["throughput", *argv])


def test_cli_prints_both_modes_and_the_published_figures(capsys):
    assert cli.cli_main(_parse(["--batch", "8", "--group-size", "4", "--workers", "8", "--decode-step-s", "0.01",
                                "--update-s", "2", "--length-sigma", "0", "--length-median", "100",
                                "--bound", "none"])) == 0
    out = capsys.readouterr().out
    assert "| sync | 3.0 | 1.0 | 2.0 | 0 |" in out and "| async | 2.0 | 1.0 | 2.0 | unbounded |" in out
    assert "speed-up sync / async: 1.50x, training-bound" in out
    assert "| AReaL | 2.77x |" in out and "arXiv:2509.19128" in out


@pytest.mark.parametrize("argv, needle", [
    (["--batch", "0"], "batch=0 is invalid"),
    (["--batch", "250"], "a multiple of group_size=16"),
    (["--bound", "soon"], "--bound='soon' is invalid"),
    (["--workers", "1.5"], "argument --workers: invalid int value"),
    (["--length-sigma", "nan"], "length_sigma=nan is invalid"),
    (["--update-s", "-3"], "update_s=-3.0 is invalid"),
])
def test_cli_bad_input_is_one_line(argv, needle):
    with pytest.raises(WorkbenchError) as e:
        cli.cli_main(_parse(argv))
    assert needle in str(e.value) and "\n" not in str(e.value)
