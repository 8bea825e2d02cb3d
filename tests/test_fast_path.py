"""The fast path (workbench.policy.fast_path): bf16 autocast against an fp64 reference, the engine
mismatch it causes, determinism of autocast and compiled runs, compiled == eager, and bad input.

Tolerances. bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.4% per value); on the tiny
model the per-token log-probs under bf16 autocast stay within 0.05 nats of fp64 and the gradient of
their sum within 5% (relative norm of the difference), so those are the bounds; fp32 is held to
1e-5 of fp64. Compiled vs eager: inductor may reorder reductions and fuse ops, so the compiled
log-probs / losses are held to 1e-5 relative of eager fp32, not to bitwise equality.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from workbench.cli import main
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.fast_path import autocast_context, check_fast_path, training_model
from workbench.policy.logprobs import token_logprobs
from workbench.policy.model import build_model
from workbench.steps.generate import SamplingParams, TransformersSampler
from workbench.steps.score import score
from workbench.steps.update import build_optimizer, update_step

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=4,
             group_size=4, eval_every=100, eval_size=8, lr=1e-3, seed=3, out_dir="")


def scored_batch(model, tokenizer, task, seed=0):
    gen = torch.Generator().manual_seed(seed)
    examples = task.sample(random.Random(seed), 4)
    r = TransformersSampler(model, tokenizer).generate(examples, 4, SamplingParams(max_new_tokens=4),
                                                       generator=gen, policy_version=0)
    r, _ = score(r, [("exact_match", 1.0)], advantage="grpo")
    return r.with_(advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]).repeat(len(r) // 4))  # [B] mixed signs


def logprob_sum_grad(model, batch, autocast=""):
    """Per-token log-probs [B, T] and the flat gradient of their masked sum."""
    model.zero_grad(set_to_none=True)
    with autocast_context(autocast, model):
        lp, _ = token_logprobs(model, batch)  # [B, T]
    (lp * batch.response_mask).sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double()
    return lp.detach().double(), grad


def run_metrics(tokenizer, tiny_model_config, n=3, **kw):
    run = Run(RunConfig(**{**SMALL, **kw}), model=build_model(tiny_model_config, tokenizer, seed=0),
              tokenizer=tokenizer, log=lambda s: None)
    df = run.run(n)
    return df.select([c for c in df.columns if not c.startswith("perf/")]), df


def test_bf16_logprobs_and_gradient_close_to_fp64_reference(tiny_model, tokenizer, addition_task):
    batch = scored_batch(tiny_model, tokenizer, addition_task)
    ref_lp, ref_grad = logprob_sum_grad(copy.deepcopy(tiny_model).double(), batch)  # float64 reference
    lp32, grad32 = logprob_sum_grad(tiny_model, batch)
    lp16, grad16 = logprob_sum_grad(tiny_model, batch, autocast="bf16")
    assert (lp32 - ref_lp).abs().max() < 1e-5
    assert (grad32 - ref_grad).norm() / ref_grad.norm() < 1e-5
    diff = (lp16 - ref_lp).abs().max()
    assert 1e-4 < diff < 0.05  # bf16 changed the numbers, within bf16's bound
    assert (grad16 - ref_grad).norm() / ref_grad.norm() < 0.05
    with autocast_context("bf16", tiny_model):
        lp, ent = token_logprobs(tiny_model, batch, with_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32  # the objective sees fp32


def test_bf16_trainer_is_an_engine_mismatch_source(tiny_model, tokenizer, addition_task):
    """fp32 sampler, bf16 trainer, staleness 0: drift is 0 by construction and the engine part is
    log pi_bf16 - log mu, matching the independent bf16 forward; fp32 leaves only rounding."""
    batch = scored_batch(tiny_model, tokenizer, addition_task)
    mask = batch.response_mask > 0  # [B, T]
    with torch.no_grad(), autocast_context("bf16", tiny_model):
        expected = (token_logprobs(tiny_model, batch)[0].double() - batch.behavior_logprobs.double())[mask].abs().max()
    out = {}
    for mode in ("", "bf16"):
        model = copy.deepcopy(tiny_model)
        out[mode] = update_step(model, build_optimizer(model, 1e-3, 0.0, (0.9, 0.999)), batch, objective="ppo_clip",
                                temperature=1.0, grad_clip=1.0, policy_version=0, autocast=mode)
    assert out[""]["mismatch/engine_abs_max"] < 1e-5
    assert out["bf16"]["mismatch/engine_abs_max"] > 1e-4
    assert out["bf16"]["mismatch/engine_abs_max"] == pytest.approx(float(expected), rel=1e-6)
    assert out["bf16"]["mismatch/drift_abs_max"] == 0.0
    assert out["bf16"]["loss/total"] == pytest.approx(out[""]["loss/total"], abs=0.05)


def test_autocast_run_is_deterministic_and_bf16_changes_it(tokenizer, tiny_model_config):
    a, _ = run_metrics(tokenizer, tiny_model_config, autocast="bf16", staleness=1)
    b, _ = run_metrics(tokenizer, tiny_model_config, autocast="bf16", staleness=1)
    assert a.equals(b)
    exact, _ = run_metrics(tokenizer, tiny_model_config, staleness=1)
    assert not a.equals(exact)
    # staleness 1: log pi_gen is stored at generation under the trainer's precision, so engine is
    # the bf16 gap and drift the weight change only
    assert (a["mismatch/engine_abs_max"] > 1e-4).all()
    assert (exact["mismatch/engine_abs_max"] < 1e-5).all()


@pytest.mark.slow  # ~20 s of torch.compile: .ci/run runs it on its own line
def test_compiled_forward_is_cached_and_equals_eager(tiny_model, tokenizer, addition_task):
    batch = scored_batch(tiny_model, tokenizer, addition_task)
    eager_lp, eager_grad = logprob_sum_grad(tiny_model, batch)
    compiled, first = training_model(tiny_model, True)
    assert first and training_model(tiny_model, True) == (compiled, False)  # compiled once per model
    assert training_model(tiny_model, False) == (tiny_model, False)
    lp, grad = logprob_sum_grad(compiled, batch)
    assert (lp - eager_lp).abs().max() < 1e-5
    assert (grad - eager_grad).norm() / eager_grad.norm() < 1e-5
    assert not any(k.startswith("_orig_mod") for k in tiny_model.state_dict())  # checkpoints unchanged
    assert training_model(copy.deepcopy(tiny_model), True)[1]  # a copy compiles for itself


@pytest.mark.slow
def test_compile_run_deterministic_equal_to_eager_and_logs_compile_time_once(tokenizer, tiny_model_config):
    a, a_full = run_metrics(tokenizer, tiny_model_config, compile=True)
    b, _ = run_metrics(tokenizer, tiny_model_config, compile=True)
    assert a.equals(b)
    eager, eager_full = run_metrics(tokenizer, tiny_model_config)
    for col in ("loss/total", "loss/grad_norm", "loss/entropy"):
        assert a[col].to_list() == pytest.approx(eager[col].to_list(), rel=1e-5, abs=1e-7)
    seconds = a_full["perf/compile_seconds"].to_list()
    assert seconds[0] > 0 and all(s is None for s in seconds[1:])  # the first update only
    assert "perf/compile_seconds" not in eager_full.columns


@pytest.mark.parametrize("kw, words", [
    (dict(autocast="int8"), ["autocast='int8'", "bf16", "fp16"]),
    (dict(autocast="BF16"), ["autocast='BF16'", "bf16"]),
    (dict(compile="yes"), ["compile", "'yes'"]),
])
def test_bad_config_values_are_one_line_errors(kw, words):
    with pytest.raises(WorkbenchError) as e:
        RunConfig(**kw)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


def test_compile_without_a_cxx_compiler_is_refused_before_the_run_dir(tokenizer, tiny_model_config, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no g++ / c++ / clang++ reachable
    monkeypatch.delenv("CXX", raising=False)
    cfg = RunConfig(**{**SMALL, "out_dir": str(tmp_path / "runs"), "run_name": "r", "compile": True})
    with pytest.raises(WorkbenchError, match="C\\+\\+ compiler") as e:
        Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    assert "\n" not in str(e.value) and "compile=True" in str(e.value)
    assert not (tmp_path / "runs").exists()  # nothing written
    check_fast_path(False, "", "cpu")  # the exact path needs nothing


def test_run_help_lists_the_fast_path_flags(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--compile" in text and "--autocast" in text and "perf/compile_seconds" in text
