"""Numerics knobs (logit rounding / noise on either side) and the sampling-mask replay
(workbench.policy.numerics, threaded through the sampler, token_logprobs, update_step and mismatch)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.policy.logprobs import token_logprobs
from workbench.policy.numerics import (FORWARD_TRAIN, LogitNumerics, forward_numerics, kept_ids, kept_mask,
                                       trainer_numerics, truncation_log_mass)
from workbench.rollouts import Rollouts, concat
from workbench.steps.generate import SamplingParams
from workbench.steps.reweight.mismatch import attach_trainer_logprobs, metrics as mismatch_metrics
from workbench.steps.update import build_optimizer, chunk_logprobs, update_step


def _gen(sampler, task, group=4, seed=0, n=6, **params):
    params.setdefault("max_new_tokens", 8)
    ex = task.sample(random.Random(seed), n)
    return sampler.generate(ex, group, SamplingParams(**params), generator=torch.Generator().manual_seed(seed),
                            policy_version=0)


def _with_advantages(r: Rollouts) -> Rollouts:
    adv = torch.linspace(-1.0, 1.0, len(r))  # [B] both signs, so the clip could bind either way
    return r.with_(rewards=adv.clone(), advantages=adv)


# ---------------------------------------------------------------- the primitives

def test_bf16_rounding_of_logits_is_round_to_nearest_even():
    x = torch.tensor([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.14159, -10.3])
    out = LogitNumerics(dtype="bf16").apply(x)
    # bf16 keeps 8 significant bits: the spacing is 2^-7 in [1, 2), 2^-6 in [2, 4), 2^-4 in [8, 16)
    assert out.tolist() == [1.0, 1.0, 1.0 + 4 * 2 ** -8, 3.140625, -10.3125]
    assert out.dtype == torch.float32
    assert LogitNumerics().apply(x) is x  # exact numerics: the very same tensor


def test_logit_noise_has_its_std_and_is_fresh_per_forward():
    zeros = torch.zeros(200, 500)
    n = LogitNumerics(noise=0.5, seed=7)
    a, b = n.apply(zeros), n.apply(zeros)
    assert torch.equal(a, b)  # one seed, one draw: deterministic
    assert abs(float(a.std()) - 0.5) < 0.01 and abs(float(a.mean())) < 0.01  # 1e5 draws: se 0.0011 / 0.0016
    c = n.for_forward(FORWARD_TRAIN, 3, 0).apply(zeros)
    d = n.for_forward(FORWARD_TRAIN, 3, 1).apply(zeros)
    assert not torch.equal(a, c) and not torch.equal(c, d)
    assert forward_numerics(None, FORWARD_TRAIN, 3) is None


def test_kept_ids_and_mask_round_trip():
    inf = float("inf")
    processed = torch.tensor([[0.0, -inf, 1.0, -inf], [-inf, 2.0, -inf, -inf]])
    ids = kept_ids(processed)
    assert ids.tolist() == [[0, 2], [1, -1]]
    mask = kept_mask(torch.cat([ids, torch.tensor([[-1, -1]])]), 4)  # a row without a set: full support
    assert mask.tolist() == [[True, False, True, False], [False, True, False, False], [True] * 4]
    # log S of the kept set: logits log(0.5, 0.3, 0.15, 0.05), keep {0, 2} -> log 0.65
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert math.isclose(float(truncation_log_mass(logits, torch.tensor([[0, 2]]))), math.log(0.65), rel_tol=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"logits_dtype": "fp8"}, "SamplingParams.logits_dtype='fp8' is invalid"),
    ({"logit_noise": -0.1}, "SamplingParams.logit_noise=-0.1 is invalid"),
    ({"record_kept": 1}, "SamplingParams.record_kept=1 is invalid"),
])
def test_sampling_params_reject_bad_numerics(kw, match):
    with pytest.raises(WorkbenchError, match=match):
        SamplingParams(**kw)


def test_full_distribution_is_false_under_injected_numerics():
    assert SamplingParams().full_distribution
    assert not SamplingParams(logits_dtype="bf16").full_distribution
    assert not SamplingParams(logit_noise=0.01).full_distribution
    assert SamplingParams(record_kept=True).full_distribution  # recording changes no distribution


@pytest.mark.parametrize("kw,match", [
    ({"sampler_logits_dtype": "fp32"}, "sampler_logits_dtype='fp32' is invalid"),
    ({"trainer_logits_dtype": "int8"}, "trainer_logits_dtype='int8' is invalid"),
    ({"trainer_logit_noise": -1.0}, "trainer_logit_noise=-1.0 is invalid"),
    ({"replay_sampling_mask": True, "sampler": "vllm"}, "replay_sampling_mask=True is invalid"),
    ({"sampler_logit_noise": 0.1, "sampler": "vllm"}, "sampler_logit_noise=0.1 is invalid"),
])
def test_config_rejects_bad_numerics(kw, match):
    with pytest.raises(WorkbenchError, match=match):
        RunConfig(**kw)


def test_trainer_numerics_of_a_config():
    assert trainer_numerics(RunConfig()) is None  # the default: the exact path
    n = trainer_numerics(RunConfig(trainer_logits_dtype="bf16", trainer_logit_noise=0.1, seed=2))
    assert (n.dtype, n.noise) == ("bf16", 0.1) and n.seed == trainer_numerics(RunConfig(trainer_logit_noise=0.1,
                                                                                        seed=2)).seed


# ---------------------------------------------------------------- defaults stay exact

def test_exact_numerics_change_no_bit(sampler, addition_task):
    r = _gen(sampler, addition_task)
    assert r.sampling_kept is None  # nothing recorded unless asked
    r2 = _gen(sampler, addition_task, record_kept=True)  # full support: nothing to record either
    assert r2.sampling_kept is None and torch.equal(r.response_ids, r2.response_ids)
    with torch.no_grad():
        a, ea = token_logprobs(sampler.model, r, with_entropy=True)
        b, eb = token_logprobs(sampler.model, r, with_entropy=True, numerics=None, replay=False)
    assert torch.equal(a, b) and torch.equal(ea, eb)


# ---------------------------------------------------------------- the sampling-mask replay

@pytest.mark.parametrize("params", [{"top_k": 3}, {"top_p": 0.5}, {"top_k": 5, "top_p": 0.7, "temperature": 0.8}])
def test_replay_makes_trainer_match_the_truncated_sampler(sampler, addition_task, params):
    r = _gen(sampler, addition_task, record_kept=True, **params)
    kept, mask = r.sampling_kept, r.response_mask.bool()
    assert kept is not None and kept.shape[:2] == r.response_ids.shape and kept.dtype == torch.long
    # every sampled token is in its position's kept set; padding positions hold no set
    hit = (kept == r.response_ids[..., None]).any(-1)  # [B, T]
    assert hit[mask].all() and (kept[~mask] == -1).all()
    if "top_k" in params and "top_p" not in params:
        assert ((kept >= 0).sum(-1)[mask] == params["top_k"]).all()
    t = params.get("temperature", 1.0)
    with torch.no_grad():
        replayed, _ = token_logprobs(sampler.model, r, temperature=t)
        full, _ = token_logprobs(sampler.model, r, temperature=t, replay=False)
    assert (replayed[mask] - r.behavior_logprobs[mask]).abs().max() < 1e-5  # float precision
    gap = r.behavior_logprobs[mask] - full[mask]  # -log S: the truncation's share (TRL #6789)
    assert gap.min() > -1e-5 and gap.max() > 0.1


def test_replay_entropy_is_of_the_renormalised_distribution(sampler, addition_task):
    r = _gen(sampler, addition_task, record_kept=True, top_k=1)  # one kept token: entropy 0, log-prob 0
    with torch.no_grad():
        lp, ent = token_logprobs(sampler.model, r, with_entropy=True)
    mask = r.response_mask.bool()
    assert lp[mask].abs().max() < 1e-6 and ent[mask].abs().max() < 1e-6


def test_update_ratio_is_one_on_policy_with_replay(sampler, addition_task):
    r = _with_advantages(_gen(sampler, addition_task, record_kept=True, top_k=3))
    no_kept = r.with_(sampling_kept=None)
    opt = build_optimizer(sampler.model, 0.0, 0.0, (0.9, 0.999))
    on = update_step(sampler.model, opt, r, objective="ppo_clip", temperature=1.0, grad_clip=1.0, policy_version=0)
    off = update_step(sampler.model, opt, no_kept, objective="ppo_clip", temperature=1.0, grad_clip=1.0,
                      policy_version=0)
    assert abs(on["offpolicy/ratio_min"] - 1) < 1e-5 and abs(on["offpolicy/ratio_max"] - 1) < 1e-5
    assert on["offpolicy/clipfrac"] == 0.0 and on["mismatch/engine_abs_max"] < 1e-5
    assert off["offpolicy/ratio_max"] < 0.8 and off["offpolicy/clipfrac"] > 0.2  # S = 3 of ~45 tokens' mass


def test_replay_with_micro_batching_and_recompute(sampler, addition_task):
    r = _with_advantages(_gen(sampler, addition_task, record_kept=True, top_p=0.6))
    opt = build_optimizer(sampler.model, 0.0, 0.0, (0.9, 0.999))
    m = update_step(sampler.model, opt, r, objective="ppo_clip", temperature=1.0, grad_clip=1.0, policy_version=0,
                    micro_batch_size=5, proximal="recompute")
    assert abs(m["offpolicy/raw_ratio_min"] - 1) < 1e-5 and abs(m["offpolicy/raw_ratio_max"] - 1) < 1e-5


def test_attach_trainer_logprobs_replays_too(sampler, addition_task):
    r = _gen(sampler, addition_task, record_kept=True, top_k=4)
    attached = attach_trainer_logprobs(sampler.model, r, 1.0)
    mask = r.response_mask.bool()
    assert (attached.trainer_logprobs[mask] - r.behavior_logprobs[mask]).abs().max() < 1e-5


def test_sampling_kept_survives_select_concat_and_state():
    def batch(widths: int, t: int, fill: int) -> Rollouts:
        b = 2
        return Rollouts(prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2, dtype=torch.long),
                        response_ids=torch.zeros(b, t, dtype=torch.long), response_mask=torch.ones(b, t),
                        behavior_logprobs=torch.zeros(b, t), policy_version=torch.zeros(b, dtype=torch.long),
                        group_id=torch.zeros(b, dtype=torch.long),
                        sampling_kept=torch.full((b, t, widths), fill, dtype=torch.long))
    c = concat([batch(2, 3, 5), batch(4, 1, 7)])
    assert c.sampling_kept.shape == (4, 3, 4)
    assert c.sampling_kept[0].tolist() == [[5, 5, -1, -1]] * 3
    assert c.sampling_kept[2].tolist() == [[7, 7, 7, 7], [-1] * 4, [-1] * 4]
    assert c.select([3]).sampling_kept.tolist() == [c.sampling_kept[3].tolist()]
    tensors, meta = c.to_state("b/")
    assert torch.equal(Rollouts.from_state(tensors, meta, "b/").sampling_kept, c.sampling_kept)
    assert concat([batch(2, 3, 5), batch(2, 3, 5).with_(sampling_kept=None)]).sampling_kept is None


def test_trimmed_response_columns_still_replay(sampler, addition_task):
    """A batch whose kept sets are wider (in T) or narrower than its responses is cut / padded."""
    r = _gen(sampler, addition_task, record_kept=True, top_k=3)
    mask = r.response_mask.bool()
    wide = r.with_(sampling_kept=torch.cat([r.sampling_kept, torch.full_like(r.sampling_kept[:, :2], -1)], 1))
    with torch.no_grad():
        a, _ = token_logprobs(sampler.model, r)
        b, _ = token_logprobs(sampler.model, wide)
    assert torch.equal(a, b) and (a[mask] - r.behavior_logprobs[mask]).abs().max() < 1e-5


# ---------------------------------------------------------------- injected numerics

def test_trainer_noise_is_per_forward_and_depends_on_chunking(sampler, addition_task):
    r = _gen(sampler, addition_task)
    n = LogitNumerics(noise=0.3, seed=1)
    mask = r.response_mask.bool()
    with torch.no_grad():
        a, _ = token_logprobs(sampler.model, r, numerics=n)
        b, _ = token_logprobs(sampler.model, r, numerics=n)
        half, _ = token_logprobs(sampler.model, r.select(list(range(len(r) // 2))), numerics=n)
        exact, _ = token_logprobs(sampler.model, r)
    assert torch.equal(a, b)  # one forward seed, one draw
    assert (a - exact)[mask].abs().mean() > 0.01  # the noise reaches the log-probs
    rows = len(r) // 2
    assert not torch.allclose(a[:rows], half, atol=1e-4)  # another batch shape: other noise (chunking noise)
    # micro-batching's pieces each get their own draw, keyed by the piece index
    chunks = [list(range(0, rows)), list(range(rows, len(r)))]
    lp, _, _ = chunk_logprobs(sampler.model, r, chunks, 1.0, numerics=n, version=0)
    with torch.no_grad():
        first, _ = token_logprobs(sampler.model, r.select(chunks[0]), numerics=forward_numerics(n, FORWARD_TRAIN, 0, 0))
    assert torch.equal(lp[:rows].detach(), first)


def test_injected_numerics_show_as_engine_mismatch(sampler, addition_task):
    r = _with_advantages(_gen(sampler, addition_task))
    opt = build_optimizer(sampler.model, 0.0, 0.0, (0.9, 0.999))
    kw = dict(objective="ppo_clip", temperature=1.0, grad_clip=1.0, policy_version=0)
    exact = update_step(sampler.model, opt, r, **kw)
    noisy = update_step(sampler.model, opt, r, numerics=LogitNumerics(noise=0.5, seed=0), micro_batch_size=7, **kw)
    assert exact["mismatch/engine_abs_max"] < 1e-5 and exact["offpolicy/clipfrac"] == 0.0
    assert noisy["mismatch/engine_abs_mean"] > 0.05 and noisy["offpolicy/clipfrac"] > 0.0
    assert all(math.isfinite(noisy[k]) for k in ("loss/total", "loss/grad_norm"))
    # a noisy sampler: its behaviour log-probs are those of its own perturbed logits
    s = _gen(sampler, addition_task, logit_noise=0.5)
    with torch.no_grad():
        lp, _ = token_logprobs(sampler.model, s)
    m = mismatch_metrics(lp, s, 0)
    assert m["mismatch/engine_abs_mean"] > 0.05 and m["mismatch/drift_abs_max"] == 0.0


def test_lint_names_the_replay_and_honours_it():
    from workbench.lint import lint

    warned = [w for w in lint(RunConfig(top_k=5)) if w.code == "truncated_support"]
    assert len(warned) == 1 and "replay_sampling_mask=true" in warned[0].message
    assert "truncated_support" not in [w.code for w in lint(RunConfig(top_k=5, replay_sampling_mask=True))]


# ---------------------------------------------------------------- through the loop

def _loop(tokenizer, tiny_model_config, **overrides):
    from workbench.loop import Run
    from workbench.policy.model import build_model
    cfg = RunConfig(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
                    group_size=4, eval_every=100, eval_size=16, lr=1e-9, seed=3, steps=3, **overrides)
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)


def test_the_loop_passes_the_replay_and_the_trainer_numerics(tokenizer, tiny_model_config):
    """RunConfig's fields reach the sampler (kept sets recorded), the update, the proximal recompute and
    the mismatch measurement: at lr = 1e-9 (the config refuses 0; the weights move ~1e-9) with top-k 3, the ratio is 1 with the replay and far from it
    without; trainer-side noise alone shows as engine mismatch."""
    kw = dict(top_k=3, sync_every=2, proximal="recompute")
    replay = _loop(tokenizer, tiny_model_config, replay_sampling_mask=True, **kw)
    rows = [replay.step() for _ in range(3)]
    assert replay.last_batch.sampling_kept is not None and replay.last_batch.sampling_kept.shape[-1] == 3
    for row in rows:
        assert abs(row["offpolicy/raw_ratio_min"] - 1) < 1e-5 and abs(row["offpolicy/raw_ratio_max"] - 1) < 1e-5
        assert row["offpolicy/clipfrac"] == 0.0
    plain = _loop(tokenizer, tiny_model_config, **kw).step()
    assert plain["offpolicy/raw_ratio_max"] < 0.9  # the factor S = p(kept set) in every ratio
    noisy = _loop(tokenizer, tiny_model_config, trainer_logit_noise=0.5).step()
    exact = _loop(tokenizer, tiny_model_config).step()
    assert exact["mismatch/engine_abs_max"] < 1e-5
    assert noisy["mismatch/engine_abs_mean"] > 0.05
