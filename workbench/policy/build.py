"""Turn a ``RunConfig`` into the objects a run needs: task, model + tokenizer, sampler."""

from __future__ import annotations

import copy
from typing import Callable

import torch

from workbench.config import RunConfig
from workbench.policy.model import ModelConfig, load_policy
from workbench.policy.warm_start import SFTConfig, warm_start
from workbench.tasks import Task, make_task


def build_task(config: RunConfig) -> Task:
    return make_task(config.task, **config.task_params)


def build_policy(config: RunConfig, task: Task, log: Callable[[str], None] = print):
    """The starting policy: the cached SFT warm start of the built-in model, or a local checkpoint."""
    if config.model == "builtin":
        path = warm_start(task, ModelConfig(**config.model_params), SFTConfig(**config.sft_params), log=log)
    else:
        path = config.model
    return load_policy(path, dtype=config.dtype, device=config.device)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference policy (only built when a KL penalty is asked for)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
