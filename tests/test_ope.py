"""Off-policy evaluation: estimators against analytic truths and hand arithmetic, refusal, a tiny
real run, the monitor hook, selection metrics and bad input."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

import argparse

from workbench.charts import mimebundle, network_refs
from workbench.cli import main
from workbench.cli import ope as ope_cli
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.ope.chart import ope_chart_spec
from workbench.ope import (ESTIMATORS, OPEInputs, OPEMonitor, estimate, evaluate_batch, evaluate_inputs, fresh_sample,
                           selection_metrics, truth_of)
from workbench.policy.model import build_model, save_policy

# ----------------------------------------------------------------------------- synthetic bandit
REWARD = np.array([0.0, 0.3, 0.7, 1.0])  # K = 4 fixed responses
MU = np.array([0.4, 0.3, 0.2, 0.1])
PI = np.array([0.1, 0.2, 0.3, 0.4])
J_PI = float(PI @ REWARD)  # 0.67


def bandit_draw(rng: np.random.Generator, prompts: int, group: int) -> OPEInputs:
    a = rng.choice(4, size=prompts * group, p=MU)  # [N] responses sampled from mu
    return OPEInputs.of(np.log(PI[a]) - np.log(MU[a]), REWARD[a], np.repeat(np.arange(prompts), group), np.log(MU[a]))


@pytest.mark.parametrize("name", ["is", "pdis", "dr"])
def test_unbiased_estimators_intervals_cover_the_analytic_truth(name):
    # 300 independent batches; if the 95% interval covered exactly 95%, the hit count is Binomial(300, 0.95):
    # mean 285, sd sqrt(300 * 0.95 * 0.05) = 3.8, so >= 264 hits (0.88) fails only ~5.6 sd below nominal.
    hits, estimates = 0, []
    for i in range(300):
        inp = bandit_draw(np.random.default_rng(1000 + i), prompts=40, group=4)
        res = estimate(name, inp, seed=i, resamples=400)
        hits += res.lo <= J_PI <= res.hi
        estimates.append(res.estimate)
    assert hits / 300 >= 0.88
    se = np.std(estimates) / math.sqrt(300)  # unbiased: the mean of 300 estimates within 4 standard errors
    assert abs(np.mean(estimates) - J_PI) < 4 * se


def test_clipped_is_mean_matches_its_analytic_biased_value():
    c = 2.0
    w = PI / MU
    expected = float(MU @ (np.minimum(w, c) * REWARD))  # E_mu[min(w, c) r] = 0.47, below J = 0.67
    vals = [estimate("clipped_is", bandit_draw(np.random.default_rng(i), 40, 4), {"c": c}, resamples=10).estimate
            for i in range(300)]
    assert abs(np.mean(vals) - expected) < 4 * np.std(vals) / math.sqrt(300)
    assert expected < J_PI - 0.1


def test_snis_error_shrinks_with_n():
    err = {n: np.mean([abs(estimate("snis", bandit_draw(np.random.default_rng(7 + i), n, 1), resamples=10).estimate
                           - J_PI) for i in range(200)]) for n in (10, 640)}
    assert err[640] < err[10] / 4  # root-n consistency: 8x the sqrt(N) ratio, well inside


# ----------------------------------------------------------------------------- hand arithmetic
def toy() -> OPEInputs:
    # 2 prompts x 3 samples
    return OPEInputs.of(log_w=np.log([0.5, 2.0, 1.0, 4.0, 0.25, 1.0]), rewards=[1.0, 0.0, 1.0, 0.5, 1.0, 0.0],
                        group_id=[0, 0, 0, 1, 1, 1], log_mu=np.log([0.2, 0.1, 0.5, 0.05, 0.4, 0.25]))


def test_every_estimator_by_hand_on_a_toy_batch():
    t = evaluate_inputs(toy(), params={"clipped_is": {"c": 1.5}, "ips_alpha": {"alpha": 0.5}}, resamples=50)
    got = dict(zip(t["estimator"], t["estimate"]))
    is_ = (0.5 * 1 + 0 + 1 * 1 + 4 * 0.5 + 0.25 * 1 + 0) / 6  # 3.75 / 6
    assert got["is"] == pytest.approx(0.625, rel=1e-12) and is_ == 0.625
    assert got["pdis"] == pytest.approx(0.625, rel=1e-12)
    assert got["snis"] == pytest.approx(3.75 / 8.75, rel=1e-12)  # sum w = 0.5 + 2 + 1 + 4 + 0.25 + 1
    assert got["clipped_is"] == pytest.approx((0.5 + 1 + 1.5 * 0.5 + 0.25) / 6, rel=1e-12)
    # pi / mu^0.5 = w mu^0.5 per row, times r
    ips = (0.5 * math.sqrt(0.2) + 1 * math.sqrt(0.5) + 4 * math.sqrt(0.05) * 0.5 + 0.25 * math.sqrt(0.4)) / 6
    assert got["ips_alpha"] == pytest.approx(ips, rel=1e-12)
    # leave-one-out q: group 0 rewards (1, 0, 1) -> q = (0.5, 1, 0.5); group 1 (0.5, 1, 0) -> q = (0.5, 0.25, 0.75)
    dr = [0.5 + 0.5 * 0.5, 1 + 2 * (0 - 1), 0.5 + 1 * 0.5, 0.5 + 4 * 0, 0.25 + 0.25 * 0.75, 0.75 + 1 * (-0.75)]
    assert got["dr"] == pytest.approx(sum(dr) / 6, rel=1e-12)
    ess = 8.75 ** 2 / (0.25 + 4 + 1 + 16 + 0.0625 + 1)
    assert t["ess"][0] == pytest.approx(ess, rel=1e-12) and t["ess_frac"][0] == pytest.approx(ess / 6, rel=1e-12)
    # Hoeffding of clipped IS: 2 groups of 3, lambda = 1/2 each, width c = 1.5 (rewards in [0, 1])
    row = t.filter(pl.col("estimator") == "clipped_is").row(0, named=True)
    half = 1.5 * math.sqrt(math.log(2 / 0.05) * 0.5 / 2)
    assert row["bound_hi"] == pytest.approx(min(row["estimate"] + half, 1.5), rel=1e-12)
    assert row["bound_lo"] == pytest.approx(max(row["estimate"] - half, 0.0), rel=1e-12)
    assert t.filter(pl.col("estimator") == "is")["bound_lo"].is_nan().all()


def test_pdis_equals_trajectory_is_with_a_terminal_reward_and_differs_with_per_token_rewards():
    rng = np.random.default_rng(0)
    ratio = rng.normal(0, 0.3, size=(5, 4))  # [N, T]
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], float)
    r = rng.uniform(size=5)
    inp = OPEInputs.of((ratio * mask).sum(1), r, log_mu=None, token_log_ratio=ratio, mask=mask)
    assert estimate("pdis", inp, resamples=10).estimate == pytest.approx(estimate("is", inp, resamples=10).estimate,
                                                                         rel=1e-12)
    step = np.zeros((5, 4))
    step[:, 0] = 1.0  # a reward of 1 at the first decision only: PDIS weights it by rho_0 alone
    per_token = OPEInputs.of((ratio * mask).sum(1), r, token_log_ratio=ratio, mask=mask, token_rewards=step)
    assert estimate("pdis", per_token, resamples=10).estimate == pytest.approx(np.exp(ratio[:, 0]).mean(), rel=1e-12)


def test_refusal_below_the_ess_threshold():
    inp = OPEInputs.of(log_w=[20.0] + [0.0] * 99, rewards=[1.0] * 100)  # one weight e^20: ESS ~ 1.0
    res = estimate("is", inp, min_ess_frac=0.05, resamples=10)
    assert res.refused and res.ess_frac < 0.05
    assert res.reason == f"not enough overlap: ESS {100 * res.ess_frac:.1f}% of N=100 (minimum 5%)"
    assert not estimate("is", OPEInputs.of([0.0] * 10, [1.0] * 10), min_ess_frac=0.05, resamples=10).refused


# ----------------------------------------------------------------------------- selection
def test_selection_metrics_by_hand():
    est = {"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.1}
    truth = {"a": 0.4, "b": 0.8, "c": 0.6, "d": 0.2}
    m = selection_metrics(est, truth, behavior_value=0.3, k=2)
    # ranks of est (a4 b2 c3 d1) vs truth (a2 b4 c3 d1): d = (2, -2, 0, 0), rho = 1 - 6 * 8 / (4 * 15)
    assert m["spearman"] == pytest.approx(1 - 48 / 60, rel=1e-12)
    assert m["top_pick"] == "a" and m["regret_at_1"] == pytest.approx(0.8 - 0.4, rel=1e-12)
    # top 2 by estimate: a (0.4), c (0.6): best 0.6, population std 0.1
    assert m["best_at_k"] == pytest.approx(0.6) and m["std_at_k"] == pytest.approx(0.1, rel=1e-9)
    assert m["sharpe_at_k"] == pytest.approx((0.6 - 0.3) / 0.1, rel=1e-9)
    one = selection_metrics(est, truth, behavior_value=0.3, k=1)
    assert math.isnan(one["sharpe_at_k"]) and one["excess_at_k"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- tiny real runs
# reverse with short strings: an untrained model's letters-only answers earn the format reward ~20% of the time
SMALL = dict(task="reverse", task_params={"max_len": 3, "heldout_size": 8}, prompts_per_step=4, group_size=4,
             eval_every=2, eval_size=8, lr=1e-3, seed=3, max_new_tokens=4, rewards=(("format", 1.0, {"value": 1.0}),))


def make_run(tokenizer, tiny_model_config, tmp_path=None, **overrides):
    cfg = RunConfig(**{**SMALL, "out_dir": str(tmp_path) if tmp_path else "", "run_name": "r", **overrides})
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)


def test_staleness_zero_weights_are_one_and_estimates_agree_with_a_fresh_truth(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config)
    batch = fresh_sample(run, prompts=16, seed=11)  # behaviour = the current policy
    t = evaluate_batch(run.model, batch, run.knobs.applied.temperature, ["is", "snis", "dr", "pdis"], resamples=500)
    mean_r = float(batch.rewards.double().mean())
    assert 0.0 < mean_r < 1.0  # the format reward varies on an untrained model
    for e in t.iter_rows(named=True):
        assert e["estimate"] == pytest.approx(mean_r, abs=1e-5) and e["ess_frac"] == pytest.approx(1.0, abs=1e-6)
    truth = truth_of(fresh_sample(run, prompts=16, seed=12).rewards.double().numpy())
    row = t.filter(pl.col("estimator") == "is").row(0, named=True)
    assert row["lo"] <= truth.hi and truth.lo <= row["hi"]  # the two intervals overlap


def test_monitor_leaves_metrics_bit_identical_and_writes_parquet(tokenizer, tiny_model_config, tmp_path):
    kw = dict(staleness=2, objective="ppo_clip")
    plain = make_run(tokenizer, tiny_model_config, tmp_path / "a", **kw)
    plain.run(4)
    watched = make_run(tokenizer, tiny_model_config, tmp_path / "b", **kw)
    mon = OPEMonitor(every=2, estimators=["is", "clipped_is", "dr"], truth_prompts=4, resamples=50)
    watched.hooks.append(mon)
    watched.run(4)
    det = lambda df: df.select([c for c in df.columns if not c.startswith("perf/")])  # noqa: E731
    assert det(watched.metrics).equals(det(plain.metrics))
    disk = pl.read_parquet(tmp_path / "b" / "r" / "ope.parquet")
    assert disk.equals(mon.table) and disk.height == 2 * 3
    assert disk["update"].unique().sort().to_list() == [1, 3]
    stale = dict(zip(plain.metrics["update"], plain.metrics["offpolicy/staleness_mean"]))
    assert disk["staleness_mean"].to_list() == [stale[u] for u in disk["update"]] and max(stale.values()) == 2.0
    assert disk["truth_n"].unique().to_list() == [16] and (disk["ess_frac"] < 1.0).all()  # stale: weights vary
    watched.close()
    resumed = Run.resume(tmp_path / "b" / "r", model=build_model(tiny_model_config, tokenizer, seed=0),
                         tokenizer=tokenizer, log=lambda s: None)
    again = OPEMonitor(every=2, estimators=["is", "clipped_is", "dr"], truth_prompts=4, resamples=50)
    resumed.hooks.append(again)
    resumed.run(2)
    both = pl.read_parquet(tmp_path / "b" / "r" / "ope.parquet")  # the earlier rows kept, one evaluation added
    assert both["update"].to_list() == [1] * 3 + [3] * 3 + [5] * 3 and both.head(6).equals(disk)


def ope_main(argv: list[str]) -> int:
    """The ``ope`` subcommand parsed and run as ``python -m workbench`` does it."""
    parser = argparse.ArgumentParser()
    ope_cli.add_parser(parser.add_subparsers(dest="command"))
    return ope_cli.cli_main(parser.parse_args(["ope", *argv]))


def test_cli_on_a_run_directory_and_bad_input(tokenizer, tiny_model, tmp_path, capsys):
    model_dir = save_policy(tiny_model, tokenizer, tmp_path / "ckpt")
    cfg = RunConfig(**{**SMALL, "model": str(model_dir), "out_dir": str(tmp_path / "runs"), "run_name": "r",
                       "checkpoint_every": 2})
    trained = Run(cfg, log=lambda s: None)
    trained.run(4)
    trained.close()  # the folder's lock released: the command reads it as another process would
    run_dir = tmp_path / "runs" / "r"
    before = sorted(p.name for p in run_dir.iterdir())
    for argv, msg in [([str(run_dir), "--estimators", "is,nope"], "unknown estimator 'nope'"),
                      ([str(run_dir), "--staleness", "9"], "no checkpoint at least 9"),
                      ([str(run_dir), "--checkpoint", "update_000099"], "checkpoint="),
                      ([str(tmp_path / "empty")], "config.json")]:
        with pytest.raises(WorkbenchError, match=msg) as e:
            ope_main(argv)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written
    assert ope_main([str(run_dir), "--estimators", "is,snis,clipped_is", "--truth-prompts", "4"]) == 0
    out = capsys.readouterr().out
    assert "| clipped_is |" in out and "truth:" in out
    table = pl.read_parquet(run_dir / "ope-update_000004-vs-update_000002.parquet")
    assert table["estimator"].to_list() == ["is", "snis", "clipped_is"] and (table["truth_n"] == 16).all()


def test_batch_without_behaviour_logprobs_is_a_one_line_error(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config)
    batch = fresh_sample(run, prompts=2, seed=0)
    with pytest.raises(WorkbenchError, match=r"^batch.behavior_logprobs=None is invalid"):
        evaluate_batch(run.model, batch.with_(behavior_logprobs=None), 1.0)
    with pytest.raises(WorkbenchError, match="unknown estimator 'x'"):
        evaluate_batch(run.model, batch, 1.0, ["x"])
    with pytest.raises(WorkbenchError, match="clipped_is.c"):
        evaluate_batch(run.model, batch, 1.0, ["clipped_is"], {"clipped_is": {"c": -1}})
    with pytest.raises(WorkbenchError, match="log_w"):
        OPEInputs.of([math.inf], [1.0])
    assert torch.isfinite(batch.behavior_logprobs).all()


def test_ope_every_in_the_config_attaches_the_monitor_and_is_validated(tokenizer, tiny_model_config, tmp_path):
    run = make_run(tokenizer, tiny_model_config, tmp_path, staleness=1, ope_every=2)
    assert [type(h) for h in run.hooks] == [OPEMonitor]
    run.run(4)
    disk = pl.read_parquet(tmp_path / "r" / "ope.parquet")
    assert disk["update"].unique().sort().to_list() == [1, 3]
    assert set(disk["estimator"].to_list()) == set(ESTIMATORS)  # every registered estimator by default
    assert not make_run(tokenizer, tiny_model_config).hooks  # 0 (the default): off
    with pytest.raises(WorkbenchError, match=r"^ope_every=-1 is invalid") as e:
        RunConfig(ope_every=-1)
    assert "\n" not in str(e.value)


def test_the_cli_run_draws_the_ope_panel_offline_with_refusals_as_hollow_marks(tokenizer, tiny_model, tmp_path):
    model_dir = save_policy(tiny_model, tokenizer, tmp_path / "ckpt")
    code = main(["run", "--model", str(model_dir), "--task", "reverse", "--task-params", "max_len=3", "heldout_size=8",
                 "--prompts-per-step", "4", "--group-size", "4", "--eval-every", "2", "--eval-size", "8",
                 "--steps", "4", "--staleness", "2", "--ope-every", "2", "--out-dir", str(tmp_path / "runs"),
                 "--run-name", "r"])
    assert code == 0
    d = tmp_path / "runs" / "r"
    assert (d / "ope.png").read_bytes()[:4] == b"\x89PNG"
    table = pl.read_parquet(d / "ope.parquet")
    spec = ope_chart_spec(table.with_columns(pl.when(pl.col("estimator") == "is").then(True)
                                             .otherwise(pl.col("refused")).alias("refused")))
    top = spec["vconcat"][0]
    rows = top["data"]["values"]
    refused = [r for r in rows if r["estimator"] == "is"]
    assert refused and all(r["estimate"] is None and r["lo"] is None for r in refused)  # never drawn as a number
    truths = dict(zip(table["update"].to_list(), table["truth"].to_list()))
    assert all(r["at_truth"] == pytest.approx(truths[r["update"]]) for r in refused)  # a hollow mark at the truth
    kept = [r for r in rows if r["estimator"] == "dr"]
    assert [r["estimate"] for r in kept] == pytest.approx(table.filter(pl.col("estimator") == "dr")["estimate"].to_list())
    assert network_refs(mimebundle(spec)) == []
    with pytest.raises(WorkbenchError, match="no OPE rows") as e:
        ope_chart_spec(pl.DataFrame({"update": [1]}))
    assert "\n" not in str(e.value)
