"""Choosing the generation engine behind the ``Sampler`` protocol (``RunConfig.sampler``).

``transformers`` (default): ``TransformersSampler``, which samples with the trainer's own model
object, so it always holds the trainer's current weights (``sync`` is not needed). ``vllm``:
``VLLMSampler``, a vLLM engine holding its own copy of the weights, refreshed in place by
``sync(model, version)``. Importing this module never imports vLLM: ``vllm_sampler`` imports it
only when an engine is built.
"""

from __future__ import annotations

from typing import Any, Callable

from workbench.errors import bad_value
from workbench.steps.generate.transformers_sampler import TransformersSampler
from workbench.steps.generate.vllm_sampler import VLLMSampler, validate_options

SAMPLERS = ("transformers", "vllm")


def make_sampler(name: str, params: dict[str, Any], model, tokenizer, *, seed: int = 0,
                 log: Callable[[str], None] = print):
    """The sampler ``name`` (``RunConfig.sampler``) with engine ``params`` (``RunConfig.sampler_params``),
    over the trainer's ``model`` / ``tokenizer``."""
    validate_sampler(name, params)
    if name == "transformers":
        return TransformersSampler(model, tokenizer)
    return VLLMSampler(model, tokenizer, seed=seed, log=log, **dict(params))


def validate_sampler(name: Any, params: Any) -> None:
    """Check ``RunConfig.sampler`` / ``sampler_params`` without importing vLLM (one-line errors)."""
    if name not in SAMPLERS:
        raise bad_value("sampler", name, " | ".join(SAMPLERS))
    if not isinstance(params, dict):
        raise bad_value("sampler_params", params, "a dict")
    if name == "transformers" and params:
        raise bad_value("sampler_params", params, "{} with sampler='transformers' (engine options are for vllm)")
    if name == "vllm":
        validate_options(params)


__all__ = ["SAMPLERS", "make_sampler", "validate_sampler"]
