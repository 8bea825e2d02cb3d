"""Paired branches (workbench.branch, workbench.branch_report, workbench.cli.fork): exact control,
common random numbers, determinism, paired differences by hand, bad input, branch_here."""

from __future__ import annotations

import argparse
import json
import math

import polars as pl
import pytest

from workbench.branch import BRANCH_FILE, MANIFEST, branch_here, fork, load_branch_set
from workbench.branch_report import differences_table, paired_chart_spec, paired_differences, t_quantile
from workbench.cli import fork as fork_cli
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import build_model, save_policy

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=3, eval_size=16, lr=1e-3, seed=3)
K, M = 4, 4  # fork after update 4, train 4 updates: the parent's updates 4..7


def deterministic(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([c for c in df.columns if not c.startswith("perf/")])


@pytest.fixture
def factory(tokenizer, tiny_model_config):
    return lambda config: (build_model(tiny_model_config, tokenizer, seed=0), tokenizer)


@pytest.fixture
def parent(tokenizer, tiny_model_config, tmp_path):
    """A finished 8-update run with checkpoints after updates 2, 4, 6, 8."""
    cfg = RunConfig(**SMALL, out_dir=str(tmp_path / "runs"), run_name="p", steps=8, checkpoint_every=2,
                    keep_checkpoints=0)
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    run.run()
    run.close()
    return tmp_path / "runs" / "p"


def own_rows(path) -> pl.DataFrame:
    return deterministic(pl.read_parquet(path / "metrics.parquet").filter(pl.col("update") >= K))


def test_control_reproduces_the_parent_bit_for_bit(parent, factory, tmp_path):
    bs = fork(parent, at=K, changes=[{}, {"staleness": 2}], steps=M, out_dir=tmp_path / "set", model_factory=factory,
              log=lambda s: None)
    control, variant = bs.branches
    expected = deterministic(pl.read_parquet(parent / "metrics.parquet").filter(pl.col("update") >= K))
    assert expected.height == M and own_rows(control.path).equals(expected)
    # every branch is a run directory holding the parent's rows before K too
    assert pl.read_parquet(variant.path / "metrics.parquet")["update"].to_list() == list(range(K + M))
    info = json.loads((variant.path / BRANCH_FILE).read_text())
    assert (info["parent"], info["at"], info["changes"], info["repeat"]) == (str(parent.resolve()), K,
                                                                            {"staleness": 2}, 0)
    # the change is a live knob change at update K, journalled
    events = [json.loads(line) for line in (variant.path / "knob_events.jsonl").read_text().splitlines()]
    assert events[-1] == {"update": K, "changes": {"staleness": 2}}
    assert own_rows(variant.path)["knob/staleness"].to_list() == [2] * M
    assert not own_rows(variant.path).equals(expected)
    assert load_branch_set(tmp_path / "set").branches == bs.branches


def test_same_fork_twice_gives_identical_metrics_and_repeats_differ(parent, factory, tmp_path):
    kw = dict(at=K, changes=[{}, {"lr": 3e-3}], steps=M, repeats=2, model_factory=factory, log=lambda s: None)
    a = fork(parent, out_dir=tmp_path / "a", **kw)
    b = fork(parent, out_dir=tmp_path / "b", **kw)
    for x, y in zip(a.branches, b.branches):
        assert own_rows(x.path).equals(own_rows(y.path))
    r0, r1 = [br for br in a.branches if br.variant == 0]
    assert r0.repeat == 0 and r1.repeat == 1
    assert not own_rows(r0.path).select("loss/entropy").equals(own_rows(r1.path).select("loss/entropy"))
    assert json.loads((r1.path / BRANCH_FILE).read_text())["seeds"] is not None


def test_variants_of_one_repeat_see_the_same_prompts(parent, factory, tmp_path):
    seen: dict[tuple[int, int], list[str]] = {}

    def record_first_batch(run, branch):
        def hook(run, row):
            if row["update"] == K:
                seen[(branch.variant, branch.repeat)] = list(run.last_batch.prompts)
        run.hooks.append(hook)

    fork(parent, at=K, changes=[{}, {"lr": 3e-3}, {"temperature": 0.7}], steps=1, repeats=2, out_dir=tmp_path / "s",
         model_factory=factory, setup=record_first_batch, log=lambda s: None)
    for r in (0, 1):  # lr and temperature do not change which prompts are drawn
        assert seen[(0, r)] == seen[(1, r)] == seen[(2, r)]
    assert seen[(0, 0)] != seen[(0, 1)]  # another stream, other prompts


def test_t_quantile_matches_the_tables():
    # Student t 0.975 quantiles (standard tables); df = 2 also has the closed form (2p-1)/sqrt(2p(1-p))
    for df, t in ((1, 12.7062047), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725)):
        assert t_quantile(0.95, df) == pytest.approx(t, rel=1e-7)
    p = 0.975
    assert t_quantile(0.95, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def _wilson(p: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_paired_differences_by_hand():
    # three repeats, control and one variant, at updates 2 and 5; update 5 lacks repeat 2 of the variant
    rows = [(0, 0, 2, 0.50), (0, 1, 2, 0.40), (0, 2, 2, 0.30), (1, 0, 2, 0.60), (1, 1, 2, 0.70), (1, 2, 2, 0.50),
            (0, 0, 5, 0.20), (0, 1, 5, 0.25), (0, 2, 5, 0.10), (1, 0, 5, 0.30), (1, 1, 5, 0.45), (1, 2, 5, None)]
    frame = pl.DataFrame(rows, schema=["variant", "repeat", "update", "value"], orient="row")
    finals = frame.filter(pl.col("update") == 5)
    out = differences_table(frame, finals, ["control", "lr=0.001"], "reward/mean")
    u2 = out.filter((pl.col("update") == 2) & ~pl.col("final")).row(0, named=True)
    d = [0.1, 0.3, 0.2]  # variant - control per repeat: mean 0.2, sd 0.1
    t2 = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)
    assert u2["repeats"] == 3 and u2["method"] == "t"
    assert u2["estimate"] == pytest.approx(sum(d) / 3, rel=1e-9)
    assert u2["lo"] == pytest.approx(0.2 - t2 * 0.1 / math.sqrt(3), rel=1e-9)
    assert u2["hi"] == pytest.approx(0.2 + t2 * 0.1 / math.sqrt(3), rel=1e-9)
    f = out.filter(pl.col("final")).row(0, named=True)  # pairs 0 and 1: d = 0.1, 0.2
    half = 12.7062047 * math.sqrt(((0.1 - 0.15) ** 2 + (0.2 - 0.15) ** 2) / 1) / math.sqrt(2)
    assert (f["repeats"], f["update"]) == (2, 5) and f["estimate"] == pytest.approx(0.15, rel=1e-9)
    assert f["hi"] - f["estimate"] == pytest.approx(half, rel=1e-6)
    assert f["control"] == pytest.approx(0.225, rel=1e-9) and f["value"] == pytest.approx(0.375, rel=1e-9)


def test_one_repeat_uses_newcombe_for_accuracy_and_nothing_otherwise():
    frame = pl.DataFrame({"variant": [0, 1], "repeat": [0, 0], "update": [9, 9], "value": [0.5, 0.625]})
    acc = differences_table(frame, frame, ["control", "staleness=8"], "eval/accuracy", eval_n=64).row(0, named=True)
    l1, u1 = _wilson(0.625, 64)
    l2, u2 = _wilson(0.5, 64)
    assert acc["method"] == "newcombe" and acc["estimate"] == pytest.approx(0.125, rel=1e-12)
    assert acc["lo"] == pytest.approx(0.125 - math.sqrt((0.625 - l1) ** 2 + (u2 - 0.5) ** 2), rel=1e-9)
    assert acc["hi"] == pytest.approx(0.125 + math.sqrt((u1 - 0.625) ** 2 + (0.5 - l2) ** 2), rel=1e-9)
    other = differences_table(frame, frame, ["control", "staleness=8"], "reward/mean").row(0, named=True)
    assert other["method"] == "none" and math.isnan(other["lo"]) and math.isnan(other["hi"])


def test_paired_chart_has_band_line_and_zero_rule(parent, factory, tmp_path):
    bs = fork(parent, at=K, changes=[{"staleness": 2}], steps=M, repeats=2, out_dir=tmp_path / "c",
              model_factory=factory, log=lambda s: None)
    assert [b.variant for b in bs.branches] == [0, 1, 0, 1]  # the control was prepended
    diffs = paired_differences(bs, "loss/entropy")
    assert diffs.filter(~pl.col("final"))["update"].to_list() == list(range(K, K + M))
    control, variant = ({b.repeat: own_rows(b.path)["loss/entropy"].to_list() for b in bs.branches if b.variant == v}
                        for v in (0, 1))
    want = [(variant[0][i] - control[0][i] + variant[1][i] - control[1][i]) / 2 for i in range(M)]
    assert diffs.filter(~pl.col("final"))["estimate"].to_list() == pytest.approx(want, rel=1e-9, abs=1e-12)
    spec = paired_chart_spec(diffs)
    marks = [layer["mark"]["type"] for layer in spec["layer"]]
    assert marks == ["area", "line", "rule"] and spec["layer"][2]["data"]["values"] == [{"zero": 0.0}]
    assert len(spec["data"]["values"]) == M


@pytest.mark.parametrize("kw, needle", [
    (dict(at=5), "no checkpoint after update 5; checkpoints at: 2, 4, 6, 8"),
    (dict(at=9), "at=9 is beyond the run"),
    (dict(changes=[{}, {"staleness": 2}, {"stalenes": 2}]), "changes[2]: 'stalenes' is not a config field or knob"),
    (dict(changes=[{"group_size": 2}]), "'group_size' is a config field fixed when a run starts, not a live knob"),
    (dict(changes=[{"staleness": -1}]), "changes[0]={'staleness': -1}: staleness=-1 is invalid"),
    (dict(changes=[{}, {}]), "the control ({}) is given twice"),
    (dict(steps=0), "steps=0 is invalid"),
])
def test_bad_input_is_one_line_and_writes_nothing(parent, factory, tmp_path, kw, needle):
    with pytest.raises(WorkbenchError) as e:
        fork(parent, **{"at": K, "steps": M, "out_dir": tmp_path / "bad", "model_factory": factory, **kw})
    assert needle in str(e.value) and "\n" not in str(e.value)
    if "live knob" in needle:
        assert "staleness, sync_every, max_staleness, objective, objective_params, lr, temperature" in str(e.value)
    assert not (tmp_path / "bad").exists()


def test_a_run_without_checkpoints_is_refused(tokenizer, tiny_model_config, tmp_path):
    cfg = RunConfig(**SMALL, out_dir=str(tmp_path / "runs"), run_name="n", steps=8)
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    run.step()  # one update, no run(): no checkpoint yet
    run.close()
    with pytest.raises(WorkbenchError, match="has no checkpoint to branch from"):
        fork(tmp_path / "runs" / "n", out_dir=tmp_path / "bad", steps=1)
    assert not (tmp_path / "bad").exists()


def test_branch_here_on_a_live_run(tokenizer, tiny_model_config, tmp_path):
    cfg = RunConfig(**SMALL, out_dir=str(tmp_path / "runs"), run_name="live", steps=20)
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    for _ in range(3):
        run.step()  # live: no checkpoint written yet
    bs = branch_here(run, [{}, {"lr": 3e-3}], steps=2, out_dir=tmp_path / "here")
    assert bs.at == 3 and len(bs.branches) == 2
    run.run(2)  # the live run's own continuation
    expected = deterministic(run.metrics.filter(pl.col("update") >= 3))
    got = deterministic(pl.read_parquet(bs.branches[0].path / "metrics.parquet").filter(pl.col("update") >= 3))
    assert got.equals(expected)
    run.close()


def test_cli_prints_table_sentences_and_folders(tiny_model, tokenizer, tmp_path, capsys):
    model_dir = save_policy(tiny_model, tokenizer, tmp_path / "ckpt")
    cfg = RunConfig(**SMALL, model=str(model_dir), out_dir=str(tmp_path / "runs"), run_name="p", steps=4,
                    checkpoint_every=2)
    run = Run(cfg, log=lambda s: None)
    run.run()
    run.close()
    parser = argparse.ArgumentParser()
    fork_cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["fork", str(tmp_path / "runs" / "p"), "--at", "2", "--set", "staleness=1", "--set", "lr=0.003",
            "--branches", "3", "--steps", "2", "--out-dir", str(tmp_path / "set"), "--metric", "eval/accuracy",
            "--metric", "reward/mean"]
    assert fork_cli.cli_main(parser.parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert "| eval/accuracy | staleness=1 | 1 |" in out and "| reward/mean | lr=0.003 | 1 |" in out
    assert "eval/accuracy: staleness=1 vs control: " in out and "Newcombe" in out
    assert f"branch: {tmp_path / 'set' / 'v2-lr=0.003-r0'}" in out and (tmp_path / "set" / MANIFEST).is_file()
    bad = parser.parse_args(argv[:8] + ["--branches", "2", "--out-dir", str(tmp_path / "x")])
    with pytest.raises(WorkbenchError, match="--branches 2 is invalid: 2 --set group"):
        fork_cli.cli_main(bad)
    assert not (tmp_path / "x").exists()
