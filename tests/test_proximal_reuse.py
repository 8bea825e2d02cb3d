"""``proximal="reuse_train_logp"`` (AReaL's prox_logp_method of that name, workbench/steps/reweight/proximal.py):
log pi_prox is the training forward's own log-probs, detached.

Checked against independent computations: over two consecutive one-update batches the proximal
log-probs the update used equal a float64 forward written here (its own input layout, log-softmax and
gather) at the weights before each update, and the whole trajectory (weights, metrics) equals
``proximal="recompute"``'s; on synthetic log-probs the loss and its gradient equal the hand formula of
PPO-clip at ratio 1 with the TIS behaviour weight; a tiny run with the loop matches recompute row by
row. Then the refused combinations, each a one-line WorkbenchError.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.notebook import TINY_REWARDS
from workbench.policy.model import build_model
from workbench.steps.generate import SamplingParams, TransformersSampler
from workbench.steps.reweight import policy_loss
from workbench.steps.reweight.proximal import PROXIMAL_MODES, check_reuse_train_logp, resolve_proximal
from workbench.steps.update import update_step

F64 = torch.float64


def _batch(model, tokenizer, task):
    """8 sequences (2 prompt groups of 4) sampled at version 0, one row masked out, mu != pi."""
    ex = task.sample(random.Random(1), 2)
    r = TransformersSampler(model, tokenizer).generate(ex, 4, SamplingParams(max_new_tokens=4),
                                                       generator=torch.Generator().manual_seed(0), policy_version=0)
    lengths = torch.tensor([4, 1, 3, 2, 0, 4, 2, 3])  # [B] row 4 has no valid token
    mask = (torch.arange(r.response_mask.shape[1])[None] < lengths[:, None]).float() * r.response_mask  # [B, T]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.25, 0.0])  # [B]
    adv = rewards - rewards.view(2, 4).mean(-1).repeat_interleave(4)  # [B]
    offset = 0.4 * torch.cos(torch.arange(mask.numel(), dtype=torch.float32)).view(mask.shape)  # [B, T]
    return r.with_(response_mask=mask, behavior_logprobs=(r.behavior_logprobs + offset) * mask,
                   rewards=rewards, advantages=adv)


def float64_logprobs(model, batch):
    """log pi(y_t) [B, T] in float64, written out: prompt + response ids, positions from the attention
    mask, logits at position P - 1 + t scored against response token t, log-softmax, gather."""
    m = copy.deepcopy(model).double().eval()
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)  # [B, P+T]
    attn = torch.cat([batch.prompt_mask.long(), batch.response_mask.long()], dim=1)  # [B, P+T]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, P+T]
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits.double()  # [B, P+T, V]
    p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1:p + t - 1], dim=-1)  # [B, T, V]
    return logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)  # [B, T]


@pytest.fixture
def setup(tokenizer, tiny_model_config, addition_task):
    base = build_model(tiny_model_config, tokenizer, seed=0)
    batch = _batch(base, tokenizer, addition_task)
    with torch.no_grad():  # the policy has moved away from the sampler: the behaviour weight acts
        gen = torch.Generator().manual_seed(2)
        for prm in base.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=gen))
    return base.double(), batch


def _two_updates(base, batch, proximal):
    """Updates 0 and 1, each the only update of its batch (the same samples, one version staler at 1)."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for k in (0, 1):
        before = copy.deepcopy(model)
        tokens: dict = {}
        metrics = update_step(model, opt, batch, objective="ppo_clip", temperature=1.0, grad_clip=0.0,
                              correction="token_tis", proximal=proximal, policy_version=k, keep_tokens=tokens,
                              context={"step": k, "state": {}})
        out.append((before, metrics, tokens["prox_logprobs"]))
    return model, out


def test_reused_logprobs_are_the_policy_before_each_update_and_equal_recompute(setup):
    base, batch = setup
    mask = batch.response_mask.bool()  # [B, T]
    reused, steps = _two_updates(base, batch, "reuse_train_logp")
    recomputed, ref_steps = _two_updates(base, batch, "recompute")
    for (before, metrics, prox), (_, ref_metrics, ref_prox) in zip(steps, ref_steps):
        want = float64_logprobs(before, batch)  # [B, T] at the weights this update starts from
        got = prox.to(F64)  # [B, T]
        assert (got[~mask] == 0).all()
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ref_prox.to(F64)[mask], want[mask], rtol=1e-6, atol=1e-7)
        for key in ("loss/policy", "loss/total", "loss/grad_norm"):
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-6), key
        assert metrics["offpolicy/ratio_max"] == pytest.approx(1.0, abs=1e-12)  # pi_theta / pi_prox = 1
    assert steps[0][1]["loss/grad_norm"] > 1e-3  # the weights moved: update 1 starts elsewhere
    assert not torch.allclose(float64_logprobs(steps[0][0], batch)[mask], float64_logprobs(steps[1][0], batch)[mask])
    for a, b in zip(reused.parameters(), recomputed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_loss_and_gradient_are_ppo_clip_at_ratio_one_with_the_tis_weight():
    g = torch.Generator().manual_seed(0)
    beh = -torch.rand(3, 5, generator=g, dtype=F64) * 3  # [B, T]
    lp = (beh + (torch.rand(3, 5, generator=g, dtype=F64) * 2 - 1) * 1.5).requires_grad_(True)  # [B, T]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=F64)  # [B, T]
    adv = torch.tensor([0.7, -1.2, 0.4], dtype=F64)  # [B]
    prox, extra = resolve_proximal("reuse_train_logp", lp, None, beh, torch.zeros(3), 4, mask)
    assert extra == {} and not prox.requires_grad
    loss, _ = policy_loss("ppo_clip", lp, beh, adv, mask, aggregation="token-mean", prox_logprobs=prox,
                          correction="token_tis")
    loss.backward()
    # by hand: ratio 1 (inside any clip), loss -(1/N) sum_t m_t min(exp(lp - mu), 2) A, d/d lp_t = -(1/N) m w A
    n = float(mask.sum())
    want_loss, want_grad = 0.0, [[0.0] * 5 for _ in range(3)]
    for i in range(3):
        for t in range(5):
            if mask[i, t]:
                w = min(math.exp(float(lp[i, t].detach()) - float(beh[i, t])), 2.0)
                want_loss -= w * float(adv[i]) / n
                want_grad[i][t] = -w * float(adv[i]) / n
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-9)
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad, dtype=F64), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(prox, torch.where(mask.bool(), lp.detach(), torch.zeros((), dtype=F64)))


def test_a_tiny_run_matches_recompute_row_by_row(tokenizer, tiny_model_config):
    rows = {}
    for proximal in ("recompute", "reuse_train_logp"):
        cfg = RunConfig(task="addition", task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=2,
                        group_size=4, eval_every=10, eval_size=8, lr=1e-2, seed=3, staleness=1, objective="ppo_clip",
                        correction="token_tis", proximal=proximal, rewards=TINY_REWARDS)
        run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
        rows[proximal] = run.run(3)
    a, b = rows["recompute"], rows["reuse_train_logp"]
    assert a.height == b.height == 3
    for key in ("loss/policy", "loss/total", "loss/grad_norm", "loss/entropy"):
        for x, y in zip(a[key].to_list(), b[key].to_list()):
            assert (x is None and y is None) or y == pytest.approx(x, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("kw, match", [
    (dict(updates_per_batch=2), r"^updates_per_batch=2 is invalid with proximal=reuse_train_logp: expected "
                                r"updates_per_batch=1 and num_minibatches=1"),
    (dict(num_minibatches=2), r"^num_minibatches=2 is invalid with proximal=reuse_train_logp: expected"),
    (dict(alp_scale=0.1), r"^alp_scale=0.1 is invalid with proximal=reuse_train_logp: expected 0"),
])
def test_invalid_combinations_are_one_line_errors(kw, match):
    with pytest.raises(WorkbenchError, match=match) as err:
        RunConfig(proximal="reuse_train_logp", **kw)
    assert "\n" not in str(err.value)
    RunConfig(proximal="recompute", **kw)  # the same fields are fine with recompute


def test_lora_dropout_and_unknown_modes_are_refused():
    with pytest.raises(WorkbenchError, match=r"^lora.dropout=0.1 is invalid with proximal=reuse_train_logp"):
        check_reuse_train_logp(1, 1, 0.0, 0.1)
    check_reuse_train_logp(1, 1)
    assert "reuse_train_logp" in PROXIMAL_MODES
    lp = torch.zeros(1, 2)
    with pytest.raises(WorkbenchError, match=r"proximal='prox' is invalid: expected none \| recompute \| loglinear "
                                             r"\| linear \| reuse_train_logp$"):
        resolve_proximal("prox", lp, None, lp, torch.zeros(1), 0, torch.ones(1, 2))
