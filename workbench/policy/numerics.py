"""Numerics as a knob: rounding and noise injected into the logits, and the sampling-mask replay.

Sampler and trainer hold the same weights yet disagree token by token, because they are two programs:
a bf16 lm_head, other kernels, another batch shape (a kernel that is not batch-invariant reduces in
another order when the chunking changes). Users measure this at lr = 0, where every clipped token
is numerics, not learning: ~4.6% of tokens outside the PPO clip band on an OpenVLA-OFT GRPO run
(RLinf PR #1534), 8.0% of tokens with a ratio outside [0.9, 1.1] from a bf16 trainer whose chunk
size alone changes (TRL issue #6789). The knobs here inject those effects into an exact fp32 CPU
pipeline so that an objective's response to them can be studied:

- ``LogitNumerics.dtype`` ('' | bf16 | fp16): the raw logits are rounded to that dtype and back (what
  a low-precision lm_head hands the softmax); bf16 keeps 8 significant bits (Kalamkar et al. 2019, "A
  Study of BFLOAT16 for Deep Learning Training", arXiv:1905.12322), so a logit of 10 moves by up to
  2^-5 = 0.03 nats.
- ``LogitNumerics.noise`` = sigma: i.i.d. N(0, sigma^2) added to every logit, drawn fresh per forward
  from a generator seeded by ``seed`` (``for_forward`` mixes a counter in) and the forward's [B, T, V]
  shape, laid out over that whole block, so a token's noise changes when the batch composition or
  chunking changes: the "chunking noise" of a non-batch-invariant engine. Noise is added before the
  rounding (the rounding is the output's dtype).

Sampling-mask replay (``replay_sampling_mask``). With top-k / top-p the sampler draws from the
truncated, renormalised distribution mu(y) = p(y) / S over its kept set K (S = p(K)), while the
trainer's full softmax gives p(y): every ratio carries the factor S, which is no policy change
(top-k 50 over a 32k vocabulary keeps S ~ 0.17, i.e. ~17% of the gradient: TRL issue #6789). The
fix records K per sampled position and renormalises the trainer's log-probs over it, log p(y) -
log p(K) (DeepSeek-AI 2025, "DeepSeek-V3.2", arXiv:2512.02556, Sec. 3.1 "Keep Sampling Mask";
prime-rl's sampling replay, PrimeIntellect-ai/prime-rl PR #2979). ``kept_ids`` stores K compactly as
token ids padded with -1 ([b, K], K the widest kept set), ``kept_mask`` expands it back to a [..., V]
bool mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from workbench.errors import bad_value

LOGITS_DTYPES = ("", "bf16", "fp16")
"""Values of ``sampler_logits_dtype`` / ``trainer_logits_dtype``: '' = exact (no rounding)."""
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads (seed, counter) pairs over the seed space


def check_logits_dtype(name: str, value: Any) -> str:
    """``value`` if it is a valid logits dtype, else a one-line error naming ``name``."""
    if value not in LOGITS_DTYPES:
        raise bad_value(name, value, "'' (exact) | bf16 | fp16")
    return value


def check_noise(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0, else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise bad_value(name, value, "a finite number >= 0 (the std of the logit noise; 0 = off)")
    return float(value)


def mix_seed(seed: int, *counters: int) -> int:
    """A 63-bit generator seed from ``seed`` and integer counters (deterministic, order-sensitive)."""
    h = int(seed) & 0xFFFFFFFFFFFFFFFF
    for c in counters:
        h = ((h ^ (int(c) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 1) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class LogitNumerics:
    """How one program's logits deviate from the exact ones (module docstring)."""

    dtype: str = ""
    """'' (exact) | bf16 | fp16: round the raw logits to this dtype and back."""
    noise: float = 0.0
    """Std of the i.i.d. Gaussian noise added to every logit (0 = none)."""
    seed: int = 0
    """Seed of this forward's noise generator (``for_forward`` derives one per forward)."""

    def __post_init__(self) -> None:
        check_logits_dtype("LogitNumerics.dtype", self.dtype)
        object.__setattr__(self, "noise", check_noise("LogitNumerics.noise", self.noise))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad_value("LogitNumerics.seed", self.seed, "an int")

    @property
    def active(self) -> bool:
        """Whether these numerics change any logit."""
        return bool(self.dtype) or self.noise > 0

    def for_forward(self, *counters: int) -> "LogitNumerics":
        """These numerics with the seed of the forward named by ``counters`` (fresh noise per forward)."""
        return replace(self, seed=mix_seed(self.seed, *counters))

    def apply(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``logits`` [..., V] with the noise added (from ``generator``, else one seeded by ``seed`` on
        the logits' device), then rounded to ``dtype``; returned in fp32. Exact numerics: unchanged."""
        if not self.active:
            return logits
        out = logits.float()
        if self.noise > 0:
            # the forward's shape is mixed into its seed: a re-chunked batch gets other noise on every row
            gen = generator if generator is not None else torch.Generator(device=out.device).manual_seed(
                mix_seed(self.seed, *out.shape))
            out = out + self.noise * torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        if self.dtype:
            out = out.to(_TORCH_DTYPES[self.dtype]).float()
        return out


FORWARD_TRAIN, FORWARD_PROXIMAL, FORWARD_MEASURE, FORWARD_REFERENCE = 1, 2, 3, 4
"""Counters naming the trainer's forwards: each gets its own noise draw (``for_forward``)."""


def forward_numerics(numerics: LogitNumerics | None, role: int, version: Any, index: int = 0) -> LogitNumerics | None:
    """``numerics`` for the forward ``role`` at policy ``version`` (an int or a [B] tensor: its max),
    piece ``index`` of a micro-batched pass (pass 2 replays pass 1's draw); None stays None."""
    if numerics is None:
        return None
    if isinstance(version, torch.Tensor):
        version = int(version.max()) if version.numel() else 0
    return numerics.for_forward(role, int(version or 0), index)


def numerics_or_none(dtype: str, noise: float, seed: int) -> LogitNumerics | None:
    """``LogitNumerics(dtype, noise, seed)``, or None when it would change nothing (the exact path)."""
    n = LogitNumerics(dtype=dtype, noise=noise, seed=int(seed))
    return n if n.active else None


def trainer_numerics(config: Any, seed: int | None = None) -> LogitNumerics | None:
    """The trainer-side numerics of a ``RunConfig`` or any object with its fields (the live
    ``knobs.KnobValues``): ``trainer_logits_dtype``, ``trainer_logit_noise``, seeded from ``seed``
    (default: the object's ``seed``), or None when exact."""
    seed = getattr(config, "seed", 0) if seed is None else seed
    return numerics_or_none(getattr(config, "trainer_logits_dtype", ""), getattr(config, "trainer_logit_noise", 0.0),
                            mix_seed(seed, 1))


def kept_ids(processed: torch.Tensor) -> torch.Tensor:
    """The kept set of each row of processed logits (removed tokens are -inf): token ids in ascending
    order, padded with -1 to the widest row. ``processed`` [b, V] -> [b, K] long."""
    finite = torch.isfinite(processed)  # [b, V]
    width = max(int(finite.sum(-1).max()) if finite.numel() else 0, 1)
    # kept ids first (stable: ascending id order), then the removed ones, which become -1
    order = torch.argsort((~finite).to(torch.int8), dim=-1, stable=True)[:, :width]  # [b, K]
    ok = finite.gather(-1, order)  # [b, K]
    return torch.where(ok, order, torch.full_like(order, -1))  # [b, K]


def kept_mask(kept: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool mask [..., V] of the token ids in ``kept`` [..., K] (-1 = padding). A position with no id
    at all (a padding position of the response) keeps every token, so its softmax stays finite."""
    ids = torch.where(kept >= 0, kept, torch.full_like(kept, vocab))  # [..., K]; padding -> a spare column V
    mask = torch.zeros((*kept.shape[:-1], vocab + 1), dtype=torch.bool, device=kept.device)  # [..., V + 1]
    mask = mask.scatter_(-1, ids, True)[..., :vocab]  # [..., V]
    none = ~mask.any(-1, keepdim=True)  # [..., 1] positions without a recorded set
    return mask | none


def truncation_log_mass(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """log S = log p(K) of each position's kept set under softmax(``logits``) [..., V]: the log-ratio
    every token of a truncated sampler carries without replay (TRL issue #6789's closed form). [...]"""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [..., V]
    return torch.logsumexp(logp.masked_fill(~kept_mask(kept, logits.shape[-1]), -math.inf), dim=-1)


__all__ = ["FORWARD_MEASURE", "FORWARD_PROXIMAL", "FORWARD_REFERENCE", "FORWARD_TRAIN", "LOGITS_DTYPES",
           "LogitNumerics", "forward_numerics", "check_logits_dtype", "check_noise", "kept_ids", "kept_mask", "mix_seed",
           "numerics_or_none", "trainer_numerics", "truncation_log_mass"]
