"""Turn a ``RunConfig`` into the objects a run needs: task, model + tokenizer (+ LoRA adapters), reference."""

from __future__ import annotations

import copy
from typing import Callable

import torch

from workbench.config import RunConfig
from workbench.policy.lora import AdapterOffReference, apply_lora, is_lora
from workbench.policy.model import ModelConfig, load_policy
from workbench.policy.warm_start import SFTConfig, warm_start
from workbench.tasks import Task, make_task


def build_task(config: RunConfig) -> Task:
    return make_task(config.task, **config.task_params)


def build_policy(config: RunConfig, task: Task, log: Callable[[str], None] = print, *, model=None, tokenizer=None):
    """The starting policy ``(model, tokenizer)``: the cached SFT warm start of the built-in model, a
    local checkpoint, or the given ``model`` / ``tokenizer``; with ``config.lora``, LoRA adapters on
    it (``policy.lora``; peft injects them into the model, a model that has them is kept as it is).
    A LoRA target that matches no layer is a one-line error here, before any run folder is touched."""
    if model is None:
        if config.model == "builtin":
            path = warm_start(task, ModelConfig(**config.model_params), SFTConfig(**config.sft_params), log=log)
        else:
            path = config.model
        model, tokenizer = load_policy(path, dtype=config.dtype, device=config.device)
    if config.lora and not is_lora(model):
        model = apply_lora(model, config.lora, seed=config.seed)
    return model, tokenizer


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference policy (only built when a KL penalty is asked for)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def reference_policy(model: torch.nn.Module):
    """The reference policy for a KL penalty or ``ref_logprobs``: with LoRA adapters the same model
    with them switched off (the frozen base: no second copy of the weights), else a frozen copy."""
    return AdapterOffReference(model) if is_lora(model) else frozen_copy(model)
