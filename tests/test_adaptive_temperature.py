"""Entropy-adaptive sampling temperature (HAPO, Liu et al. 2025, arXiv:2509.16591) in the transformers
sampler: T_t = clip(T (1 + alpha (H_t / log V - 0.5)), T_min, T_max), H_t the entropy of softmax(z / T).

The references below are written from that formula in float64 (plain Python for hand-built logits, a
full no-cache forward of the model for sampled rollouts), not through the sampler's helpers."""

from __future__ import annotations

import math
import random

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import build_model
from workbench.steps.generate.sampler import SamplingParams, adaptive_temperatures
from workbench.steps.generate.transformers_sampler import TransformersSampler
from workbench.steps.generate.vllm_sampler import VLLMSampler


def _examples(task, n=6, seed=0):
    return task.sample(random.Random(seed), n)


def _gen(sampler, examples, group=4, seed=0, **params):
    params.setdefault("max_new_tokens", 20)
    return sampler.generate(examples, group, SamplingParams(**params),
                            generator=torch.Generator().manual_seed(seed), policy_version=0)


def _same(a, b) -> bool:
    return (torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
            and torch.equal(a.behavior_logprobs, b.behavior_logprobs))


def _reference_temperature(row: list[float], T: float, alpha: float, lo: float, hi: float) -> float:
    """T_t by hand: entropy of softmax(row / T) in float64 Python, over log(len(row))."""
    z = [x / T for x in row]
    m = max(z)
    w = [math.exp(x - m) for x in z]
    s = sum(w)
    p = [x / s for x in w]
    H = -sum(q * math.log(q) for q in p if q > 0)
    return min(max(T * (1 + alpha * (H / math.log(len(row)) - 0.5)), lo), hi)


# ---- the temperature map on hand-built logits -----------------------------------------------------


def test_temperature_rises_with_entropy_and_matches_the_formula():
    inf = float("inf")
    rows = [[8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # peaked: h ~ 0.003
            [2.0, 1.0, 0.5, 0.0, 0.0, -1.0, -2.0, 0.3],  # in between
            [0.0] * 8]  # flat: h = 1
    params = SamplingParams(temperature=0.8, adaptive_temperature=1.0, adaptive_temperature_min=0.05,
                            adaptive_temperature_max=5.0)
    got = adaptive_temperatures(torch.tensor(rows), params).double()  # [3]
    want = torch.tensor([_reference_temperature(r, 0.8, 1.0, 0.05, 5.0) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got[0] < 0.8 * 0.51 and got[0] < got[1] < got[2]  # peaked cools, flat heats
    assert got[2].item() == pytest.approx(0.8 * 1.5, rel=1e-6)  # h = 1: T (1 + alpha / 2)
    # two live tokens of four: H = log 2 = half of log 4, so T_t = T exactly (and no nan from -inf)
    half = adaptive_temperatures(torch.tensor([[0.0, 0.0, -inf, -inf]]), params)
    assert half.item() == pytest.approx(0.8, rel=1e-6)


def test_temperatures_stay_in_bounds():
    rows = torch.tensor([[30.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, -0.5]])  # [3, 4]
    strong = SamplingParams(temperature=1.0, adaptive_temperature=10.0, adaptive_temperature_min=0.4,
                            adaptive_temperature_max=1.7)
    t = adaptive_temperatures(rows, strong)
    assert t[0].item() == pytest.approx(0.4) and t[1].item() == pytest.approx(1.7)  # clipped at both ends
    assert ((t >= 0.4) & (t <= 1.7)).all()
    ref = _reference_temperature(rows[2].tolist(), 1.0, 10.0, 0.4, 1.7)
    assert t[2].item() == pytest.approx(ref, rel=1e-6)


# ---- the sampler -----------------------------------------------------------------------------------


def test_alpha_zero_ignores_the_bounds(sampler, addition_task):
    ex = _examples(addition_task)
    plain = _gen(sampler, ex, temperature=0.7, seed=2)
    off = _gen(sampler, ex, temperature=0.7, seed=2, adaptive_temperature=0.0, adaptive_temperature_min=0.2,
               adaptive_temperature_max=0.2)
    assert _same(plain, off)
    assert SamplingParams().full_distribution and not SamplingParams(adaptive_temperature=0.5).full_distribution


def test_pinned_bounds_reduce_to_one_temperature(sampler, addition_task):
    """alpha > 0 with T_min = T_max = T samples at T on every token: the same draws, bit for bit."""
    ex = _examples(addition_task)
    plain = _gen(sampler, ex, temperature=0.5, seed=5)
    pinned = _gen(sampler, ex, temperature=0.5, seed=5, adaptive_temperature=3.0, adaptive_temperature_min=0.5,
                  adaptive_temperature_max=0.5)
    assert _same(plain, pinned)
    moved = _gen(sampler, ex, temperature=0.5, seed=5, adaptive_temperature=3.0)
    assert not torch.equal(plain.behavior_logprobs, moved.behavior_logprobs)


def _reference_logprobs(model, r, T, alpha, lo, hi, top_p):
    """Per valid response token, in float64: (log-prob of the sampled token under the T_t distribution
    with top-p after it, log-prob under the trainer's softmax(z / T), T_t). A full forward without cache."""
    ids = torch.cat([r.prompt_ids, r.response_ids], 1)  # [B, P + T]
    mask = torch.cat([r.prompt_mask.long(), r.response_mask.long()], 1)  # [B, P + T]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P + T]
    P, L = r.prompt_ids.shape[1], r.response_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double()  # [B, P + T, V]
    logits = logits[:, P - 1:P + L - 1]  # [B, T, V] the logits each response token was drawn from
    V = logits.shape[-1]
    beh, trainer, temps = [], [], []
    for b, t in r.response_mask.nonzero().tolist():
        z, y = logits[b, t], int(r.response_ids[b, t])  # [V]
        p = torch.softmax(z / T, -1)  # [V]
        h = float(-(p * p.log()).sum()) / math.log(V)
        Tt = min(max(T * (1 + alpha * (h - 0.5)), lo), hi)
        q = torch.softmax(z / Tt, -1)  # [V] the distribution sampled from, before top-p
        order = torch.argsort(q, descending=True)
        kept, mass = [], 0.0
        for i in order.tolist():  # nucleus: keep tokens while the mass of better ones is below top_p
            if mass >= top_p:
                break
            kept.append(i)
            mass += float(q[i])
        assert y in kept
        beh.append(math.log(float(q[y]) / sum(float(q[i]) for i in kept)))
        trainer.append(math.log(float(p[y])))
        temps.append(Tt)
    f64 = torch.float64
    return torch.tensor(beh, dtype=f64), torch.tensor(trainer, dtype=f64), torch.tensor(temps, dtype=f64)


@pytest.mark.parametrize("top_p", [1.0, 0.85])
def test_behavior_logprobs_are_those_of_the_sampled_distribution(tiny_model, tokenizer, addition_task, top_p):
    """The Rollouts contract under adaptive temperature: log pi at T_t (then top-p), not at T."""
    model = tiny_model.double()  # float64 weights: cache vs no-cache forwards agree far below the tolerance
    sampler = TransformersSampler(model, tokenizer)
    # the untrained model is near uniform at T = 1; at T = 0.1 its normalised entropies spread over ~[0.2, 0.7]
    T, alpha, lo, hi = 0.1, 2.0, 0.05, 0.2
    r = _gen(sampler, _examples(addition_task), temperature=T, top_p=top_p, adaptive_temperature=alpha,
             adaptive_temperature_min=lo, adaptive_temperature_max=hi)
    beh, trainer, temps = _reference_logprobs(model, r, T, alpha, lo, hi, top_p)
    got = r.behavior_logprobs[r.response_mask.bool()].double()  # [n]
    torch.testing.assert_close(got, beh, rtol=1e-6, atol=1e-6)
    assert temps.max() - temps.min() > 0.03 and ((temps >= lo) & (temps <= hi)).all()  # T_t really moved
    assert (beh - trainer).abs().max() > 0.05  # and that is not the single-temperature log-prob


def test_same_seed_same_rollouts(sampler, addition_task):
    ex = _examples(addition_task)
    kw = dict(temperature=1.0, adaptive_temperature=1.5)
    a, b, c = _gen(sampler, ex, seed=7, **kw), _gen(sampler, ex, seed=7, **kw), _gen(sampler, ex, seed=8, **kw)
    assert _same(a, b) and a.completions == b.completions
    assert not torch.equal(a.response_ids[:, :3], c.response_ids[:, :3])


# ---- the loop: the temperature mismatch is logged as engine mismatch at staleness 0 ---------------


SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=100, eval_size=16, lr=1e-3, seed=3, out_dir="", run_name="r")


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_engine_mismatch_at_staleness_0_shows_the_temperature_change(tokenizer, tiny_model_config, alpha):
    """The trainer scores at the single temperature T; with alpha > 0 the sampler did not, so on-policy
    (staleness 0, drift exactly 0) the whole log-ratio is mismatch/engine_* (the importance weight
    corrects it); with alpha = 0 engine mismatch is float rounding."""
    cfg = RunConfig(**SMALL, staleness=0, adaptive_temperature=alpha)
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer,
              log=lambda s: None)
    df = run.run(1)
    assert df["mismatch/drift_abs_max"].to_list() == [0.0]
    engine = df["mismatch/engine_abs_mean"].item()
    assert engine < 1e-5 if alpha == 0 else engine > 0.02


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"adaptive_temperature": -0.5}, r"SamplingParams.adaptive_temperature=-0.5 is invalid: expected a finite number >= 0"),
    ({"adaptive_temperature": float("inf")}, r"SamplingParams.adaptive_temperature=inf is invalid"),
    ({"adaptive_temperature": True}, r"SamplingParams.adaptive_temperature=True is invalid"),
    ({"adaptive_temperature_min": 0.0}, r"SamplingParams.adaptive_temperature_min=0.0 is invalid: expected a finite number > 0"),
    ({"adaptive_temperature_min": 1.0, "adaptive_temperature_max": 0.5},
     r"SamplingParams.adaptive_temperature_max=0.5 is invalid: expected a finite number >= adaptive_temperature_min=1.0"),
])
def test_sampling_params_bad_input(kw, match):
    with pytest.raises(WorkbenchError, match=match) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, match", [
    ({"adaptive_temperature": -1.0}, r"adaptive_temperature=-1.0 is invalid: expected a finite float >= 0"),
    ({"adaptive_temperature_min": -0.1}, r"adaptive_temperature_min=-0.1 is invalid: expected a finite float > 0"),
    ({"adaptive_temperature_min": 1.5, "adaptive_temperature_max": 1.0},
     r"adaptive_temperature_max=1.0 is invalid: expected a finite float >= adaptive_temperature_min=1.5"),
    ({"adaptive_temperature": 1.0, "sampler": "vllm"}, r"adaptive_temperature=1.0 is invalid: expected 0 with sampler=vllm"),
])
def test_config_bad_input(kw, match):
    with pytest.raises(WorkbenchError, match=match) as e:
        RunConfig(**kw)
    assert "\n" not in str(e.value)


def test_vllm_sampler_refuses_adaptive_temperature(addition_task):
    """The refusal comes before vLLM is imported, so it holds without the vllm extra installed."""
    engine = VLLMSampler.__new__(VLLMSampler)  # no engine needed: generate refuses before using one
    params = SamplingParams(adaptive_temperature=1.0, max_new_tokens=3)
    with pytest.raises(WorkbenchError, match=r"adaptive_temperature=1.0 is invalid for sampler=vllm") as e:
        engine.generate(addition_task.heldout[:1], 1, params, generator=torch.Generator(), policy_version=0)
    assert "\n" not in str(e.value)
