"""The ``Sampler`` protocol and what every engine shares: ``SamplingParams``, the argument checks,
prompt encoding (left padding), logit processing and the ``Rollouts`` an engine returns.

Sampling (temperature, then top-k, then top-p / nucleus, Holtzman et al. 2020): ``behavior_logprobs``
is the log-prob of each sampled token under the *processed* distribution, i.e. the one actually
sampled from. With top-k / top-p that is a truncated, renormalised distribution, so it is >= the
full-softmax log-prob the trainer recomputes: a real behaviour/target mismatch that off-policy
corrections see (docs/design.md, "Staleness and the behaviour policy"). Temperature 0 is greedy
decoding with log-prob 0.

Entropy-adaptive temperature (``adaptive_temperature`` = alpha > 0; after HAPO's Adaptive Temperature
Sampling: Liu, Liu, Wen, Cai, Cui, He, Zhang 2025, "From Uniform to Heterogeneous: Tailoring Policy
Optimization to Every Token's Nature", arXiv:2509.16591). Per decode step and row, h_t = H_t / log V is
the entropy of the full, untruncated softmax at the base temperature T, normalised by its maximum
(V = the logits' width), and the step samples at
    T_t = clip(T * (1 + alpha * (h_t - 0.5)), T_min, T_max)
(then top-k / top-p on logits / T_t): hotter at high-entropy "forking" tokens (exploration), colder at
near-deterministic ones (coherence). The map is this module's choice (linear in h_t, equal to T at
h_t = 0.5, monotone increasing), not a transcription of the paper's. ``behavior_logprobs`` are then
log-probs under the T_t distribution actually sampled from, while the trainer scores at the single
temperature T: the trainer-vs-behaviour log-ratio is not 0 even on-policy, by design (the importance
weight corrects for the temperature change, and ``mismatch/engine_*`` shows it at staleness 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from workbench.errors import WorkbenchError, bad_value
from workbench.policy.numerics import LogitNumerics, check_logits_dtype, check_noise, numerics_or_none
from workbench.rollouts import Rollouts
from workbench.tasks import Example

if TYPE_CHECKING:
    from workbench.tasks import Task


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
    adaptive_temperature: float = 0.0
    """alpha of the entropy-adaptive temperature T_t (module docstring); 0 = off; temperature 0 stays greedy."""
    adaptive_temperature_min: float = 0.1
    """T_min: the lowest per-token temperature when ``adaptive_temperature`` > 0."""
    adaptive_temperature_max: float = 2.0
    """T_max: the highest per-token temperature when ``adaptive_temperature`` > 0."""
    logits_dtype: str = ""
    """'' (exact) | bf16 | fp16: the engine's raw logits are rounded to this dtype before processing
    (a low-precision lm_head; ``workbench.policy.numerics``)."""
    logit_noise: float = 0.0
    """Std of Gaussian noise added to the raw logits at every decode step (0 = off;
    ``workbench.policy.numerics``)."""
    record_kept: bool = False
    """Record each sampled position's kept top-k / top-p set as ``Rollouts.sampling_kept`` (the
    sampling-mask replay; only when top-k or top-p truncates)."""

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
        a = self.adaptive_temperature
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < float("inf"):
            raise bad_value("SamplingParams.adaptive_temperature", a, "a finite number >= 0 (0 = off)")
        lo, hi = self.adaptive_temperature_min, self.adaptive_temperature_max
        if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not 0 < lo < float("inf"):
            raise bad_value("SamplingParams.adaptive_temperature_min", lo, "a finite number > 0")
        if isinstance(hi, bool) or not isinstance(hi, (int, float)) or not lo <= hi < float("inf"):
            raise bad_value("SamplingParams.adaptive_temperature_max", hi,
                            f"a finite number >= adaptive_temperature_min={lo}")
        check_logits_dtype("SamplingParams.logits_dtype", self.logits_dtype)
        check_noise("SamplingParams.logit_noise", self.logit_noise)
        if not isinstance(self.record_kept, bool):
            raise bad_value("SamplingParams.record_kept", self.record_kept, "true or false")

    def for_task(self, task: "Task") -> "SamplingParams":
        """These params with ``max_new_tokens`` filled from ``task.max_answer_tokens`` if unset."""
        if self.max_new_tokens is not None:
            return self
        return replace(self, max_new_tokens=task.max_answer_tokens)

    @property
    def full_distribution(self) -> bool:
        """True when behaviour log-probs equal the temperature-scaled full softmax of the model's exact
        logits (no truncation, no per-token temperature, no injected rounding or noise)."""
        return (self.temperature > 0 and not self.truncates and self.adaptive_temperature == 0
                and not self.logits_dtype and self.logit_noise == 0)

    @property
    def truncates(self) -> bool:
        """True when top-k or top-p removes tokens from the sampled distribution."""
        return self.top_p < 1.0 or self.top_k > 0

    @property
    def numerics(self) -> LogitNumerics | None:
        """The engine-side ``LogitNumerics`` (its seed is drawn per ``generate`` call), None = exact."""
        return numerics_or_none(self.logits_dtype, self.logit_noise, 0)


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


def adaptive_temperatures(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Per-row T_t = clip(T * (1 + alpha * (H / log V - 0.5)), T_min, T_max), H the entropy of the full
    softmax(logits / T) (module docstring). ``logits`` [B, V] -> [B] float32; needs temperature > 0."""
    logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)  # [B, V]
    # p log p with p = 0 (an -inf logit) contributes 0, not nan
    entropy = -(logp.exp() * logp).nan_to_num(nan=0.0).sum(-1)  # [B]
    vocab = logits.shape[-1]
    h = entropy / math.log(vocab) if vocab > 1 else torch.zeros_like(entropy)  # [B] in [0, 1]
    t = params.temperature * (1.0 + params.adaptive_temperature * (h - 0.5))  # [B]
    return t.clamp(params.adaptive_temperature_min, params.adaptive_temperature_max)  # [B]


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature, then top-k, then top-p; removed tokens get -inf. ``logits`` [B, V] -> [B, V].
    ``temperature`` [B] (per row, e.g. ``adaptive_temperatures``) replaces ``params.temperature``."""
    if temperature is None:
        logits = logits.float() / params.temperature  # [B, V]
    else:
        logits = logits.float() / temperature[:, None]  # [B, V]
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


__all__ = ["SamplingParams", "Sampler", "adaptive_temperatures", "build_rollouts", "check_generate_args", "encode_prompts",
           "process_logits"]
