"""Score step: rewards (``workbench.steps.rewards``), advantage estimators, DAPO filtering.

Advantages (``ADVANTAGES``), all sequence-level ``fn(rewards [B], group_id [B], *, eps, **options) -> [B]``,
vectorised over groups (``group_id`` values need not be contiguous or sorted); ``options`` are the
estimator's registered ``choices`` (``RunConfig.advantage_params``, ``score(..., advantage_params=)``):
    grpo          (R - mean_G) / (std_G + eps), DeepSeekMath arXiv:2402.03300. std_G is the
                  *unbiased* (n-1) std, as ``torch.std`` in verl's ``compute_grpo_outcome_advantage``.
    dr_grpo       R - mean_G, Dr. GRPO arXiv:2503.20783.
    rloo          R_i - mean_{j!=i} R_j, RLOO arXiv:2402.14740.
    lite_ppo      (R - mean_G) / (std_batch + eps), Lite PPO arXiv:2508.08221. ``std``:
                  ``batch_rewards`` (default): unbiased std of the raw rewards over the whole batch,
                  like TRL ``scale_rewards="batch"``; ``batch_centred``: unbiased std over the batch
                  of the group-centred rewards R - mean_G, AReaL's ``adv_norm`` with group mean and
                  batch std (arXiv:2505.24298).
    reinforce_pp  c = R - mean_G, then whitened over the batch: (c - m) / (s + eps) (unbiased s),
                  REINFORCE++-baseline arXiv:2501.03262. ``whiten``: ``sequences`` (default): m and
                  s over the B sequences; ``tokens``: over the valid tokens, as verl's
                  ``masked_whiten`` of the token-broadcast advantage, i.e. sequence i weighted by its
                  length L_i: m = sum L_i c_i / N, s^2 = sum L_i (c_i - m)^2 / (N - 1), N = sum L_i
                  (a row with no token gets 0). The value is still one per sequence, so [B] is
                  exact; verl puts eps inside the square root (rsqrt(s^2 + 1e-8)), here it is added
                  to s like every estimator of this file.
    none          raw reward (TOPR arXiv:2503.14286 uses +1/-1 rewards with no baseline).
    capo          pairwise logistic-AUC advantage from each response's confidence (CAPO arXiv:2604.12632,
                  ``workbench.steps.advantages_seed``); ``noise_margin`` is a numeric option.
A group of size 1 has no baseline information: its centred reward is 0 in every group estimator
(verl instead uses mean 0, std 1 there, i.e. the raw reward). A batch std of a single value is 0.

Filtering: ``score(..., filter_zero_variance=True)`` drops groups whose *combined* reward is
constant (DAPO dynamic sampling, arXiv:2503.14476, without the resampling: the loop decides that).
Advantages are computed after filtering, as in verl's DAPO recipe (matters only for the batch-level
estimators lite_ppo and reinforce_pp). An estimator that takes ``lengths`` gets the kept rows'
response lengths [B']; one that takes ``confidence`` gets their mean behaviour log-probs [B'].
Numeric options are listed in the estimator's ``numbers`` metadata ({key: (low, high)}).

Left out: token-level advantages (GAE/critics, REINFORCE++ discounted per-token returns), ReMax/OPO/GPG
baselines. (Rewards, their spec and their validation: ``workbench.steps.rewards``.)
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

from workbench.errors import WorkbenchError, bad_value
from workbench.registry import Registry
from workbench.rollouts import Rollouts
from workbench.steps.advantages_seed import CAPO_META, capo, sequence_confidence
from workbench.steps.rewards import (REWARDS, RewardFn, RewardSpec, combine, compute_rewards, exact_match,
                                     format_reward, overlong, reward_kwargs)

ADVANTAGES: Registry[Callable[..., torch.Tensor]] = Registry("advantage estimator")


# ------------------------------------------------------------------------------- advantages
def _groups(
    rewards: torch.Tensor, group_id: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(rewards as float64 [B], inverse group index [B], group sizes [K], K)."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise bad_value("rewards", getattr(rewards, "shape", rewards), "a 1-D tensor [B]")
    if not isinstance(group_id, torch.Tensor) or group_id.shape != rewards.shape:
        got = getattr(group_id, "shape", group_id)
        raise bad_value("group_id", got, f"a tensor of shape {tuple(rewards.shape)}")
    _, inv = torch.unique(group_id, return_inverse=True)  # [B] in 0..K-1
    k = int(inv.max()) + 1 if inv.numel() else 0
    counts = torch.bincount(inv, minlength=k).double()  # [K]
    return rewards.double(), inv, counts, k


def _group_mean_var(
    r: torch.Tensor, inv: torch.Tensor, counts: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence group mean [B] and unbiased group variance [B] (0 for groups of size 1)."""
    sums = r.new_zeros(k).index_add_(0, inv, r)  # [K]
    mean = sums / counts  # [K]
    sq = r.new_zeros(k).index_add_(0, inv, (r - mean[inv]) ** 2)  # [K]
    var = torch.where(counts > 1, sq / (counts - 1).clamp(min=1), torch.zeros_like(sq))  # [K]
    return mean[inv], var[inv]  # [B], [B]


def _batch_std(x: torch.Tensor) -> torch.Tensor:
    return x.std() if x.numel() > 1 else x.new_zeros(())  # unbiased; 0 for a single value


@ADVANTAGES.register("grpo", paper="DeepSeekMath arXiv:2402.03300",
                     summary="(R - mean_G) / (std_G + eps), unbiased group std (as verl)")
def grpo(rewards: torch.Tensor, group_id: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    r, inv, counts, k = _groups(rewards, group_id)
    mean, var = _group_mean_var(r, inv, counts, k)  # [B], [B]
    return ((r - mean) / (var.sqrt() + eps)).to(rewards.dtype)  # [B]


@ADVANTAGES.register("dr_grpo", paper="Dr. GRPO arXiv:2503.20783", summary="R - mean_G (no std scaling)")
def dr_grpo(rewards: torch.Tensor, group_id: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    r, inv, counts, k = _groups(rewards, group_id)
    mean, _ = _group_mean_var(r, inv, counts, k)  # [B]
    return (r - mean).to(rewards.dtype)  # [B]


@ADVANTAGES.register("rloo", paper="RLOO arXiv:2402.14740",
                     summary="R_i - mean of the other samples in the group (0 for groups of size 1)")
def rloo(rewards: torch.Tensor, group_id: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    r, inv, counts, k = _groups(rewards, group_id)
    sums = r.new_zeros(k).index_add_(0, inv, r)[inv]  # [B]
    n = counts[inv]  # [B]
    loo = (sums - r) / (n - 1).clamp(min=1)  # [B] mean of the others
    return torch.where(n > 1, r - loo, torch.zeros_like(r)).to(rewards.dtype)  # [B]


def _option(name: str, key: str, value: Any) -> None:
    numbers = ADVANTAGES.meta(name).get("numbers", {})
    if key in numbers:
        lo, hi = numbers[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise bad_value(f"advantage_params.{key}", value, f"a number in [{lo}, {hi}] (advantage={name})")
        return
    choices = ADVANTAGES.meta(name)["choices"][key]
    if value not in choices:
        raise bad_value(f"advantage_params.{key}", value, f"{' | '.join(choices)} (advantage={name})")


@ADVANTAGES.register("lite_ppo", paper="Tricks or Traps? Part I (Lite PPO) arXiv:2508.08221",
                     summary="(R - mean_G) / (batch std + eps): std of R (TRL) or of R - mean_G (AReaL)",
                     choices={"std": ("batch_rewards", "batch_centred")})
def lite_ppo(rewards: torch.Tensor, group_id: torch.Tensor, *, eps: float = 1e-6,
             std: str = "batch_rewards") -> torch.Tensor:
    _option("lite_ppo", "std", std)
    r, inv, counts, k = _groups(rewards, group_id)
    mean, _ = _group_mean_var(r, inv, counts, k)  # [B]
    scale = _batch_std(r) if std == "batch_rewards" else _batch_std(r - mean)
    return ((r - mean) / (scale + eps)).to(rewards.dtype)  # [B]


@ADVANTAGES.register("reinforce_pp", paper="REINFORCE++ arXiv:2501.03262",
                     summary="REINFORCE++-baseline: R - mean_G, then whitened over the batch's sequences or tokens",
                     choices={"whiten": ("sequences", "tokens")})
def reinforce_pp(rewards: torch.Tensor, group_id: torch.Tensor, *, eps: float = 1e-6, whiten: str = "sequences",
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``whiten="tokens"`` needs ``lengths`` [B], the response token counts (``score`` passes them)."""
    _option("reinforce_pp", "whiten", whiten)
    r, inv, counts, k = _groups(rewards, group_id)
    mean, _ = _group_mean_var(r, inv, counts, k)  # [B]
    a = r - mean  # [B]
    if a.numel() == 0:
        return a.to(rewards.dtype)
    if whiten == "sequences":
        return ((a - a.mean()) / (_batch_std(a) + eps)).to(rewards.dtype)  # [B]
    if not isinstance(lengths, torch.Tensor) or lengths.shape != a.shape:
        raise bad_value("lengths", getattr(lengths, "shape", lengths),
                        f"a tensor of shape {tuple(a.shape)} (response lengths) for whiten='tokens'")
    w = lengths.to(torch.float64)  # [B], tokens per sequence
    n = w.sum()
    m = (w * a).sum() / n.clamp(min=1.0)
    var = (w * (a - m) ** 2).sum() / (n - 1.0) if float(n) > 1 else a.new_zeros(())
    out = torch.where(w > 0, (a - m) / (var.sqrt() + eps), torch.zeros_like(a))  # [B]
    return out.to(rewards.dtype)


@ADVANTAGES.register("none", paper="TOPR arXiv:2503.14286", summary="raw reward, no baseline")
def no_baseline(rewards: torch.Tensor, group_id: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    _groups(rewards, group_id)  # validation only
    return rewards.clone()  # [B]


ADVANTAGES.add("capo", capo, **CAPO_META)


def validate_advantage_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params`` against estimator ``name``'s registered ``choices``; one-line WorkbenchError."""
    if not isinstance(params, dict):
        raise bad_value("advantage_params", params, "a dict of the estimator's options")
    meta = ADVANTAGES.meta(name)
    keys = {**meta.get("choices", {}), **meta.get("numbers", {})}
    for key, value in params.items():
        if key not in keys:
            valid = ", ".join(sorted(keys)) or "none"
            raise WorkbenchError(f"advantage_params has no key {key!r} for advantage={name!r}: valid keys are {valid}")
        _option(name, key, value)
    return params


def zero_variance_mask(rewards: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    """bool [B]: True for sequences whose group's rewards are all equal (incl. groups of size 1)."""
    r, inv, _, k = _groups(rewards, group_id)
    gmax = r.new_full((k,), -math.inf).scatter_reduce(0, inv, r, "amax")  # [K]
    gmin = r.new_full((k,), math.inf).scatter_reduce(0, inv, r, "amin")  # [K]
    return (gmax == gmin)[inv]  # [B]


# ------------------------------------------------------------------------------------ score
def score(
    rollouts: Rollouts,
    rewards_spec: RewardSpec,
    advantage: str | Callable[..., torch.Tensor] = "grpo",
    filter_zero_variance: bool = False,
    eps: float = 1e-6,
    advantage_params: dict[str, Any] | None = None,
) -> tuple[Rollouts, dict[str, float]]:
    """Attach rewards [B] and advantages [B]; optionally drop zero-variance groups.

    ``advantage_params`` are the estimator's options (``validate_advantage_params`` for a registry
    name); an estimator taking ``lengths`` also gets the kept rows' response lengths.

    Metrics: reward stats, ``reward/accuracy`` (exact match, whatever the spec) and response
    lengths are over the whole input batch; ``reward/adv_*`` over the returned (kept) rows (NaN when
    none are kept). Stds in metrics are population stds (descriptive; defined for one value).
    """
    adv_fn = ADVANTAGES.get(advantage) if isinstance(advantage, str) else advantage
    if not callable(adv_fn):
        raise bad_value("advantage", advantage, f"one of {', '.join(ADVANTAGES.names())} or a callable")
    rewards = compute_rewards(rewards_spec, rollouts)  # [B]
    gid = rollouts.group_id
    zero_var = zero_variance_mask(rewards, gid)  # [B]
    keep = ~zero_var if filter_zero_variance else torch.ones_like(zero_var)  # [B] bool
    kept = rollouts.select(keep) if filter_zero_variance else rollouts
    kept_rewards = rewards[keep]  # [B']
    params = validate_advantage_params(advantage, advantage_params or {}) if isinstance(advantage, str) \
        else dict(advantage_params or {})
    if "lengths" in inspect.signature(adv_fn).parameters:
        params = {**params, "lengths": kept.response_lengths}  # [B']
    if "confidence" in inspect.signature(adv_fn).parameters:
        params = {**params, "confidence": sequence_confidence(kept.behavior_logprobs, kept.response_mask)}  # [B']
    adv = adv_fn(kept_rewards, kept.group_id, eps=eps, **params)  # [B']
    out = kept.with_(rewards=kept_rewards, advantages=adv)

    n = len(rollouts)
    nan = float("nan")
    _, inv = torch.unique(gid, return_inverse=True)
    n_groups = int(inv.max()) + 1 if n else 0
    zv_groups = int(inv[zero_var].unique().numel())  # groups with constant reward
    acc = torch.tensor(exact_match(rollouts.prompts, rollouts.completions, answers=rollouts.answers),
                       device=rewards.device)  # [B]
    lens = rollouts.response_lengths.double()  # [B]
    a = adv.double()
    metrics = {
        "reward/mean": float(rewards.double().mean()) if n else nan,
        "reward/std": float(rewards.double().std(correction=0)) if n else nan,
        "reward/accuracy": float(acc.mean()) if n else nan,
        "reward/zero_var_group_frac": zv_groups / n_groups if n_groups else nan,
        "reward/filtered_seqs": float(n - len(out)),
        "reward/response_len_mean": float(lens.mean()) if n else nan,
        "reward/response_len_max": float(lens.max()) if n else nan,
        "reward/adv_mean": float(a.mean()) if a.numel() else nan,
        "reward/adv_std": float(a.std(correction=0)) if a.numel() else nan,
        "reward/pos_adv_frac": float((a > 0).double().mean()) if a.numel() else nan,
    }
    return out, metrics


__all__ = [
    "ADVANTAGES", "REWARDS", "RewardFn", "RewardSpec", "combine", "compute_rewards", "dr_grpo",
    "exact_match", "format_reward", "grpo", "lite_ppo", "no_baseline", "overlong", "reinforce_pp",
    "reward_kwargs", "rloo", "score", "validate_advantage_params", "zero_variance_mask",
]
