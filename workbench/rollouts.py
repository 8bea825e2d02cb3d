"""The batch type that flows through generate -> score -> buffer -> reweight -> update.

``Rollouts`` is one batch of sampled responses (docs/design.md, "The Rollouts contract"). Tensors are CPU tensors;
prompts are left-padded (so generation can run batched with a KV cache), responses right-padded.

Shapes (B sequences, P prompt tokens, T response tokens):
    prompt_ids         [B, P] long   left-padded with the tokenizer's pad id
    prompt_mask        [B, P] long   1 = real prompt token
    response_ids       [B, T] long   right-padded
    response_mask      [B, T] float  1.0 = real response token (EOS included when sampled)
    behavior_logprobs  [B, T] float  log-prob of each sampled token under the distribution actually
                                      sampled from (after temperature / top-k / top-p)
    policy_version     [B]    long   version of the weights that generated each sequence (with
                                      ``token_version``: the version of its first token)
    token_version      [B, T] long   optional version of the weights that generated each token
                                      (rollouts continued across updates: workbench.steps.async_pipeline;
                                      0 on padding); None = every token has ``policy_version``
    group_id           [B]    long   which prompt the sequence answers (G samples per prompt)
    rewards            [B]    float  after score (None before)
    advantages         [B] or [B, T] float after score (None before)
    prox_logprobs      [B, T] float  optional trainer recompute at the start of an update
    ref_logprobs       [B, T] float  optional frozen-reference log-probs
    trainer_logprobs   [B, T] float  optional trainer log-probs at generation time, under the
                                      generating weights (``workbench.steps.reweight.mismatch``)
    sampling_kept      [B, T, K] long optional kept top-k / top-p token ids of each sampled position,
                                      -1 padded (the sampling-mask replay, ``workbench.policy.numerics``)
Non-tensor fields (length B): ``prompts``, ``completions`` (decoded text), ``answers`` (the
task's reference answer) and ``extras`` (per-example dicts passed to reward functions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch

_TENSOR_FIELDS = (
    "prompt_ids", "prompt_mask", "response_ids", "response_mask", "behavior_logprobs",
    "policy_version", "group_id", "rewards", "advantages", "prox_logprobs", "ref_logprobs",
    "trainer_logprobs", "token_version", "sampling_kept",
)
_LIST_FIELDS = ("prompts", "completions", "answers", "extras")


@dataclass
class Rollouts:
    """One batch of responses; see the module docstring for shapes."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T]
    behavior_logprobs: torch.Tensor  # [B, T]
    policy_version: torch.Tensor  # [B]
    group_id: torch.Tensor  # [B]
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    rewards: torch.Tensor | None = None  # [B]
    advantages: torch.Tensor | None = None  # [B] or [B, T]
    prox_logprobs: torch.Tensor | None = None  # [B, T]
    ref_logprobs: torch.Tensor | None = None  # [B, T]
    trainer_logprobs: torch.Tensor | None = None  # [B, T]
    token_version: torch.Tensor | None = None  # [B, T] long
    sampling_kept: torch.Tensor | None = None  # [B, T, K] long, -1 padded

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)  # [B]

    def select(self, index: torch.Tensor | list[int]) -> "Rollouts":
        """Rows ``index`` (a long tensor, list of ints or bool mask) as a new batch."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero(as_tuple=True)[0]
        rows = idx.tolist()
        out = {}
        for f in _TENSOR_FIELDS:
            v = getattr(self, f)
            out[f] = None if v is None else v[idx]
        for f in _LIST_FIELDS:
            v = getattr(self, f)
            out[f] = [v[i] for i in rows] if v else []
        return Rollouts(**out)

    def with_(self, **changes: Any) -> "Rollouts":
        """A copy with some fields replaced (e.g. ``rewards=..., advantages=...``)."""
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> "Rollouts":
        """A copy with every tensor on ``device`` (the same object when all already are)."""
        moved = {f: getattr(self, f).to(device) for f in _TENSOR_FIELDS
                 if getattr(self, f) is not None and getattr(self, f).device != torch.device(device)}
        return replace(self, **moved) if moved else self

    # ---- persistence: tensors to safetensors, text to JSON (never pickle) ----
    def to_state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Split into (tensors for safetensors, JSON-able dict) under ``prefix``."""
        tensors = {
            f"{prefix}{f}": getattr(self, f).contiguous()
            for f in _TENSOR_FIELDS
            if getattr(self, f) is not None
        }
        meta = {f: getattr(self, f) for f in _LIST_FIELDS}
        json.dumps(meta)  # fail here, not at write time, if an extra is not JSON-able
        return tensors, meta

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = ""
    ) -> "Rollouts":
        kw: dict[str, Any] = {f: tensors.get(f"{prefix}{f}") for f in _TENSOR_FIELDS}
        kw.update({f: list(meta.get(f, [])) for f in _LIST_FIELDS})
        return cls(**kw)


def _pad_cat(tensors: list[torch.Tensor], value: float, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = width - t.shape[1]
        if pad:
            padding = torch.full((t.shape[0], pad), value, dtype=t.dtype, device=t.device)
            t = torch.cat([padding, t] if left else [t, padding], dim=1)
        out.append(t)
    return torch.cat(out, dim=0)


def _pad_cat_3d(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    """Row-wise concat of [b, T, K] tensors, right-padded with ``value`` on both T and K."""
    width = max(t.shape[1] for t in tensors)
    depth = max(t.shape[2] for t in tensors)
    out = torch.full((sum(t.shape[0] for t in tensors), width, depth), value, dtype=tensors[0].dtype)  # [B, T, K]
    row = 0
    for t in tensors:
        out[row:row + t.shape[0], :t.shape[1], :t.shape[2]] = t
        row += t.shape[0]
    return out


def concat(batches: list[Rollouts], pad_id: int = 0) -> Rollouts:
    """Stack batches row-wise, re-padding prompts (left) and responses (right) to a common width.

    ``group_id`` is offset per batch so groups from different batches never merge.
    """
    if not batches:
        raise ValueError("concat needs at least one batch")
    if len(batches) == 1:
        return batches[0]
    kw: dict[str, Any] = {}
    kw["prompt_ids"] = _pad_cat([b.prompt_ids for b in batches], pad_id, left=True)
    kw["prompt_mask"] = _pad_cat([b.prompt_mask for b in batches], 0, left=True)
    for f in ("response_ids",):
        kw[f] = _pad_cat([getattr(b, f) for b in batches], pad_id, left=False)
    for f in ("response_mask", "behavior_logprobs", "prox_logprobs", "ref_logprobs", "trainer_logprobs",
              "token_version"):
        vals = [getattr(b, f) for b in batches]
        kw[f] = None if any(v is None for v in vals) else _pad_cat(vals, 0, left=False)
    kept = [b.sampling_kept for b in batches]
    kw["sampling_kept"] = None if any(k is None for k in kept) else _pad_cat_3d(kept, -1)
    kw["policy_version"] = torch.cat([b.policy_version for b in batches])
    offset, gids = 0, []
    for b in batches:
        gids.append(b.group_id + offset)
        offset += int(b.group_id.max().item()) + 1 if len(b) else 0
    kw["group_id"] = torch.cat(gids)
    for f in ("rewards",):
        vals = [getattr(b, f) for b in batches]
        kw[f] = None if any(v is None for v in vals) else torch.cat(vals)
    advs = [b.advantages for b in batches]
    if any(a is None for a in advs):
        kw["advantages"] = None
    elif all(a.dim() == 1 for a in advs):
        kw["advantages"] = torch.cat(advs)
    else:
        kw["advantages"] = _pad_cat(
            [a if a.dim() == 2 else a[:, None].expand_as(b.response_mask) for a, b in zip(advs, batches)],
            0, left=False,
        )
    for f in _LIST_FIELDS:
        kw[f] = [x for b in batches for x in getattr(b, f)]
    return Rollouts(**kw)


__all__ = ["Rollouts", "concat"]
