"""The lr = 0 null test (workbench.studies.null_test, the null-test command) and the sequence-weight
length sweep (workbench.studies.sequence_weights), against hand-computed values."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from workbench.cli import OneLineParser
from workbench.cli import null_test as cli
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.policy.model import build_model
from workbench.studies.null_test import (check_settings, default_settings, format_null_table, noisiest_setting,
                                         run_null_test)
from workbench.studies.sequence_weights import (analytic_row, batch_row, format_weight_table, lognormal_stats,
                                                measured_row, weight_table)

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=100, eval_size=8, seed=3,
             rewards=(("overlong", 1.0, {"max_len": 4, "cache_len": 3}),))


def _null(tokenizer, tiny_model_config, settings, noise=0.3, updates=2, **overrides):
    cfg = RunConfig(**{**SMALL, **overrides})
    return run_null_test(cfg, settings, updates=updates, noise=noise, log=lambda s: None,
                         model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer)


def test_exact_fp32_clips_nothing_and_injected_numerics_do(tokenizer, tiny_model_config):
    res = _null(tokenizer, tiny_model_config, ["exact", "trainer_noise", "sampler_noise", "sampler_bf16"])
    rows = {r["setting"]: r for r in res.table.iter_rows(named=True)}
    assert res.weights_unchanged  # lr = 0 really moves no parameter
    exact = rows["exact"]
    assert exact["outside_band"] == 0.0 and exact["clipfrac"] == 0.0 and exact["masked_frac"] == 0.0
    assert exact["abs_max"] < 1e-5 and exact["tokens"] > 50
    for name in ("trainer_noise", "sampler_noise"):  # sigma = 0.3 on the logits
        assert rows[name]["outside_band"] > 0.01 and rows[name]["abs_q50"] > 0.01, name
    assert rows["sampler_bf16"]["abs_max"] > 1e-4  # rounding reaches the ratio (too little to clip here)
    assert (rows["exact"]["band_lo"], rows["exact"]["band_hi"]) == (0.8, 1.2)  # ppo_clip's 0.2 / 0.2
    x = res.log_ratios["trainer_noise"]
    assert math.isclose(rows["trainer_noise"]["outside_band"],
                        float(((x.exp() < 0.8) | (x.exp() > 1.2)).double().mean()), rel_tol=1e-12)
    assert noisiest_setting(res) in ("trainer_noise", "sampler_noise")
    table = format_null_table(res.table)
    assert table.splitlines()[0].startswith("| setting | knobs | tokens | outside [0.8, 1.2]")
    assert len(table.splitlines()) == 2 + 4


def test_replay_pair_under_top_k(tokenizer, tiny_model_config):
    res = _null(tokenizer, tiny_model_config, ["no_replay", "replay"], top_k=3)
    rows = {r["setting"]: r for r in res.table.iter_rows(named=True)}
    assert rows["no_replay"]["outside_band"] == 1.0  # log S = log p(top 3) < log 0.8 on an untrained model
    assert rows["replay"]["outside_band"] == 0.0 and rows["replay"]["abs_max"] < 1e-5


def test_default_settings_and_bad_names():
    assert default_settings(RunConfig()) == ["exact", "sampler_bf16", "trainer_bf16", "autocast_bf16", "trainer_noise"]
    assert default_settings(RunConfig(top_p=0.9, trainer_logit_noise=0.1))[0] == "config"
    assert default_settings(RunConfig(top_k=5))[-2:] == ["no_replay", "replay"]
    with pytest.raises(WorkbenchError, match="setting='fp64' is invalid: expected one of config, exact"):
        check_settings(["exact", "fp64"])
    with pytest.raises(WorkbenchError, match="updates=0 is invalid"):
        run_null_test(RunConfig(), ["exact"], updates=0)


# ---------------------------------------------------------------- sequence weights

def test_lognormal_stats_hand_computed():
    s = lognormal_stats(0.0, 1.0)
    assert s.median == 1.0
    assert math.isclose(s.q05, 0.193041, rel_tol=1e-5)  # exp(-1.6448536)
    assert math.isclose(s.share_below, 0.010651, abs_tol=1e-6)  # Phi(ln 0.1) = Phi(-2.302585)
    point = lognormal_stats(-3.0, 0.0)  # sd 0: the point mass e^-3 = 0.0498 < 0.1
    assert point.median == point.q05 == math.exp(-3.0) and point.share_below == 1.0


def test_analytic_row_sum_grows_and_mean_shrinks_with_length():
    r = analytic_row(16, 0.25)  # IS: sd = 0.25 * 4 = 1; GSPO: sd = 0.25 / 4 = 0.0625
    assert math.isclose(r["is"].q05, 0.193041, rel_tol=1e-5) and math.isclose(r["is"].share_below, 0.010651, abs_tol=1e-6)
    assert math.isclose(r["gspo"].q05, math.exp(-1.6448536269514722 * 0.0625), rel_tol=1e-12)  # 0.90230
    assert r["gspo"].share_below < 1e-100
    d = analytic_row(100, 0.1, mean=-0.01)  # IS: N(-1, 1); GSPO: N(-0.01, 0.01^2)
    assert math.isclose(d["is"].median, math.exp(-1.0), rel_tol=1e-12)  # 0.367879
    assert math.isclose(d["is"].q05, math.exp(-2.6448536269514722), rel_tol=1e-12)  # 0.071
    assert math.isclose(d["is"].share_below, 0.096364, abs_tol=1e-5)  # Phi(-1.302585)
    assert math.isclose(d["gspo"].median, math.exp(-0.01), rel_tol=1e-12)
    with pytest.raises(WorkbenchError, match="length=0 is invalid"):
        analytic_row(0, 0.1)
    with pytest.raises(WorkbenchError, match="sigma=-1 is invalid"):
        analytic_row(4, -1)


def test_measured_row_of_a_constant_pool_is_exact():
    r = measured_row(torch.tensor([0.5]), 4, n=10)  # every sequence sums to 2
    assert math.isclose(r["is"].median, math.exp(2.0), rel_tol=1e-12) and r["is"].q05 == r["is"].median
    assert math.isclose(r["gspo"].median, math.exp(0.5), rel_tol=1e-12) and r["is"].share_below == 0.0
    low = measured_row(torch.tensor([-1.0]), 3, n=5)  # weight e^-3 < 0.1, its mean e^-1 is not
    assert low["is"].share_below == 1.0 and low["gspo"].share_below == 0.0
    # a symmetric pool: the sum's spread grows like sqrt(L), the mean's shrinks
    pool = torch.tensor([-0.1, 0.1])
    a, b = measured_row(pool, 16, n=4000, seed=1), measured_row(pool, 1024, n=4000, seed=1)
    assert b["is"].q05 < a["is"].q05 < 1 < a["gspo"].q05 * 1.2 and b["gspo"].q05 > a["gspo"].q05
    assert math.isclose(math.log(b["is"].q05), -1.6448536 * 0.1 * 32, rel_tol=0.08)  # normal limit
    with pytest.raises(WorkbenchError, match="pool of token log-ratios is empty"):
        measured_row(torch.tensor([]), 4)


def test_batch_row_uses_each_sequence_at_its_length():
    x = torch.tensor([[0.1, 0.2, 9.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the 9.0 is padding
    r = batch_row(x, mask)  # float32 input; sums 0.3, -1; means 0.15, -1/3; linear-interpolated quantiles of two values
    assert math.isclose(r["is"].median, math.exp(-0.35), rel_tol=1e-6)
    assert math.isclose(r["is"].q05, math.exp(-1.0 + 0.05 * 1.3), rel_tol=1e-6)
    assert math.isclose(r["gspo"].median, math.exp((0.15 - 1 / 3) / 2), rel_tol=1e-6)
    assert r["is"].share_below == 0.0


def test_weight_table_defaults_to_the_pools_moments_and_formats():
    pool = torch.tensor([-0.2, 0.0, 0.2, 0.0], dtype=torch.float64)  # mean 0, population std sqrt(0.02)
    rows = weight_table(pool, [4, 64], n=200)
    assert [r["L"] for r in rows] == [4, 64]
    assert math.isclose(rows[1]["analytic"]["is"].q05, math.exp(-1.6448536269514722 * math.sqrt(0.02 * 64)),
                        rel_tol=1e-9)
    text = format_weight_table(rows, math.sqrt(0.02), 0.0)
    assert "| 64 |" in text and text.count("\n") == 5


# ---------------------------------------------------------------- the command

def _parse(*argv: str) -> argparse.Namespace:
    p = OneLineParser(prog="python -m workbench", allow_abbrev=False)
    cli.add_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["null-test", *argv])


@pytest.mark.parametrize("argv,match", [
    (("--settings", "exact,nope"), "setting='nope' is invalid"),
    (("--lengths", "4,x"), "--lengths='4,x' is invalid"),
    (("--lengths", "0"), "--lengths='0' is invalid"),
    (("--updates", "0"), "--updates=0 is invalid"),
    (("--noise", "-1"), "--noise=-1.0 is invalid"),
    (("--settings", "exact", "--weights-setting", "bf16"), "--weights-setting='bf16' is invalid"),
    (("--top-k", "-1"), "top_k=-1 is invalid"),
])
def test_cli_rejects_bad_input_before_building_anything(argv, match):
    with pytest.raises(WorkbenchError, match=match):
        cli.cli_main(_parse(*argv))


def test_cli_prints_both_tables(tokenizer, tiny_model_config, monkeypatch, capsys):
    import workbench.studies.null_test as study

    real = study.run_null_test

    def tiny(config, settings, **kw):  # the CLI's own path, on the tiny model
        return real(config, settings, **kw, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer)
    monkeypatch.setattr(cli, "run_null_test", tiny)
    args = _parse("--task", "addition", "--task-params", "max_digits=2", "heldout_size=16", "--prompts-per-step", "2",
                  "--group-size", "2", "--updates", "1", "--settings", "exact,trainer_noise", "--lengths", "4,16")
    assert cli.cli_main(args) == 0
    out = capsys.readouterr().out
    assert "| exact | exact |" in out and "| trainer_noise | trainer_logit_noise=0.1 |" in out
    assert "setting: trainer_noise" in out and "| 16 |" in out
    assert "weights bit-identical after 1 lr = 0 updates per setting: True" in out
