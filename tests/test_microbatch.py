"""Micro-batching with gradient accumulation (``update_step(micro_batch_size=...)``) is exact.

The chunked update builds the loss once over the whole minibatch from per-chunk log-probs and
replays each chunk's forward for its share of the gradient, so for every registered objective and
every aggregation the accumulated parameter gradient, the metrics and the per-token record equal
the unchunked update's. An independent reference for REINFORCE writes the gradient-accumulation
formula out by hand: per-chunk losses with the whole minibatch's normaliser (global token count,
global sequence count, or the fixed scale), summed.
"""

from __future__ import annotations

import copy
import math
import random
import resource
import sys

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.notebook import TINY_REWARDS
from workbench.policy.logprobs import token_logprobs
from workbench.policy.model import build_model
from workbench.steps.generate import SamplingParams, TransformersSampler
from workbench.steps.reweight.aggregate import AGGREGATIONS
from workbench.steps.reweight.core import OBJECTIVES
from workbench.steps.update import expert_batch, row_chunks, update_step

GROUPS, GROUP_SIZE = 3, 4


def _batch(model, tokenizer, task):
    """12 sequences (3 prompt groups), lengths 1..4 tokens, one row fully masked, pi/mu != 1."""
    ex = task.sample(random.Random(0), GROUPS)
    r = TransformersSampler(model, tokenizer).generate(ex, GROUP_SIZE, SamplingParams(max_new_tokens=4),
                                                       generator=torch.Generator().manual_seed(0), policy_version=0)
    lengths = torch.tensor([4, 1, 3, 2, 2, 0, 4, 1, 3, 4, 2, 1])  # [B] row 5 has no valid token
    mask = (torch.arange(r.response_mask.shape[1])[None] < lengths[:, None]).float() * r.response_mask  # [B, T]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25, 0.0, 1.0, 0.75, 0.5])  # [B]
    adv = rewards - rewards.view(GROUPS, GROUP_SIZE).mean(-1).repeat_interleave(GROUP_SIZE)  # [B]
    offset = 0.3 * torch.sin(torch.arange(mask.numel(), dtype=torch.float32)).view(mask.shape)  # [B, T]
    return r.with_(response_mask=mask, behavior_logprobs=(r.behavior_logprobs + offset) * mask,
                   rewards=rewards, advantages=adv)


@pytest.fixture
def setup(tokenizer, tiny_model_config, addition_task):
    base = build_model(tiny_model_config, tokenizer, seed=0)
    batch = _batch(base, tokenizer, addition_task)
    ref = copy.deepcopy(base).double().eval().requires_grad_(False)
    with torch.no_grad():  # the trained policy has moved away from the reference
        gen = torch.Generator().manual_seed(1)
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return base.double(), ref, batch, expert_batch(batch, tokenizer, addition_task)


def _update(base, batch, micro, **kw):
    """One update with lr 0: returns (.grad after accumulation and clipping, metrics, token record)."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tokens: dict = {}
    kw.setdefault("context", {"step": 2, "state": {}})
    metrics = update_step(model, opt, batch, temperature=1.0, micro_batch_size=micro, keep_tokens=tokens, **kw)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    return grads, metrics, tokens


def _assert_same(full, chunked, rtol=1e-9):
    (g0, m0, t0), (g1, m1, t1) = full, chunked
    num = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(g0, g1)))
    den = math.sqrt(sum(float(a.pow(2).sum()) for a in g0))
    assert den > 0 and num <= rtol * den, (num, den)
    keys = {k for k in m0 if not k.startswith("perf/time")}
    assert keys == {k for k in m1 if not k.startswith("perf/time")}
    for k in keys - {"perf/peak_mem_mb"}:
        a, b = m0[k], m1[k]
        assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(a, rel=1e-6, abs=1e-9), (k, a, b)
    assert torch.allclose(t0["logprobs"], t1["logprobs"], rtol=1e-6, atol=1e-7)  # [B, T] the whole batch's
    assert t1["logprob_grad"].shape == t1["batch"].response_mask.shape and len(t1["batch"]) == GROUPS * GROUP_SIZE
    assert torch.allclose(t0["logprob_grad"], t1["logprob_grad"], rtol=1e-6, atol=1e-9)


# the default suite: one objective per kind of coupling across the batch (token-local, sequence-level,
# group statistics, batch search, covariance selection, a dual variable, expert data, preference pairs,
# trajectory balance); every objective in the slow suite
COUPLED = ("ppo_clip", "gspo", "cispo", "bapo", "clip_cov",
           "r2vpo", "chord", "online_dpo", "tb")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", [n if n in COUPLED else pytest.param(n, marks=pytest.mark.slow)
                                  for n in OBJECTIVES.names()])
def test_micro_batched_gradient_equals_the_full_batch_one(setup, name, aggregation):
    base, ref, batch, expert = setup
    kw = dict(objective=name, objective_params={}, aggregation=aggregation, grad_clip=0.0, kl_coef=0.1,
              kl_estimator="k3", entropy_coef=0.01, ref_model=ref, expert_batch=expert, loss_scale_factor=None)
    full = _update(base, batch, 0, **kw)
    for micro in (1, 3):
        _assert_same(full, _update(base, batch, micro, **kw))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k3+"])
@pytest.mark.parametrize("corrected", [False, True])
def test_micro_batched_kl_entropy_and_clip_are_exact(setup, estimator, corrected):
    base, ref, batch, _ = setup
    kw = dict(objective="ppo_clip", objective_params={"clip_low": 0.1, "clip_high": 0.1},
              aggregation="seq-mean-token-sum-norm", loss_scale_factor=7.0, grad_clip=0.05, kl_coef=0.2,
              kl_estimator=estimator, kl_is_corrected=corrected, entropy_coef=0.03, ref_model=ref)
    full = _update(base, batch, 0, **kw)
    assert full[1]["loss/grad_norm"] > 0.05  # the clip is active: it must act on the accumulated gradient
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in full[0]))
    assert norm == pytest.approx(0.05, rel=1e-6)
    for micro in (1, 3):
        _assert_same(full, _update(base, batch, micro, **kw))


@pytest.mark.parametrize("proximal, correction", [("recompute", "token_tis"), ("loglinear", "seq_mis")])
def test_micro_batched_proximal_and_correction_are_exact(setup, proximal, correction):
    base, _, batch, _ = setup
    kw = dict(objective="ppo_clip", objective_params={}, grad_clip=0.0, proximal=proximal, policy_version=3,
              correction=correction)
    full = _update(base, batch, 0, **kw)
    _assert_same(full, _update(base, batch, 3, **kw))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batched_reinforce_matches_hand_written_accumulation(setup, aggregation):
    # L_t = -A_i logp_t; per chunk c: sum_{i in c} sum_t m L (or per-row means) over the GLOBAL
    # normaliser N (token count, sequence count with a valid token, or the fixed scale), summed over chunks.
    base, _, batch, _ = setup
    mask = batch.response_mask  # [B, T]
    counts = mask.sum(-1)  # [B]
    n_tokens, n_rows, scale = float(mask.sum()), float((counts > 0).sum()), 5.0
    model = copy.deepcopy(base).train()
    for rows in row_chunks(len(batch), 3):
        lp, _ = token_logprobs(model, batch.select(rows))  # [b, T]
        per_tok = -batch.advantages[rows, None].double() * lp.double() * mask[rows].double()  # [b, T]
        if aggregation == "token-mean":
            part = per_tok.sum() / n_tokens
        elif aggregation == "seq-mean-token-sum":
            part = per_tok.sum() / n_rows
        elif aggregation == "seq-mean-token-mean":
            part = (per_tok.sum(-1) / counts[rows].clamp(min=1).double()).sum() / n_rows
        else:
            part = per_tok.sum() / scale
        part.backward()
    want = [p.grad for p in model.parameters()]
    got, _, _ = _update(base, batch, 3, objective="reinforce", objective_params={}, aggregation=aggregation,
                        grad_clip=0.0, loss_scale_factor=scale)
    num = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(want, got)))
    assert num <= 1e-6 * math.sqrt(sum(float(a.pow(2).sum()) for a in want))


def test_row_chunks_cover_every_row_once():
    assert row_chunks(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert row_chunks(7, 0) == row_chunks(7, 7) == row_chunks(7, 9) == [list(range(7))]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_micro_batch_size_is_one_line(setup, bad):
    base, _, batch, _ = setup
    with pytest.raises(WorkbenchError) as err:
        _update(base, batch, bad, objective="reinforce", objective_params={}, grad_clip=0.0)
    assert "micro_batch_size" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(WorkbenchError, match="micro_batch_size"):
        RunConfig(micro_batch_size=bad)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_peak_memory_is_logged(setup):
    base, _, batch, _ = setup
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    _, m, _ = _update(base, batch, 2, objective="reinforce", objective_params={}, grad_clip=0.0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert before <= m["perf/peak_mem_mb"] <= after  # on CPU: the process high-water mark, in MiB


def test_run_with_micro_batches_matches_the_whole_minibatch(tokenizer, tiny_model_config):
    small = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
                 group_size=4, eval_every=100, eval_size=16, lr=1e-2, seed=3, rewards=TINY_REWARDS, out_dir="",
                 objective="ppo_clip", entropy_coef=0.01, kl_coef=0.05)
    rows = {}
    for micro in (0, 2):
        run = Run(RunConfig(**small, micro_batch_size=micro), model=build_model(tiny_model_config, tokenizer, seed=0),
                  tokenizer=tokenizer, log=lambda s: None)
        rows[micro] = [run.step() for _ in range(3)]
    for a, b in zip(rows[0], rows[2]):
        keys = [k for k, v in a.items() if isinstance(v, float) and not k.startswith(("perf/", "time"))]
        assert "loss/grad_norm" in keys and "loss/kl_ref" in keys
        for k in keys:
            assert (math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), k
