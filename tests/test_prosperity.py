"""The prosperity reproduction: per-run statistics and the four checks on hand-built sweeps (values
computed by hand), the intervals the report draws (bounds that follow from the exact bootstrap
distribution of two seeds, Wilson intervals as roots of the score quadratic), then the whole path
(sweeps, table, figures, Markdown, CLI) on a tiny model."""

from __future__ import annotations

import math
import signal

import polars as pl
import pytest

from workbench import cli
from workbench.cli import report as report_cli
from workbench.errors import WorkbenchError
from workbench.studies.prosperity import (ONPOLICY, SIZES, base_config, check_claims, collapse_update, drift_matched_staleness, load_sweeps,
                                  report_path, resolve_size, run_sweeps, runs_table, summary_table, sweep_base, sweep_prefix,
                                  tiny_base)
from workbench.studies.prosperity_intervals import cell_intervals, check_interval, with_last
from workbench.studies.prosperity_report import (BAND_TEXT, closest_lines, curve_chart, curve_frame, drift_table,
                                                 markdown_table, render_markdown, write_report)
from workbench.sweeps import SweepStopped
from workbench.sweeps.results import eval_problems

Z95 = 1.959963984540054


def wilson_by_roots(p: float, n: int) -> tuple[float, float]:
    """{q : (p - q)^2 <= z^2 q (1 - q) / n}: the roots of (1 + z^2/n) q^2 - (2p + z^2/n) q + p^2."""
    c = Z95 * Z95 / n
    disc = math.sqrt((2 * p + c) ** 2 - 4 * (1 + c) * p * p)
    return max(0.0, (2 * p + c - disc) / (2 * (1 + c))), min(1.0, (2 * p + c + disc) / (2 * (1 + c)))


def fake_run(run, objective, staleness, seed, acc, initial, *, clip=0.0, masked=0.0, truncated=0.0, m2=0.0):
    """Six updates (0..5), evaluated after updates 1, 3, 5 (policy versions 2, 4, 6)."""
    n = 6
    evals = {1: acc[0], 3: acc[1], 5: acc[2]}
    return pl.DataFrame({
        "run": [run] * n, "status": ["ok"] * n, "objective": [objective] * n, "staleness": [staleness] * n,
        "seed": [seed] * n, "update": list(range(n)), "eval/accuracy": [evals.get(u) for u in range(n)],
        "offpolicy/clipfrac": [clip] * n, "offpolicy/masked_frac": [masked] * n,
        "offpolicy/truncated_frac": [truncated] * n, "offpolicy/m2": [m2] * n, "offpolicy/ess_token": [0.9] * n,
        "loss/entropy": [1.0] * n, "reward/response_len_mean": [4.0] * n, "initial_accuracy": [initial] * n,
    })


def test_collapse_is_the_first_evaluation_after_the_best_below_the_start():
    assert collapse_update([10, 20, 30, 40], [0.3, 0.5, 0.35, 0.1], initial=0.25) == 40
    assert collapse_update([10, 20, 30], [0.3, 0.5, 0.3], initial=0.25) is None  # degraded, not collapsed
    assert collapse_update([10, 20, 30], [0.1, 0.5, 0.4], initial=0.25) is None  # below the start only before the best
    assert collapse_update([10, 20, 30], [0.5, 0.5, 0.2], initial=0.25) == 30  # ties: the first best
    assert collapse_update([], [], initial=0.25) is None


def test_runs_table_and_summary_by_hand():
    df = pl.concat([
        fake_run("a", "is", 64, 0, [0.4, 0.6, 0.2], 0.3, clip=0.1, masked=0.02),
        fake_run("b", "is", 64, 1, [0.5, 0.5, 0.5], 0.3),
        fake_run("x", "is", 64, 2, [0.9, 0.9, 0.9], 0.3).with_columns(pl.lit("failed").alias("status")),
    ])
    runs = runs_table(df)
    assert runs["run"].to_list() == ["a", "b"]  # failed runs are excluded
    a = runs.row(0, named=True)
    assert a["final"] == pytest.approx(0.4) and a["best"] == pytest.approx(0.6) and a["best_update"] == 4
    assert a["collapse"] == 6 and a["zeroed"] == pytest.approx(0.12) and a["updates"] == 6
    b = runs.row(1, named=True)
    assert b["final"] == pytest.approx(0.5) and b["best_update"] == 2 and b["collapse"] is None
    t = summary_table(runs).row(0, named=True)
    assert t["seeds"] == 2 and t["final"] == pytest.approx(0.45) and t["final_spread"] == pytest.approx(0.05)
    assert t["best"] == pytest.approx(0.55) and t["best_spread"] == pytest.approx(0.05)
    assert t["collapsed"] == 1 and t["collapse"] == pytest.approx(6.0)
    assert t["zeroed"] == pytest.approx(0.06) and t["zeroed_spread"] == pytest.approx(0.06)


def test_runs_table_rejects_a_frame_that_is_not_a_sweep():
    with pytest.raises(WorkbenchError, match="lack column"):
        runs_table(pl.DataFrame({"update": [0]}))


def _frame(m2po_final=0.48, m2po_masked=0.001):
    return pl.concat([
        fake_run("r", ONPOLICY, 0, 0, [0.45, 0.5, 0.55], 0.25),
        fake_run("i", "is", 64, 0, [0.40, 0.30, 0.20], 0.25),  # rise 0.15, final 0.30: falls 0.10 from the best
        fake_run("c", "ppo_clip", 64, 0, [0.40, 0.40, 0.40], 0.25, clip=0.02),
        fake_run("m", "m2po", 64, 0, [m2po_final] * 3, 0.25, masked=m2po_masked),
        fake_run("m16", "m2po", 16, 0, [0.1] * 3, 0.25, masked=0.5),  # a lower staleness never decides
    ])


def _table(m2po_final=0.48, m2po_masked=0.001):
    return summary_table(runs_table(_frame(m2po_final, m2po_masked)))


def _two_seed_frame():
    """Two seeds per cell. With two values per side, every bootstrap bound is an extreme: the mean of
    two resampled values is an end value with probability 1/4, a difference of two such means takes
    its extreme with probability 1/16 > 2.5%, so the 95% bounds are exactly min/max combinations."""
    return pl.concat([
        fake_run("r0", ONPOLICY, 0, 0, [0.5, 0.5, 0.5], 0.25), fake_run("r1", ONPOLICY, 0, 1, [0.6, 0.6, 0.6], 0.25),
        fake_run("c0", "ppo_clip", 64, 0, [0.3] * 3, 0.25, clip=0.02),
        fake_run("c1", "ppo_clip", 64, 1, [0.4] * 3, 0.25, clip=0.04),
        fake_run("m0", "m2po", 64, 0, [0.45] * 3, 0.25, masked=0.001),
        fake_run("m1", "m2po", 64, 1, [0.5] * 3, 0.25, masked=0.005),
        # final = mean of the 3 evaluations = 0.3 for both; rise (best - start) 0.15 / 0.20,
        # fall (best - final) 0.10 / 0.15
        fake_run("i0", "is", 64, 0, [0.40, 0.30, 0.20], 0.25),
        fake_run("i1", "is", 64, 1, [0.45, 0.30, 0.15], 0.25),
    ])


def test_the_four_checks_hold_on_data_that_shows_the_story():
    checks = check_claims(_table())
    assert [c.name for c in checks] == ["a", "b", "c", "d"]
    assert [c.holds for c in checks] == [True, True, True, True]
    assert "staleness 64" in checks[1].statement and "ratio 0.050" in checks[3].evidence
    assert "50.0%" in checks[0].evidence  # mean of the reference's last three evaluations


def test_the_checks_say_what_does_not_hold():
    checks = check_claims(_table(m2po_final=0.45, m2po_masked=0.005))
    assert [c.holds for c in checks] == [True, True, False, False]
    assert "gap 5.0%" in checks[2].evidence and "ratio 0.250" in checks[3].evidence
    text = render_markdown(pl.concat([fake_run("r", ONPOLICY, 0, 0, [0.5] * 3, 0.25),
                                      fake_run("m", "m2po", 64, 0, [0.3] * 3, 0.25)]), command="cmd")
    assert "(c) at staleness 64, m2po ends within 3 points of on-policy: **does not hold**" in text
    assert "(b) stale IS improves then degrades; clipping alone degrades: not measured" in text


def test_drift_matched_staleness_is_where_ppo_clip_clips_like_the_paper():
    table = _table()  # ppo_clip at 64 clips 2% (the only ppo_clip cell)
    assert drift_matched_staleness(table) == 64
    df = pl.concat([fake_run(f"c{s}", "ppo_clip", s, 0, [0.4] * 3, 0.25, clip=z, m2=z)
                    for s, z in ((4, 0.001), (16, 0.01), (64, 0.05), (256, 0.11))])
    t = summary_table(runs_table(df))
    # |log(z / 0.0122)|: 16 -> 0.20, 64 -> 1.41: staleness 16 is closest to the paper's 1.22%
    assert drift_matched_staleness(t) == 16 and drift_matched_staleness(t, target=0.08) == 256
    assert drift_matched_staleness(summary_table(runs_table(fake_run("m", "m2po", 8, 0, [0.3] * 3, 0.25)))) is None
    lines = drift_table(t).splitlines()
    assert lines[2] == "| 4 | 0.10 | 0.0010 |" and lines[-1] == "| 256 in the paper | 1.22 | |"
    # checks at a chosen staleness look only at that staleness
    assert "staleness 16" in check_claims(_table(), staleness=16)[2].statement
    assert check_claims(_table(), staleness=16)[1].holds is None  # no is / ppo_clip at 16


def test_no_reference_means_nothing_is_claimed():
    df = fake_run("m", "m2po", 64, 0, [0.3] * 3, 0.25)
    assert [c.holds for c in check_claims(summary_table(runs_table(df)))] == [None]


def test_curve_frame_repeats_the_reference_under_every_staleness_and_bands_the_seeds():
    df = pl.concat([fake_run("r", ONPOLICY, 0, 0, [0.4, 0.5, 0.6], 0.25),
                    fake_run("a", "is", 16, 0, [0.2, 0.4, 0.6], 0.25),
                    fake_run("b", "is", 16, 1, [0.4, 0.4, 0.4], 0.25),
                    fake_run("c", "is", 64, 0, [0.1, 0.1, 0.1], 0.25)])
    acc = curve_frame(df, ("eval/accuracy",))
    ref = acc.filter(pl.col("objective") == ONPOLICY)
    assert sorted(ref["staleness"].unique().to_list()) == [16, 64] and ref.height == 6
    row = acc.filter((pl.col("objective") == "is") & (pl.col("staleness") == 16) & (pl.col("update") == 2)).row(
        0, named=True)
    # two seeds: the bootstrap interval of their mean is their range (the end atoms hold 1/4 each)
    assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((0.3, 0.2, 0.4))
    one = acc.filter((pl.col("objective") == "is") & (pl.col("staleness") == 64)).row(0, named=True)
    assert one["mean"] == pytest.approx(0.1) and one["lo"] is None and one["hi"] is None  # one seed: no band
    # dense columns: a trailing mean over `smooth` updates per run, then mean / min / max over seeds
    df = df.with_columns(pl.when(pl.col("run") == "a").then(pl.col("update") * 0.1).otherwise(0.0)
                         .alias("offpolicy/clipfrac"))
    clip = curve_frame(df, ("offpolicy/clipfrac",), smooth=2, every=1)
    row = clip.filter((pl.col("objective") == "is") & (pl.col("staleness") == 16) & (pl.col("update") == 3)).row(
        0, named=True)  # update index 2: run a (0.1 + 0.2) / 2 = 0.15, run b 0
    assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((0.075, 0.0, 0.15))
    assert curve_frame(df, ("offpolicy/clipfrac",), smooth=2, every=5)["update"].unique().sort().to_list() == [5, 6]
    title = curve_chart(df, "eval/accuracy", "held-out accuracy").to_dict()["title"]
    assert title["text"] == "held-out accuracy" and title["subtitle"] == BAND_TEXT and "bootstrap CI" in BAND_TEXT


def test_closest_lines_rank_objectives_per_staleness_and_say_what_is_resolved():
    lines = closest_lines(runs_table(_frame()))  # one seed per cell: no interval anywhere
    assert lines[0] == "- staleness 16: m2po 10.0% (-40.0, one seed: no interval, not resolved)"
    assert lines[1].startswith("- staleness 64: m2po 48.0% (-2.0, one seed: no interval, not resolved), ppo_clip 40.0%")
    assert lines[2] == "  - first vs second: m2po vs ppo_clip: not resolved, no interval (fewer than 2 seeds on a side)"
    assert lines[-1].startswith("- (final accuracy; in brackets the points against on-policy 50.0% and the 95% "
                                "bootstrap CI")
    lines = closest_lines(runs_table(_two_seed_frame()))
    # on-policy [0.5, 0.6]; m2po [0.45, 0.5]: gap -0.075, bounds 0.45 - 0.6 and 0.5 - 0.5
    # ppo_clip [0.3, 0.4]: gap -0.2, bounds 0.3 - 0.6 and 0.4 - 0.5; is [0.3, 0.3]: -0.25, [-0.3, -0.2]
    assert lines[0] == ("- staleness 64: m2po 47.5% (-7.5 [-15.0, +0.0] includes 0), ppo_clip 35.0% "
                        "(-20.0 [-30.0, -10.0] excludes 0), is 30.0% (-25.0 [-30.0, -20.0] excludes 0)")
    # m2po - ppo_clip: 0.125, bounds 0.45 - 0.4 and 0.5 - 0.3
    assert lines[1] == "  - first vs second: m2po > ppo_clip (95% CI of the difference [5.0, 20.0] points excludes 0)"
    with pytest.raises(WorkbenchError, match="expected runs_table"):
        closest_lines(_table())


def test_markdown_table_formats_points_and_intervals():
    lines = markdown_table(_table()).splitlines()  # a summary table alone: means over seeds
    assert lines[0].startswith("| staleness | objective | seeds | final acc. (%) | best acc. (%) | IQM final (%) |")
    assert lines[2].startswith(f"| 0 | {ONPOLICY} | 1 | 50.0 | 55.0 | - |")
    assert any(line.startswith("| 64 | m2po | 1 | 48.0 | 48.0 | - | 0 of 1 | 0.100 |") for line in lines)
    # with the runs: one seed -> the Wilson interval of its last evaluation (0.48 of 256 problems)
    df = _frame()
    runs = with_last(runs_table(df), df)
    lo, hi = wilson_by_roots(0.48, 256)
    row = next(r for r in markdown_table(summary_table(runs), runs, eval_n=256).splitlines() if "| 64 | m2po |" in r)
    assert row.startswith(f"| 64 | m2po | 1 | 48.0 (W [{100 * lo:.1f}, {100 * hi:.1f}]) | 48.0 | - | 0 of 1 |")
    # two seeds: the bootstrap interval of the mean of two values is their range
    df = _two_seed_frame()
    runs = with_last(runs_table(df), df)
    md = markdown_table(summary_table(runs), runs, eval_n=256)
    assert f"| 0 | {ONPOLICY} | 2 | 55.0 [50.0, 60.0] | 55.0 [50.0, 60.0] | - | 0 of 2 |" in md
    assert "| 64 | is | 2 | 30.0 [30.0, 30.0] | 42.5 [40.0, 45.0] | - | 2 of 2, 6 |" in md


def test_iqm_column_from_four_seeds():
    finals = [0.1, 0.4, 0.5, 0.9]
    df = pl.concat([fake_run(f"r{i}", ONPOLICY, 0, i, [f] * 3, 0.05) for i, f in enumerate(finals)])
    runs = runs_table(df)
    row = cell_intervals(runs).row(0, named=True)
    # IQM of 4 values: the mean of the middle two; a resample's IQM is 0.1 (0.9) when >= 3 of its 4 draws
    # are 0.1 (0.9), probability 13/256 > 2.5%: the bounds are 0.1 and 0.9
    assert (row["iqm"], row["iqm_lo"], row["iqm_hi"]) == pytest.approx((0.45, 0.1, 0.9), rel=1e-12)
    assert row["final"] == pytest.approx(0.475, rel=1e-12) and row["final_lo"] < 0.475 < row["final_hi"]
    line = markdown_table(summary_table(runs), runs).splitlines()[2]
    assert f"| 0 | {ONPOLICY} | 4 | 47.5 [" in line and "| 45.0 [10.0, 90.0] |" in line


def test_check_intervals_state_whether_each_difference_is_resolved():
    runs = runs_table(_two_seed_frame())
    # (b): rise per run [0.15, 0.20], fall per run [0.10, 0.15] (paired within runs); gap to ppo_clip as above
    assert check_interval("b", runs, 64) == (
        "is rise from its start 17.5 points, 95% CI [15.0, 20.0] above 5 points: resolved; "
        "is fall from its best 12.5 points, 95% CI [10.0, 15.0] above 5 points: resolved; "
        "on-policy - ppo_clip final 20.0 points, 95% CI [10.0, 30.0] above 3 points: resolved")
    # (c): on-policy - m2po = 0.075, bounds 0.5 - 0.5 and 0.6 - 0.45: the 3-point margin is inside
    assert check_interval("c", runs, 64) == ("on-policy - m2po final 7.5 points, 95% CI [0.0, 15.0] includes 3 points: "
                                             "not resolved")
    # (d): m2po masked [0.001, 0.005] - 0.1 x ppo_clip clipped [0.002, 0.004]: 0.003 - 0.003 = 0,
    # bounds 0.001 - 0.004 and 0.005 - 0.002 (in % of tokens)
    assert check_interval("d", runs, 64) == (
        "m2po masked - 0.1 x ppo_clip clipped 0.000% of tokens, 95% CI [-0.300, 0.300] includes 0% of tokens: "
        "not resolved")
    assert check_interval("a", runs, 64) == "on-policy final 55.0%, 95% CI [50.0, 60.0] across 2 seeds"
    assert check_interval("c", runs, 16) == ""  # no cells at staleness 16
    # one seed: the Wilson interval of the reference's last evaluation, when the evaluation size is known
    df = _frame()
    lo, hi = wilson_by_roots(0.55, 8)
    assert check_interval("a", with_last(runs_table(df), df), 64, eval_n=8) == (
        f"one seed: its last evaluation 55.0%, Wilson 95% [{100 * lo:.1f}, {100 * hi:.1f}] on 8 problems")
    text = render_markdown(_two_seed_frame(), command="cmd")
    assert "(c) at staleness 64, m2po ends within 3 points of on-policy: **does not hold**." in text
    assert "Intervals: on-policy - m2po final 7.5 points, 95% CI [0.0, 15.0] includes 3 points: not resolved." in text
    assert "(c) does not hold (on-policy - m2po final 7.5 points, 95% CI [0.0, 15.0] includes 3 points" in text
    assert "half the max - min" not in text and "bootstrap intervals across seeds" in text


def test_eval_problems_is_the_evaluated_share_of_the_heldout_set():
    assert eval_problems({"eval_size": 256, "task": "addition", "task_params": {"heldout_size": 100}}) == 100
    assert eval_problems({"eval_size": 8, "task": "addition", "task_params": {}}) == 8
    assert eval_problems(None) is None and eval_problems({}) is None
    assert eval_problems({"eval_size": 8, "task": "no-such-task", "task_params": {}}) is None


def test_sweep_prefix_separates_sizes_and_bases():
    assert sweep_prefix("cpu") == "prosperity" and sweep_prefix("workshop") == "prosperity-workshop"
    assert sweep_prefix(resolve_size("workshop")) == "prosperity-workshop"
    changed = resolve_size("workshop", steps=10)
    assert sweep_prefix(changed).startswith("prosperity-custom-") and sweep_prefix(changed) != sweep_prefix(
        resolve_size("workshop", steps=11))

    assert sweep_prefix("cpu", base_config(SIZES["cpu"], lr=1e-4)).startswith("prosperity-custom-")


def test_resolve_size_validates_overrides():
    s = resolve_size("workshop", steps=4, staleness="2, 8", objectives="ppo_clip,m2po", seeds=3)
    assert (s.steps, s.staleness, s.objectives, s.seeds) == (4, (2, 8), ("ppo_clip", "m2po"), 3)
    assert resolve_size("cpu") == SIZES["cpu"]
    with pytest.raises(WorkbenchError, match="size='huge' is invalid"):
        resolve_size("huge")
    with pytest.raises(WorkbenchError, match="staleness"):
        resolve_size("cpu", staleness="0,4")
    with pytest.raises(WorkbenchError, match="staleness"):
        resolve_size("cpu", staleness="a")
    with pytest.raises(WorkbenchError, match="nope"):
        resolve_size("cpu", objectives="nope")


def test_tiny_sweeps_report_and_cli(tmp_path, capsys):
    out = str(tmp_path / "runs")
    size = resolve_size("workshop", steps=4, staleness="2", objectives="ppo_clip,m2po", seeds=1)
    logs = []
    prefix = sweep_prefix(size, tiny_base(size, out), out)
    assert prefix.startswith("prosperity-custom-") and prefix == sweep_prefix(size, tiny_base(size, out), out)
    df = run_sweeps(size, base=tiny_base(size, out), workers=0, progress=False, log=logs.append)
    assert sorted(df["objective"].unique().to_list()) == sorted([ONPOLICY, "ppo_clip", "m2po"])
    runs = runs_table(df)
    assert runs.height == 3 and set(runs["updates"].to_list()) == {4}
    assert all(0.0 <= v <= 1.0 for v in runs["initial"].to_list() + runs["final"].to_list())
    path = write_report(df, tmp_path / "rep" / "prosperity.md", command="test", base=tiny_base(size, out).to_dict(),
                        log=logs.append)
    text = path.read_text()
    assert "| 2 | m2po | 1 |" in text and "(d) at staleness 2" in text
    # one seed per cell: each final carries the Wilson interval of its run's last evaluation of 8 problems
    assert "8 problems each" in text
    last = df.filter(pl.col("eval/accuracy").is_not_null() & (pl.col("objective") == "m2po")).sort("update")
    lo, hi = wilson_by_roots(float(last["eval/accuracy"][-1]), 8)
    m2po_row = next(r for r in text.splitlines() if r.startswith("| 2 | m2po | 1 |"))
    assert f"| 2 | m2po | 1 | {100 * runs.filter(pl.col('objective') == 'm2po')['final'][0]:.1f} " \
           f"(W [{100 * lo:.1f}, {100 * hi:.1f}]) |" in m2po_row
    pngs = sorted(p.name for p in (tmp_path / "rep" / "prosperity").glob("*.png"))
    assert "accuracy.png" in pngs and "m2.png" in pngs
    assert (tmp_path / "rep" / "prosperity" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "![held-out accuracy](prosperity/accuracy.png)" in text

    # resumable: the same sweeps again run nothing; the CLI rebuilds the report from disk
    run_sweeps(size, base=tiny_base(size, out), workers=0, progress=False, log=logs.append)
    assert sum("already complete, 0 to run" in line for line in logs) == 2
    assert load_sweeps(out, prefix).height == df.height
    assert cli.main(["report", "--no-run", "--out-dir", out, "--prefix", prefix, "--out", str(tmp_path / "cli.md")]) == 0
    printed = capsys.readouterr().out
    assert "(a) on-policy reference final accuracy: holds" in printed
    assert "(g) online_dpo's drop" in printed and "not measured: add online_dpo to the grid" in printed
    cli_text = (tmp_path / "cli.md").read_text()
    # both run_sweeps calls recorded their wall time; the sweeps recorded each run's seconds
    assert "- Sweep wall time: 0 minutes" in cli_text and "wall time of 3 runs" in cli_text
    assert "## How stale can I go?" in cli_text and "## What reproduces and what does not" in cli_text
    assert math.isfinite(runs["m2"].sum())


def test_a_stopped_report_is_one_line_with_the_signal_exit_code_and_writes_no_report(tmp_path, capsys, monkeypatch):
    def stopped(*args, **kwargs):
        raise SweepStopped(signal.SIGINT, "sweep runs/prosperity-stale stopped by SIGINT: 18 of 60 runs complete")

    monkeypatch.setattr(report_cli, "run_sweeps", stopped)
    out = tmp_path / "report.md"
    assert cli.main(["report", "--out-dir", str(tmp_path), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sweep runs/prosperity-stale stopped by SIGINT: 18 of 60 runs complete"]  # no "internal error"
    assert not out.exists()


def test_the_report_runs_every_objective_of_its_grid_in_the_scratchpad_regime(tmp_path):
    full = SIZES["cpu"]
    base = base_config(full)
    assert (base.task, base.lr, base.prefill_to_steps) == ("scratchpad", 2e-5, True)
    assert dict(base.rewards) == {"final_answer": 1.0}  # graded as the task verifies: the final answer
    assert SIZES["workshop"].overrides == full.overrides
    assert base_config(SIZES["addition"]).task == "addition" and not SIZES["addition-workshop"].overrides
    assert report_path("cpu") == "reports/prosperity.md"
    assert report_path("addition") == "reports/prosperity-addition.md"
    out = str(tmp_path / "runs")
    # the grid's two objectives that no other report grid has, on the scratchpad task, 2 updates each
    size = resolve_size("cpu", steps=2, staleness="3", objectives="clip_cov,online_dpo", seeds=1)
    assert {"clip_cov", "online_dpo"} <= set(full.objectives)
    df = run_sweeps(size, base=tiny_base(size, out), workers=0, progress=False, log=lambda s: None)
    runs = runs_table(df)
    assert sorted(runs["objective"].to_list()) == sorted([ONPOLICY, "clip_cov", "online_dpo"])
    assert sweep_base(out, sweep_prefix(size, tiny_base(size, out), out))["task"] == "scratchpad"
    assert set(runs["updates"].to_list()) == {2}
    generated = df.group_by("run").agg(pl.col("buffer/generated_batches").sum())["buffer/generated_batches"]
    assert set(generated.to_list()) == {2.0}  # staleness 3 > 2 updates: only the 2 batches trained on
