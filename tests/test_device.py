"""Device audit: every tensor a loss or metric creates lives on its inputs' device.

There is no GPU here, so the test simulates "inputs on another device than the default one". Why not
inputs on the ``meta`` device: ``policy_loss`` cannot run on meta tensors at all. Its input checks
(``bool(bad.any())``), its metrics (``.tolist()`` / ``float()``), ``torch.quantile``, ``nonzero`` and
the data-dependent shapes of ``x[mask]`` all need real data (meta tensors carry none).

What this file does instead: the inputs are real CPU tensors and the *default* device is switched
to meta (``with torch.device("meta"):``). A construction without an explicit device
(``torch.zeros(n)``, ``torch.arange(n)``, ``torch.tensor(x)``, ``torch.full(...)``) then lands on
meta instead of the inputs' device, just as it would land on the CPU next to CUDA inputs. Using it
with the inputs raises ("Tensor on device meta is not on the expected device cpu"), or it surfaces
as a meta output or metric (``float()`` of a meta tensor raises). A torch-function mode
(``_NoMixing``) also fails every op that sees a meta tensor next to a CPU one: on its own, meta
silently ignores writes such as ``cpu_tensor[idx] = meta_tensor``. ``new_*`` / ``*_like`` /
``device=x.device`` constructions follow their inputs and pass. ``test_the_check_catches_a_cpu_construction``
checks that the mechanism still works with the installed torch.

Where it differs from a real CUDA run: it is stricter for a 0-d tensor made without a device (CUDA
accepts a CPU scalar tensor in an op, meta does not; we want neither). It also gives one false alarm:
``torch.as_tensor(t)`` of an existing tensor is moved to meta here, but on CUDA it keeps ``t``'s
device. ``Rollouts.select`` does that, so ``score(..., filter_zero_variance=True)`` is left out.
Context tensors passed in on another device than the inputs (``context.row_values`` /
``token_values`` / ``expert_tensors`` move them) cannot be simulated without a second real device.

The inputs are built here from public package functions (``objective_needs``, ``CONTEXT_KEYS``)
rather than imported from the ``test_reweight*`` helpers, which are being reorganised.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from workbench.steps.generate import SamplingParams, TransformersSampler
from workbench.policy.logprobs import token_logprobs
from workbench.policy.model import build_model
from workbench.steps.reweight import AGGREGATIONS, CORRECTION_PRESETS, OBJECTIVES, policy_loss, weight_curve
from workbench.steps.reweight.context import CONTEXT_KEYS
from workbench.steps.reweight.core import objective_needs
from workbench.steps.score import ADVANTAGES, score, zero_variance_mask
from workbench.steps.update import build_optimizer, update_step
from workbench.policy.warm_start import sft_batch

F64 = torch.float64
CPU = torch.device("cpu")


class _NoMixing(TorchFunctionMode):
    """Fail any torch call that meets a meta tensor next to a tensor on another device. (Needed for
    indexed writes: ``cpu_tensor[idx] = meta_tensor`` is a silent no-op, not an error.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {x.device.type for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        if "meta" in devices and len(devices) > 1:
            raise AssertionError(f"{getattr(func, '__qualname__', func)}: a tensor built without a device "
                                 f"(on meta here) meets the inputs' device ({sorted(devices - {'meta'})})")
        return func(*args, **kwargs)


@contextmanager
def elsewhere():
    """Inside: tensors built without an explicit device go to meta (not the inputs' device), and any
    op that mixes them with the inputs fails."""
    with torch.device("meta"), _NoMixing():
        yield


def _batch(seed: int = 0, all_masked: bool = False):
    """(logprobs with grad, behaviour log-probs, advantages [B], mask) on the CPU: B=4, T=5, ragged rows."""
    g = torch.Generator().manual_seed(seed)
    beh = -torch.rand(4, 5, generator=g, dtype=F64) * 3  # [B, T]
    lp = (beh + (torch.rand(4, 5, generator=g, dtype=F64) * 2 - 1) * 0.6).requires_grad_()  # [B, T]
    mask = torch.ones(4, 5, dtype=F64)  # [B, T]
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    if all_masked:
        mask.zero_()
    adv = torch.tensor([1.0, -0.7, 0.4, -1.3], dtype=F64)  # [B]
    return lp, beh, adv, mask


def _context(name: str, params: dict, beh: torch.Tensor, mask: torch.Tensor) -> dict | None:
    """Every context key the objective needs, on the CPU (groups of two rows, a fresh state)."""
    needs = objective_needs(name, params)
    assert set(needs) <= set(CONTEXT_KEYS)
    if not needs:
        return None
    b = beh.shape[0]
    full = {"group_id": torch.arange(b) // 2, "rewards": torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=F64),
            "step": 5, "state": {}, "ref_logprobs": beh - 0.25,
            "expert_logprobs": beh.clone().requires_grad_(), "expert_mask": mask.clone()}
    return {k: full[k] for k in needs}


def _variants(name: str) -> list[dict]:
    """Defaults, every preset and every choice of every string parameter."""
    meta = OBJECTIVES.meta(name)
    out = [{}] + [dict(p) for p in meta.get("presets", {}).values()]
    out += [{p.name: c} for p in meta["params"] if p.choices for c in p.choices]
    return out


def _run_loss(name: str, params: dict, *, all_masked=False, prox=False, correction=None,
              aggregation="token-mean"):
    lp, beh, adv, mask = _batch(all_masked=all_masked)
    ctx = _context(name, params, beh, mask)
    with elsewhere():
        loss, metrics = policy_loss(name, lp, beh, adv, mask, aggregation=aggregation, context=ctx,
                                    prox_logprobs=beh + 0.1 if prox else None, correction=correction, **params)
        loss.backward()
    assert loss.device == CPU and lp.grad.device == CPU
    if ctx and "expert_logprobs" in ctx and ctx["expert_logprobs"].grad is not None:
        assert ctx["expert_logprobs"].grad.device == CPU
    assert all(isinstance(v, float) for v in metrics.values())


def test_the_check_catches_a_cpu_construction():
    x, idx = torch.ones(3), torch.tensor([0, 2])
    with elsewhere():
        assert torch.zeros(3).device.type == "meta" and x.new_zeros(3).device == CPU
        with pytest.raises((RuntimeError, AssertionError)):
            x + torch.zeros(3)
        with pytest.raises(AssertionError):
            x[idx] = torch.zeros(2)  # meta alone silently ignores this write
        with pytest.raises((RuntimeError, NotImplementedError)):
            float(torch.tensor(1.0))


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_policy_loss_stays_on_the_input_device(name):
    """Every variant (defaults: with every correction preset), with and without a proximal anchor, an
    empty batch, every aggregation."""
    for i, params in enumerate(_variants(name)):
        for correction in (None, *CORRECTION_PRESETS) if i == 0 else (None, "seq_mis"):
            for prox in (False, True):
                _run_loss(name, params, prox=prox, correction=correction)
        _run_loss(name, params, all_masked=True, correction="seq_mis")
    for aggregation in AGGREGATIONS:
        _run_loss(name, {}, aggregation=aggregation)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_weight_curves_stay_on_the_ratio_device(name):
    r = torch.linspace(0.5, 2.0, 4, dtype=F64)  # [N]
    with elsewhere():
        curves = [weight_curve(name, r, -1, batched=True), weight_curve(name, r[:2], 1)]
    assert all(w.device == CPU for w in curves)


def test_advantages_stay_on_the_input_device():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 2.0])  # [B]
    group_id = torch.tensor([0, 0, 1, 1, 2, 3])  # [B]
    with elsewhere():
        out = [ADVANTAGES.get(name)(rewards, group_id) for name in ADVANTAGES.names()]
        out.append(zero_variance_mask(rewards, group_id))
    assert all(a.device == CPU for a in out)


def _rollouts(model, tokenizer, task, n=2, group=2):
    ex = task.sample(random.Random(0), n)
    r = TransformersSampler(model, tokenizer).generate(ex, group, SamplingParams(max_new_tokens=4),
                                                       generator=torch.Generator().manual_seed(0), policy_version=0)
    return r, ex


def test_score_logprobs_and_update_step_stay_on_the_model_device(tiny_model, tiny_model_config, tokenizer,
                                                                 addition_task):
    batch, ex = _rollouts(tiny_model, tokenizer, addition_task)
    with elsewhere():
        scored, metrics = score(batch, [("exact_match", 1.0), ("format", 0.5)], advantage="grpo")
        lp, ent = token_logprobs(tiny_model, batch, with_entropy=True)
    assert scored.rewards.device == scored.advantages.device == lp.device == ent.device == CPU
    assert all(isinstance(v, float) for v in metrics.values())
    scored = scored.with_(advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))  # mixed signs: nothing degenerate
    ref = build_model(tiny_model_config, tokenizer, seed=1)
    expert = sft_batch(tokenizer, ex, addition_task)
    opt = build_optimizer(tiny_model, 1e-3, 0.0, (0.9, 0.999))
    runs = [
        dict(objective="ppo_clip", kl_coef=0.1, entropy_coef=0.01, ref_model=ref, proximal="loglinear",
             policy_version=1, correction="seq_mis"),
        dict(objective="tb", ref_model=ref, proximal="recompute", grad_clip=0.0),
        dict(objective="chord", expert_batch=expert, context={"step": 3}),
        dict(objective="r2vpo", context={"step": 0, "state": {}}),
    ]
    for kw in runs:
        kw = {"objective_params": {}, "aggregation": "token-mean", "temperature": 1.0, "grad_clip": 1.0, **kw}
        with elsewhere():
            m = update_step(tiny_model, opt, scored, **kw)
        assert m["loss/skipped_nonfinite"] == 0.0 and all(isinstance(v, float) for v in m.values())
    assert all(p.device == CPU for p in tiny_model.parameters())
