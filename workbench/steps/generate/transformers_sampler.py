"""``TransformersSampler``: a hand-written batched KV-cache sampler for any transformers causal LM.

It left-pads the prompts (attention mask + explicit position ids, so padding never shifts
positions), prefills each prompt once, copies its KV cache to its ``group_size`` samples, then
decodes one token per step through the cache, stopping each sequence at EOS (dropping it from the
batch and the cache) and the whole batch when every sequence has stopped. Sharing the prefill and
dropping finished rows are what ``model.generate`` does not do; the sampled tokens' log-probs come
for free. It samples with the trainer's own model object, so it always holds the current weights.

``SamplingParams.adaptive_temperature`` > 0 samples each token at its own entropy-adaptive
temperature (HAPO's Adaptive Temperature Sampling; the map and its citation are in
``workbench.steps.generate.sampler``); the behaviour log-probs are those of that per-token
distribution, so they differ from the trainer's single-temperature ones even on-policy.

``SamplingParams.logits_dtype`` / ``logit_noise`` perturb the raw logits of every decode step before
they are processed (``workbench.policy.numerics``): the noise comes from a generator seeded by one draw
of the run's token generator per ``generate`` call, so it is deterministic for the run's seed and
fresh at every step. ``record_kept`` (with top-k / top-p) stores each step's kept set as
``Rollouts.sampling_kept`` [B, T, K] (-1 padded) for the trainer's sampling-mask replay.

Left out: repetition penalties, stop strings, beam search, speculative decoding.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING

import torch
from packaging.version import Version

from workbench.errors import WorkbenchError
from workbench.policy.numerics import kept_ids
from workbench.rollouts import Rollouts
from workbench.steps.generate.sampler import (SamplingParams, adaptive_temperatures, build_rollouts, check_generate_args,
                                              encode_prompts, process_logits)
from workbench.tasks import Example

if TYPE_CHECKING:
    from workbench.tasks import Task

# The forward's keyword for the KV cache, and the output field that returns it: ``cache`` from
# transformers 5.24 (where ``past_key_values`` is deprecated, to be removed in 5.40); earlier
# releases know only ``past_key_values`` (the vLLM CPU build of the engine tests pins < 5.20).
# The installed version is read from its metadata: transformers itself is imported where a cache is made
# (~2 s of importing workbench.config otherwise).
CACHE_ARG = "cache" if Version(version("transformers")) >= Version("5.24.0.dev0") else "past_key_values"



def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator token sampling draws from on ``device``. ``torch.multinomial`` refuses a CPU
    generator for CUDA probabilities, so off the CPU a generator on ``device`` is seeded from one draw
    of the run's CPU generator (one draw per ``generate`` call: deterministic for the run's seed on
    that device, and the CPU stream, hence every CPU run, is unchanged)."""
    if generator is None or generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)

class TransformersSampler:
    """Batched sampling with a KV cache for any transformers causal LM (CPU or GPU)."""

    name = "transformers"

    def __init__(self, model, tokenizer):
        if tokenizer.eos_token_id is None:
            raise WorkbenchError("TransformersSampler tokenizer has no eos_token: expected one to stop on")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        # Stop on the tokenizer's EOS and on any EOS the checkpoint's generation config lists
        # (chat models often have several, e.g. <|im_end|> and <|endoftext|>).
        extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
        self.stop_ids = torch.tensor(sorted({self.eos_id, *map(int, extra)}), dtype=torch.long)

    def generate(
        self,
        examples: list[Example],
        group_size: int,
        params: SamplingParams,
        *,
        generator: torch.Generator,
        policy_version: int,
    ) -> Rollouts:
        check_generate_args(examples, group_size, params)
        ids, mask = encode_prompts(self.tokenizer, [ex.prompt for ex in examples])  # [N, P]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                noise_gen = _noise_generator(params, generator, device)  # before token sampling's generator
                kept: list | None = [] if params.record_kept and params.truncates and params.temperature > 0 else None
                resp, resp_mask, logps = self._sample(
                    ids.to(device), mask.to(device), group_size, params, device_generator(generator, device),
                    noise_generator=noise_gen, kept=kept,
                )
        finally:
            self.model.train(was_training)
        # Clone outside inference mode: inference tensors cannot enter autograd graphs later.
        resp, resp_mask, logps = (t.cpu().clone() for t in (resp, resp_mask, logps))  # [B, T]
        out = build_rollouts(examples, group_size, ids, mask, resp, resp_mask, logps,
                             policy_version, self.tokenizer)
        if kept is not None:
            out = out.with_(sampling_kept=_stack_kept(kept, *resp.shape))  # [B, T, K]
        return out

    def _sample(self, prompt_ids, prompt_mask, group_size: int, params: SamplingParams, generator, *,
                noise_generator: torch.Generator | None = None, kept: list | None = None):
        """Decode loop over N distinct prompts x ``group_size`` samples (B = N * group_size rows).

        ``params.numerics`` perturb each step's raw logits (noise from ``noise_generator``); ``kept``
        (a list) receives ``(step, rows [b], kept ids [b, K])`` per step for ``_stack_kept``.

        Each prompt is prefilled once and its KV cache copied to its group (prefill is most of the
        work when prompts are longer than answers). Finished rows are dropped from the batch and
        the cache ("compaction"), so rows that end early stop costing (``model.generate`` does
        neither)."""
        # imported here: transformers is ~2 s of importing workbench.config
        from transformers import DynamicCache

        N, max_new = prompt_ids.shape[0], params.max_new_tokens
        B = N * group_size
        device = prompt_ids.device
        resp = torch.full((B, max_new), self.pad_id, dtype=torch.long, device=device)  # [B, max_new]
        mask = torch.zeros((B, max_new), dtype=torch.float32, device=device)  # [B, max_new]
        logps = torch.zeros((B, max_new), dtype=torch.float32, device=device)  # [B, max_new]
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [N, P]
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{CACHE_ARG: DynamicCache(config=self.model.config)})
        cache, logits = getattr(out, CACHE_ARG), out.logits[:, -1, :]  # logits [N, V]
        if cache is None:
            raise WorkbenchError(f"TransformersSampler: {type(self.model).__name__} returned no KV cache "
                                 "(use_cache=True): expected a causal LM that supports one")
        rows = torch.arange(B, device=device)  # [b] original row of each active row
        if group_size > 1:
            expand = torch.arange(N, device=device).repeat_interleave(group_size)  # [B]
            _select_rows(cache, expand)
            logits, prompt_mask = logits[expand], prompt_mask[expand]  # [B, V], [B, P]
        attn = prompt_mask  # [b, P + t] grows by one column per step
        next_pos = prompt_mask.sum(-1, keepdim=True)  # [b, 1]
        stop_ids = self.stop_ids.to(device)
        numerics = params.numerics  # None = the exact path, bit for bit
        steps = 0
        for step in range(max_new):
            if numerics is not None:
                logits = numerics.apply(logits, noise_generator)  # [b, V] fp32
            if params.temperature == 0:
                tok = logits.argmax(-1)  # [b]
                lp = torch.zeros(tok.shape, dtype=torch.float32, device=device)  # [b]
            else:
                # per-token temperature only when asked: alpha = 0 keeps the scalar path bit for bit
                temps = adaptive_temperatures(logits, params) if params.adaptive_temperature > 0 else None  # [b]
                processed = process_logits(logits, params, temps)  # [b, V]
                if kept is not None:
                    kept.append((step, rows, kept_ids(processed)))  # [b], [b, K]
                logprobs = torch.log_softmax(processed, dim=-1)  # [b, V]
                tok = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)  # [b]
                lp = logprobs.gather(-1, tok[:, None]).squeeze(-1)  # [b]
            resp[rows, step] = tok
            logps[rows, step] = lp
            mask[rows, step] = 1.0
            steps = step + 1
            keep = ~torch.isin(tok, stop_ids)  # [b]
            if step + 1 == max_new or not bool(keep.any()):
                break
            if not bool(keep.all()):
                idx = keep.nonzero(as_tuple=True)[0]  # [b']
                rows, tok, attn, next_pos = rows[idx], tok[idx], attn[idx], next_pos[idx]
                _select_rows(cache, idx)
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)  # [b, P + t + 1]
            out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos,
                             use_cache=True, **{CACHE_ARG: cache})
            logits = out.logits[:, -1, :]  # [b, V]
            next_pos = next_pos + 1
        return resp[:, :steps], mask[:, :steps], logps[:, :steps]  # [B, T] each


def _noise_generator(params: SamplingParams, generator: torch.Generator | None, device) -> torch.Generator | None:
    """The generator of this call's logit noise on ``device``: seeded by one draw of the run's token
    generator (deterministic for the run's seed, fresh per call); None when there is no noise."""
    if params.logit_noise <= 0:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    return torch.Generator(device=device).manual_seed(seed)


def _stack_kept(kept: list, rows_total: int, steps: int) -> torch.Tensor:
    """The per-step kept sets of ``_sample`` as one CPU tensor [B, T, K] long, -1 padded."""
    width = max((ids.shape[1] for _, _, ids in kept), default=1)
    out = torch.full((rows_total, steps, width), -1, dtype=torch.long)  # [B, T, K]
    for step, rows, ids in kept:
        if step < steps:
            out[rows.cpu(), step, :ids.shape[1]] = ids.cpu()
    return out


def _select_rows(cache, idx: torch.Tensor) -> None:
    """Keep rows ``idx`` of a KV cache, in that order (repeats allowed: that expands it).

    ``Cache.reorder_cache`` is the public row gather (beam search uses it): every layer type
    implements it, linear-attention and quantized layers included (``batch_select_indices`` and
    ``batch_repeat_interleave`` are missing on linear-attention layers), and its ``index_select`` is
    1.3-4x faster on CPU than the advanced indexing of ``batch_select_indices`` at these sizes."""
    cache.reorder_cache(idx)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: "Task", examples: list[Example] | None = None,
                    batch_size: int = 256) -> float:
    """Fraction of ``examples`` (default: ``task.heldout``) answered correctly by greedy decoding."""
    examples = task.heldout if examples is None else examples
    if not examples:
        raise WorkbenchError(f"greedy_accuracy on task {task.name!r}: no examples to evaluate")
    sampler = TransformersSampler(model, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=task.max_answer_tokens)
    gen = torch.Generator().manual_seed(0)  # unused by greedy decoding; required by the protocol
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        r = sampler.generate(chunk, 1, params, generator=gen, policy_version=0)
        correct += sum(task.verify(c, ex) for c, ex in zip(r.completions, chunk))
    return correct / len(examples)


__all__ = ["TransformersSampler", "device_generator", "greedy_accuracy"]
