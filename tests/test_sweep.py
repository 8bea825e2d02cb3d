"""Sweeps: a 2x2 grid on the local process pool (merged parquet, resume, determinism), a failing
cell, up-front validation and the CLI (on Ray: tests/test_sweep_ray.py).

Every run is tiny (an untrained ~35 k-parameter local checkpoint, 4 prompts x 4 samples, 3 updates);
most of a pool sweep's time is the spawned workers importing torch and transformers.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import polars as pl
import pytest

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.policy.model import save_policy
from workbench.sweeps import build_cells, cell_name, parse_grid, parse_seeds, read_sweep, sweep
from workbench.sweeps.results import seed_intervals

GRID = {"staleness": [0, 1], "objective": ["ppo_clip", "m2po"]}
# an untrained model is never right: a length-shaped reward gives the groups reward variance
REWARDS = (("exact_match", 1.0), ("overlong", 1.0, {"max_len": 4, "cache_len": 3}))
QUIET = dict(progress=False, log=lambda s: None)
Z95 = 1.959963984540054


def wilson_by_roots(p: float, n: int) -> tuple[float, float]:
    """{q : (p - q)^2 <= z^2 q (1 - q) / n}: the roots of (1 + z^2/n) q^2 - (2p + z^2/n) q + p^2."""
    c = Z95 * Z95 / n
    disc = math.sqrt((2 * p + c) ** 2 - 4 * (1 + c) * p * p)
    return max(0.0, (2 * p + c - disc) / (2 * (1 + c))), min(1.0, (2 * p + c + disc) / (2 * (1 + c)))


def metric_columns(df: pl.DataFrame) -> pl.DataFrame:
    """Everything but wall-clock timings."""
    return df.select([c for c in df.columns if not c.startswith("perf/")])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    import workbench  # noqa: F401
    from workbench.policy.model import ModelConfig, build_model
    from workbench.policy.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("sweep")
    tok = build_char_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=128, max_position_embeddings=64), tok, seed=0)
    ckpt = save_policy(model, tok, d / "ckpt")
    return RunConfig(model=str(ckpt), task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=4,
                     group_size=4, steps=3, eval_every=3, eval_size=8, lr=1e-2, rewards=REWARDS,
                     out_dir=str(d / "runs"))


@pytest.fixture(scope="module")
def pool_sweep(base):
    """The 2x2 grid x 2 seeds on the local pool (2 workers, 1 thread each); (dataframe, folder, seconds)."""
    t0 = time.perf_counter()
    df = sweep(base, GRID, seeds=2, name="pool", workers=2, threads_per_run=1, **QUIET)
    return df, os.path.join(base.out_dir, "pool"), time.perf_counter() - t0


def test_pool_sweep_merges_every_run(pool_sweep):
    df, root, _ = pool_sweep
    assert df.columns[:6] == ["run", "status", "error", "staleness", "objective", "seed"]
    assert df.height == 8 * 3  # 8 runs x 3 updates
    assert set(df["status"]) == {"ok"} and df["error"].null_count() == df.height
    cells = df.group_by(["staleness", "objective", "seed"]).agg(pl.len(), pl.col("update").max())
    assert cells.height == 8 and set(cells["len"]) == {3} and set(cells["update"]) == {2}
    # the grid values reached the runs
    assert (df["knob/objective"] == df["objective"]).all() and (df["knob/staleness"] == df["staleness"]).all()
    assert df.filter(pl.col("update") == 2)["offpolicy/staleness_mean"].to_list() == \
        [float(s) for s in df.filter(pl.col("update") == 2)["staleness"]]
    for col in ("reward/accuracy", "offpolicy/clipfrac", "offpolicy/m2", "eval/accuracy"):
        assert col in df.columns
    assert read_sweep(root).equals(df)
    runs = pl.read_parquet(os.path.join(root, "sweep_runs.parquet"))
    assert runs.height == 8 and set(runs["status"]) == {"ok"} and not runs["resumed"].any()
    assert runs["summary/updates"].to_list() == [3] * 8
    spec = json.loads(open(os.path.join(root, "sweep.json")).read())
    assert spec["grid"] == GRID and spec["seeds"] == 2
    assert sorted(os.listdir(os.path.join(root, "runs")))[0] == "staleness=0__objective=m2po__seed=0"


def test_sweep_results_carry_final_accuracy_intervals(pool_sweep):
    _, root, _ = pool_sweep
    # the wiring on real runs (the untrained model mostly scores 0 of 8: Wilson [0, 0.32]); the
    # interval arithmetic on spread-out values is checked by hand in test_result_intervals_by_hand
    runs = pl.read_parquet(os.path.join(root, "sweep_runs.parquet"))
    assert runs["eval_n"].to_list() == [8] * 8  # eval_size 8 on a held-out set of 8
    for r in runs.iter_rows(named=True):
        lo, hi = wilson_by_roots(r["summary/eval/final_accuracy"], 8)
        assert (r["final_accuracy_wilson_lo"], r["final_accuracy_wilson_hi"]) == pytest.approx((lo, hi), abs=1e-12)
    # per grid point, over its two seeds: the mean, and a bootstrap interval that for two values is their range
    for (staleness, objective), part in runs.group_by(["staleness", "objective"]):
        finals = part["summary/eval/final_accuracy"].to_list()
        assert part["seeds_ok"].to_list() == [2, 2]
        assert part["final_accuracy_mean"].to_list() == pytest.approx([sum(finals) / 2] * 2, abs=1e-12)
        assert part["final_accuracy_ci_lo"].to_list() == pytest.approx([min(finals)] * 2, abs=1e-12)
        assert part["final_accuracy_ci_hi"].to_list() == pytest.approx([max(finals)] * 2, abs=1e-12)


def test_result_intervals_by_hand():
    runs = pl.DataFrame({
        "status": ["ok", "ok", "ok", "ok", "failed", "ok"],
        "objective": ["a", "a", "a", "b", "b", "c"],
        "eval_n": [256, 256, 256, 10, 10, None],
        "summary/eval/final_accuracy": [0.5, 0.25, 0.75, 0.0, None, 0.5],
    })
    out = seed_intervals(runs, ["objective"])
    r = out.to_dicts()
    assert (r[0]["final_accuracy_wilson_lo"], r[0]["final_accuracy_wilson_hi"]) == pytest.approx(
        wilson_by_roots(0.5, 256), rel=1e-9)
    assert (r[3]["final_accuracy_wilson_lo"], r[3]["final_accuracy_wilson_hi"]) == pytest.approx(
        (0.0, Z95**2 / 10 / (1 + Z95**2 / 10)), rel=1e-9)  # 0 of 10 by hand
    assert r[4]["final_accuracy_wilson_lo"] is None and r[5]["final_accuracy_wilson_hi"] is None  # failed; n unknown
    # a: three seeds, mean 0.5; a resample's mean is 0.25 (all three draws 0.25) or 0.75 with probability
    # 1/27 each, more than 2.5%: the interval is [0.25, 0.75]
    assert [r[i]["seeds_ok"] for i in range(6)] == [3, 3, 3, 1, 1, 1]  # per grid point; the failed run does not count
    assert (r[0]["final_accuracy_mean"], r[0]["final_accuracy_ci_lo"], r[0]["final_accuracy_ci_hi"]) == pytest.approx(
        (0.5, 0.25, 0.75), rel=1e-12)
    assert r[3]["final_accuracy_mean"] == 0.0 and r[3]["final_accuracy_ci_lo"] is None  # one seed: no interval
    assert out.columns[:4] == runs.columns and out.height == 6


def test_rerun_skips_completed_runs(base, pool_sweep):
    df, root, _ = pool_sweep
    metrics = sorted(p for p in (os.path.join(root, "runs", r, "metrics.parquet") for r in df["run"].unique()))
    before = [os.stat(p).st_mtime_ns for p in metrics]
    logs: list[str] = []
    t0 = time.perf_counter()
    again = sweep(base, GRID, seeds=2, name="pool", workers=2, progress=False, log=logs.append)
    assert time.perf_counter() - t0 < 5  # no worker was started
    assert [os.stat(p).st_mtime_ns for p in metrics] == before
    assert "8 already complete, 0 to run" in logs[0]
    assert again.equals(df)
    runs = pl.read_parquet(os.path.join(root, "sweep_runs.parquet"))
    assert runs["resumed"].all()


def test_same_sweep_twice_gives_identical_metrics(base, pool_sweep):
    df, _, _ = pool_sweep
    # another folder, one worker instead of two: different processes run different cells
    other = sweep(base, GRID, seeds=2, name="pool-again", workers=1, **QUIET)
    assert metric_columns(other).equals(metric_columns(df))
    assert not metric_columns(df.filter(pl.col("seed") == 0)).drop("seed").equals(
        metric_columns(df.filter(pl.col("seed") == 1)).drop("seed"))  # seeds differ


def test_failing_cell_is_reported_and_the_others_complete(base):
    # "overlong" without max_len passes config validation but raises when the first batch is scored
    grid = {"rewards": [[["exact_match", 1.0]], [["overlong", 1.0]]], "staleness": [0, 1]}
    df = sweep(base, grid, name="failing", workers=1, **QUIET)
    runs = pl.read_parquet(os.path.join(base.out_dir, "failing", "sweep_runs.parquet"))
    assert runs["status"].to_list() == ["ok", "ok", "failed", "failed"]
    err = runs["error"][2]
    assert "overlong max_len=None is invalid" in err and "\n" not in err
    assert runs["seeds_ok"].to_list() == [1, 1, 0, 0] and runs["final_accuracy_ci_lo"].null_count() == 4
    assert runs["final_accuracy_wilson_lo"].null_count() == 2 and runs["eval_n"].to_list() == [8] * 4
    assert df.filter(pl.col("status") == "ok").height == 6
    failed = df.filter(pl.col("status") == "failed")
    assert failed.height == 2 and failed["update"].null_count() == 2 and failed["error"][0] == err
    # re-running retries only the failed cells (the completed ones are skipped); in this process, to
    # spare the test a second pool start-up
    logs: list[str] = []
    sweep(base, grid, name="failing", workers=0, progress=False, log=logs.append)
    assert "2 already complete, 2 to run" in logs[0]
    assert pl.read_parquet(os.path.join(base.out_dir, "failing", "sweep_runs.parquet"))["status"].to_list() == \
        ["ok", "ok", "failed", "failed"]


def test_interrupted_cell_continues_from_its_checkpoint(base):
    """A cell killed after 2 of 3 updates (checkpoint every update) continues from update 2 and
    merges exactly the metrics of an uninterrupted run of the same cell."""
    from workbench.loop import Run

    ckpt_base = base.replace(checkpoint_every=1)
    grid = {"staleness": [1], "objective": ["m2po"]}
    cell = build_cells(ckpt_base, grid, [0], (Path(base.out_dir) / "continue").resolve(), None, None)[0]
    run = Run(RunConfig.from_dict(cell.spec["config"]), log=lambda s: None)
    run.step()
    run.step()  # "killed" here: checkpoints after updates 1 and 2, no summary.json
    assert not (cell.run_dir / "summary.json").exists()
    logs: list[str] = []
    out = sweep(ckpt_base, grid, seeds=[0], name="continue", workers=0, progress=False, log=logs.append)
    assert "0 already complete, 1 to run" in logs[0]
    runs = pl.read_parquet(Path(base.out_dir) / "continue" / "sweep_runs.parquet")
    assert runs["continued_from"].to_list() == [2] and runs["status"].to_list() == ["ok"]
    assert not (Path(str(cell.run_dir) + ".1")).exists()  # continued in place, not moved aside
    # the same cell uninterrupted, also in this process (same thread count: same floating-point sums)
    reference = sweep(ckpt_base, grid, seeds=[0], name="continue-ref", workers=0, **QUIET)
    assert metric_columns(out).equals(metric_columns(reference))

    # a different config in the folder is never continued: the cell starts over
    other = base.replace(checkpoint_every=1, lr=5e-3)
    sweep(other, grid, seeds=[0], name="continue", workers=0, progress=False, log=logs.append)
    runs = pl.read_parquet(Path(base.out_dir) / "continue" / "sweep_runs.parquet")
    assert runs["continued_from"].to_list() == [None] and Path(str(cell.run_dir) + ".1").is_dir()


@pytest.mark.parametrize("grid, seeds, needle", [
    ({"stalenes": [0, 4]}, None, "grid key 'stalenes' is invalid: expected a RunConfig field"),
    ({"objective": ["ppo_clip", "nope"]}, None, "sweep cell objective=nope, seed=0: unknown objective 'nope'"),
    ({"staleness": [0, -1]}, None, "sweep cell staleness=-1, seed=0: staleness=-1 is invalid"),
    ({"objective_params.tau": [0.02]}, None, "objective 'ppo_clip' has no parameter 'tau'"),
    ({"lr.x": [1]}, None, "a dotted key must be FIELD.KEY of a dict field"),
    ({"staleness": [0, 0]}, None, "a value is repeated"),
    ({"staleness": []}, None, "expected a non-empty list"),
    ({"run_name": ["a"]}, None, "the sweep sets run_name itself"),
    ({"seed": [1, 2]}, 2, "grid key 'seed' and seeds= are both given"),
    ({"task_params.max_digits": [2, 0]}, None, "sweep cell task_params.max_digits=0, seed=0: addition.max_digits=0"),
])
def test_bad_grid_is_one_line_error_before_anything_runs(base, tmp_path, grid, seeds, needle):
    with pytest.raises(WorkbenchError) as err:
        sweep(base, grid, seeds, sweep_dir=tmp_path / "s", **QUIET)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "s").exists()


def test_cells_names_seeds_and_objective_params(base, tmp_path):
    cells = build_cells(base.replace(objective_params={"clip_high": 0.28}),
                        {"objective": ["ppo_clip", "m2po", "dual_clip"]}, [5, 7], tmp_path)
    assert [c.name for c in cells][:3] == ["objective=ppo_clip__seed=5", "objective=ppo_clip__seed=7",
                                           "objective=m2po__seed=5"]
    params = {c.values["objective"]: c.spec["config"]["objective_params"] for c in cells}
    assert params["ppo_clip"]["clip_high"] == 0.28
    assert params["dual_clip"]["clip_high"] == 0.28  # kept: dual_clip has it and it was not a default
    assert "clip_high" not in params["m2po"]  # switched objective: its own defaults
    dotted = build_cells(base, {"objective": ["m2po"], "objective_params.tau": [0.02, 0.08]}, 1, tmp_path)
    assert [c.spec["config"]["objective_params"]["tau"] for c in dotted] == [0.02, 0.08]
    assert [c.seed for c in dotted] == [base.seed, base.seed]
    assert cell_name({"model": "/a b/c"}, 0).startswith("model=_a_b_c__seed=0-")  # made safe, hashed


def test_grid_and_seed_parsing():
    assert parse_grid(["staleness=0,4,16", "objective=ppo_clip,m2po", "objective_params.tau=0.02,1e-1",
                       'rewards=[["exact_match",1.0]],[["format",1.0]]', "filter_zero_variance=true,false"]) == {
        "staleness": [0, 4, 16], "objective": ["ppo_clip", "m2po"], "objective_params.tau": [0.02, 0.1],
        "rewards": [[["exact_match", 1.0]], [["format", 1.0]]], "filter_zero_variance": [True, False]}
    assert parse_seeds("3") == 3 and parse_seeds("0,5,7") == [0, 5, 7] and parse_seeds(None) is None
    for bad in (["staleness"], ["staleness="], ["staleness=0,,4"], ["a=1", "a=2"]):
        with pytest.raises(WorkbenchError):
            parse_grid(bad)
    with pytest.raises(WorkbenchError, match="--seeds"):
        parse_seeds("x")


def test_cli_sweep(base, tmp_path, capsys):
    from workbench.cli import main

    argv = ["sweep", "--grid", "staleness=0,1", "--seeds", "1", "--name", "cli", "--workers", "0",
            "--model", base.model, "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
            "--eval-every", "2", "--eval-size", "8", "--task-params", "max_digits=2", "heldout_size=8",
            "--out-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    df = pl.read_parquet(tmp_path / "cli" / "sweep.parquet")
    assert df["staleness"].to_list() == [0, 0, 1, 1] and df["seed"].to_list() == [0] * 4
    assert "2 ok, 0 failed" in capsys.readouterr().out
    assert main(["sweep", "--grid", "stalenes=0,1", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "grid key 'stalenes' is invalid" in err and "\n" not in err


def _write_notebook(path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('out_dir = "runs"\nrun_name = "nb"\nseed = 0\nstaleness = 0\nmodel = ""\n'
                                       'steps = 2')
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "from workbench.config import RunConfig\nfrom workbench.loop import Run\n"
        "cfg = RunConfig(model=model, staleness=staleness, seed=seed, steps=steps, prompts_per_step=4, group_size=4,\n"
        "                eval_every=2, eval_size=8, task_params={'max_digits': 2, 'heldout_size': 8},\n"
        "                out_dir=out_dir, run_name=run_name)\n"
        "Run(cfg, log=lambda s: None).run()")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


@pytest.mark.slow  # ~13 s (papermill kernels per cell): CI's slow line
def test_notebook_cells(base, tmp_path):
    pytest.importorskip("papermill")
    nb = _write_notebook(tmp_path / "tiny.ipynb")
    with pytest.raises(WorkbenchError, match="params_file is only read with notebook="):
        sweep(base, {"staleness": [1]}, params_file="ci.yaml", sweep_dir=tmp_path / "bad", **QUIET)
    with pytest.raises(WorkbenchError, match="the notebook declares no parameter 'lr'"):
        sweep(base, {"lr": [0.1]}, notebook=nb, sweep_dir=tmp_path / "bad", **QUIET)
    with pytest.raises(WorkbenchError, match=r"base config \w+=.* cannot be passed: the notebook declares no"):
        sweep(base, {"staleness": [1]}, notebook=nb, sweep_dir=tmp_path / "bad", **QUIET)
    df = sweep(RunConfig(model=base.model, steps=2), {"staleness": [1]}, notebook=nb, sweep_dir=tmp_path / "nb",
               workers=0, **QUIET)
    assert df["status"].to_list() == ["ok", "ok"] and df["offpolicy/staleness_mean"].to_list() == [0.0, 1.0]
    d = tmp_path / "nb" / "runs" / "staleness=1__seed=0"
    assert (d / "notebook.ipynb").exists() and json.loads((d / "config.json").read_text())["staleness"] == 1


class RecordingBar:
    """The tqdm calls the sweep makes (``n``, ``initial``, ``update``, ``write``, ``close``)."""

    def __init__(self, total, initial, enabled, unit="upd"):
        self.total, self.initial, self.n, self.unit, self.updates = total, initial, initial, unit, []

    def update(self, k):
        self.updates.append(k)
        self.n += k

    def write(self, msg, file=None):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("workers", [0, 2])
def test_the_progress_bar_counts_updates_not_runs(base, tmp_path, monkeypatch, workers):
    bars = []
    monkeypatch.setattr("workbench.sweeps.driver.progress_bar", lambda *a, **k: bars.append(RecordingBar(*a, **k))
                        or bars[-1])
    cfg = RunConfig(**{**base.to_dict(), "steps": 4, "out_dir": str(tmp_path)})
    sweep(cfg, {"lr": [1e-3, 1e-2]}, workers=workers, name="bar", log=lambda s: None)
    (bar,) = bars
    assert (bar.total, bar.initial, bar.unit, bar.n) == (8, 0, "upd", 8)
    if workers == 0:
        assert bar.updates == [0, 1, 1, 1, 1, 0, 1, 1, 1, 1]  # each update as it happens (0: a fresh run's start)
    else:
        assert all(k >= 0 for k in bar.updates) and sum(bar.updates) == 8
    sweep(cfg, {"lr": [1e-3, 1e-2, 3e-2]}, workers=0, name="bar2", log=lambda s: None)
    sweep(cfg, {"lr": [1e-3, 1e-2, 3e-2]}, workers=0, name="bar2", log=lambda s: None)  # all complete
    assert (bars[-1].total, bars[-1].initial, bars[-1].updates) == (12, 12, [])
