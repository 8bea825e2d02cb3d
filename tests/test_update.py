"""The update step: KL estimators, lr schedule, entropy bonus, gradient clipping, non-finite guard."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.steps.generate import SamplingParams
from workbench.steps.score import score
from workbench.steps.update import build_optimizer, kl_penalty, lr_multiplier, update_step


def test_kl_estimators_hand_computed():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    d = [-0.5, 1.0]  # log(pi_ref / pi_theta)
    k1 = kl_penalty(logp, ref, "k1")[0].tolist()
    k2 = kl_penalty(logp, ref, "k2")[0].tolist()
    k3 = kl_penalty(logp, ref, "k3")[0].tolist()
    assert k1 == pytest.approx([0.5, -1.0], rel=1e-6)
    assert k2 == pytest.approx([0.125, 0.5], rel=1e-6)
    assert k3 == pytest.approx([math.exp(x) - 1 - x for x in d], rel=1e-6)


@pytest.mark.parametrize("schedule, update, expected", [
    ("constant", 5, 1.0), ("linear", 2, 1 - (2 - 2) / 8), ("linear", 6, 1 - 4 / 8),
    ("cosine", 6, 0.5 * (1 + math.cos(math.pi * 4 / 8))), ("cosine", 0, 0.5), ("linear", 1, 1.0),
])
def test_lr_multiplier(schedule, update, expected):
    # 2 warm-up updates (multipliers 1/2 and 2/2), then the schedule over the remaining 8 of 10
    assert lr_multiplier(update, total=10, warmup=2, schedule=schedule) == pytest.approx(expected)


def _scored_batch(tiny_model, tokenizer, addition_task, seed=0):
    from workbench.steps.generate import TransformersSampler

    gen = torch.Generator().manual_seed(seed)
    ex = addition_task.sample(__import__("random").Random(seed), 4)
    r = TransformersSampler(tiny_model, tokenizer).generate(
        ex, 4, SamplingParams(max_new_tokens=4), generator=gen, policy_version=0)
    r, _ = score(r, [("exact_match", 1.0)], advantage="grpo")
    # an untrained model earns no reward: give the batch fixed mixed-sign advantages instead
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).repeat(len(r) // 4)  # [B]
    return r.with_(advantages=adv)


def test_update_step_moves_weights_and_reports(tiny_model, tokenizer, addition_task):
    batch = _scored_batch(tiny_model, tokenizer, addition_task)
    opt = build_optimizer(tiny_model, 1e-3, 0.0, (0.9, 0.999))
    before = [p.clone() for p in tiny_model.parameters()]
    m = update_step(tiny_model, opt, batch, objective="ppo_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2},
                    aggregation="token-mean", temperature=1.0, grad_clip=1.0, entropy_coef=0.01)
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))
    # on-policy first update: ratio is 1 up to float noise, nothing clipped
    assert m["offpolicy/clipfrac"] == 0.0 and abs(m["offpolicy/ratio_mean"] - 1) < 1e-4
    assert m["loss/total"] == pytest.approx(m["loss/policy"] - 0.01 * m["loss/entropy"], rel=1e-5)
    assert m["loss/grad_norm"] > 0 and m["loss/skipped_nonfinite"] == 0.0


def test_kl_to_reference_is_zero_at_the_start_and_grows(tiny_model, tokenizer, addition_task):
    from workbench.policy.build import frozen_copy

    ref = frozen_copy(tiny_model)
    batch = _scored_batch(tiny_model, tokenizer, addition_task)
    opt = build_optimizer(tiny_model, 1e-2, 0.0, (0.9, 0.999))
    kw = dict(objective="reinforce", objective_params={}, aggregation="token-mean", temperature=1.0,
              grad_clip=1.0, kl_coef=0.1, kl_estimator="k3", ref_model=ref)
    first = update_step(tiny_model, opt, batch, **kw)
    assert first["loss/kl_ref"] == pytest.approx(0.0, abs=1e-7)
    second = update_step(tiny_model, opt, batch, **kw)
    assert second["loss/kl_ref"] > 1e-6


def test_grad_clip_bounds_the_step(tiny_model, tokenizer, addition_task):
    batch = _scored_batch(tiny_model, tokenizer, addition_task)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in tiny_model.parameters()])
    m = update_step(tiny_model, opt, batch, objective="reinforce", objective_params={}, aggregation="token-mean",
                    temperature=1.0, grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in tiny_model.parameters()])
    assert m["loss/grad_norm"] > 1e-3  # the pre-clip norm is what gets logged
    # tied embeddings appear once in parameters(): the SGD step has norm lr * clip
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(1e-3, rel=1e-3)
