"""Sampler (shapes, masks, EOS, determinism, top-k/top-p) and the logprob recompute it must match."""

from __future__ import annotations

import random

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.generate import (
    Sampler, SamplingParams, TransformersSampler, build_rollouts, greedy_accuracy, process_logits,
)
from workbench.policy.logprobs import token_logprobs
from workbench.tasks import Example


def _examples(task, n=6, seed=0):
    ex = task.sample(random.Random(seed), n)
    assert len({len(e.prompt) for e in ex}) > 1  # prompts of different lengths -> left padding
    return ex


def _gen(sampler, examples, group=4, seed=0, version=0, **params):
    params.setdefault("max_new_tokens", 40)
    return sampler.generate(examples, group, SamplingParams(**params),
                            generator=torch.Generator().manual_seed(seed), policy_version=version)


def _stop_lengths(r, eos):
    """Per row: index+1 of the first EOS, or None when the row never stopped."""
    out = []
    for ids, m in zip(r.response_ids.tolist(), r.response_mask.tolist()):
        out.append(ids.index(eos) + 1 if eos in ids else None)
    return out


def test_sampler_fills_every_field(sampler, addition_task, tokenizer):
    ex = _examples(addition_task)
    r = _gen(sampler, ex, group=3, version=7, temperature=1.5)
    B, T = 18, r.response_ids.shape[1]
    assert isinstance(sampler, Sampler) and sampler.name == "transformers"
    assert r.prompt_ids.shape == r.prompt_mask.shape and r.prompt_ids.shape[0] == B
    assert r.response_ids.shape == r.response_mask.shape == r.behavior_logprobs.shape == (B, T)
    assert r.response_mask.dtype == torch.float32 and r.behavior_logprobs.dtype == torch.float32
    assert r.prompt_ids.dtype == r.response_ids.dtype == torch.long
    assert r.policy_version.tolist() == [7] * B and r.policy_version.dtype == torch.long
    assert r.group_id.tolist() == [i for i in range(6) for _ in range(3)]
    assert r.prompts == [e.prompt for e in ex for _ in range(3)]
    assert r.answers == [e.answer for e in ex for _ in range(3)]
    assert r.extras == [{}] * B
    # prompts are left-padded and decode back to the prompt text
    for i in range(B):
        m = r.prompt_mask[i].bool()
        assert m[-1] and (m.long().diff() >= 0).all()  # zeros then ones
        assert tokenizer.decode(r.prompt_ids[i][m].tolist()) == r.prompts[i]
        assert (r.prompt_ids[i][~m] == tokenizer.pad_token_id).all()


def test_eos_handling_and_padding(sampler, addition_task, tokenizer):
    r = _gen(sampler, _examples(addition_task), temperature=1.5)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    stops = _stop_lengths(r, eos)
    stopped = [s for s in stops if s is not None]
    assert stopped and None in stops and len(set(stopped)) >= 3  # different stop lengths
    assert r.response_ids.shape[1] == 40  # someone never stopped, so the budget was used
    for i, s in enumerate(stops):
        n = 40 if s is None else s
        assert r.response_mask[i, :n].eq(1).all() and r.response_mask[i, n:].eq(0).all()
        assert r.response_ids[i, n:].eq(pad).all()
        assert r.behavior_logprobs[i, n:].eq(0).all() and r.behavior_logprobs[i, :n].lt(0).all()
        assert eos not in r.response_ids[i, : n - 1].tolist()  # EOS only as the last real token
        body = r.response_ids[i, :n].tolist()
        assert r.completions[i] == tokenizer.decode(body, skip_special_tokens=True)
        assert len(r.completions[i]) == sum(t > 3 for t in body)  # one char per non-special token


def _constant_head(model, tokenizer, eos_logit):
    """Replace the LM head by one whose logits are 0 everywhere except EOS (= ``eos_logit``)."""
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = eos_logit
    model.lm_head = head


def test_batch_stops_when_every_row_has_finished(tiny_model, tokenizer, addition_task):
    sampler = TransformersSampler(tiny_model, tokenizer)
    ex = _examples(addition_task)
    _constant_head(tiny_model, tokenizer, 10.0)
    r = _gen(sampler, ex, temperature=0.0)
    assert r.response_ids.shape == (24, 1) and r.response_ids.eq(tokenizer.eos_token_id).all()
    assert r.response_mask.eq(1).all() and r.completions == [""] * 24
    _constant_head(tiny_model, tokenizer, 3.0)  # p(EOS) ~ 0.28 per step: geometric lengths
    r = _gen(sampler, ex, temperature=1.0)
    stops = _stop_lengths(r, tokenizer.eos_token_id)
    assert None not in stops and len(set(stops)) >= 3
    assert r.response_ids.shape[1] == max(stops) < 40  # stopped as soon as the last row ended
    assert r.response_mask.sum(1).tolist() == stops
    p_eos = torch.softmax(tiny_model.lm_head.bias, -1)[tokenizer.eos_token_id]
    eos_lp = r.behavior_logprobs[torch.arange(24), torch.tensor(stops) - 1]
    assert torch.allclose(eos_lp, p_eos.log().expand(24), atol=1e-5)


def test_same_generator_state_same_rollouts(sampler, addition_task):
    ex = _examples(addition_task)
    a, b = _gen(sampler, ex, seed=3), _gen(sampler, ex, seed=3)
    c = _gen(sampler, ex, seed=4)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.behavior_logprobs, b.behavior_logprobs)
    assert a.completions == b.completions
    assert not torch.equal(a.response_ids[:, :3], c.response_ids[:, :3])
    # samples inside a group differ (it is sampling, not repeating)
    assert len({tuple(x) for x in a.response_ids[:4, :5].tolist()}) > 1


def test_top_k_1_equals_greedy(sampler, addition_task):
    ex = _examples(addition_task)
    greedy = _gen(sampler, ex, group=2, temperature=0.0, max_new_tokens=10)
    top1 = _gen(sampler, ex, group=2, temperature=1.0, top_k=1, max_new_tokens=10, seed=9)
    assert torch.equal(greedy.response_ids, top1.response_ids)
    assert torch.equal(greedy.response_mask, top1.response_mask)
    assert greedy.behavior_logprobs.eq(0).all() and top1.behavior_logprobs.abs().max() < 1e-6
    assert torch.equal(greedy.response_ids[0], greedy.response_ids[1])  # greedy: group rows agree


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_behavior_logprobs(sampler, addition_task, tokenizer, temperature):
    """The central contract: recomputed log-probs equal the sampler's at every valid token."""
    r = _gen(sampler, _examples(addition_task), temperature=temperature * 1.0)
    stops = [s for s in _stop_lengths(r, tokenizer.eos_token_id) if s is not None]
    assert len(set(stops)) >= 2 and r.prompt_mask.eq(0).any()  # ragged on both sides
    logp, ent = token_logprobs(sampler.model, r, temperature=temperature, with_entropy=True)
    mask = r.response_mask.bool()
    assert logp.shape == r.response_ids.shape and logp.dtype == torch.float32
    assert (logp[mask] - r.behavior_logprobs[mask]).abs().max() < 1e-5
    assert logp[~mask].eq(0).all() and ent[~mask].eq(0).all()
    V = len(tokenizer)
    assert (ent[mask] > 0).all() and (ent[mask] <= torch.log(torch.tensor(float(V))) + 1e-5).all()


def test_token_logprobs_gradients_flow(sampler, addition_task):
    r = _gen(sampler, _examples(addition_task), max_new_tokens=6)
    logp, ent = token_logprobs(sampler.model, r)
    assert ent is None and logp.requires_grad
    (logp * r.response_mask).sum().backward()
    grads = [p.grad for p in sampler.model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("params", [{"top_p": 0.7}, {"top_k": 5}])
def test_truncated_sampling_logprobs_exceed_full_distribution(sampler, addition_task, params):
    """top-p / top-k sample from a renormalised subset, so behaviour log-probs >= full ones."""
    r = _gen(sampler, _examples(addition_task), max_new_tokens=8, **params)
    logp, _ = token_logprobs(sampler.model, r, temperature=1.0)
    mask = r.response_mask.bool()
    gap = r.behavior_logprobs[mask] - logp[mask]
    assert (gap >= -1e-5).all() and gap.max() > 0.05  # a real, one-sided mismatch


def test_process_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = torch.softmax(process_logits(logits, SamplingParams(top_p=0.75)), -1)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = torch.softmax(process_logits(logits, SamplingParams(top_p=0.5)), -1)
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    p = torch.softmax(process_logits(logits, SamplingParams(top_k=3)), -1)
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    t = process_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(torch.softmax(t, -1), torch.softmax(logits * 2, -1))


@pytest.mark.parametrize("kw,match", [
    ({"temperature": -1}, "SamplingParams.temperature=-1 is invalid"),
    ({"top_p": 0}, "SamplingParams.top_p=0 is invalid"),
    ({"top_k": -2}, "SamplingParams.top_k=-2 is invalid"),
    ({"max_new_tokens": 0}, "SamplingParams.max_new_tokens=0 is invalid"),
])
def test_sampling_params_validation(kw, match):
    with pytest.raises(WorkbenchError, match=match):
        SamplingParams(**kw)


def test_max_new_tokens_from_task(sampler, addition_task):
    params = SamplingParams()
    with pytest.raises(WorkbenchError, match="for_task"):
        sampler.generate(addition_task.heldout[:2], 1, params, generator=torch.Generator(), policy_version=0)
    assert params.for_task(addition_task).max_new_tokens == addition_task.max_answer_tokens
    assert SamplingParams(max_new_tokens=3).for_task(addition_task).max_new_tokens == 3
    with pytest.raises(WorkbenchError, match="group_size=0"):
        sampler.generate(addition_task.heldout[:2], 0, params.for_task(addition_task),
                         generator=torch.Generator(), policy_version=0)


def test_greedy_accuracy(tiny_model, tokenizer, addition_task):
    acc = greedy_accuracy(tiny_model, tokenizer, addition_task, batch_size=10)
    assert acc == 0.0  # an untrained model gets nothing right

    class Oracle:  # a task whose verify accepts anything shows the batching covers all examples
        name, heldout, max_answer_tokens = "oracle", addition_task.heldout, 3

        @staticmethod
        def verify(completion, example):
            return example.prompt.startswith("1")

    expected = sum(e.prompt.startswith("1") for e in addition_task.heldout) / 32
    assert greedy_accuracy(tiny_model, tokenizer, Oracle, batch_size=7) == expected
    assert tiny_model.training  # the sampler restores the model's mode


def test_extras_pass_through(sampler):
    ex = [Example("1+1=", "2", {"level": 1}), Example("22+3=", "25", {"level": 2})]
    r = _gen(sampler, ex, group=2, max_new_tokens=3)
    assert r.extras == [{"level": 1}] * 2 + [{"level": 2}] * 2
    r.extras[0]["level"] = 99
    assert ex[0].extra == {"level": 1}  # copies, not shared dicts


def test_stops_on_every_eos_of_the_generation_config(tiny_model, tokenizer, addition_task):
    _constant_head(tiny_model, tokenizer, 0.0)
    with torch.no_grad():
        tiny_model.lm_head.bias[5] = 10.0  # greedy always emits token 5
    ex = _examples(addition_task)
    r = _gen(TransformersSampler(tiny_model, tokenizer), ex, temperature=0.0, max_new_tokens=6)
    assert r.response_ids.shape[1] == 6 and r.response_ids.eq(5).all()
    tiny_model.generation_config.eos_token_id = [tokenizer.eos_token_id, 5]
    r = _gen(TransformersSampler(tiny_model, tokenizer), ex, temperature=0.0, max_new_tokens=6)
    assert r.response_ids.shape == (24, 1) and r.response_mask.eq(1).all()


def test_build_rollouts_exact_fields(tokenizer):
    """The helper both samplers return through: prompts repeated per sample, version/group ids,
    completions decoded from the masked response tokens only (EOS and padding skipped)."""
    ex = [Example("1+2=", "3", {"k": 1}), Example("10+2=", "12")]
    # char ids: pad 0, eos 2, '0'..'9' = 4..13, '+' 40, '=' 44
    prompt_ids = torch.tensor([[0, 5, 40, 6, 44], [5, 4, 40, 6, 44]])  # [N=2, P=5], left-padded
    prompt_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # [N, P]
    resp = torch.tensor([[7, 2, 0], [7, 4, 2], [5, 6, 2], [8, 4, 4]])  # [B=4, T=3]
    resp_mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])  # [B, T]
    logps = torch.tensor([[-0.5, -0.1, 0], [-1, -2, -3], [-0.25, -0.5, -0.75], [-4, 0, 0]])  # [B, T]
    r = build_rollouts(ex, 2, prompt_ids, prompt_mask, resp, resp_mask, logps, 3, tokenizer)
    assert torch.equal(r.prompt_ids, torch.tensor([[0, 5, 40, 6, 44]] * 2 + [[5, 4, 40, 6, 44]] * 2))
    assert torch.equal(r.prompt_mask, torch.tensor([[0, 1, 1, 1, 1]] * 2 + [[1, 1, 1, 1, 1]] * 2))
    assert r.prompt_ids.dtype == r.prompt_mask.dtype == torch.long
    assert r.response_ids is resp and r.response_mask is resp_mask and r.behavior_logprobs is logps
    assert torch.equal(r.policy_version, torch.tensor([3, 3, 3, 3])) and r.policy_version.dtype == torch.long
    assert torch.equal(r.group_id, torch.tensor([0, 0, 1, 1])) and r.group_id.dtype == torch.long
    assert r.completions == ["3", "30", "12", "4"]  # masked-out '0's of the last row are not decoded
    assert r.prompts == ["1+2=", "1+2=", "10+2=", "10+2="]
    assert r.answers == ["3", "3", "12", "12"]
    assert r.extras == [{"k": 1}, {"k": 1}, {}, {}]
    r.extras[0]["k"] = 99
    assert ex[0].extra == {"k": 1} and r.extras[1] == {"k": 1}  # a copy per row
    assert len(r) == 4 and r.rewards is None and r.advantages is None


def test_device_generator_keeps_the_cpu_stream_and_seeds_one_per_call_elsewhere():
    from workbench.steps.generate.transformers_sampler import device_generator

    g = torch.Generator().manual_seed(3)
    assert device_generator(g, torch.device("cpu")) is g  # CPU runs draw from the run's own stream
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the off-CPU branch needs one")
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    da, db = device_generator(a, torch.device("cuda")), device_generator(b, torch.device("cuda"))
    assert da.device.type == "cuda" and da.initial_seed() == db.initial_seed()
    probs = torch.full((4, 10), 0.1, device="cuda")
    assert torch.equal(torch.multinomial(probs, 1, generator=da), torch.multinomial(probs, 1, generator=db))
    assert torch.equal(a.get_state(), b.get_state())  # one draw each from the CPU stream
