"""LoRA adapters (``RunConfig.lora``, workbench/policy/lora.py): only the adapters train, the
reference policy is the same model with them off, a resume is exact, the engine's merged weights
are W + (alpha / r) B A, and bad input is one line before anything is written."""

from __future__ import annotations

import argparse

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft", reason="LoRA needs the optional peft extra: pip install 'workbench[peft]'")

from workbench.cli.config_flags import add_config_flags, config_from_args  # noqa: E402
from workbench.config import RunConfig  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.loop import Run  # noqa: E402
from workbench.policy import lora  # noqa: E402
from workbench.policy.logprobs import frozen_logprobs  # noqa: E402
from workbench.policy.model import build_model, save_policy  # noqa: E402

from test_run_dirs import deterministic, one_line

# entropy_coef gives every update a gradient even while the tiny model earns no reward
SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=2, eval_size=16, lr=1e-2, seed=3, entropy_coef=0.5, out_dir="")
LORA = {"r": 4, "alpha": 12, "target": "q_proj,v_proj"}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def quiet_run(config: RunConfig, model=None, tokenizer=None) -> Run:
    return Run(config, model=model, tokenizer=tokenizer, log=lambda s: None)




def split_state(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base tensors, adapter tensors) of a peft model's state dict, cloned."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapters = {k: v for k, v in sd.items() if ".lora_" in k}
    return {k: v for k, v in sd.items() if k not in adapters}, adapters


# ------------------------------------------------------------------------------ training
def test_only_the_adapters_train_on_a_local_checkpoint(tiny_model, tokenizer, tmp_path):
    folder = save_policy(tiny_model, tokenizer, tmp_path / "ckpt")
    run = quiet_run(RunConfig(**SMALL, model=str(folder), lora=LORA))
    assert lora.is_lora(run.model)
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
                for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"}
    assert trainable == expected
    optimized = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for name, p in run.model.named_parameters() if name in expected}
    base_before, adapters_before = split_state(run.model)
    assert all(not v.any() for k, v in adapters_before.items() if ".lora_B." in k)  # B starts at zero
    run.run(3)
    base_after, adapters_after = split_state(run.model)
    assert base_after.keys() == base_before.keys()
    for k, v in base_before.items():
        assert torch.equal(base_after[k], v), f"base weight {k} changed"
    for k, v in adapters_before.items():
        assert not torch.equal(adapters_after[k], v), f"adapter {k} did not train"


def test_a_suffix_and_all_linear_select_the_layers_they_name(tiny_model):
    every = [f"model.layers.{i}.{proj}" for i in range(2) for proj in PROJECTIONS]
    assert lora.target_modules(tiny_model, "all-linear") == every  # lm_head (the output layer) excluded
    assert lora.target_modules(tiny_model, "self_attn.o_proj,down_proj") == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]


def test_adapter_init_is_seeded_and_leaves_the_global_rng_alone(tiny_model_config, tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = lora.apply_lora(build_model(tiny_model_config, tokenizer, seed=0), LORA, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    again = lora.apply_lora(build_model(tiny_model_config, tokenizer, seed=0), LORA, seed=5)
    other = lora.apply_lora(build_model(tiny_model_config, tokenizer, seed=0), LORA, seed=6)
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(first.state_dict()[a], again.state_dict()[a])
    assert not torch.equal(first.state_dict()[a], other.state_dict()[a])


# ------------------------------------------------------------------------------ the reference policy
def test_reference_is_the_base_model_with_adapters_off_and_no_copy(tiny_model_config, tokenizer):
    run = quiet_run(RunConfig(**SMALL, kl_coef=0.1, lora=LORA), build_model(tiny_model_config, tokenizer, seed=0),
                    tokenizer)
    assert isinstance(run.ref_model, lora.AdapterOffReference)
    # no second parameter set: the reference's tensors are the training model's own storage
    assert {p.data_ptr() for p in run.ref_model.parameters()} == {p.data_ptr() for p in run.model.parameters()}
    run.run(3)
    assert run.rows[-1]["loss/kl_ref"] > 0  # the adapters moved the policy away from the reference
    batch = run.last_batch
    policy_before = frozen_logprobs(run.model, batch)  # [B, T]
    ref = frozen_logprobs(run.ref_model, batch)  # [B, T]
    base = build_model(tiny_model_config, tokenizer, seed=0)  # the same base weights, loaded separately
    assert torch.equal(ref, frozen_logprobs(base, batch))
    assert not torch.equal(ref, policy_before)
    assert torch.equal(frozen_logprobs(run.model, batch), policy_before)  # adapters are back on afterwards


class RecordingReference(lora.AdapterOffReference):
    """The run's reference, keeping each forward's inputs and logits."""

    calls: list[tuple[dict, torch.Tensor]]

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        self.calls.append((kwargs, out.logits.detach().clone()))
        return out


def test_the_loop_reference_forward_is_the_base_model(tiny_model_config, tokenizer):
    run = quiet_run(RunConfig(**SMALL, kl_coef=0.1, lora=LORA), build_model(tiny_model_config, tokenizer, seed=0),
                    tokenizer)
    run.run(2)
    run.ref_model = RecordingReference(run.model)
    run.ref_model.calls = []
    row = run.step()
    assert row["loss/kl_ref"] > 0 and len(run.ref_model.calls) == 1
    kwargs, logits = run.ref_model.calls[0]
    base = build_model(tiny_model_config, tokenizer, seed=0).eval()
    with torch.no_grad():
        assert torch.equal(logits, base(**kwargs).logits)  # [B, T + 1, V]
        assert not torch.equal(logits, run.model(**kwargs).logits)  # the adapters do change the policy


# ------------------------------------------------------------------------------ checkpoints
def test_resume_mid_run_is_exact(tiny_model_config, tokenizer, tmp_path):
    cfg = dict(SMALL, kl_coef=0.1, lora=LORA, checkpoint_every=2, run_name="r")
    whole = quiet_run(RunConfig(**{**cfg, "out_dir": str(tmp_path / "a")}), build_model(tiny_model_config, tokenizer, seed=0),
                      tokenizer)
    whole.run(4)
    whole.close()
    first = quiet_run(RunConfig(**{**cfg, "out_dir": str(tmp_path / "b")}), build_model(tiny_model_config, tokenizer, seed=0),
                      tokenizer)
    first.run(2)
    first.close()
    saved = load_file(str(first.dir.path / "checkpoints" / "update_000002" / "model.safetensors"))
    adapters = {k: v for k, v in saved.items() if ".lora_" in k}
    assert len(adapters) == 8 and any(v.any() for k, v in adapters.items() if ".lora_B." in k)
    resumed = Run.resume(first.dir.path, model=build_model(tiny_model_config, tokenizer, seed=0),
                         tokenizer=tokenizer, log=lambda s: None)
    assert resumed.version == 2 and lora.is_lora(resumed.model)
    resumed.run(2)
    resumed.close()
    assert deterministic(resumed.metrics).equals(deterministic(whole.metrics))
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


# ------------------------------------------------------------------------------ merged weights (vLLM sync)
def test_merged_state_dict_is_base_plus_scaled_b_times_a(tiny_model_config, tokenizer):
    model = lora.apply_lora(build_model(tiny_model_config, tokenizer, seed=0), {**LORA, "target": "all-linear"})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B, so the update is not trivially zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    training_before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merged_state_dict(model)
    base = build_model(tiny_model_config, tokenizer, seed=0).state_dict()
    assert merged.keys() == base.keys()
    sd = model.state_dict()
    scale = LORA["alpha"] / LORA["r"]
    for i in range(2):
        for proj in PROJECTIONS:
            name = f"model.layers.{i}.{proj}"
            w = sd[f"base_model.model.{name}.base_layer.weight"].double()  # [out, in]
            a = sd[f"base_model.model.{name}.lora_A.default.weight"].double()  # [r, in]
            b = sd[f"base_model.model.{name}.lora_B.default.weight"].double()  # [out, r]
            expected = w + scale * torch.einsum("or,ri->oi", b, a)  # [out, in]
            torch.testing.assert_close(merged[f"{name}.weight"].double(), expected, rtol=1e-6, atol=1e-7)
            assert not torch.equal(merged[f"{name}.weight"], base[f"{name}.weight"])
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(merged[key], base[key])
    for k, v in model.state_dict().items():  # the training model is left as it was
        assert torch.equal(v, training_before[k]), k
    plain = lora.plain_policy(model)  # what the engine starts from
    assert not lora.is_lora(plain) and lora.is_lora(model)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v.double(), merged[k].double(), rtol=1e-6, atol=1e-7)


def test_a_plain_model_state_dict_is_unchanged(tiny_model):
    merged = lora.merged_state_dict(tiny_model)
    assert merged.keys() == tiny_model.state_dict().keys()
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in merged.items())
    assert lora.plain_policy(tiny_model) is tiny_model


# ------------------------------------------------------------------------------ config and bad input
def test_cli_flag_fills_the_defaults():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    config = config_from_args(parser.parse_args(["--lora", "r=16", "alpha=32", "target=q_proj,v_proj"]))
    assert config.lora == {"r": 16, "alpha": 32.0, "dropout": 0.0, "target": "q_proj,v_proj"}
    assert RunConfig().lora == {} and RunConfig(lora={"r": 2}).lora == {**lora.DEFAULTS, "r": 2}


@pytest.mark.parametrize("params, needle", [
    ({"rank": 4}, "lora key 'rank' is unknown: valid keys are r, alpha, dropout, target"),
    ({"r": 0}, "lora.r=0 is invalid: expected an integer >= 1"),
    ({"r": True}, "lora.r=True is invalid"),
    ({"r": 2.5}, "lora.r=2.5 is invalid"),
    ({"alpha": 0}, "lora.alpha=0 is invalid: expected a finite number > 0"),
    ({"alpha": float("inf")}, "lora.alpha=inf is invalid"),
    ({"alpha": "x"}, "lora.alpha='x' is invalid"),
    ({"dropout": 1.0}, "lora.dropout=1.0 is invalid: expected a number in [0, 1)"),
    ({"dropout": -0.1}, "lora.dropout=-0.1 is invalid"),
    ({"target": ""}, "lora.target='' is invalid: expected comma-separated module-name suffixes"),
    ({"target": "q_proj,"}, "lora.target='q_proj,' is invalid"),
    ({"target": ["q_proj"]}, "lora.target=['q_proj'] is invalid"),
    ({"target": "all-linear,q_proj"}, "lora.target='all-linear,q_proj' is invalid"),
])
def test_bad_lora_config_is_one_line(params, needle):
    with pytest.raises(WorkbenchError) as e:
        RunConfig(lora=params)
    assert needle in one_line(e)


def test_missing_peft_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(lora, "peft_available", lambda: False)
    with pytest.raises(WorkbenchError) as e:
        RunConfig(lora={"r": 4})
    assert "needs peft, which is not installed: pip install 'workbench[peft]'" in one_line(e)
    assert RunConfig().lora == {}  # off: peft is not needed


def test_a_target_that_matches_nothing_fails_before_anything_is_written(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(WorkbenchError) as e:
        quiet_run(RunConfig(**{**SMALL, "out_dir": str(out)}, lora={"target": "q_proj,qkv"}), tiny_model, tokenizer)
    text = one_line(e)
    assert "lora.target='qkv' matches no linear layer of the model" in text
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text
    assert not out.exists()
    assert not any(".lora_" in k or ".base_layer." in k for k in tiny_model.state_dict())  # not wrapped
