"""The update step: KL estimators, lr schedule, entropy bonus, gradient clipping, non-finite guard."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.policy.build import frozen_copy
from workbench.policy.logprobs import frozen_logprobs, token_logprobs
from workbench.steps.generate import SamplingParams
from workbench.steps.reweight.aggregate import aggregate
from workbench.steps.reweight.kl import kl_term
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
    # k3+ has k3's value; past |x| = 20 k1 keeps its value (no clamp) and k3 is capped at 10
    assert kl_penalty(logp, ref, "k3+")[0].tolist() == pytest.approx(k3, rel=1e-6)
    far = kl_penalty(torch.tensor([[-1.0]]), torch.tensor([[-31.0]]), "k1")
    capped = kl_penalty(torch.tensor([[-31.0]]), torch.tensor([[-1.0]]), "k3")
    assert far.item() == pytest.approx(30.0) and capped.item() == 10.0
    assert RunConfig(kl_estimator="k3+", kl_is_corrected=True).kl_estimator == "k3+"
    with pytest.raises(WorkbenchError, match="^kl_estimator='k4' is invalid: expected k1 | k2 | k3 | k3\\+$"):
        RunConfig(kl_estimator="k4")


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


def test_kl_and_entropy_are_aggregated_like_the_policy_loss(tiny_model, tokenizer, addition_task):
    # seq-mean-token-mean: both terms are the mean over sequences of per-sequence token means, from the
    # same log-probs the update computes; on this batch (unequal lengths) that differs from token-mean.
    ref = frozen_copy(tiny_model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    batch = _scored_batch(tiny_model, tokenizer, addition_task)
    lengths = torch.arange(len(batch)) % 4 + 1  # [B] 1..4 tokens (the untrained model never stops early)
    mask = (torch.arange(batch.response_mask.shape[1])[None] < lengths[:, None]).float() * batch.response_mask
    batch = batch.with_(response_mask=mask, behavior_logprobs=(batch.behavior_logprobs - 0.2) * mask)  # pi/mu != 1
    assert len(set(mask.sum(-1).tolist())) > 1
    tiny_model.train()
    with torch.no_grad():
        lp, ent = token_logprobs(tiny_model, batch, with_entropy=True)  # [B, T] x2
    ref_lp = frozen_logprobs(ref, batch)  # [B, T]
    rows = [[t for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]
    for corrected in (False, True):
        tok_kl = {(i, t): float(lp[i, t] - ref_lp[i, t])
                  * (math.exp(float(lp[i, t] - batch.behavior_logprobs[i, t])) if corrected else 1.0)
                  for i, ts in enumerate(rows) for t in ts}  # k1, times pi/mu when corrected
        want_kl = sum(sum(tok_kl[(i, t)] for t in ts) / len(ts) for i, ts in enumerate(rows)) / len(rows)
        want_ent = sum(sum(float(ent[i, t]) for t in ts) / len(ts) for i, ts in enumerate(rows)) / len(rows)
        model = frozen_copy(tiny_model).train().requires_grad_(True)
        m = update_step(model, build_optimizer(model, 1e-3, 0.0, (0.9, 0.999)), batch, objective="reinforce",
                        objective_params={}, aggregation="seq-mean-token-mean", temperature=1.0, grad_clip=1.0,
                        kl_coef=0.1, kl_estimator="k1", kl_is_corrected=corrected, entropy_coef=0.01, ref_model=ref)
        assert m["loss/kl_ref"] == pytest.approx(want_kl, rel=1e-5)
        assert m["loss/entropy"] == pytest.approx(want_ent, rel=1e-5)
        beh = batch.behavior_logprobs if corrected else None
        assert m["loss/kl_ref"] == pytest.approx(float(kl_term(lp, ref_lp, mask, "k1", "seq-mean-token-mean",
                                                               behavior_logprobs=beh)), rel=1e-6)
        token_mean = float(kl_term(lp, ref_lp, mask, "k1", "token-mean", behavior_logprobs=beh))
        assert abs(m["loss/kl_ref"] - token_mean) > 1e-3 * abs(token_mean)
        assert abs(m["loss/entropy"] - float(aggregate(ent, mask, "token-mean"))) > 1e-4
        assert m["loss/total"] == pytest.approx(m["loss/policy"] - 0.01 * m["loss/entropy"] + 0.1 * m["loss/kl_ref"],
                                                rel=1e-5)
