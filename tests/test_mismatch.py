"""The sampler-vs-trainer mismatch and the drift / engine split of the log-ratio (workbench.steps.reweight.mismatch),
on the transformers sampler: engine mismatch is float rounding there and drift is the staleness."""

from __future__ import annotations

import copy
import math
import random

import polars as pl
import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.steps.generate import SamplingParams
from workbench.policy.logprobs import token_logprobs
from workbench.loop import Run
from workbench.steps.reweight.mismatch import attach_trainer_logprobs, decompose, metrics, sampled_rows
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


@pytest.mark.parametrize("sample", [4, 2])  # every group of SMALL's 4 (the default), and a subset (NaN rows queued)
def test_trainer_logprobs_survive_checkpoint_and_resume_exactly(tokenizer, tiny_model_config, tmp_path, sample):
    ref = make_run(tokenizer, tiny_model_config, staleness=2, mismatch_sample=sample).run(5)
    a = make_run(tokenizer, tiny_model_config, tmp_path, staleness=2, checkpoint_every=3, mismatch_sample=sample)
    a.run(3)
    assert all(b.trainer_logprobs is not None for b, _ in a.buffer.queue)
    b = Run.resume(tmp_path / "r", model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer,
                   log=lambda s: None)
    b.run(2)
    cols = [c for c in ref.columns if c.startswith("mismatch/")]
    assert len(cols) == 21  # 3 components x 6 statistics, engine_ppl_ratio, engine_share, sequences
    assert b.metrics.select(cols).equals(ref.select(cols))
    # update 0 trains on a fresh batch (every row joins); the stale updates on the subset only
    assert b.metrics["mismatch/sequences"].to_list() == [16.0] + [4.0 * sample] * 4


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


def _float64_split(lp, gen, beh, mask) -> dict[str, float]:
    """The mismatch statistics written out from their formulas, float64, over the valid tokens."""
    lp, gen, beh = (t.double() for t in (lp, gen, beh))
    valid = mask > 0
    parts = {"total": (lp - beh)[valid], "drift": (lp - gen)[valid], "engine": (gen - beh)[valid]}
    out = {}
    for name, x in parts.items():
        rho = x.clamp(-20, 20).exp()
        out.update({f"mismatch/{name}_mean": float(x.sum() / x.numel()), f"mismatch/{name}_abs_max": float(x.abs().max()),
                    f"mismatch/{name}_abs_mean": float(x.abs().sum() / x.numel()),
                    f"mismatch/{name}_m2": float((x**2).sum() / x.numel()),
                    f"mismatch/{name}_k3": float((rho - 1 - x).sum() / x.numel()),
                    f"mismatch/{name}_chi2": float((rho**2).sum() / x.numel() - 1)})
    per_seq = [math.exp(float(((beh - gen)[i][valid[i]]).mean())) for i in range(len(lp)) if valid[i].any()]
    out["mismatch/engine_ppl_ratio"] = sum(per_seq) / len(per_seq)
    out["mismatch/engine_share"] = out["mismatch/engine_m2"] / (out["mismatch/engine_m2"] + out["mismatch/drift_m2"])
    return out


def test_subset_split_is_exact_on_its_subset(sampler, tiny_model, addition_task):
    """Measured on 3 of 8 groups: the stored log pi_gen are the full measurement's on those rows, NaN
    elsewhere, and every statistic equals the formula over exactly those rows of the full measurement."""
    params = SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=6)  # truncated support: engine mismatch
    batch = sampler.generate(addition_task.sample(random.Random(4), 8), 4, params,
                             generator=torch.Generator().manual_seed(4), policy_version=2)
    full = attach_trainer_logprobs(tiny_model, batch, 1.0)
    sub = attach_trainer_logprobs(tiny_model, batch, 1.0, groups=3, seed=11)
    rows = sampled_rows(batch, 3, 11)  # [b]
    picked = set(batch.group_id[rows].tolist())
    assert len(picked) == 3 and len(rows) == 12  # three whole groups of 4
    out = torch.ones(len(batch), dtype=torch.bool)
    out[rows] = False
    assert torch.isnan(sub.trainer_logprobs[out]).all() and not torch.isnan(sub.trainer_logprobs[rows]).any()
    assert torch.allclose(sub.trainer_logprobs[rows], full.trainer_logprobs[rows], rtol=0, atol=1e-6)
    moved = copy.deepcopy(tiny_model)  # the trainer a few updates later: drift
    with torch.no_grad():
        for i, p in enumerate(moved.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        lp, _ = token_logprobs(moved, batch, temperature=1.0)  # [B, T]
    got = metrics(lp, sub, policy_version=5)  # staleness 3: no row is fresh
    want = _float64_split(lp[rows], full.trainer_logprobs[rows], batch.behavior_logprobs[rows], batch.response_mask[rows])
    assert got["mismatch/sequences"] == 12.0
    assert want["mismatch/engine_abs_max"] > 1e-2 and want["mismatch/drift_abs_max"] > 1e-2  # both parts are real
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert got["mismatch/total_mean"] == pytest.approx(got["mismatch/drift_mean"] + got["mismatch/engine_mean"],
                                                       rel=0, abs=1e-12)
    whole = metrics(lp, full, policy_version=5)
    assert whole["mismatch/sequences"] == 32.0 and whole["mismatch/drift_m2"] != got["mismatch/drift_m2"]


def test_sampled_rows_are_a_seeded_draw_of_whole_groups(sampler, tiny_model, addition_task):
    params = SamplingParams(temperature=1.0, max_new_tokens=4)
    batch = sampler.generate(addition_task.sample(random.Random(5), 6), 2, params,
                             generator=torch.Generator().manual_seed(5), policy_version=0)
    assert sampled_rows(batch, 0, 1) is None and sampled_rows(batch, 6, 1) is None and sampled_rows(batch, 9, 1) is None
    picks = set()
    for version in range(8):
        b = batch.with_(policy_version=torch.full_like(batch.policy_version, version))
        rows = sampled_rows(b, 2, 1)
        assert torch.equal(rows, sampled_rows(b, 2, 1))  # the same (seed, version): the same rows
        assert rows.tolist() == sorted(rows.tolist()) and len(rows) == 4
        groups = batch.group_id[rows]
        assert all(int((batch.group_id == g).sum()) == int((groups == g).sum()) for g in groups.tolist())
        picks.add(tuple(groups.unique().tolist()))
    assert len(picks) > 1  # the version reseeds the draw


def test_fresh_rows_outside_the_subset_join_the_split():
    """Rows with no stored log pi_gen but generated by the update's own version: pi_gen = pi_theta."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # [3, 2]
    f64 = dict(dtype=torch.float64)  # the hand-computed sums below are float64 too
    beh = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-0.3, -0.1]], **f64)
    cur = torch.tensor([[-1.2, -2.5], [-0.1, 0.0], [-0.2, -0.4]], **f64)
    gen = torch.tensor([[-1.1, -2.0], [float("nan")] * 2, [float("nan")] * 2], **f64)
    batch = Rollouts(prompt_ids=torch.ones(3, 1, dtype=torch.long), prompt_mask=torch.ones(3, 1, dtype=torch.long),
                     response_ids=torch.ones(3, 2, dtype=torch.long), response_mask=mask, behavior_logprobs=beh,
                     policy_version=torch.tensor([0, 1, 0]), group_id=torch.tensor([0, 1, 2]), trainer_logprobs=gen)
    m = metrics(cur, batch, policy_version=1)  # row 1 is fresh, row 2 is stale and unmeasured
    assert m["mismatch/sequences"] == 2.0
    drift = [-0.1, -0.5, 0.0]  # row 0: cur - gen; row 1: 0 (fresh)
    engine = [-0.1, 0.0, 0.4]  # row 0: gen - beh; row 1: cur - beh
    assert m["mismatch/drift_m2"] == pytest.approx(sum(d * d for d in drift) / 3, rel=1e-12)
    assert m["mismatch/engine_mean"] == pytest.approx(sum(engine) / 3, rel=1e-12)
    assert m["mismatch/total_abs_max"] == pytest.approx(0.5, rel=1e-12)
    stale = metrics(cur, batch, policy_version=2)  # no fresh row: the measured row 0 only
    assert stale["mismatch/sequences"] == 1.0 and stale["mismatch/drift_abs_max"] == pytest.approx(0.5, rel=1e-12)
    empty = metrics(cur, batch.with_(trainer_logprobs=torch.full((3, 2), float("nan"))), policy_version=2)
    assert empty["mismatch/sequences"] == 0.0 and math.isnan(empty["mismatch/drift_mean"])


def test_a_sampled_subset_leaves_training_unchanged_and_is_deterministic(tokenizer, tiny_model_config):
    kw = dict(prompts_per_step=8, staleness=2)
    full = make_run(tokenizer, tiny_model_config, mismatch_sample=0, **kw).run(4)
    a = make_run(tokenizer, tiny_model_config, mismatch_sample=2, **kw).run(4)
    b = make_run(tokenizer, tiny_model_config, mismatch_sample=2, **kw).run(4)
    assert a.drop([c for c in a.columns if c.startswith("perf/")]).equals(
        b.drop([c for c in b.columns if c.startswith("perf/")]))
    same = [c for c in a.columns if not c.startswith(("perf/", "mismatch/"))]
    assert a.select(same).equals(full.select(same))  # the subset draws from no run RNG stream
    # update 0 trains on a fresh batch (all 32 rows); later ones on stale batches: 2 groups x 4
    assert a["mismatch/sequences"].to_list() == [32.0, 8.0, 8.0, 8.0]
    assert full["mismatch/sequences"].to_list() == [32.0] * 4
    assert (a["perf/time_trainer_logprobs"] > 0).all()


@pytest.mark.parametrize("value, expected", [
    (-1, "mismatch_sample=-1 is invalid: expected an integer >= 0 (groups per batch whose trainer log-probs are "
         "measured; 0 = every group)"),
    (True, "mismatch_sample=True is invalid: expected an integer, not a bool"),
    (2.5, "mismatch_sample=2.5 is invalid: expected an integer"),
])
def test_mismatch_sample_bad_values_are_one_line_errors(value, expected):
    with pytest.raises(WorkbenchError) as e:
        RunConfig(mismatch_sample=value)
    assert str(e.value) == expected


def test_mismatch_sample_default_and_zero_are_valid():
    assert RunConfig().mismatch_sample == 4 and RunConfig(mismatch_sample=0).mismatch_sample == 0
