"""The prosperity reproduction: per-run statistics and the four checks on hand-built sweeps (values
computed by hand), then the whole path (sweeps, table, figures, Markdown, CLI) on a tiny model."""

from __future__ import annotations

import math

import polars as pl
import pytest

from workbench import cli
from workbench.errors import WorkbenchError
from workbench.studies.prosperity import (ONPOLICY, SIZES, check_claims, collapse_update, drift_matched_staleness, load_sweeps,
                                  resolve_size, run_sweeps, runs_table, summary_table, sweep_prefix, tiny_base)
from workbench.studies.prosperity_report import closest_lines, curve_frame, drift_table, markdown_table, render_markdown, write_report


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


def _table(m2po_final=0.48, m2po_masked=0.001):
    df = pl.concat([
        fake_run("r", ONPOLICY, 0, 0, [0.45, 0.5, 0.55], 0.25),
        fake_run("i", "is", 64, 0, [0.40, 0.30, 0.20], 0.25),  # rise 0.15, final 0.30: falls 0.10 from the best
        fake_run("c", "ppo_clip", 64, 0, [0.40, 0.40, 0.40], 0.25, clip=0.02),
        fake_run("m", "m2po", 64, 0, [m2po_final] * 3, 0.25, masked=m2po_masked),
        fake_run("m16", "m2po", 16, 0, [0.1] * 3, 0.25, masked=0.5),  # a lower staleness never decides
    ])
    return summary_table(runs_table(df))


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
    assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((0.3, 0.2, 0.4))
    # dense columns: a trailing mean over `smooth` updates per run, then mean / min / max over seeds
    df = df.with_columns(pl.when(pl.col("run") == "a").then(pl.col("update") * 0.1).otherwise(0.0)
                         .alias("offpolicy/clipfrac"))
    clip = curve_frame(df, ("offpolicy/clipfrac",), smooth=2, every=1)
    row = clip.filter((pl.col("objective") == "is") & (pl.col("staleness") == 16) & (pl.col("update") == 3)).row(
        0, named=True)  # update index 2: run a (0.1 + 0.2) / 2 = 0.15, run b 0
    assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((0.075, 0.0, 0.15))
    assert curve_frame(df, ("offpolicy/clipfrac",), smooth=2, every=5)["update"].unique().sort().to_list() == [5, 6]


def test_closest_lines_rank_objectives_per_staleness():
    lines = closest_lines(_table())
    assert lines[0] == "- staleness 16: m2po 10.0% (-40.0)"
    assert lines[1] == "- staleness 64: m2po 48.0% (-2.0), ppo_clip 40.0% (-10.0), is 30.0% (-20.0)"
    assert lines[-1] == "- (final accuracy, points against on-policy 50.0%)"


def test_markdown_table_formats_points_and_spreads():
    md = markdown_table(_table())
    lines = md.splitlines()
    assert lines[0].startswith("| staleness | objective |") and lines[2].startswith(f"| 0 | {ONPOLICY} | 1 | 50.0 |")
    assert any(line.startswith("| 64 | m2po | 1 | 48.0 | 48.0 | 0 of 1 | 0.100 |") for line in lines)


def test_sweep_prefix_separates_sizes_and_bases():
    assert sweep_prefix("cpu") == "prosperity" and sweep_prefix("workshop") == "prosperity-workshop"
    assert sweep_prefix(resolve_size("workshop")) == "prosperity-workshop"
    changed = resolve_size("workshop", steps=10)
    assert sweep_prefix(changed).startswith("prosperity-custom-") and sweep_prefix(changed) != sweep_prefix(
        resolve_size("workshop", steps=11))
    from workbench.studies.prosperity import base_config

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
    path = write_report(df, tmp_path / "rep" / "prosperity.md", command="test", log=logs.append)
    text = path.read_text()
    assert "| 2 | m2po | 1 |" in text and "(d) at staleness 2" in text
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
    assert math.isfinite(runs["m2"].sum())
