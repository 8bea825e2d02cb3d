"""Config linter: combinations users get wrong and peer frameworks fail on silently.

    from workbench.lint import lint
    for w in lint(RunConfig(objective="cispo", correction="token_tis")):
        print(w.code, w.field, w.message)

``lint(config) -> list[LintWarning]`` (``Warning`` is an alias); each warning has a ``code``, a
one-line ``message`` and the config ``field`` to change. ``notes(config) -> list[str]`` are
informative lines about what a config does that is no mistake. The CLI prints both before ``run``
and for ``python -m workbench lint [same flags as run]``. Nothing here raises: a config that
validates is runnable, the linter only says where it probably does not do what was meant. The
checks (each cites the upstream issue reports it comes from):

``clip_inert``
    Nothing makes pi_theta differ from the anchor, so the ratio is identically 1 and clipping /
    masking / IS weighting never acts: staleness 0, sync_every 1, one update per batch, full-support
    sampling (TRL #3120 / #3757, AReaL #201 "clip_ratio always 0", SkyRL #1315). Warnings are for
    combinations users get wrong, so the on-policy default itself (objective, its parameters,
    correction and proximal policy all left at their defaults) is not warned about: it is the
    on-policy reference run, and ``notes`` says so instead. Choosing an objective, its parameters or
    a correction for an on-policy run is what the warning is for. Also
    ``proximal="recompute"`` with one update per batch: the anchor is the policy at the start of the
    batch, which is then the policy being updated, so the ratio is 1 regardless of staleness (the
    trust region is only the correction's cap; reuse, epochs x minibatches, is what lets it act).
    ``proximal="reuse_train_logp"`` always: the anchor is the update's own training forward (it is
    refused with reuse), so the ratio is 1 by construction.
``double_correction``
    An importance weight applied twice: in bypass mode (no proximal policy) the objective's ratio is
    already pi_theta / mu, and a correction with a TIS weight multiplies it again (~ rho^2; verl
    applies only rejection with PPO-clip in bypass mode). Also an objective flagged
    ``behavior_weighted`` (weights by pi/mu itself, whatever the anchor) with a proximal policy and
    a weighted correction.
``stale_ignored``
    Off-policy data (staleness, sync period, reuse, truncated sampling) with an objective that
    ignores the behaviour policy (metadata ``ignores_behavior``: ``reinforce``) and no weighting
    correction: the gradient is REINFORCE's on another policy's samples, uncorrected.
``batch_dependent_aggregation``
    The loss scale changes with batch composition: ``seq-mean-token-sum-norm`` without a fixed
    ``loss_scale_factor`` (the normaliser is the batch's longest response; verl #3741); Dr. GRPO
    advantages with a mean aggregation (the Dr. GRPO caveat: its unbiased form needs a constant
    normaliser, docs/design.md, "Aggregation"); a mean aggregation with filtering (``filter_zero_variance`` or
    ``max_staleness``), whose normaliser counts only the samples that survive.
``m2po_tau_range``
    M2PO with tau outside [0.02, 0.12], the range the paper found stable (arXiv:2510.01161, Fig. 8).
``truncated_support``
    top-p / top-k sampling with no correction and no ``replay_sampling_mask``: mu is the truncated,
    renormalised distribution, so pi_theta / mu < 1 on every sampled token (verl #6240, TRL #4159 /
    #6789 / PR #7269); replaying the sampler's kept sets in the trainer removes the bias
    (``workbench.policy.numerics``), so a replayed top-p / top-k is no off-policy source either.
``decoupled_without_correction``
    A proximal policy anchors the ratio but no correction weights pi_prox / mu: the behaviour
    mismatch is silently dropped. AReaL's current default does the same (``rejection_sampling=None``:
    ``ppo_actor_loss_fn`` multiplies by no behaviour weight, and ``PPOActorConfig`` warns that
    staleness filtering is off); its removed default ``behave_imp_weight_cap=5.0`` with
    ``token_mask`` applied the weight with tokens above 5 masked, which ``rejection_sampling``
    (level token, action mask, metric ratio, upper 5.0) restores: correction ``areal`` here
    (``areal_clamp`` for action clamp).
``lag_exceeds_steps``
    ``staleness + sync_every >= steps`` (in batches of ``updates_per_batch * num_minibatches``
    updates): the first sync generates that many batches with the initial weights before the first
    update, so every update of the run trains on theta_0's data, and the batches past ``steps`` are
    generated for nothing (``staleness=1000000`` would pre-generate a million batches).
``no_group_baseline``
    ``group_size=1`` with a group-relative advantage (grpo, dr_grpo, rloo, lite_ppo, reinforce_pp):
    a group of one has no baseline, its centred reward is 0, so every advantage is 0 and nothing is
    learnt (``advantage=none`` uses the raw reward).
``eval_size_clipped``
    ``eval_size`` larger than the task's held-out set: the evaluation uses the whole held-out set,
    which is smaller than asked (the message says how many examples are used).

The objective checked is the config's (a live knob may change it later).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.steps.reweight import OBJECTIVES
from workbench.steps.reweight.core import default_aggregation
from workbench.steps.score import ADVANTAGES
from workbench.tasks import make_task

M2PO_STABLE_TAU = (0.02, 0.12)
_MEAN_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "lite_ppo", "reinforce_pp")
"""Estimators that centre each reward on its group (a registry entry may say so with ``group_relative``)."""
HUGE_COEF = 1e3  # a kl_coef / entropy_coef above this is named as the likely cause of non-finite updates


@dataclass(frozen=True)
class LintWarning:
    """One finding: ``code`` (stable id), ``message`` (one line), ``field`` (config field to change)."""

    code: str
    message: str
    field: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.field}: {self.message}"


Warning = LintWarning  # noqa: A001  (short alias; prefer LintWarning)

CODES: tuple[str, ...] = (
    "clip_inert", "double_correction", "stale_ignored", "batch_dependent_aggregation", "m2po_tau_range",
    "truncated_support", "decoupled_without_correction", "lag_exceeds_steps", "no_group_baseline",
    "eval_size_clipped", "reward_stricter_than_verify",
)


def ignores_behavior(objective: str) -> bool:
    """True if the objective's gradient never looks at pi/mu (metadata ``ignores_behavior``)."""
    return bool(OBJECTIVES.meta(objective).get("ignores_behavior", False))


def offpolicy_sources(cfg: RunConfig) -> list[tuple[str, str]]:
    """(field, reason) for everything that makes the sampled data differ from pi_theta."""
    out = []
    if cfg.staleness > 0:
        out.append(("staleness", f"staleness={cfg.staleness}"))
    if cfg.sync_every > 1:
        out.append(("sync_every", f"sync_every={cfg.sync_every}"))
    if cfg.updates_per_batch > 1:
        out.append(("updates_per_batch", f"updates_per_batch={cfg.updates_per_batch}"))
    if cfg.num_minibatches > 1:
        out.append(("num_minibatches", f"num_minibatches={cfg.num_minibatches}"))
    if cfg.top_p < 1.0 and not cfg.replay_sampling_mask:  # replayed: the trainer scores the same kept sets
        out.append(("top_p", f"top_p={cfg.top_p}"))
    if cfg.top_k > 0 and not cfg.replay_sampling_mask:
        out.append(("top_k", f"top_k={cfg.top_k}"))
    if cfg.sampler != "transformers":  # another engine's kernels: a measured sampler-trainer mismatch
        out.append(("sampler", f"sampler={cfg.sampler}"))
    if cfg.staleness_mode == "async":  # the simulated pipeline's lag (steps/async_pipeline.py)
        out.append(("staleness_mode", "staleness_mode=async"))
    for name in ("sampler_logits_dtype", "trainer_logits_dtype", "sampler_logit_noise", "trainer_logit_noise"):
        if getattr(cfg, name):  # injected numerics (policy/numerics.py): a sampler-trainer mismatch by design
            out.append((name, f"{name}={getattr(cfg, name)}"))
    return out


# What the user chooses when the clip is meant to act; all at the defaults = the on-policy reference.
_REFERENCE_FIELDS = ("objective", "objective_params", "correction", "correction_params", "proximal")


def is_on_policy_reference(cfg: RunConfig) -> bool:
    """True for the default objective left on-policy: nothing the clip would need was chosen.

    That run is the on-policy reference (ratio 1 by design), so it gets a note, not a warning. A
    config that equals the default is the default whatever flags produced it."""
    if offpolicy_sources(cfg):
        return False
    default = RunConfig()  # validated: objective_params holds the registry defaults, as in ``cfg``
    return all(getattr(cfg, n) == getattr(default, n) for n in _REFERENCE_FIELDS)


def notes(config: RunConfig) -> list[str]:
    """Informative one-line notes: what the config does that is deliberate (empty list = none)."""
    if not is_on_policy_reference(config):
        return []
    obj = config.objective
    effect = ("trains as REINFORCE" if OBJECTIVES.meta(obj).get("reduces_to_reinforce")
              else "its clipping never acts")
    return [f"on-policy run (staleness 0): the ratio is 1, so {obj} {effect}; try --staleness 16 to see "
            f"clipping act"]


def lint(config: RunConfig) -> list[LintWarning]:
    """Every warning for ``config`` (empty list = nothing suspicious), in ``CODES`` order."""
    cfg = config
    obj = cfg.objective
    meta = OBJECTIVES.meta(obj)
    corr = cfg.correction_spec()
    weighted = corr is not None and corr.weighted
    sources = offpolicy_sources(cfg)
    agg = cfg.aggregation or default_aggregation(obj)
    out: list[LintWarning] = []

    def warn(code: str, field: str, message: str) -> None:
        out.append(LintWarning(code, " ".join(message.split()), field))

    # clip_inert ---------------------------------------------------------------------------------
    if not ignores_behavior(obj):
        tail = " (it trains as REINFORCE)" if meta.get("reduces_to_reinforce") else ""
        if cfg.proximal == "reuse_train_logp":  # one update per batch by validation
            warn("clip_inert", "proximal",
                 f"proximal=reuse_train_logp anchors the ratio at this update's own training forward: "
                 f"pi_theta/pi_prox is identically 1 and {obj}'s clipping/masking never acts{tail}; the only "
                 f"trust region left is the correction's cap on pi_prox/mu (use proximal=recompute with "
                 f"updates_per_batch or num_minibatches > 1 for the clip to act)")
        elif cfg.proximal == "recompute" and cfg.updates_per_batch * cfg.num_minibatches == 1:
            warn("clip_inert", "proximal",
                 f"proximal=recompute anchors the ratio at the policy at the start of the batch, and with one "
                 f"update per batch that is the policy being updated: pi_theta/pi_prox is identically 1 and "
                 f"{obj}'s clipping/masking never acts{tail}; the only trust region left is the correction's "
                 f"cap on pi_prox/mu (use updates_per_batch or num_minibatches > 1 for the clip to act)")
        elif not sources and not is_on_policy_reference(cfg):
            warn("clip_inert", "staleness",
                 f"nothing makes pi_theta differ from the behaviour policy (staleness 0, sync_every 1, one "
                 f"update per batch, full-support sampling): the ratio is identically 1, so {obj}'s "
                 f"clipping/masking/IS weighting never acts{tail} (TRL #3120, SkyRL #1315)")

    # double_correction ---------------------------------------------------------------------------
    if weighted and cfg.proximal == "none" and not ignores_behavior(obj):
        warn("double_correction", "correction",
             f"bypass mode: {obj}'s ratio is already pi_theta/mu, and correction={cfg.correction} multiplies "
             f"the loss by another {corr.weight} TIS weight min(pi_theta/mu, {corr.cap:g}) (~ rho^2); use a "
             f"rejection-only correction (geo_rs, k3_rs), objective=reinforce, or a proximal policy (proximal=recompute, ...)")
    if weighted and cfg.proximal != "none" and meta.get("behavior_weighted", False):
        warn("double_correction", "correction",
             f"{obj} already weights each token by pi/mu from the behaviour log-probs, and the decoupled "
             f"correction multiplies by pi_prox/mu again")

    # stale_ignored -------------------------------------------------------------------------------
    if sources and ignores_behavior(obj) and not weighted:
        field, reason = sources[0]
        warn("stale_ignored", "objective",
             f"{reason} makes the data off-policy but {obj} ignores the behaviour policy: the gradient is "
             f"REINFORCE's on another policy's samples, uncorrected; use an importance-weighted objective "
             f"or a weighting correction (token_tis, seq_tis)")

    # batch_dependent_aggregation -----------------------------------------------------------------
    if agg == "seq-mean-token-sum-norm" and not cfg.loss_scale_factor:
        warn("batch_dependent_aggregation", "loss_scale_factor",
             "seq-mean-token-sum-norm with loss_scale_factor=0 divides by the batch's longest response, so "
             "the loss scale changes with batch composition; set a constant (e.g. the generation budget), "
             "Dr. GRPO's intent (verl #3741)")
    if cfg.advantage == "dr_grpo" and agg != "seq-mean-token-sum-norm":
        why = ("divides each response by its own length, reintroducing the length bias Dr. GRPO removes"
               if agg == "seq-mean-token-mean" else
               "divides by a count that changes with the batch, so the per-token scale is not the constant "
               "Dr. GRPO assumes")
        warn("batch_dependent_aggregation", "aggregation",
             f"advantage=dr_grpo with aggregation={agg} {why} (the Dr. GRPO caveat: docs/design.md, \"Aggregation\"); use "
             f"seq-mean-token-sum-norm with a fixed loss_scale_factor")
    if agg in _MEAN_AGGREGATIONS and (cfg.filter_zero_variance or cfg.max_staleness >= 0):
        field = "filter_zero_variance" if cfg.filter_zero_variance else "max_staleness"
        unit = "tokens" if agg == "token-mean" else "sequences"
        warn("batch_dependent_aggregation", field,
             f"{agg} with {field} normalises by the {unit} that survive filtering, so each sample's weight "
             f"changes with how many were dropped this step; use seq-mean-token-sum-norm with a fixed "
             f"loss_scale_factor for a constant scale")

    # m2po_tau_range -------------------------------------------------------------------------------
    if obj == "m2po":
        tau = cfg.objective_params.get("tau")
        lo, hi = M2PO_STABLE_TAU
        if tau is not None and not lo <= tau <= hi:
            warn("m2po_tau_range", "objective_params",
                 f"m2po tau={tau:g} is outside [{lo:g}, {hi:g}], the range the M2PO paper found stable "
                 f"(arXiv:2510.01161, Fig. 8)")

    # truncated_support ---------------------------------------------------------------------------
    if corr is None and (cfg.top_p < 1.0 or cfg.top_k > 0) and not cfg.replay_sampling_mask:
        field = "top_p" if cfg.top_p < 1.0 else "top_k"
        warn("truncated_support", field,
             f"{field}={getattr(cfg, field)} samples from a truncated, renormalised distribution: mu >= pi_theta "
             f"on every sampled token, so the ratio is biased below 1 by the kept mass (verl #6240, TRL #6789 / "
             f"#7269); set replay_sampling_mask=true (the trainer renormalises over the sampler's kept sets), add a "
             f"correction (token_tis, icepop) or sample with full support")

    # decoupled_without_correction -----------------------------------------------------------------
    if cfg.proximal != "none" and corr is None:
        warn("decoupled_without_correction", "correction",
             f"proximal={cfg.proximal} anchors the ratio at pi_prox but no correction weights pi_prox/mu: the "
             f"behaviour mismatch is dropped (as with AReaL's default rejection_sampling=None, which warns); "
             f"use correction=areal (AReaL's rejection_sampling upper=5.0: the weight, tokens above 5 masked)")

    # lag_exceeds_steps -----------------------------------------------------------------------------
    units = cfg.updates_per_batch * cfg.num_minibatches  # the buffer counts batches of `units` updates
    batches = cfg.staleness // units + max(1, cfg.sync_every // units)  # generated by the first sync
    if (cfg.staleness > 0 or cfg.sync_every > 1) and batches * units >= cfg.steps:
        field = "staleness" if cfg.staleness >= cfg.sync_every else "sync_every"
        unused = batches - -(-cfg.steps // units)
        tail = f" and {unused} of them are never used" if unused > 0 else ""
        warn("lag_exceeds_steps", field,
             f"staleness={cfg.staleness}, sync_every={cfg.sync_every}: the first sync generates {batches} "
             f"batches ({batches * units} updates' worth) with the initial weights before update 0, and the run "
             f"has steps={cfg.steps}, so every update trains on theta_0's data{tail}; lower {field} below steps "
             f"or run longer")

    # no_group_baseline -----------------------------------------------------------------------------
    if cfg.group_size == 1 and group_relative(cfg.advantage):
        warn("no_group_baseline", "group_size",
             f"group_size=1 with advantage={cfg.advantage}: a group of one is its own baseline, so every "
             f"advantage is 0 and no update changes the policy; use group_size >= 2, or advantage=none")

    # eval_size_clipped -----------------------------------------------------------------------------
    held = heldout_size(cfg)
    if held is not None and cfg.eval_size > held:
        warn("eval_size_clipped", "eval_size",
             f"eval_size={cfg.eval_size} is larger than the {cfg.task} held-out set: every evaluation uses "
             f"its {held} examples; set eval_size <= {held} (or a larger heldout_size in task_params)")

    # reward_stricter_than_verify --------------------------------------------------------------------
    if cfg.task == "scratchpad" and not any((r[0] if isinstance(r, (tuple, list)) else r) == "final_answer"
                                            for r in cfg.rewards):
        warn("reward_stricter_than_verify", "rewards",
             "the scratchpad task's held-out accuracy grades only the final answer after '>', but these rewards "
             "do not (exact_match grades the whole scratchpad); use rewards final_answer=1 to reward what is "
             "evaluated")

    order = {c: i for i, c in enumerate(CODES)}
    return sorted(out, key=lambda w: order[w.code])


def group_relative(advantage: str) -> bool:
    """True if the estimator centres each reward on its group (so a group of one gets advantage 0)."""
    return bool(ADVANTAGES.meta(advantage).get("group_relative", advantage in GROUP_ADVANTAGES))


def heldout_size(cfg: RunConfig) -> int | None:
    """Examples in the task's held-out set, or None when the task cannot be built here (its own
    error comes when the run starts)."""
    try:
        return len(make_task(cfg.task, **cfg.task_params).heldout)
    except (WorkbenchError, OSError, TypeError, ValueError):
        return None


def nonfinite_message(cfg: RunConfig, knobs: Any, row: dict[str, Any], streak: int) -> str:
    """One line for the loop when ``streak`` updates in a row were skipped for a non-finite gradient
    norm (no step applied, so nothing changes and the run would go on skipping): the likely cause."""
    loss = row.get("loss/total", float("nan"))
    huge = [f"{name}={getattr(cfg, name):g}" for name in ("kl_coef", "entropy_coef") if getattr(cfg, name) > HUGE_COEF]
    if huge:
        cause = f"{' and '.join(huge)}: its term's gradient overflows float range; use a coefficient <= 1"
    elif not math.isfinite(loss):
        cause = ("the loss itself is not finite: check the rewards, the advantages and objective_params "
                 "(a NaN reward or an extreme parameter)")
    elif knobs.lr >= 1e-2:
        cause = f"lr={knobs.lr:g} makes the weights diverge; lower it (2e-4 is the measured default)"
    else:
        cause = "the gradient overflows: lower lr, kl_coef or entropy_coef"
    return (f"updates {row['update'] - streak + 1}..{row['update']} were all skipped because the gradient norm "
            f"was not finite (loss/total={loss:g}): no step was applied, so the run stopped; likely cause: {cause}")


__all__ = ["CODES", "GROUP_ADVANTAGES", "LintWarning", "M2PO_STABLE_TAU", "Warning", "group_relative", "heldout_size",
           "ignores_behavior", "is_on_policy_reference", "lint", "nonfinite_message", "notes", "offpolicy_sources"]
