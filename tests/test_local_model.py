"""Any local Hugging Face checkpoint through RunConfig: dtype, device, chat template; sampler options."""

from __future__ import annotations

import pytest
import torch

from workbench.policy.chat import render_prompt, resolve_template
from workbench.cli import build_parser, config_from_args
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import build_model, load_policy, resolve_device, save_policy

# a chat template over the char tokenizer's alphabet (lowercase, digits, punctuation)
TEMPLATE = ("{% for m in messages %}q: {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} a:{% endif %}")
SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=2, group_size=2,
             eval_every=2, eval_size=8, out_dir="")


@pytest.fixture
def checkpoint(tiny_model, tokenizer, tmp_path):
    return save_policy(tiny_model, tokenizer, tmp_path / "ckpt")


def test_local_checkpoint_with_chat_template_trains(checkpoint):
    run = Run(RunConfig(**SMALL, model=str(checkpoint), chat_template=TEMPLATE, device="auto"), log=lambda s: None)
    df = run.run(2)
    assert df.height == 2 and df["eval/accuracy"].drop_nulls().len() == 1
    prompts = run.last_batch.prompts
    assert all(p.startswith("q: ") and p.endswith(" a:") and "+" in p for p in prompts)
    # the trainer and the sampler saw the same rendered tokens
    ids = run.tokenizer(prompts[0])["input_ids"]
    row = run.last_batch.prompt_ids[0][run.last_batch.prompt_mask[0].bool()].tolist()
    assert row == ids


def test_dtype_and_device_options(checkpoint):
    model, _ = load_policy(checkpoint, dtype="bfloat16", device="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    run = Run(RunConfig(**SMALL, model=str(checkpoint), dtype="bfloat16"), log=lambda s: None)
    assert next(run.model.parameters()).dtype == torch.bfloat16
    df = run.run(2)
    assert df["loss/total"].is_finite().all()
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(WorkbenchError, match="no CUDA device"):
            load_policy(checkpoint, device="cuda")
    for bad in (dict(dtype="float8"), dict(device="tpu")):
        with pytest.raises(WorkbenchError, match=f"{next(iter(bad))}="):
            RunConfig(**SMALL, **bad)


def test_chat_template_choices_and_errors(tokenizer, tmp_path):
    assert resolve_template(tokenizer, "") is None
    assert render_prompt(tokenizer, "1+2=", resolve_template(tokenizer, TEMPLATE)) == "q: 1+2= a:"
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    assert resolve_template(tokenizer, str(f)) == TEMPLATE
    with pytest.raises(WorkbenchError, match="has no chat template"):
        resolve_template(tokenizer, "tokenizer")
    with pytest.raises(WorkbenchError, match="chat_template="):
        resolve_template(tokenizer, str(tmp_path / "missing.jinja"))
    with pytest.raises(WorkbenchError, match="cannot render"):
        render_prompt(tokenizer, "x", "{% if %}")
    tokenizer.chat_template = TEMPLATE  # a checkpoint that ships its own template
    assert render_prompt(tokenizer, "7", resolve_template(tokenizer, "tokenizer")) == "q: 7 a:"


def test_template_that_writes_bos_is_not_doubled(tokenizer):
    tpl = "{{ bos_token }}" + TEMPLATE
    assert render_prompt(tokenizer, "1", tpl) == "<bos>q: 1 a:"  # the char tokenizer adds no BOS itself


def test_sampler_config_fields_and_cli_flags():
    args = build_parser().parse_args(["run", "--sampler", "vllm", "--sampler-params", "dtype=bfloat16",
                                      "in_process=false", "--no-measure-mismatch", "--dtype", "float32",
                                      "--device", "cpu", "--chat-template", "tokenizer"])
    cfg = config_from_args(args)
    assert cfg.sampler == "vllm" and cfg.sampler_params == {"dtype": "bfloat16", "in_process": False}
    assert cfg.measure_mismatch is False and cfg.chat_template == "tokenizer" and cfg.device == "cpu"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in ((dict(sampler="sglang"), "sampler='sglang'"),
                       (dict(sampler="vllm", sampler_params={"dtpye": "float32"}), "'dtpye' is unknown"),
                       (dict(sampler="vllm", sampler_params={"dtype": "fp8"}), "sampler_params.dtype="),
                       (dict(sampler="vllm", sampler_params={"gpu_memory_utilization": 2}), "gpu_memory"),
                       (dict(sampler_params={"dtype": "float32"}), "engine options are for vllm"),
                       (dict(measure_mismatch="yes"), "measure_mismatch=")):
        with pytest.raises(WorkbenchError, match=match) as e:
            RunConfig(**bad)
        assert "\n" not in str(e.value)


def test_built_in_model_saved_and_reloaded_keeps_its_outputs(tiny_model_config, tokenizer, tmp_path):
    model = build_model(tiny_model_config, tokenizer, seed=1)
    path = save_policy(model, tokenizer, tmp_path / "m")
    again, _ = load_policy(path, dtype="float32", device="cpu")
    ids = torch.tensor([tokenizer("12+3=")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
