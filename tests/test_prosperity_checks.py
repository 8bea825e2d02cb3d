"""Statements (e)-(g), "How stale can I go?", the compute lines and the seed bookkeeping of the
prosperity sweeps, on hand-built per-run tables whose outcomes are known (values computed by hand;
with two values per side the bootstrap bounds of a difference are exact min / max combinations:
each extreme has probability 1/16 > 2.5%)."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from workbench.errors import WorkbenchError
from workbench.stats import Interval
from workbench.studies.prosperity import (ONPOLICY, Check, load_sweeps, resolve_size, run_sweeps, runs_table,
                                          summary_table, tiny_base)
from workbench.studies.prosperity_checks import (all_checks, check_entropy, check_online_dpo, check_topr, drop_gap,
                                                 reproduce_lines)
from workbench.studies.prosperity_howstale import answer, compute_lines, how_stale, how_stale_lines, within
from workbench.studies.prosperity_report import render_markdown
from workbench.studies.prosperity_sweeps import (check_seed_counts, record_wall, recorded_seeds, seed_change,
                                                 wall_seconds)
from workbench.sweeps import MERGED_FILE, SPEC_FILE


def run(name, objective, staleness, seed, acc, initial, entropy=(1.0, 1.0), step_s=0.5):
    """Ten updates (0..9), evaluated after updates 2, 5, 8; entropy linear from entropy[0] to entropy[1]
    (the first / last tenth of ten updates is one update: exactly those two values)."""
    n = 10
    evals = {2: acc[0], 5: acc[1], 8: acc[2]}
    return pl.DataFrame({
        "run": [name] * n, "status": ["ok"] * n, "objective": [objective] * n, "staleness": [staleness] * n,
        "seed": [seed] * n, "update": list(range(n)), "eval/accuracy": [evals.get(u) for u in range(n)],
        "loss/entropy": np.linspace(entropy[0], entropy[1], n).tolist(), "initial_accuracy": [initial] * n,
        "perf/time_step": [step_s] * n, "run_seconds": [60.0] * n,
    })


def flat(name, objective, staleness, seed, final, initial=0.25, **kw):
    return run(name, objective, staleness, seed, [final] * 3, initial, **kw)


def reference(finals=(0.5, 0.52)):
    return [flat(f"r{i}", ONPOLICY, 0, i, f) for i, f in enumerate(finals)]


# ----------------------------------------------------------------------------- (e) IS collapses, TOPR stable
def _collapse_frame(topr_gain=(0.10, 0.05, 0.15), is_collapses=3, reinforce=None):
    parts = reference()
    for i in range(3):  # best 0.4 at version 3, then 0.1 < start 0.25: collapsed; else stays at 0.3
        parts.append(run(f"i{i}", "is", 64, i, [0.4, 0.3, 0.1] if i < is_collapses else [0.4, 0.3, 0.3], 0.25))
        parts.append(flat(f"t{i}", "topr", 64, i, 0.25 + topr_gain[i]))
    if reinforce is not None:
        parts += [run(f"f{i}", "reinforce", 64, i, reinforce, 0.25) for i in range(3)]
    return runs_table(pl.concat(parts))


def test_topr_check_holds_when_is_collapses_and_topr_does_not_fall():
    c = check_topr(_collapse_frame(), 64)
    assert (c.name, c.holds, c.settled) == ("e", True, True)
    assert "is: 3 of 3 seed(s) collapsed" in c.evidence and "topr final - start +10.0 points" in c.evidence
    assert c.intervals.startswith("topr final - start 10.0 points, 95% CI [")
    assert c.intervals.endswith("above 0 points: resolved")
    assert "arXiv:2503.14286" in c.source


def test_topr_check_fails_when_topr_falls_outside_its_interval_or_is_does_not_collapse():
    c = check_topr(_collapse_frame(topr_gain=(-0.10, -0.12, -0.08)), 64)
    assert (c.holds, c.settled) == (False, True) and "below 0 points: resolved" in c.intervals
    c = check_topr(_collapse_frame(topr_gain=(-0.10, 0.0, 0.10)), 64)  # a fall inside its interval: stable
    assert c.holds is True and "includes 0 points: not resolved" in c.intervals
    c = check_topr(_collapse_frame(is_collapses=1), 64)  # 1 of 3 is not "most"
    assert c.holds is False and "is: 1 of 3 seed(s) collapsed" in c.evidence
    c = check_topr(_collapse_frame(reinforce=[0.4, 0.3, 0.3]), 64)  # reinforce in the grid, never collapses
    assert c.holds is False and "is / reinforce" in c.statement and "reinforce: 0 of 3" in c.evidence


def test_topr_check_with_one_seed_uses_the_estimate_and_is_not_settled():
    runs = runs_table(pl.concat(reference() + [run("i", "is", 64, 0, [0.4, 0.3, 0.1], 0.25),
                                               flat("t", "topr", 64, 0, 0.24)]))
    c = check_topr(runs, 64)
    assert (c.holds, c.settled) == (False, False) and "no interval (one seed)" in c.intervals


def test_topr_check_not_measured_without_its_objectives():
    runs = runs_table(pl.concat(reference() + [run("i", "is", 64, 0, [0.4, 0.3, 0.1], 0.25)]))
    c = check_topr(runs, 64)
    assert c.holds is None and c.evidence == "not measured: add topr to the grid"


# ----------------------------------------------------------------------------- (f) entropy
def _entropy_frame(cov_end=(0.8, 1.0), ppo_end=(0.2, 0.3), kl=False):
    parts = reference()
    for i in range(2):
        parts.append(flat(f"p{i}", "ppo_clip", 64, i, 0.4, entropy=(1.5, ppo_end[i])))
        parts.append(flat(f"c{i}", "clip_cov", 64, i, 0.4, entropy=(1.5, cov_end[i])))
        if kl:
            parts.append(flat(f"k{i}", "kl_cov", 64, i, 0.4, entropy=(1.5, 0.1)))
    return runs_table(pl.concat(parts))


def test_entropy_check_compares_the_last_tenth_with_ppo_clip():
    c = check_entropy(_entropy_frame(), 64)
    # clip_cov [0.8, 1.0] - ppo_clip [0.2, 0.3]: 0.9 - 0.25 = 0.65, bounds 0.8 - 0.3 and 1.0 - 0.2
    assert (c.holds, c.settled) == (True, True)
    assert c.intervals == "clip_cov - ppo_clip final entropy 0.650 nats, 95% CI [0.500, 0.800] above 0 nats: resolved"
    assert c.evidence == ("ppo_clip entropy 1.500 -> 0.250 nats per token (first -> last tenth); clip_cov final 0.900 "
                          "(kl_cov not in the grid)")
    c = check_entropy(_entropy_frame(kl=True), 64)  # kl_cov ends at 0.1, below ppo_clip: fails, settled
    assert (c.holds, c.settled) == (False, True) and "kl_cov - ppo_clip final entropy -0.150 nats" in c.intervals
    c = check_entropy(_entropy_frame(cov_end=(0.1, 0.6)), 64)  # 0.35 - 0.25 = 0.1, CI [-0.2, 0.4]: not settled
    assert (c.holds, c.settled) == (True, False)


def test_entropy_check_not_measured_without_cov_objectives_or_entropy():
    runs = runs_table(pl.concat(reference() + [flat("p", "ppo_clip", 64, 0, 0.4)]))
    assert check_entropy(runs, 64).evidence == "not measured: add clip_cov, kl_cov to the grid"
    no_entropy = pl.concat(reference() + [flat("p", "ppo_clip", 64, 0, 0.4), flat("c", "clip_cov", 64, 0, 0.4)])
    c = check_entropy(runs_table(no_entropy.drop("loss/entropy")), 64)
    assert c.holds is None and "logged no loss/entropy" in c.evidence


# ----------------------------------------------------------------------------- (g) online DPO
def _dpo_frame(dpo64=(0.48, 0.46), ppo64=(0.30, 0.34)):
    parts = reference()
    for i in range(2):
        parts += [flat(f"d4{i}", "online_dpo", 4, i, 0.5), flat(f"d64{i}", "online_dpo", 64, i, dpo64[i]),
                  flat(f"p4{i}", "ppo_clip", 4, i, 0.5), flat(f"p64{i}", "ppo_clip", 64, i, ppo64[i])]
    return runs_table(pl.concat(parts))


def test_online_dpo_check_compares_drops_from_the_lowest_staleness():
    c = check_online_dpo(_dpo_frame(), 64)
    # drops: online_dpo 0.5 - 0.47 = 0.03, ppo_clip 0.5 - 0.32 = 0.18; the staleness-4 cells are constant, so
    # the gap's bounds are 0.46 - 0.34 and 0.48 - 0.30
    assert (c.holds, c.settled) == (True, True) and "from staleness 4 to 64" in c.statement
    assert c.evidence == "drop from staleness 4 to 64: online_dpo +3.0 points, ppo_clip +18.0 points"
    assert c.intervals == "ppo_clip drop - online_dpo drop 15.0 points, 95% CI [12.0, 18.0] above 0 points: resolved"
    c = check_online_dpo(_dpo_frame(dpo64=(0.20, 0.24)), 64)  # online DPO drops 0.28: more than ppo_clip
    assert (c.holds, c.settled) == (False, True)
    c = check_online_dpo(_collapse_frame(), 64)
    assert c.holds is None and c.evidence == "not measured: add online_dpo to the grid"
    one = _dpo_frame().filter(pl.col("staleness") != 4)  # one stale staleness: no drop to measure
    c = check_online_dpo(one, 64)
    assert c.holds is None and "from a lower staleness to 64" in c.statement
    assert c.evidence == "not measured: needs two stale staleness values in the grid"


def test_drop_gap_needs_two_runs_per_group_and_is_deterministic():
    assert math.isnan(drop_gap([0.5], [0.3, 0.4], [0.5, 0.5], [0.4, 0.4]).lo)
    a = drop_gap([0.5, 0.6], [0.3, 0.4], [0.5, 0.55], [0.4, 0.45])
    assert a == drop_gap([0.5, 0.6], [0.3, 0.4], [0.5, 0.55], [0.4, 0.45])
    assert a.estimate == pytest.approx(0.2 - 0.1) and a.lo < a.estimate < a.hi


# ----------------------------------------------------------------------------- how stale
def test_within_rule():
    assert within(Interval(-0.02, -0.025, -0.01))  # worse, but the whole CI is above -3 points
    assert not within(Interval(-0.05, -0.06, -0.04))  # below 0 and past -3 points
    assert within(Interval(-0.05, -0.08, 0.01))  # includes 0: not shown worse
    assert within(Interval(-0.02, math.nan, math.nan)) and not within(Interval(-0.04, math.nan, math.nan))


def _stale_frame():
    parts = reference()  # on-policy [0.50, 0.52]
    cells = {"a": {4: (0.50, 0.51), 16: (0.40, 0.42), 64: (0.49, 0.53)},  # out at 16, within again at 64
             "b": {4: (0.50, 0.52), 16: (0.49, 0.52), 64: (0.50, 0.51)},  # never out
             "c": {4: (0.30, 0.32), 16: (0.30, 0.31), 64: (0.2, 0.21)}}  # out at once
    for o, by_s in cells.items():
        for s, finals in by_s.items():
            parts += [flat(f"{o}{s}_{i}", o, s, i, f) for i, f in enumerate(finals)]
    return runs_table(pl.concat(parts))


def test_how_stale_answers_per_objective():
    table = how_stale(_stale_frame())
    a4 = table.filter((pl.col("objective") == "a") & (pl.col("staleness") == 4)).row(0, named=True)
    # [0.50, 0.51] - [0.50, 0.52]: -0.005, bounds 0.50 - 0.52 and 0.51 - 0.50
    assert (a4["gap"], a4["lo"], a4["hi"], a4["within"]) == pytest.approx((-0.005, -0.02, 0.01, True))
    answers = {o: answer(table.filter(pl.col("objective") == o)) for o in "abc"}
    assert answers == {"a": ("4 (out at 16)", 4), "b": ("at least 64 (the largest measured)", 64),
                       "c": ("below 4 (the smallest measured)", None)}
    lines = how_stale_lines(_stale_frame())
    assert lines[0].startswith("Rule: at staleness s, the gap is an objective's final accuracy minus on-policy's "
                               "(51.0%)")
    # a at 16: [0.40, 0.42] - [0.50, 0.52] = -0.10, bounds 0.40 - 0.52 and 0.42 - 0.50: below 0, past -3 points
    assert ("| a | -0.5 [-2.0, +1.0] within | -10.0 [-12.0, -8.0] **out** | +0.0 [-3.0, +3.0] within "
            "| 4 (out at 16) |") in lines
    assert "- a: up to staleness 4, then out at 16 (gap -10.0 [-12.0, -8.0] points); within again at 64." in lines
    assert any(line.startswith("- b: within reach at every measured staleness, up to 64") for line in lines)
    assert any(line.startswith("- c: out already at the smallest measured staleness, 4") for line in lines)
    no_ref = runs_table(flat("x", "is", 4, 0, 0.3))
    assert how_stale_lines(no_ref) == ["Not measured: needs the on-policy reference runs (staleness 0) and at least "
                                       "one stale objective."]


# ----------------------------------------------------------------------------- compute and reproduce lines
def test_compute_lines_sum_the_runs():
    df = pl.concat(reference() + [flat("x", "is", 4, 0, 0.3)])  # 3 runs x 10 updates x 0.5 s; 60 s per run
    assert compute_lines(df, 150.0) == [
        "- Runs: 3 successful.",
        "- Update steps: 0 run-minutes (the sum of every update's perf/time_step).",
        "- Whole runs: 3 run-minutes (the sweeps' recorded wall time of 3 runs: evaluations, checkpoints and "
        "start-up included).",
        "- Sweep wall time: 2 minutes (every report command that ran these sweeps)."]
    assert compute_lines(df.drop("perf/time_step", "run_seconds"), None)[1:] == [
        "- Update steps: not measured (the runs logged no perf/time_step).",
        "- Sweep wall time: not recorded (sweeps run before it was; `python -m workbench report` records it)."]


def test_reproduce_lines_sort_the_statements_by_verdict():
    checks = [Check("b", "", True, "", settled=True), Check("c", "", True, "", settled=False),
              Check("d", "", False, "", settled=True), Check("e", "", False, "", settled=None),
              Check("g", "", None, "not measured: add online_dpo to the grid")]
    assert reproduce_lines(checks, 64) == [
        "Statements (b)-(g) at staleness 64:", "",
        "- Reproduces (holds, outside the intervals): (b) stale IS improves then degrades, ppo_clip ends below "
        "on-policy.",
        "- Holds on the means, not settled by the intervals: (c) m2po stays near on-policy.",
        "- Does not reproduce (fails, outside the intervals): (d) m2po masks <= 1/10 of what ppo_clip clips.",
        "- Fails on the means, not settled by the intervals: (e) unclipped IS collapses, TOPR stays stable.",
        "- Not measured: (g) online DPO degrades least with staleness: not measured: add online_dpo to the grid."]


def test_all_checks_settle_b_to_d_from_their_intervals():
    runs = _collapse_frame()
    checks = all_checks(summary_table(runs), runs, 64)
    assert [c.name for c in checks] == ["b", "c", "d", "e", "f", "g"]
    by = {c.name: c for c in checks}
    assert by["b"].holds is None and by["e"].holds is True and by["f"].holds is None


def test_report_has_the_new_sections_and_states_a_seed_mismatch():
    df = pl.concat([_d for _d in reference()] + [run(f"i{i}", "is", 64, i, [0.4, 0.3, 0.1], 0.25) for i in range(2)]
                   + [flat(f"t{i}", "topr", 64, i, 0.4 + 0.02 * i) for i in range(2)])
    text = render_markdown(df, command="python -m workbench report", size="cpu", wall=600.0)
    assert "## Three more statements at the highest staleness (64)" in text
    assert "(e) at staleness 64, unclipped is collapses in most seeds" in text and "Source: Le Roux et al. 2025" in text
    assert "(f) at staleness 64, clip_cov / kl_cov end with a higher entropy" in text
    assert "not measured: add ppo_clip, clip_cov, kl_cov to the grid" in text
    assert "## How stale can I go?" in text and "## What reproduces and what does not" in text
    assert "- Reproduces (holds, outside the intervals): (e) unclipped IS collapses, TOPR stays stable." in text
    assert "- Sweep wall time: 10 minutes" in text
    assert "These runs have 2 seed(s) per cell; size `cpu` now runs 3" in text
    assert "fewer than 2 seeds" not in text
    uneven = render_markdown(pl.concat([df, flat("p0", "ppo_clip", 64, 0, 0.4)]), command="cmd")
    assert "- Cells with fewer than 2 seeds: ppo_clip at 64 (1)." in uneven and "size `" not in uneven


# ----------------------------------------------------------------------------- seed bookkeeping
def _folder(root, kind, seeds):
    d = root / f"pp-{kind}"
    d.mkdir(parents=True)
    (d / SPEC_FILE).write_text(json.dumps({"seeds": seeds}))
    pl.concat(reference()).write_parquet(d / MERGED_FILE)
    return d


def test_a_two_seed_folder_is_never_silently_mixed_with_a_three_seed_one(tmp_path):
    _folder(tmp_path, "onpolicy", 3)
    _folder(tmp_path, "stale", 2)
    assert recorded_seeds(tmp_path / "pp-stale") == 2 and recorded_seeds(tmp_path / "nowhere") is None
    lines = seed_change(tmp_path, "pp", 3)
    assert len(lines) == 1 and "pp-stale holds a 2-seed sweep; this grid runs 3 seed(s)" in lines[0]
    with pytest.raises(WorkbenchError, match="pp-onpolicy records 3 seed.s. and pp-stale 2"):
        check_seed_counts(tmp_path, "pp")
    with pytest.raises(WorkbenchError, match="a report would mix them"):
        load_sweeps(str(tmp_path), "pp")
    (tmp_path / "pp-stale" / SPEC_FILE).write_text(json.dumps({"seeds": [0, 1, 2]}))
    assert check_seed_counts(tmp_path, "pp") == 3 and seed_change(tmp_path, "pp", 3) == []


def test_wall_time_accumulates_over_calls(tmp_path):
    assert wall_seconds(tmp_path, "pp") is None
    record_wall(tmp_path, "pp", 5.0)  # no folder yet: nothing written
    assert wall_seconds(tmp_path, "pp") is None
    (tmp_path / "pp-stale").mkdir()
    record_wall(tmp_path, "pp", 60.0)
    record_wall(tmp_path, "pp", 30.5)
    assert wall_seconds(tmp_path, "pp") == pytest.approx(90.5)


def test_a_named_prefix_resumed_with_more_seeds_says_so_and_reuses_the_first_seed(tmp_path):
    out = str(tmp_path / "runs")
    one = resolve_size("workshop", steps=2, staleness="2", objectives="ppo_clip", seeds=1)
    logs: list[str] = []
    run_sweeps(one, base=tiny_base(one, out), prefix="pp", workers=0, progress=False, log=logs.append)
    assert not any("seed sweep" in line for line in logs)
    two = resolve_size("workshop", steps=2, staleness="2", objectives="ppo_clip", seeds=2)
    logs.clear()
    df = run_sweeps(two, base=tiny_base(two, out), prefix="pp", workers=0, progress=False, log=logs.append)
    said = [line for line in logs if "holds a 1-seed sweep; this grid runs 2 seed(s)" in line]
    assert len(said) == 2  # both folders, before anything runs
    assert sum("2 runs, 1 already complete, 1 to run" in line for line in logs) == 2
    assert runs_table(df).group_by("objective").len()["len"].to_list() == [2, 2]
    assert check_seed_counts(out, "pp") == 2 and len(json.loads(
        (tmp_path / "runs" / "pp-stale" / "prosperity_wall.json").read_text())["calls"]) == 2
