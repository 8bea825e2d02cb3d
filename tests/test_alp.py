"""ALP (workbench.steps.alp): the adversarial per-layer perturbation of the update's training forward."""

from __future__ import annotations

import random

import polars as pl
import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.logprobs import token_logprobs
from workbench.policy.model import build_model
from workbench.steps.alp import DELTA_NORM_METRIC, adversarial_deltas, decoder_layers, perturbed
from workbench.steps.generate import SamplingParams, TransformersSampler
from workbench.steps.reweight import resolve_objective
from workbench.steps.reweight.loss import policy_loss
from workbench.steps.update import build_optimizer, update_step

PPO = dict(objective="ppo_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2}, aggregation="token-mean")


def _model(tiny_model_config, tokenizer, double=True):
    model = build_model(tiny_model_config, tokenizer, seed=0)
    return model.double() if double else model


def _batch(model, tokenizer, addition_task, seed=0):
    """Sampled rollouts of ``model`` with fixed mixed-sign advantages (an untrained model earns no reward)."""
    ex = addition_task.sample(random.Random(seed), 4)
    r = TransformersSampler(model, tokenizer).generate(ex, 4, SamplingParams(max_new_tokens=4),
                                                      generator=torch.Generator().manual_seed(seed), policy_version=0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64).repeat(len(r) // 4)  # [B]
    return r.with_(advantages=adv)


def _ppo_loss(batch):
    obj = resolve_objective(PPO["objective"], PPO["objective_params"])
    return lambda lp: policy_loss(obj, lp, batch.behavior_logprobs, batch.advantages, batch.response_mask,
                                  aggregation="token-mean", context={"group_id": batch.group_id})[0]


def _own_hooks(model, deltas, rms=None):
    """The test's own pre-hooks: layer l's first positional input + deltas[l] (records sqrt(mean ||h_t||^2))."""
    def make(d, i):
        def hook(_m, args):
            if rms is not None:
                rms[i] = float(args[0].detach().pow(2).sum(-1).mean().sqrt())
            return (args[0] + d,) + args[1:]
        return hook
    return [layer.register_forward_pre_hook(make(d, i)) for i, (layer, d) in enumerate(zip(decoder_layers(model), deltas))]


def _update(model, batch, **kw):
    opt = build_optimizer(model, 1e-2, 0.0, (0.9, 0.999))
    metrics = update_step(model, opt, batch, temperature=1.0, grad_clip=0.0, **PPO, **kw)
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def _n_hooks(model):
    return sum(len(layer._forward_pre_hooks) for layer in decoder_layers(model))


def test_delta_is_the_normalised_gradient_ascent_step_on_the_bound(tiny_model_config, tokenizer, addition_task):
    model = _model(tiny_model_config, tokenizer)
    batch = _batch(model, tokenizer, addition_task)
    scale, loss_of = 0.05, _ppo_loss(batch)
    deltas, bounds = adversarial_deltas(model, batch, 1.0, scale, loss_of)
    # independent reference: own hooks adding zero leaves, autograd for dL/ddelta_l, the RMS token norm
    zeros = [torch.zeros(tiny_model_config.hidden_size, dtype=torch.float64, requires_grad=True) for _ in deltas]
    rms = [0.0] * len(zeros)
    handles = _own_hooks(model, zeros, rms)
    grads = torch.autograd.grad(loss_of(token_logprobs(model, batch, temperature=1.0)[0]), zeros)
    for h in handles:
        h.remove()
    for d, g, r, bound in zip(deltas, grads, rms, bounds):
        assert bound == pytest.approx(scale * r, rel=1e-12)
        assert torch.allclose(d, bound * g / g.norm(), rtol=1e-10, atol=0)
        assert float(d.norm()) <= bound * (1 + 1e-12)  # on the bound, never past it
    # the step ascends: L(-delta) < L(0) < L(+delta). (A finite-difference check of g at 1e-6 is out of
    # reach: the Llama RMSNorm computes in fp32 even in a float64 model.)
    with torch.no_grad():
        losses = []
        for sign in (-1.0, 0.0, 1.0):
            with perturbed(model, [sign * d for d in deltas]):
                losses.append(float(loss_of(token_logprobs(model, batch)[0])))
    assert losses[0] < losses[1] < losses[2]
    assert _n_hooks(model) == 0


def test_alp_off_is_bit_identical_and_registers_no_hooks(tiny_model_config, tokenizer, addition_task, monkeypatch):
    plain = _model(tiny_model_config, tokenizer, double=False)
    batch = _batch(plain, tokenizer, addition_task)
    m_plain = _update(plain, batch)
    registered = []
    original = torch.nn.Module.register_forward_pre_hook
    monkeypatch.setattr(torch.nn.Module, "register_forward_pre_hook",
                        lambda self, *a, **k: registered.append(self) or original(self, *a, **k))
    off = _model(tiny_model_config, tokenizer, double=False)
    m_off = _update(off, batch, alp_scale=0.0)
    assert registered == [] and m_off == m_plain and DELTA_NORM_METRIC not in m_off
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values()))


def test_training_forward_is_perturbed_by_exactly_the_adversarial_deltas(tiny_model_config, tokenizer, addition_task):
    """update_step(alp_scale) == an ALP-off update of a model carrying the test's own hooks with the
    deltas computed at the same weights: same metrics (the perturbed forward's ratio statistics) and weights."""
    alp = _model(tiny_model_config, tokenizer)
    batch = _batch(alp, tokenizer, addition_task)
    deltas, bounds = adversarial_deltas(alp, batch, 1.0, 0.1, _ppo_loss(batch))
    m_alp = _update(alp, batch, alp_scale=0.1)
    ref = _model(tiny_model_config, tokenizer)
    handles = _own_hooks(ref, deltas)
    m_ref = _update(ref, batch)
    for h in handles:
        h.remove()
    assert m_alp[DELTA_NORM_METRIC] == pytest.approx(sum(float(d.norm()) for d in deltas) / len(deltas), rel=1e-12)
    assert m_alp[DELTA_NORM_METRIC] == pytest.approx(sum(bounds) / len(bounds), rel=1e-12)
    assert abs(m_alp["offpolicy/ratio_mean"] - 1) > 1e-4  # perturbed numerator vs the unperturbed sampler
    for k, v in m_ref.items():
        assert m_alp[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    for a, b in zip(alp.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_stateful_objective_advances_once(tiny_model_config, tokenizer, addition_task):
    """R2VPO's dual variable: the adversarial pass evaluates the loss on a copy of the run's state,
    so after one ALP update the state equals an ALP-off update's on the same perturbed forward."""
    states = []
    for with_alp in (True, False):
        model = _model(tiny_model_config, tokenizer)
        batch = _batch(model, tokenizer, addition_task)
        handles = [] if with_alp else _own_hooks(model, _r2vpo_deltas(model, batch))
        state: dict = {}
        update_step(model, build_optimizer(model, 1e-2, 0.0, (0.9, 0.999)), batch, objective="r2vpo",
                    temperature=1.0, grad_clip=0.0, context={"step": 0, "state": state}, alp_scale=0.1 if with_alp else 0.0)
        for h in handles:
            h.remove()
        states.append(state)
    assert states[0] and states[0].keys() == states[1].keys()
    for k in states[0]:
        assert states[0][k] == pytest.approx(states[1][k], rel=1e-9), k


def _r2vpo_deltas(model, batch):
    obj = resolve_objective("r2vpo", {})
    deltas, _ = adversarial_deltas(model, batch, 1.0, 0.1, lambda lp: policy_loss(
        obj, lp, batch.behavior_logprobs, batch.advantages, batch.response_mask, aggregation=obj.aggregation(""),
        context={"group_id": batch.group_id, "rewards": batch.rewards, "step": 0, "state": {}})[0])
    return deltas


def test_hooks_only_in_training_forwards_and_removed_after(tiny_model_config, tokenizer, addition_task):
    model = _model(tiny_model_config, tokenizer)
    batch = _batch(model, tokenizer, addition_task)
    seen = []  # (grad enabled, ALP hooks on the layers) at every forward of the policy
    probe = model.register_forward_pre_hook(lambda m, a: seen.append((torch.is_grad_enabled(), _n_hooks(model))))
    _update(model, batch, alp_scale=0.1, proximal="recompute")
    probe.remove()
    n = tiny_model_config.num_layers
    # the no-grad proximal forward is plain; the delta = 0 pass and the perturbed forward are hooked
    assert seen == [(False, 0), (True, n), (True, n)]
    assert _n_hooks(model) == 0
    # no leak: after the update the model's forward, sampling and greedy decoding equal a plain copy's
    copy = _model(tiny_model_config, tokenizer)
    copy.load_state_dict(model.state_dict())
    model.eval()
    assert torch.equal(token_logprobs(model, batch)[0], token_logprobs(copy, batch)[0])  # [B, T]
    ex = addition_task.sample(random.Random(7), 4)
    for params in (SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=4, temperature=1e-6)):
        a = TransformersSampler(model, tokenizer).generate(ex, 2, params, generator=torch.Generator().manual_seed(1),
                                                  policy_version=0)
        b = TransformersSampler(copy, tokenizer).generate(ex, 2, params, generator=torch.Generator().manual_seed(1),
                                                  policy_version=0)
        assert a.completions == b.completions and torch.equal(a.behavior_logprobs, b.behavior_logprobs)


def test_hooks_removed_when_the_forward_raises(tiny_model_config, tokenizer):
    model = _model(tiny_model_config, tokenizer)
    with pytest.raises(RuntimeError):
        with perturbed(model, [torch.zeros(3, dtype=torch.float64) for _ in decoder_layers(model)]):
            model(torch.tensor([[1, 2, 3]]))  # [3] does not broadcast to hidden 32
    assert _n_hooks(model) == 0


def test_alp_update_is_deterministic(tiny_model_config, tokenizer, addition_task):
    runs = []
    for _ in range(2):
        model = _model(tiny_model_config, tokenizer, double=False)
        batch = _batch(model, tokenizer, addition_task)
        runs.append((_update(model, batch, alp_scale=0.05), [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("bad, match", [
    (dict(alp_scale=-0.1), r"^alp_scale=-0.1 is invalid: expected a finite float >= 0 \(0 = off\)$"),
    (dict(alp_scale=float("inf")), r"^alp_scale=inf is invalid: expected a finite number"),
    (dict(alp_scale=float("nan")), r"^alp_scale=nan is invalid: expected a finite number"),
    (dict(alp_scale="0.1"), r"^alp_scale='0.1' is invalid"),
    (dict(alp_scale=0.1, micro_batch_size=4), r"^alp_scale=0.1 is invalid: expected 0 with micro_batch_size"),
    (dict(alp_scale=0.1, compile=True), r"^alp_scale=0.1 is invalid: expected 0 with .*compile=true"),
])
def test_bad_config_one_line_error(bad, match):
    with pytest.raises(WorkbenchError, match=match) as err:
        RunConfig(**bad)
    assert "\n" not in str(err.value)


def test_config_accepts_alp_with_one_piece():
    base = RunConfig()
    minibatch = base.batch_size // base.num_minibatches
    assert RunConfig(alp_scale=0.1, micro_batch_size=minibatch).alp_scale == 0.1  # >= the minibatch: one piece
    with pytest.raises(WorkbenchError, match="^alp_scale=0.1 is invalid"):
        RunConfig(alp_scale=0.1, micro_batch_size=minibatch - 1)


@pytest.mark.parametrize("kw, match", [
    (dict(alp_scale=-1.0), r"^alp_scale=-1.0 is invalid: expected a finite float >= 0 \(0 = off\)$"),
    (dict(alp_scale=True), r"^alp_scale=True is invalid"),
    (dict(alp_scale=float("nan")), r"^alp_scale=nan is invalid: expected a finite float >= 0"),
    (dict(alp_scale=0.1, micro_batch_size=4), r"^alp_scale=0.1 needs micro_batch_size=0 and compile=False"),
])
def test_update_step_bad_input_one_line_error(tiny_model_config, tokenizer, addition_task, kw, match):
    model = _model(tiny_model_config, tokenizer, double=False)
    batch = _batch(model, tokenizer, addition_task)
    with pytest.raises(WorkbenchError, match=match) as err:
        _update(model, batch, **kw)
    assert "\n" not in str(err.value)


SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=3, eval_size=16, lr=1e-3, seed=3, alp_scale=0.05, objective="ppo_clip",
             rewards=(("overlong", 1.0, {"max_len": 4, "cache_len": 3}),))  # a length-shaped reward: advantages != 0


def _run(tokenizer, tiny_model_config, out, **kw):
    cfg = RunConfig(**{**SMALL, "out_dir": str(out), "run_name": "r", **kw})
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)


def _deterministic(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([c for c in df.columns if not c.startswith("perf/")])


def test_run_with_alp_end_to_end_and_resumes_exactly(tokenizer, tiny_model_config, tmp_path):
    kw = dict(staleness=2, updates_per_batch=2, num_minibatches=2)
    full = _run(tokenizer, tiny_model_config, tmp_path / "a", **kw).run(6)
    # a minibatch whose advantages are all 0 has no loss gradient, so its delta is 0
    assert (full[DELTA_NORM_METRIC] > 0).sum() >= 3 and full["loss/skipped_nonfinite"].sum() == 0
    plain = _run(tokenizer, tiny_model_config, tmp_path / "p", alp_scale=0.0, **kw).run(6)
    assert not _deterministic(plain).equals(_deterministic(full).drop(DELTA_NORM_METRIC))
    first = _run(tokenizer, tiny_model_config, tmp_path / "b", **kw)
    first.run(3)  # nothing of ALP persists across updates: the checkpoint needs nothing new
    resumed = Run.resume(tmp_path / "b" / "r", model=build_model(tiny_model_config, tokenizer, seed=0),
                         tokenizer=tokenizer, log=lambda s: None)
    assert _deterministic(resumed.run(3)).equals(_deterministic(full))
