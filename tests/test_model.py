"""Model config/build, checkpoint save + load_policy round trip, and the cached SFT warm start."""

from __future__ import annotations

import json
import time

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.policy.model import ModelConfig, build_model, count_parameters, load_policy, save_policy
from workbench.tasks import make_task
from workbench.cache import cache_root
from workbench.policy.warm_start import SFTConfig, sft_batch, warm_start
import workbench.policy.warm_start as ws


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits  # [B, L, V]


def test_default_config_size(tokenizer):
    model = build_model(ModelConfig(), tokenizer, seed=0)
    n = count_parameters(model)
    assert 0.5e6 <= n <= 2e6, n
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


def test_tiny_config_size_and_determinism(tiny_model_config, tokenizer, tiny_model):
    assert 30_000 <= count_parameters(tiny_model) <= 100_000
    again = build_model(tiny_model_config, tokenizer, seed=0)
    other = build_model(tiny_model_config, tokenizer, seed=1)
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    assert torch.equal(_logits(tiny_model, ids), _logits(again, ids))
    assert not torch.allclose(_logits(tiny_model, ids), _logits(other, ids))
    # building a model leaves the caller's global RNG alone
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    build_model(tiny_model_config, tokenizer, seed=9)
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_and_load_policy_round_trip(arch, tokenizer, tmp_path):
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, tie_embeddings=arch == "llama")
    model = build_model(cfg, tokenizer, seed=3)
    path = save_policy(model, tokenizer, tmp_path / "ckpt")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    loaded, tok = load_policy(path)
    assert type(loaded) is type(model)
    ids = torch.tensor([tokenizer("rev:abc=")["input_ids"]])
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert tok("9+9=")["input_ids"] == tokenizer("9+9=")["input_ids"]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    # saving again over an existing folder replaces it atomically
    model2 = build_model(cfg, tokenizer, seed=4)
    save_policy(model2, tokenizer, path)
    assert torch.equal(_logits(load_policy(path)[0], ids), _logits(model2, ids))


def test_load_policy_errors(tiny_model, tokenizer, tmp_path):
    with pytest.raises(WorkbenchError, match="does not exist") as e:
        load_policy(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value) and "\n" not in str(e.value)
    tiny_model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(WorkbenchError, match="no tokenizer files"):
        load_policy(tmp_path / "no_tok")
    tokenizer.save_pretrained(tmp_path / "no_cfg")
    with pytest.raises(WorkbenchError, match=r"no config\.json"):
        load_policy(tmp_path / "no_cfg")


def test_load_policy_uses_eos_as_missing_pad(tiny_model, tokenizer, tmp_path):
    tokenizer.pad_token = None
    tiny_model.save_pretrained(tmp_path / "c")
    tokenizer.save_pretrained(tmp_path / "c")
    _, tok = load_policy(tmp_path / "c")
    assert tok.pad_token_id == tok.eos_token_id == 2


@pytest.mark.parametrize("field,value,match", [
    ("arch", "gpt2", "ModelConfig.arch='gpt2' is invalid: expected one of llama, qwen2"),
    ("num_heads", 3, "ModelConfig.num_heads=3 is invalid"),
    ("num_kv_heads", 3, "ModelConfig.num_kv_heads=3 is invalid: expected a divisor of num_heads=4"),
    ("hidden_size", 0, "ModelConfig.hidden_size=0 is invalid"),
])
def test_model_config_validation(field, value, match):
    with pytest.raises(WorkbenchError, match=match):
        ModelConfig(**{field: value})


def test_sft_config_validation():
    with pytest.raises(WorkbenchError, match="target_band"):
        SFTConfig(target_band=(0.6, 0.2))
    with pytest.raises(WorkbenchError, match="SFTConfig.lr"):
        SFTConfig(lr=0)
    assert SFTConfig(target_band=[0, 1]).target_band == (0.0, 1.0)


def test_sft_batch_layout(tokenizer, addition_task):
    from workbench.tasks import Example
    b = sft_batch(tokenizer, [Example("1+2=", "3"), Example("10+20=", "30")], addition_task)
    assert b.prompt_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert b.response_ids[0].tolist() == tokenizer("3")["input_ids"] + [2, 0]
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


# ---------------------------------------------------------------- warm start
TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "wb"))
    assert cache_root() == tmp_path / "wb"
    monkeypatch.delenv("WORKBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "workbench"


def test_warm_start_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    task = make_task("addition", max_digits=2, heldout_size=16)
    mcfg, scfg = ModelConfig(**TINY), SFTConfig(max_steps=4, batch_size=8, eval_every=2)
    logs: list[str] = []
    path = warm_start(task, mcfg, scfg, log=logs.append)
    assert path.parent == tmp_path / "warm_start"
    meta = json.loads((path / "warm_start.json").read_text())
    assert meta["steps"] in (2, 4) and 0 <= meta["accuracy"] <= 1
    assert meta["task"] == {"name": "addition", "params": task.params}
    assert meta["model_config"]["hidden_size"] == 32 and meta["sft_config"]["max_steps"] == 4
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging leftovers
    model, tok = load_policy(path)
    assert count_parameters(model) == count_parameters(build_model(mcfg, tok))

    logs.clear()
    t0 = time.perf_counter()
    again = warm_start(task, mcfg, scfg, log=logs.append)
    assert time.perf_counter() - t0 < 0.5
    assert again == path and any("cache hit" in line for line in logs)
    # a different config is a different cache entry
    other = warm_start(task, mcfg, SFTConfig(max_steps=2, batch_size=8, eval_every=2), log=logs.append)
    assert other != path


def test_warm_start_ignores_folder_without_marker(monkeypatch, tmp_path):
    task = make_task("addition", max_digits=2, heldout_size=16)
    mcfg, scfg = ModelConfig(**TINY), SFTConfig(max_steps=2, batch_size=8, eval_every=2)
    key = ws.cache_key(task, mcfg, scfg)
    half = tmp_path / "warm_start" / key
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # an interrupted write: no warm_start.json
    logs: list[str] = []
    path = warm_start(task, mcfg, scfg, cache_dir=tmp_path, log=logs.append)
    assert path == half and not any("cache hit" in line for line in logs)
    assert (path / "warm_start.json").is_file()
    load_policy(path)


def _scripted_accuracy(monkeypatch, values):
    """Replace held-out evaluation with scripted accuracies; returns the weights seen at each eval."""
    it, seen = iter(values), []

    def fake(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(it)

    monkeypatch.setattr(ws, "greedy_accuracy", fake)
    return seen


def test_warm_start_stops_in_band(monkeypatch, tmp_path):
    _scripted_accuracy(monkeypatch, [0.05, 0.1, 0.3, 0.9])
    task = make_task("addition", max_digits=2, heldout_size=16)
    path = warm_start(task, ModelConfig(**TINY), SFTConfig(max_steps=20, batch_size=4, eval_every=1),
                      cache_dir=tmp_path, log=lambda s: None)
    meta = json.loads((path / "warm_start.json").read_text())
    assert (meta["steps"], meta["accuracy"], meta["stop_reason"]) == (3, 0.3, "in band")


def test_warm_start_jump_past_band_keeps_closest(monkeypatch, tmp_path):
    seen = _scripted_accuracy(monkeypatch, [0.05, 0.15, 0.75])
    logs: list[str] = []
    task = make_task("addition", max_digits=2, heldout_size=16)
    path = warm_start(task, ModelConfig(**TINY), SFTConfig(max_steps=20, batch_size=4, eval_every=1),
                      cache_dir=tmp_path, log=logs.append)
    meta = json.loads((path / "warm_start.json").read_text())
    assert (meta["steps"], meta["accuracy"], meta["steps_trained"]) == (2, 0.15, 3)
    saved = load_policy(path)[0].state_dict()
    assert all(torch.equal(saved[k], seen[1][k]) for k in saved)  # the step-2 weights, not step 3
    assert not all(torch.equal(saved[k], seen[2][k]) for k in saved)
    assert meta["stop_reason"] == "jumped past band" and not meta["in_band"]
    assert any("jumped past the band" in line and "step 2" in line for line in logs)


def test_warm_start_step_cap(monkeypatch, tmp_path):
    _scripted_accuracy(monkeypatch, [0.0, 0.1])
    logs: list[str] = []
    task = make_task("addition", max_digits=2, heldout_size=16)
    path = warm_start(task, ModelConfig(**TINY), SFTConfig(max_steps=2, batch_size=4, eval_every=1),
                      cache_dir=tmp_path, log=logs.append)
    meta = json.loads((path / "warm_start.json").read_text())
    assert (meta["steps"], meta["stop_reason"]) == (2, "step cap")
    assert any("without entering the band" in line for line in logs)
