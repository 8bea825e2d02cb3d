"""The estimator lab (workbench.lab, workbench.lab_report) on the tiny untrained model: the metric
formulas against hand computations in float64, every objective that reduces to REINFORCE equal to
an independent REINFORCE gradient at ratio 1 and level with the fresh-batch floor at staleness 0,
a known-biased estimator (REINFORCE on data 12 updates old, a large learning rate) outside the floor,
the tidy table's shape, determinism for a seed, the sentences and chart, and bad input."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.lab import (SIZES, estimator_gradients, estimator_lab, gradient_metrics, parameter_group,
                           relative_variance, variance_interval)
from workbench.lab_report import (FRESH_ROW, REFERENCE_ROW, TABLE_COLUMNS, lab_chart, lab_findings, lab_summary,
                                  versus_floor)
from workbench.loop import Run
from workbench.notebook import setup
from workbench.policy.logprobs import token_logprobs
from workbench.steps.reweight import OBJECTIVES

LAB_METRICS = {"cosine", "projection", "relative_error", "grad_norm", "variance", "ess_token", "ess_seq",
               "norm/norm", "norm/embedding", "norm/attention", "norm/mlp"}  # the tiny model ties its head
REFERENCE_METRICS = {"relative_se", "split_cosine", "cosine_ceiling", "sequences"}
# objectives whose gradient is REINFORCE's at ratio 1 with the same (token-mean) aggregation as g*
REDUCING = [n for n in OBJECTIVES.names() if OBJECTIVES.meta(n)["reduces_to_reinforce"]
            and OBJECTIVES.meta(n)["default_aggregation"] == "token-mean"]


def tiny_run(seed: int = 0, lr: float = 0.01, prompts: int = 8, staleness: int = 0) -> Run:
    config, model, tok = setup(True, prompts_per_step=prompts, group_size=4, lr=lr, seed=seed, threads=2,
                               out_dir="", eval_size=8, staleness=staleness)
    return Run(config, model=model, tokenizer=tok, log=lambda s: None)


@pytest.fixture(scope="module")
def ci_table():
    return estimator_lab(tiny_run(), **{**SIZES["ci"]["lab"], "batches": 5})


def value(table: pl.DataFrame, objective: str, staleness: int, metric: str) -> dict:
    return table.filter((pl.col("objective") == objective) & (pl.col("staleness") == staleness)
                        & (pl.col("metric") == metric)).row(0, named=True)


# ----------------------------------------------------------------------------- formulas
def test_gradient_metrics_match_hand_formulas():
    rng = np.random.default_rng(3)
    grads, ref = rng.normal(size=(5, 7)), rng.normal(size=7)
    grads[2] = 0.0  # a zero gradient has no direction
    out = gradient_metrics(torch.tensor(grads), torch.tensor(ref))
    for k in range(5):
        g = grads[k]
        dot, ng, nr = sum(a * b for a, b in zip(g, ref)), math.sqrt(sum(a * a for a in g)), math.sqrt(sum(b * b for b in ref))
        assert out["projection"][k] == pytest.approx(dot / nr**2, rel=1e-12, abs=1e-15)
        assert out["relative_error"][k] == pytest.approx(math.sqrt(sum((a - b) ** 2 for a, b in zip(g, ref))) / nr, rel=1e-12)
        assert out["grad_norm"][k] == pytest.approx(ng, rel=1e-12, abs=1e-15)
        assert math.isnan(out["cosine"][k]) if k == 2 else out["cosine"][k] == pytest.approx(dot / (ng * nr), rel=1e-12)


def test_relative_variance_is_the_trace_of_the_covariance_over_the_squared_mean():
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(4, 6)) + 2.0
    mean = grads.mean(axis=0)
    expected = np.mean([np.sum((g - mean) ** 2) for g in grads]) / np.sum(mean**2)
    gram = grads @ grads.T
    assert relative_variance(gram, np.ones(4)) == pytest.approx(expected, rel=1e-12)
    # multiplicities: the same as the expanded multiset (batch 0 twice, batch 3 left out)
    multiset = grads[[0, 0, 1, 2]]
    m = multiset.mean(axis=0)
    expanded = np.mean([np.sum((g - m) ** 2) for g in multiset]) / np.sum(m**2)
    assert relative_variance(gram, np.array([2.0, 1.0, 1.0, 0.0])) == pytest.approx(expanded, rel=1e-12)
    est, lo, hi = variance_interval(torch.tensor(grads))
    assert est == pytest.approx(expected, rel=1e-12) and lo <= est <= hi


def test_parameter_groups_by_name():
    assert [parameter_group(n) for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                         "model.layers.0.mlp.up_proj.weight", "model.layers.1.post_attention_layernorm.weight",
                                         "lm_head.weight", "model.rotary.inv_freq")] == [
        "embedding", "attention", "mlp", "norm", "head", "other"]


# ----------------------------------------------------------------------------- (a) staleness 0 is REINFORCE
def test_at_ratio_one_every_reducing_objective_is_an_independent_reinforce_gradient():
    run = tiny_run()
    run.run(2)  # the untrained model's first batches often carry no reward variance
    batch, _ = run.sample(16, filter_zero_variance=False)
    weights = [p for p in run.model.parameters() if p.requires_grad]
    lp, _ = token_logprobs(run.model, batch, temperature=1.0)  # [B, T]
    mask, adv = batch.response_mask, batch.advantages[:, None]  # [B, T], [B, 1]
    reinforce = -(adv * lp * mask).sum() / mask.sum()  # token-mean -A log pi, written out
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(reinforce, weights)]).double()
    assert float(expected.norm()) > 0
    grads, (ess_token, ess_seq) = estimator_gradients(run, batch, [(n, None) for n in REDUCING], {})
    for name, per_param in zip(REDUCING, grads):
        g = torch.cat([x.reshape(-1) for x in per_param])
        assert float((g - expected).norm() / expected.norm()) < 1e-5, name  # float32 ratio round-off only
    assert ess_token == pytest.approx(1.0, abs=1e-6) and ess_seq == pytest.approx(1.0, abs=1e-6)


def test_at_staleness_zero_reducing_objectives_are_level_with_the_fresh_batch_floor():
    objectives = ["reinforce", "ppo_clip", "is", "m2po", "cispo", "tis"]
    assert set(objectives) <= set(REDUCING)
    table = estimator_lab(tiny_run(seed=1), staleness=[0], objectives=objectives, batches=6, batch_prompts=8,
                          reference_factor=8, warmup=2)
    floor = value(table, FRESH_ROW, 0, "cosine")
    base = value(table, "reinforce", 0, "cosine")
    for name in objectives:
        row = value(table, name, 0, "cosine")
        assert row["n"] == 6 and row["mean"] == pytest.approx(base["mean"], rel=1e-5), name
        assert versus_floor(row, floor) == "not distinguished from", (name, row, floor)
        assert value(table, name, 0, "ess_token")["mean"] == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- (b) a known bias
def test_reinforce_on_data_many_updates_old_is_biased_outside_its_interval():
    """A large learning rate moves the tiny policy to near-deterministic answers in 12 updates: the
    on-policy gradient shrinks while the stale batches (drawn when rewards still varied) push as before.
    The projection on g* (1 in expectation for an unbiased estimate, up to g*'s own noise: the floor)
    lies far above the floor's interval; the cosine alone would not show it (stale batches carry more
    signal and point the same way)."""
    table = estimator_lab(tiny_run(seed=2, lr=0.02), staleness=[0, 12], objectives=["reinforce"], batches=8,
                          batch_prompts=16, reference_factor=16, warmup=2)
    floor, stale = value(table, FRESH_ROW, 0, "projection"), value(table, "reinforce", 12, "projection")
    assert stale["lo"] > floor["hi"], (stale, floor)  # the interval excludes what fresh data reaches
    assert versus_floor(stale, floor) == "above"
    assert versus_floor(value(table, "reinforce", 0, "projection"), floor) == "not distinguished from"
    assert value(table, "reinforce", 12, "ess_token")["hi"] < 0.5  # the policy moved: the weights are far from 1
    assert any(f.startswith("reinforce at staleness 12:") and "projection" in f and "above the floor's" in f
               for f in lab_findings(table))


# ----------------------------------------------------------------------------- (c) the table
def test_table_is_tidy_one_row_per_objective_staleness_and_metric(ci_table):
    lab = SIZES["ci"]["lab"]
    assert ci_table.columns == list(TABLE_COLUMNS)
    assert ci_table.schema["staleness"] == pl.Int64 and ci_table.schema["n"] == pl.Int64
    names = list(lab["objectives"])
    assert list(dict.fromkeys(ci_table["objective"].to_list())) == names + [FRESH_ROW, REFERENCE_ROW]
    est = ci_table.filter(pl.col("objective").is_in(names))
    assert set(est["metric"].to_list()) == LAB_METRICS
    assert est.height == len(names) * len(lab["staleness"]) * len(LAB_METRICS)
    assert set(ci_table.filter(pl.col("objective") == REFERENCE_ROW)["metric"].to_list()) == REFERENCE_METRICS
    assert ci_table.select("objective", "staleness", "metric").is_unique().all()
    finite = ci_table.filter(pl.col("lo").is_finite())
    assert (finite["lo"] <= finite["mean"] + 1e-12).all() and (finite["mean"] <= finite["hi"] + 1e-12).all()
    assert est.filter(pl.col("metric") == "variance")["n"].to_list() == [5] * (len(names) * len(lab["staleness"]))
    ref = {r["metric"]: r["mean"] for r in ci_table.filter(pl.col("objective") == REFERENCE_ROW).iter_rows(named=True)}
    assert ref["cosine_ceiling"] == pytest.approx(1 / math.sqrt(1 + ref["relative_se"] ** 2), rel=1e-12)
    assert ref["sequences"] == lab["batch_prompts"] * lab["reference_factor"] * 4  # x group_size


def test_findings_and_chart_say_only_what_the_intervals_show(ci_table):
    findings = lab_findings(ci_table)
    assert findings[0].startswith("on-policy reference g*:") and findings[1].startswith("fresh-batch floor")
    floor = value(ci_table, FRESH_ROW, 0, "cosine")
    for name in SIZES["ci"]["lab"]["objectives"]:
        for s in SIZES["ci"]["lab"]["staleness"]:
            row = value(ci_table, name, s, "cosine")
            sentence = next(f for f in findings if f.startswith(f"{name} at staleness {s}:"))
            if row["n"]:
                assert f"cosine {row['mean']:.2f} [{row['lo']:.2f}, {row['hi']:.2f}], {versus_floor(row, floor)} " in sentence
    synthetic = {"mean": 0.2, "n": 5}
    assert versus_floor({**synthetic, "lo": 0.1, "hi": 0.3}, {"lo": 0.5, "hi": 0.7}) == "below"
    assert versus_floor({**synthetic, "lo": 0.8, "hi": 0.9}, {"lo": 0.5, "hi": 0.7}) == "above"
    assert versus_floor({**synthetic, "lo": 0.1, "hi": 0.5}, {"lo": 0.5, "hi": 0.7}) == "not distinguished from"
    assert versus_floor({**synthetic, "lo": math.nan, "hi": math.nan}, {"lo": 0.5, "hi": 0.7}) == "no interval"
    summary = lab_summary(ci_table)
    assert summary["findings"] == findings and summary["batches"] == 5
    spec = lab_chart(ci_table).to_dict()
    first = spec["concat"][0]["layer"]
    assert [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in first] == [
        "rect", "rule", "rule", "line"]  # floor band, floor mean, intervals, estimates
    assert first[2]["encoding"]["x"]["scale"] == {"type": "symlog", "constant": 2.0}  # 0 drawn; smallest s > 0
    assert len(spec["concat"]) == 6


# ----------------------------------------------------------------------------- (d) determinism
def test_same_seed_same_table():
    kwargs = {"staleness": [0, 2], "objectives": ["reinforce", "m2po"], "batches": 3, "batch_prompts": 4,
              "reference_factor": 4}
    first, second = (estimator_lab(tiny_run(seed=5), **kwargs) for _ in range(2))
    assert first.equals(second)
    assert not first.equals(estimator_lab(tiny_run(seed=6), **kwargs))


# ----------------------------------------------------------------------------- (e) bad input
@pytest.mark.parametrize("kwargs, field", [
    ({"objectives": ["reinforce", "nope"]}, "objectives"), ({"objectives": "reinforce"}, "objectives"),
    ({"staleness": [0, -1]}, "staleness"), ({"staleness": []}, "staleness"), ({"staleness": [2, 2]}, "staleness"),
    ({"batches": 1}, "batches"), ({"batches": True}, "batches"), ({"corrections": ["nope"]}, "corrections"),
    ({"reference_chunks": 1}, "reference_chunks")])
def test_bad_input_is_one_line_naming_the_field_before_any_update(kwargs, field):
    run = tiny_run()
    with pytest.raises(WorkbenchError, match=f"^{field}=") as info:
        estimator_lab(run, **kwargs)
    assert "\n" not in str(info.value) and "expected" in str(info.value) and run.version == 0


def test_a_run_that_trains_on_stale_data_is_refused():
    run = tiny_run(staleness=2)
    with pytest.raises(WorkbenchError, match=r"^run\.knobs\.staleness=2 is invalid"):
        estimator_lab(run, staleness=[0, 1], objectives=["reinforce"], batches=2)
