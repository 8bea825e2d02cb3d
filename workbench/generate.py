"""Generation: the ``Sampler`` protocol and a hand-written batched sampler for transformers models.

``TransformersSampler`` left-pads the prompts (attention mask + explicit position ids, so padding
never shifts positions), prefills each prompt once, copies its KV cache to its ``group_size``
samples, then decodes one token per step through the cache, stopping each sequence at EOS (dropping
it from the batch and the cache) and the whole batch when every sequence has stopped. Sharing the
prefill and dropping finished rows are what ``model.generate`` does not do; the sampled tokens'
log-probs come for free.

Sampling (temperature, then top-k, then top-p / nucleus, Holtzman et al. 2020): ``behavior_logprobs``
is the log-prob of each sampled token under the *processed* distribution, i.e. the one actually
sampled from. With top-k / top-p that is a truncated, renormalised distribution, so it is >= the
full-softmax log-prob the trainer recomputes: a real behaviour/target mismatch that off-policy
corrections see (DESIGN.md section 3). Temperature 0 is greedy decoding with log-prob 0.

Left out: repetition penalties, stop strings, beam search, speculative decoding; other engines
(vLLM) implement ``Sampler`` separately.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .errors import WorkbenchError, bad_value
from .rollouts import Rollouts
from .tasks import Example

if TYPE_CHECKING:
    from .tasks import Task


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``max_new_tokens=None`` means "the task's budget" (see ``for_task``)."""

    temperature: float = 1.0
    """Logits are divided by this; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    max_new_tokens: int | None = None
    """Generation budget in tokens (EOS included); None = the task's ``max_answer_tokens``."""

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise bad_value("SamplingParams.temperature", t, "a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise bad_value("SamplingParams.top_p", p, "a number in (0, 1]")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise bad_value("SamplingParams.top_k", k, "an int >= 0 (0 = off)")
        m = self.max_new_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise bad_value("SamplingParams.max_new_tokens", m, "an int >= 1 or None (task default)")

    def for_task(self, task: "Task") -> "SamplingParams":
        """These params with ``max_new_tokens`` filled from ``task.max_answer_tokens`` if unset."""
        if self.max_new_tokens is not None:
            return self
        return replace(self, max_new_tokens=task.max_answer_tokens)

    @property
    def full_distribution(self) -> bool:
        """True when behaviour log-probs equal the temperature-scaled full softmax."""
        return self.temperature > 0 and self.top_p >= 1.0 and self.top_k == 0


@runtime_checkable
class Sampler(Protocol):
    """A generation engine. ``generate`` returns one ``Rollouts`` row per (example, sample)."""

    name: str

    def generate(
        self,
        examples: list[Example],
        group_size: int,
        params: SamplingParams,
        *,
        generator: torch.Generator,
        policy_version: int,
    ) -> Rollouts: ...


def check_generate_args(examples: list[Example], group_size: int, params: SamplingParams) -> None:
    """The argument checks every ``Sampler.generate`` shares (one-line errors)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise bad_value("group_size", group_size, "an int >= 1")
    if params.max_new_tokens is None:
        raise bad_value("SamplingParams.max_new_tokens", None,
                        "an int; call params.for_task(task) to use the task's budget")
    if not examples:
        raise WorkbenchError("examples=[] is invalid: expected at least one example")


def build_rollouts(
    examples: list[Example],
    group_size: int,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    policy_version: int,
    tokenizer,
) -> Rollouts:
    """The ``Rollouts`` every ``Sampler.generate`` returns: one row per (example, sample).

    N = ``len(examples)`` prompts, G = ``group_size`` samples each, B = N * G rows grouped by
    example (rows ``i * G .. i * G + G - 1`` answer ``examples[i]``). Inputs (CPU):
        prompt_ids         [N, P] long   one left-padded row per example (``encode_prompts``)
        prompt_mask        [N, P] long   1 = real prompt token
        response_ids       [B, T] long   right-padded
        response_mask      [B, T] float  1.0 = real response token
        behavior_logprobs  [B, T] float  log-prob of each sampled token (0 on padding)
    Prompts are repeated G times; ``policy_version`` [B] is ``int(policy_version)``; ``group_id``
    [B] is the example index; ``completions`` decode each row's masked response tokens with
    special tokens skipped and no clean-up of tokenization spaces; ``prompts``, ``answers`` and
    ``extras`` (copied dicts) come from the examples. Response tensors are used as given."""
    rows = [ex for ex in examples for _ in range(group_size)]
    completions = tokenizer.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(response_ids, response_mask)],
        skip_special_tokens=True, clean_up_tokenization_spaces=False,
    )
    return Rollouts(
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),  # [B, P]
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),  # [B, P]
        response_ids=response_ids,  # [B, T]
        response_mask=response_mask,  # [B, T]
        behavior_logprobs=behavior_logprobs,  # [B, T]
        policy_version=torch.full((len(rows),), int(policy_version), dtype=torch.long),  # [B]
        group_id=torch.arange(len(examples), dtype=torch.long).repeat_interleave(group_size),  # [B]
        prompts=[ex.prompt for ex in rows],
        completions=completions,
        answers=[ex.answer for ex in rows],
        extras=[dict(ex.extra) for ex in rows],
    )


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p; removed tokens get -inf. ``logits`` [B, V] -> [B, V]."""
    logits = logits.float() / params.temperature  # [B, V]
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = torch.softmax(sorted_logits, dim=-1)  # [B, V]
        mass_before = torch.cumsum(probs, dim=-1) - probs  # [B, V] mass of strictly better tokens
        drop_sorted = mass_before >= params.top_p  # [B, V]; the top token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V]
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize with the tokenizer's own defaults and left-pad: (ids [B, P], mask [B, P])."""
    enc = tokenizer(list(prompts))["input_ids"]
    for text, row in zip(prompts, enc):
        if not row:
            raise bad_value("prompt", text, "a string that encodes to at least one token")
    width = max((len(x) for x in enc), default=0)
    ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((len(enc), width), dtype=torch.long)  # [B, P]
    for i, row in enumerate(enc):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


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
                resp, resp_mask, logps = self._sample(
                    ids.to(device), mask.to(device), group_size, params, generator
                )
        finally:
            self.model.train(was_training)
        # Clone outside inference mode: inference tensors cannot enter autograd graphs later.
        resp, resp_mask, logps = (t.cpu().clone() for t in (resp, resp_mask, logps))  # [B, T]
        return build_rollouts(examples, group_size, ids, mask, resp, resp_mask, logps,
                              policy_version, self.tokenizer)

    def _sample(self, prompt_ids, prompt_mask, group_size: int, params: SamplingParams, generator):
        """Decode loop over N distinct prompts x ``group_size`` samples (B = N * group_size rows).

        Each prompt is prefilled once and its KV cache copied to its group (prefill is most of the
        work when prompts are longer than answers). Finished rows are dropped from the batch and
        the cache ("compaction"), so rows that end early stop costing (``model.generate`` does
        neither)."""
        N, max_new = prompt_ids.shape[0], params.max_new_tokens
        B = N * group_size
        device = prompt_ids.device
        resp = torch.full((B, max_new), self.pad_id, dtype=torch.long, device=device)  # [B, max_new]
        mask = torch.zeros((B, max_new), dtype=torch.float32, device=device)  # [B, max_new]
        logps = torch.zeros((B, max_new), dtype=torch.float32, device=device)  # [B, max_new]
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [N, P]
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                         past_key_values=DynamicCache(config=self.model.config), use_cache=True,
                         logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1, :]  # logits [N, V]
        rows = torch.arange(B, device=device)  # [b] original row of each active row
        if group_size > 1:
            expand = torch.arange(N, device=device).repeat_interleave(group_size)  # [B]
            _select_rows(cache, expand)
            logits, prompt_mask = logits[expand], prompt_mask[expand]  # [B, V], [B, P]
        attn = prompt_mask  # [b, P + t] grows by one column per step
        next_pos = prompt_mask.sum(-1, keepdim=True)  # [b, 1]
        stop_ids = self.stop_ids.to(device)
        steps = 0
        for step in range(max_new):
            if params.temperature == 0:
                tok = logits.argmax(-1)  # [b]
                lp = torch.zeros(tok.shape, dtype=torch.float32, device=device)  # [b]
            else:
                logprobs = torch.log_softmax(process_logits(logits, params), dim=-1)  # [b, V]
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
                             past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1, :]  # [b, V]
            next_pos = next_pos + 1
        return resp[:, :steps], mask[:, :steps], logps[:, :steps]  # [B, T] each


def _select_rows(cache, idx: torch.Tensor) -> None:
    """Keep rows ``idx`` of a KV cache (repeats allowed: that expands it). ``index_select`` is ~7x
    faster on CPU than the advanced indexing of ``DynamicLayer.batch_select_indices``; other layer
    types use their own method."""
    for layer in getattr(cache, "layers", None) or [cache]:
        if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and layer.is_initialized:
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
        else:
            layer.batch_select_indices(idx)


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


__all__ = ["SamplingParams", "Sampler", "TransformersSampler", "check_generate_args", "build_rollouts",
           "greedy_accuracy", "process_logits", "encode_prompts"]
