"""generate: prompts -> ``Rollouts`` (G sampled answers per prompt, with the behaviour log-probs).

- ``sampler``: the ``Sampler`` protocol, ``SamplingParams`` and what every engine shares.
- ``transformers_sampler``: ``TransformersSampler``, the default batched KV-cache sampler, and
  ``greedy_accuracy`` (held-out evaluation).
- ``vllm_sampler`` (+ ``vllm_worker``): ``VLLMSampler``, a vLLM engine with its own weights, synced
  in place (the ``vllm`` extra; vLLM is imported only when an engine starts).
- ``engines``: ``make_sampler`` / ``validate_sampler``, the choice ``RunConfig.sampler`` makes.
"""

from __future__ import annotations

from workbench.steps.generate.engines import SAMPLERS, make_sampler, validate_sampler
from workbench.steps.generate.sampler import (Sampler, SamplingParams, build_rollouts, check_generate_args,
                                              encode_prompts, process_logits)
from workbench.steps.generate.transformers_sampler import TransformersSampler, greedy_accuracy
from workbench.steps.generate.vllm_sampler import INSTALL_HINT, VLLMSampler, require_vllm, vllm_available

__all__ = ["INSTALL_HINT", "SAMPLERS", "Sampler", "SamplingParams", "TransformersSampler", "VLLMSampler",
           "build_rollouts", "check_generate_args", "encode_prompts", "greedy_accuracy", "make_sampler",
           "process_logits", "require_vllm", "validate_sampler", "vllm_available"]
