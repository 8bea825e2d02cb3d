"""The ``context`` of ``policy_loss``: what some objectives need beyond the five tensors.

    loss, metrics = policy_loss("tb", logprobs, behavior_logprobs, advantages, response_mask,
                                context={"group_id": group_id, "rewards": rewards,
                                         "ref_logprobs": ref_logprobs})

An objective declares the keys it needs in its metadata (``needs=``, a tuple or a function of the
filled params); ``policy_loss`` refuses a call that lacks one (one-line WorkbenchError naming it).
``CONTEXT_KEYS`` documents every key. The loop (``workbench.loop`` / ``workbench.steps.update``) always
supplies ``group_id``, ``rewards``, ``step`` and ``state``, plus ``ref_logprobs`` when it has a
reference model and the expert tensors when the objective needs them.

The helpers below read and validate a key for an objective: shape, dtype, finiteness at valid
positions (NaN/inf in padding is allowed and sanitised, exactly like the main tensors) -> a clean
tensor in the compute dtype, or a one-line WorkbenchError naming ``context[key]``.

``state`` is a plain dict owned by the caller and persisting across calls (the loop keeps one per
run, ``Run.objective_state``, and saves it in checkpoints as JSON): objectives store JSON-able
numbers there under ``"<objective>/<name>"`` keys (R2VPO's dual variable ``"r2vpo/lambda"``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.inputs import LossInputs

CONTEXT_KEYS: dict[str, str] = {
    "group_id": "[B] integer tensor: the prompt each sequence answers (Rollouts.group_id)",
    "rewards": "[B] float tensor: each sequence's scalar reward (Rollouts.rewards)",
    "step": "int >= 0: the 0-based update index, for schedules",
    "state": "dict of JSON-able numbers that persists across updates (the loop owns and checkpoints it)",
    "ref_logprobs": "[B, T] float tensor: frozen reference-policy log-probs of the sampled tokens",
    "expert_logprobs": "[Be, Te] float tensor: current-policy log-probs of expert demonstration tokens, with grad",
    "expert_mask": "[Be, Te] 0/1 or bool tensor: 1 = real expert token",
    "generator": "torch.Generator (optional): randomness for Clip-Cov; default: seeded from the batch",
}


def _err(key: str, what: str) -> WorkbenchError:
    return WorkbenchError(f"context[{key!r}] {what}")


def _get(inp: LossInputs, key: str) -> Any:
    value = inp.context.get(key)
    if value is None:
        raise _err(key, f"is missing: expected {CONTEXT_KEYS[key]}")
    return value


def valid_rows(inp: LossInputs) -> torch.Tensor:
    """[B] bool: rows with at least one valid token (the others are not samples)."""
    return inp.seq_lengths > 0


def row_values(inp: LossInputs, key: str) -> torch.Tensor:
    """A [B] float context tensor (e.g. ``rewards``) on the inputs' device, finite on rows with a valid
    token, 0 elsewhere."""
    x = _get(inp, key)
    b = inp.mask.shape[0]
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (b,):
        raise _err(key, f"has shape {tuple(getattr(x, 'shape', ()))}: expected [B]=({b},)")
    x = x.detach().to(inp.logprobs.device, inp.logprobs.dtype)
    rows = valid_rows(inp)
    bad = rows & ~torch.isfinite(x)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise _err(key, f"has a non-finite value ({float(x[i])}) at row {i}, which has valid tokens")
    return torch.where(rows, x, x.new_zeros(()))


def token_values(inp: LossInputs, key: str) -> torch.Tensor:
    """A [B, T] float context tensor (e.g. ``ref_logprobs``) on the inputs' device, detached, 0 at padded
    positions."""
    x = _get(inp, key)
    shape = tuple(inp.mask.shape)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
        raise _err(key, f"has shape {tuple(getattr(x, 'shape', ()))}: expected [B, T]={shape}")
    x = x.detach().to(inp.logprobs.device, inp.logprobs.dtype)
    bad = inp.mask & ~torch.isfinite(x)
    if bool(bad.any()):
        i, t = (int(v) for v in bad.nonzero()[0])
        raise _err(key, f"has a non-finite value ({float(x[i, t])}) at valid token [{i}, {t}]")
    return torch.where(inp.mask, x, x.new_zeros(()))


def group_index(inp: LossInputs) -> tuple[torch.Tensor, int]:
    """(inverse [B] long in 0..G-1, G) for ``group_id``; rows without valid tokens get index G."""
    gid = _get(inp, "group_id")
    b = inp.mask.shape[0]
    if not isinstance(gid, torch.Tensor) or tuple(gid.shape) != (b,) or gid.is_floating_point() \
            or gid.dtype == torch.bool:
        raise _err("group_id", f"must be an integer tensor of shape [B]=({b},), got "
                               f"{getattr(gid, 'dtype', type(gid).__name__)} {tuple(getattr(gid, 'shape', ()))}")
    gid = gid.to(inp.mask.device)
    rows = valid_rows(inp)
    if not bool(rows.any()):
        return torch.zeros(b, dtype=torch.long, device=gid.device), 0
    uniq, inv = torch.unique(gid[rows], return_inverse=True)
    out = torch.full((b,), len(uniq), dtype=torch.long, device=gid.device)
    out[rows] = inv
    return out, int(len(uniq))


def group_mean(x: torch.Tensor, inv: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``x [B]`` over each row's group (rows with index ``n_groups`` ignored) -> [B]."""
    sums = x.new_zeros(n_groups + 1).index_add(0, inv, x)  # [G + 1]
    counts = x.new_zeros(n_groups + 1).index_add(0, inv, torch.ones_like(x))  # [G + 1]
    means = torch.cat([(sums / counts.clamp(min=1))[:n_groups], x.new_zeros(1)])  # [G + 1], ignored rows -> 0
    return means[inv]  # [B]


def group_median(x: torch.Tensor, inv: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Median of ``x [B]`` within each row's group (mean of the two middle values for an even count)."""
    order = torch.argsort(x, stable=True)  # [B] by value
    order = order[torch.argsort(inv[order], stable=True)]  # [B] by group, then value
    counts = torch.bincount(inv, minlength=n_groups + 1)  # [G + 1]
    starts = torch.cumsum(counts, 0) - counts  # [G + 1]
    sorted_x = x[order]  # [B]
    c = counts[:n_groups]
    lo = starts[:n_groups] + (c - 1) // 2
    hi = starts[:n_groups] + c // 2
    med = (sorted_x[lo] + sorted_x[hi]) / 2  # [G]
    med = torch.cat([med, x.new_zeros(1)])  # [G + 1]
    return med[inv]  # [B]


def get_state(inp: LossInputs) -> dict[str, Any]:
    """The mutable per-run ``state`` dict."""
    state = _get(inp, "state")
    if not isinstance(state, dict):
        raise _err("state", f"must be a dict, got {type(state).__name__}")
    return state


def get_step(inp: LossInputs) -> int:
    """The 0-based update index."""
    step = _get(inp, "step")
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step < 0 or int(step) != step:
        raise _err("step", f"={step!r} is invalid: expected an int >= 0 (the update index)")
    return int(step)


def expert_tensors(inp: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert log-probs [Be, Te] with their graph, 0 at padding; expert mask [Be, Te] bool), the mask
    moved to the log-probs' device."""
    lp = _get(inp, "expert_logprobs")
    mask = _get(inp, "expert_mask")
    if not isinstance(lp, torch.Tensor) or lp.dim() != 2 or not lp.is_floating_point():
        raise _err("expert_logprobs", f"must be a floating [Be, Te] tensor, got {tuple(getattr(lp, 'shape', ()))}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(lp.shape):
        raise _err("expert_mask", f"has shape {tuple(getattr(mask, 'shape', ()))}: expected {tuple(lp.shape)} "
                                  f"like context['expert_logprobs']")
    valid = (mask if mask.dtype == torch.bool else mask != 0).to(lp.device)  # [Be, Te]
    lp = lp.to(torch.promote_types(lp.dtype, torch.float32))
    bad = valid & ~torch.isfinite(lp.detach())
    if bool(bad.any()):
        i, t = (int(v) for v in bad.nonzero()[0])
        raise _err("expert_logprobs", f"has a non-finite value ({float(lp[i, t])}) at valid token [{i}, {t}]")
    return torch.where(valid, lp, lp.new_zeros(())), valid


def batch_generator(inp: LossInputs, *parts: torch.Tensor) -> torch.Generator:
    """``context["generator"]`` if given, else a CPU generator seeded from ``parts`` (the batch content).

    Same batch -> same seed -> same random choice, so runs stay reproducible without threading a
    generator through the caller.
    """
    gen = inp.context.get("generator")
    if gen is not None:
        if not isinstance(gen, torch.Generator):
            raise _err("generator", f"must be a torch.Generator, got {type(gen).__name__}")
        return gen
    h = hashlib.sha256()
    for p in parts:
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") & (2**63 - 1))


__all__ = ["CONTEXT_KEYS", "batch_generator", "expert_tensors", "get_state", "get_step", "group_index",
           "group_mean", "group_median", "row_values", "token_values", "valid_rows"]
