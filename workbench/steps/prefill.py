"""prefill: n queued batches from one generate call (``RunConfig.prefill_batches``).

In context: docs/design.md, "Staleness and the behaviour policy" (the buffer's sync).

A sync fills the queue with batches of the *same* weights (the theta_0 prefill of a lag s makes s + 1 of
them), so nothing but the sampler's batch size stops them being generated together. ``sample_batches``
is the batched twin of ``Run.sample``: it draws the prompts of n batches from the prompt stream in the
order n ``sample()`` calls would (n draws of ``prompts_per_step``), generates all n * P * G rows in one
sampler call, splits the rows back into n batches of whole groups in order (``split_batches``) and
scores each batch on its own rows. Advantages, the zero-variance filter and batch whitening are per
batch, so each batch is exactly ``score()`` of its rows; only the token sampling differs from n calls
(one generator stream over a wider batch), which is why the default (1) keeps the per-batch calls.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from workbench.policy.chat import render_examples
from workbench.rollouts import Rollouts
from workbench.steps.generate import SamplingParams
from workbench.steps.score import score


def sampling_params(config: Any, knobs: Any, task: Any) -> SamplingParams:
    """How a run samples its training batches: ``config``'s fields, the live knobs (temperature,
    top_p, top_k, the sampler's logit dtype / noise, the sampling-mask replay: ``knobs``' values, the
    config's where ``knobs`` lacks one), the task's answer budget when ``max_new_tokens`` is 0."""
    def live(name: str) -> Any:
        return getattr(knobs, name, getattr(config, name))

    return SamplingParams(
        temperature=knobs.temperature, top_p=live("top_p"), top_k=live("top_k"),
        max_new_tokens=config.max_new_tokens or task.max_answer_tokens,
        adaptive_temperature=config.adaptive_temperature, adaptive_temperature_min=config.adaptive_temperature_min,
        adaptive_temperature_max=config.adaptive_temperature_max,
        logits_dtype=live("sampler_logits_dtype"), logit_noise=live("sampler_logit_noise"),
        record_kept=live("replay_sampling_mask"))


def split_batches(rollouts: Rollouts, n: int, prompts: int) -> list[Rollouts]:
    """``rollouts`` of n * ``prompts`` examples (rows grouped by example, ``group_id`` = the example's
    index, as every sampler returns them) as n batches of ``prompts`` whole groups, in order. Each batch
    looks as if generated alone: ``group_id`` 0..prompts-1, and the padding columns only the other
    batches needed (prompts are left-padded, responses right-padded) are cut."""
    if n < 1 or prompts < 1 or len(rollouts) % (n * prompts):
        raise ValueError(f"split_batches: {len(rollouts)} rows do not split into {n} batches of {prompts} groups")
    rows = len(rollouts) // n
    out = []
    for i in range(n):
        part = rollouts.select(torch.arange(i * rows, (i + 1) * rows))
        out.append(_trim_padding(part.with_(group_id=part.group_id - i * prompts)))  # [rows]
    return out


def _trim_padding(batch: Rollouts) -> Rollouts:
    """Drop the prompt columns left of every row's first token and the response columns right of every
    row's last one (at least one column each stays)."""
    prompt_used = batch.prompt_mask.bool().any(0).nonzero()  # [k, 1] columns some row uses
    first = min(int(prompt_used[0]) if len(prompt_used) else 0, batch.prompt_mask.shape[1] - 1)
    response_used = batch.response_mask.bool().any(0).nonzero()  # [k, 1]
    end = max(int(response_used[-1]) + 1 if len(response_used) else 0, 1)
    # .contiguous(): each queued batch gets its own storage instead of keeping the whole call's alive
    changes = {name: getattr(batch, name)[:, first:].contiguous() for name in ("prompt_ids", "prompt_mask")}  # [B, P']
    for name in ("response_ids", "response_mask", "behavior_logprobs", "prox_logprobs", "ref_logprobs",
                 "trainer_logprobs", "advantages", "token_version", "sampling_kept"):
        value = getattr(batch, name)
        if value is not None and value.dim() >= 2:  # (advantages may be per sequence [B]; sampling_kept is [B, T, K])
            changes[name] = value[:, :end].contiguous()  # [B, T'(, K)]
    return batch.with_(**changes)


def sample_batches(run: Any, n: int) -> list[tuple[Rollouts, dict[str, float]]]:
    """n scored batches of the current weights of ``run`` (a ``workbench.loop.Run``) from one generate
    call: each ``prompts_per_step`` x ``group_size`` with its own score metrics, drawn and scored as
    ``run.sample()`` would (module doc). Times add to the update's ``perf/time_generate`` / ``_score``."""
    run._sync_sampler()
    cfg, kn, t0 = run.config, run.knobs.applied, time.perf_counter()
    prompts = cfg.prompts_per_step
    drawn = [ex for _ in range(n) for ex in run.task.sample(run.prompt_rng, prompts)]  # n draws: the stream's order
    examples = render_examples(run.tokenizer, drawn, run.chat_template)
    run.model.eval()
    rollouts = run.sampler.generate(examples, cfg.group_size, sampling_params(cfg, kn, run.task),
                                    generator=run.generator, policy_version=run.version)
    t1 = time.perf_counter()
    out = [score(part, list(cfg.rewards), advantage=cfg.advantage, filter_zero_variance=cfg.filter_zero_variance,
                 advantage_params=cfg.advantage_params) for part in split_batches(rollouts, n, prompts)]
    timing = run._timing
    timing["perf/time_generate"] = timing.get("perf/time_generate", 0.0) + t1 - t0
    timing["perf/time_score"] = timing.get("perf/time_score", 0.0) + time.perf_counter() - t1
    timing["perf/gen_tokens"] = timing.get("perf/gen_tokens", 0.0) + float(rollouts.response_mask.sum())
    return out
