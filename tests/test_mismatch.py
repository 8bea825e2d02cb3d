"""The sampler-vs-trainer mismatch and the drift / engine split of the log-ratio (workbench.steps.reweight.mismatch),
on the transformers sampler: engine mismatch is float rounding there and drift is the staleness."""

from __future__ import annotations

import math
import random

import polars as pl
import pytest
import torch

from workbench.config import RunConfig
from workbench.steps.generate import SamplingParams
from workbench.policy.logprobs import token_logprobs
from workbench.loop import Run
from workbench.steps.reweight.mismatch import attach_trainer_logprobs, decompose, metrics
from workbench.policy.model import build_model
from workbench.rollouts import Rollouts, concat

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=100, eval_size=8, lr=1e-2, seed=3,
             # an untrained model is never right: a length-shaped reward gives the groups reward variance
             rewards=(("overlong", 1.0, {"max_len": 4, "cache_len": 3}),))


def make_run(tokenizer, tiny_model_config, tmp_path=None, **overrides):
    cfg = RunConfig(**{**SMALL, "out_dir": str(tmp_path) if tmp_path else "", "run_name": "r", **overrides})
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer,
               log=lambda s: None)


def test_drift_plus_engine_is_the_total_per_token(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config, sync_every=3, top_p=0.9)
    seen = 0
    for _ in range(6):
        run.step()
        batch = run.last_batch  # trained on by the update that just ran; its trainer_logprobs are pi_gen
        assert batch.trainer_logprobs is not None and batch.trainer_logprobs.shape == batch.behavior_logprobs.shape
        with torch.no_grad():
            lp, _ = token_logprobs(run.model, batch, temperature=1.0)  # pi_theta now (after that update)
        parts = decompose(lp, batch.trainer_logprobs, batch.behavior_logprobs, batch.response_mask)
        valid = batch.response_mask > 0
        assert torch.allclose(parts["drift"] + parts["engine"], parts["total"], rtol=0, atol=1e-12)
        # and in the log-ratio the objective sees, computed in fp32, to fp32 precision
        total32 = (lp - batch.behavior_logprobs)[valid]
        assert torch.allclose(parts["total"][valid].float(), total32, rtol=0, atol=1e-6)
        assert (parts["drift"][~valid] == 0).all() and (parts["engine"][~valid] == 0).all()
        seen += int(parts["drift"][valid].abs().max() > 1e-4)
    assert seen >= 3  # the updates really moved the policy, so drift is not trivially zero
    df = run.metrics
    for row in df.iter_rows(named=True):  # the logged means add up too
        assert math.isclose(row["mismatch/total_mean"], row["mismatch/drift_mean"] + row["mismatch/engine_mean"],
                            rel_tol=0, abs_tol=1e-9)


def test_transformers_sampler_has_no_engine_mismatch_and_drift_is_staleness(tokenizer, tiny_model_config):
    df = make_run(tokenizer, tiny_model_config, sync_every=3).run(6)
    assert df["offpolicy/staleness_mean"].to_list() == [0.0, 1.0, 2.0] * 2
    assert (df["mismatch/engine_abs_max"] < 1e-5).all()  # same model object: KV-cache decode vs full forward
    assert (df["mismatch/engine_k3"].abs() < 1e-9).all()
    fresh = df.filter(pl.col("offpolicy/staleness_mean") == 0)
    assert (fresh["mismatch/drift_abs_max"] == 0).all()  # staleness 0: pi_theta is pi_gen exactly
    stale = df.filter((pl.col("offpolicy/staleness_mean") > 0) & (pl.col("update") >= 3))
    assert (stale["mismatch/drift_abs_max"] > 1e-4).all() and (stale["mismatch/engine_share"] < 1e-3).all()
    # the extra forward runs only where a batch is consumed after an update: at the sync points here
    assert (df["perf/time_trainer_logprobs"] > 0).to_list() == [True, False, False] * 2


def test_default_run_needs_no_extra_forward(tokenizer, tiny_model_config):
    df = make_run(tokenizer, tiny_model_config).run(3)  # staleness 0, sync 1, no reuse
    assert (df["perf/time_trainer_logprobs"] == 0).all()
    assert (df["mismatch/drift_abs_max"] == 0).all() and (df["mismatch/engine_abs_max"] < 1e-5).all()


def test_truncated_sampling_is_counted_as_engine_mismatch(tokenizer, tiny_model_config):
    # top-p: mu is renormalised over fewer tokens, so log mu >= log pi_gen on every sampled token
    df = make_run(tokenizer, tiny_model_config, top_p=0.5, staleness=1).run(3)
    assert (df["mismatch/engine_mean"] < -1e-3).all() and (df["mismatch/engine_ppl_ratio"] > 1).all()
    assert (df["mismatch/engine_k3"] > 0).all()


def test_measure_mismatch_off_skips_the_forward(tokenizer, tiny_model_config):
    df = make_run(tokenizer, tiny_model_config, staleness=2, measure_mismatch=False).run(4)
    assert (df["perf/time_trainer_logprobs"] == 0).all()
    # only the first update (staleness 0, a fresh batch) can be split for free
    assert df["mismatch/drift_mean"].is_null().to_list() == [False, True, True, True]


def test_trainer_logprobs_survive_checkpoint_and_resume_exactly(tokenizer, tiny_model_config, tmp_path):
    ref = make_run(tokenizer, tiny_model_config, staleness=2).run(5)
    a = make_run(tokenizer, tiny_model_config, tmp_path, staleness=2, checkpoint_every=3)
    a.run(3)
    assert all(b.trainer_logprobs is not None for b, _ in a.buffer.queue)
    b = Run.resume(tmp_path / "r", model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer,
                   log=lambda s: None)
    b.run(2)
    cols = [c for c in ref.columns if c.startswith("mismatch/")]
    assert len(cols) == 20
    assert b.metrics.select(cols).equals(ref.select(cols))


def test_metrics_on_known_values():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # [2, 3]
    beh = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    gen = torch.tensor([[-1.5, -2.0, 9.0], [-0.5, 9.0, 9.0]])  # padding values must not matter
    cur = torch.tensor([[-1.0, -3.0, 9.0], [-0.7, 9.0, 9.0]])
    batch = Rollouts(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                     response_ids=torch.ones(2, 3, dtype=torch.long), response_mask=mask, behavior_logprobs=beh,
                     policy_version=torch.zeros(2, dtype=torch.long), group_id=torch.zeros(2, dtype=torch.long),
                     trainer_logprobs=gen)
    m = metrics(cur, batch)
    eng = torch.tensor([-0.5, 0.0, 0.0], dtype=torch.float64)  # gen - beh on the 3 valid tokens
    drift = torch.tensor([0.5, -1.0, -0.2], dtype=torch.float64)  # cur - gen
    assert m["mismatch/engine_abs_max"] == pytest.approx(0.5) and m["mismatch/engine_mean"] == pytest.approx(-0.5 / 3)
    assert m["mismatch/engine_k3"] == pytest.approx(float((eng.exp() - 1 - eng).mean()))
    assert m["mismatch/engine_chi2"] == pytest.approx(float((2 * eng).exp().mean() - 1))
    assert m["mismatch/drift_m2"] == pytest.approx(float((drift**2).mean()))
    # per-sequence PPL_trainer / PPL_engine = exp(mean_t (log mu - log pi_gen)), averaged over sequences
    assert m["mismatch/engine_ppl_ratio"] == pytest.approx((math.exp(0.25) + 1.0) / 2)
    assert m["mismatch/engine_share"] == pytest.approx(
        m["mismatch/engine_m2"] / (m["mismatch/engine_m2"] + m["mismatch/drift_m2"]))
    assert metrics(cur, batch.with_(trainer_logprobs=None)) == {}  # stale rows without pi_gen: nothing
    fresh = metrics(cur, batch.with_(trainer_logprobs=None), policy_version=0)  # staleness 0: pi_gen = pi_theta
    assert fresh["mismatch/drift_abs_max"] == 0 and fresh["mismatch/total_mean"] == fresh["mismatch/engine_mean"]


def test_attach_and_concat_keep_trainer_logprobs(sampler, tiny_model, addition_task):
    params = SamplingParams(temperature=0.8, max_new_tokens=6)
    ex = addition_task.sample(random.Random(0), 3)
    r1 = sampler.generate(ex, 2, params, generator=torch.Generator().manual_seed(0), policy_version=0)
    r2 = sampler.generate(ex[:1], 2, SamplingParams(temperature=0.8, max_new_tokens=3),
                          generator=torch.Generator().manual_seed(1), policy_version=0)
    a1, a2 = (attach_trainer_logprobs(tiny_model, r, 0.8) for r in (r1, r2))
    assert torch.allclose(a1.trainer_logprobs, r1.behavior_logprobs, atol=1e-5)  # same model, full softmax
    both = concat([a1, a2])
    assert both.trainer_logprobs.shape == both.behavior_logprobs.shape
    assert torch.equal(both.select([0, 1]).trainer_logprobs[:, : a1.trainer_logprobs.shape[1]],
                       a1.trainer_logprobs[:2])
    t, meta = both.to_state("q.")
    assert torch.equal(Rollouts.from_state(t, meta, "q.").trainer_logprobs, both.trainer_logprobs)
    assert concat([a1, r2]).trainer_logprobs is None  # partially measured batches are not mixed
