"""Peer presets: the RunConfig fields that reproduce a peer framework's DEFAULT policy loss.

``PEER_PRESETS`` maps a name to a ``PeerPreset`` (the peer, the source file and config keys its
defaults were read from, a description of what is and is not reproduced, and the RunConfig field
values). ``preset_fields(name)`` returns those fields; ``apply_preset(name, **overrides)`` returns
them with overrides on top, checked to be RunConfig fields. Nothing here edits a config: the caller
builds ``RunConfig(**apply_preset(...))``.

Which log-probs anchor the ratio: verl, TRL and SkyRL recompute the old policy's log-probs with the
trainer at the start of each batch (verl ``ray_trainer._compute_old_log_prob`` with
``rollout_correction.bypass_mode=false``; TRL ``old_per_token_logps``, the detached current
log-probs when each batch gets one update; SkyRL's forward pass before training), which is
``proximal="recompute"`` here; the sampler's log-probs then only feed diagnostics. prime-rl uses the
inference engine's log-probs (``inference_logprobs``): ``proximal="none"``. AReaL's decoupled PPO
(Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language
Reasoning", arXiv:2505.24298) recomputes pi_prox (``prox_logp_method=recompute``).

Differences kept on purpose (each preset's description repeats its own): the workbench clamps
every log-ratio to +-20 (``inputs.LOG_RATIO_CLAMP``, as verl and SkyRL do; TRL, AReaL and prime-rl
do not), so for |log r| > 20 the ratio is e^+-20 with zero gradient; prime-rl's extra
``kl_tau * (log r)^2`` term has no workbench counterpart. Advantage estimators are left to the
caller (the peers' defaults differ: verl's is GAE, which needs a critic).

Papers: PPO (Schulman et al. 2017, arXiv:1707.06347), dual-clip (Ye et al. 2019,
arXiv:1912.09729), DAPO token-level loss (Yu et al. 2025, arXiv:2503.14476), DPPO (Qi et al. 2026,
arXiv:2602.04879).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from workbench.config import RunConfig
from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class PeerPreset:
    """One peer's default policy loss as RunConfig fields.

    ``source``: the peer's files and config keys the values come from; ``description``: what the
    loss is and what is not reproduced; ``fields``: RunConfig field -> value.
    """

    name: str
    peer: str
    source: str
    description: str
    fields: Mapping[str, Any]


def _preset(name: str, peer: str, source: str, description: str, **fields: Any) -> PeerPreset:
    return PeerPreset(name, peer, source, description, MappingProxyType(fields))


_PRESETS = (
    _preset(
        "verl_vanilla", "verl",
        "verl/trainer/ppo/core_algos.py compute_policy_loss_vanilla; verl/trainer/config/actor/actor.yaml "
        "policy_loss.loss_mode=vanilla, clip_ratio=0.2 (clip_ratio_low / clip_ratio_high default to it), "
        "clip_ratio_c=3.0, loss_agg_mode=token-mean, use_kl_loss=false; old_log_prob recomputed "
        "(ray_trainer._compute_old_log_prob, rollout_correction.bypass_mode=false)",
        "dual-clip PPO, eps 0.2 / 0.2, c = 3, token-mean over the batch, ratio anchored at the recomputed old "
        "policy, log-ratio clamped to +-20 as verl; no KL loss. Advantage left to the caller (verl's default "
        "adv_estimator is gae, which needs a critic)",
        objective="dual_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2, "clip_c": 3.0},
        aggregation="token-mean", correction="", proximal="recompute", kl_coef=0.0,
    ),
    _preset(
        "trl_grpo", "TRL",
        "trl/trainer/grpo_config.py GRPOConfig loss_type='dapo', epsilon=0.2, epsilon_high=None (= epsilon), "
        "beta=0.0, delta=None, importance_sampling_level='token', use_vllm=False; trl/trainer/grpo_trainer.py "
        "compute_loss (dapo: sum over tokens / num_items_in_batch, the batch's token count)",
        "PPO-clip, eps 0.2 / 0.2, token-level normalisation over the batch's tokens, no KL (beta 0), ratio "
        "anchored at the trainer's own old log-probs. TRL does not clamp the log-ratio (the workbench clamps at "
        "+-20). TRL's vllm_importance_sampling_correction (sequence_mask, clip_max 3) acts only with "
        "use_vllm=True, so it is not part of the default",
        objective="ppo_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2},
        aggregation="token-mean", correction="", proximal="recompute", kl_coef=0.0,
    ),
    _preset(
        "skyrl_regular", "SkyRL",
        "skyrl/train/config/config.py AlgorithmConfig policy_loss_type='regular', eps_clip_low=0.2, "
        "eps_clip_high=0.2, loss_reduction='token_mean', use_kl_loss=True, kl_loss_coef=0.001, "
        "kl_estimator_type='k3', off_policy_correction all off; skyrl/backends/skyrl_train/utils/ppo_utils.py "
        "ppo_policy_loss (ratio = exp of the log-ratio clamped to +-20)",
        "PPO-clip, eps 0.2 / 0.2, token-mean, ratio anchored at the recomputed old policy, plus SkyRL's default "
        "KL loss to the reference model (k3, coefficient 0.001; the policy-loss tests check the PPO term, not "
        "how SkyRL clamps its k3)",
        objective="ppo_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2},
        aggregation="token-mean", correction="", proximal="recompute", kl_coef=0.001, kl_estimator="k3",
    ),
    _preset(
        "areal_decoupled", "AReaL",
        "areal/api/cli_args.py PPOActorConfig eps_clip=0.2, eps_clip_higher=None, c_clip=None, "
        "use_decoupled_loss=True (not the default: False), prox_logp_method='recompute', rejection_sampling=None; "
        "areal/utils/functional/functional.py ppo_actor_loss_fn (sum / loss_mask_count)",
        "decoupled PPO: PPO-clip eps 0.2 / 0.2 anchored at the recomputed pi_prox, token-mean over the valid "
        "tokens; with AReaL's current default rejection_sampling=None no behaviour weight pi_prox / mu is "
        "applied (AReaL warns about it; areal_decoupled_cap5 restores the capped weight). AReaL does not clamp "
        "the log-ratio (the workbench clamps at +-20)",
        objective="ppo_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2},
        aggregation="token-mean", correction="", proximal="recompute", kl_coef=0.0,
    ),
    _preset(
        "areal_decoupled_cap5", "AReaL",
        "as areal_decoupled, with rejection_sampling set to areal/api/cli_args.py RejectionSamplingConfig's "
        "defaults (level='token', action='mask', metric='ratio', upper=5.0; areal/utils/functional/functional.py "
        "apply_rejection_sampling), the replacement of the removed behave_imp_weight_cap=5.0, "
        "behave_imp_weight_mode='token_mask'",
        "decoupled PPO with the behaviour weight pi_prox / mu on every token, tokens whose weight exceeds 5 "
        "masked but still counted in the normaliser (correction preset areal)",
        objective="ppo_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2},
        aggregation="token-mean", correction="areal", proximal="recompute", kl_coef=0.0,
    ),
    _preset(
        "prime_rl_default", "prime-rl",
        "src/prime_rl/trainer/rl/loss.py default_loss_fn; packages/prime-rl-configs/src/prime_rl/configs/trainer.py "
        "DefaultLossConfig dppo_mask_low=0.2, dppo_mask_high=0.2, adv_tau=1.0, kl_tau=1e-3; compute_loss "
        "divides by the global rl-token count",
        "DPPO-Binary-TV: -M r A with the token masked once pi - mu moves past 0.2 in the direction A pushes, "
        "ratio against the inference log-probs, token-mean. NOT reproduced: prime-rl's kl_tau (1e-3) * (log r)^2 "
        "term on every token (no workbench counterpart; the tests compare with kl_tau = 0); prime-rl does not "
        "clamp the log-ratio (the workbench clamps at +-20)",
        objective="dppo_tv", objective_params={"delta_low": 0.2, "delta_high": 0.2},
        aggregation="token-mean", correction="", proximal="none", kl_coef=0.0,
    ),
)

PEER_PRESETS: Mapping[str, PeerPreset] = MappingProxyType({p.name: p for p in _PRESETS})
"""name -> PeerPreset, in the order above."""

_RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))


def peer_preset(name: str) -> PeerPreset:
    """The ``PeerPreset`` called ``name``; a one-line WorkbenchError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in PEER_PRESETS:
        raise WorkbenchError(f"preset={name!r} is invalid: expected one of {', '.join(PEER_PRESETS)}")
    return PEER_PRESETS[name]


def preset_fields(name: str) -> dict[str, Any]:
    """The RunConfig fields of preset ``name`` (fresh dicts: safe to modify)."""
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in peer_preset(name).fields.items()}


def apply_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """``preset_fields(name)`` with ``overrides`` on top; an override must name a RunConfig field."""
    fields = preset_fields(name)
    for key in overrides:
        if key not in _RUN_FIELDS:
            raise WorkbenchError(f"apply_preset({name!r}): {key!r} is not a RunConfig field: valid fields are "
                                 f"{', '.join(sorted(_RUN_FIELDS))}")
    return {**fields, **overrides}


__all__ = ["PEER_PRESETS", "PeerPreset", "apply_preset", "peer_preset", "preset_fields"]
