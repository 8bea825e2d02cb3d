"""reweight: the policy-loss step (ratio / clip / mask = the objective) of the workbench loop.

    from workbench.steps.reweight import policy_loss, OBJECTIVES
    loss, metrics = policy_loss("ppo_clip", logprobs, behavior_logprobs, advantages, response_mask,
                                aggregation="token-mean", clip_high=0.28)

``OBJECTIVES`` is the registry of objectives (names, papers, ``Param`` lists, presets, default
aggregation); ``register_objective`` adds one; ``aggregate`` / ``AGGREGATIONS`` are the shared loss
reductions (docs/design.md, "Aggregation"); ``validate_params`` / ``objective_defaults`` serve the
config layer. See ``loss`` and ``inputs`` for the contract
(docs/design.md, "The reweight contract"), ``core`` for the registry, ``diagnostics`` for the
shared metrics, ``objectives`` for the catalogue and papers, ``corrections`` for TIS / MIS /
Geo-RS / k1-k3 rejection on top of any objective (bypass or decoupled,
``policy_loss(..., correction=...)``) and ``curves`` for each objective's gradient weight as a
function of the ratio (``weight_curve``).
"""

from __future__ import annotations

from workbench.steps.reweight.aggregate import AGGREGATIONS, aggregate
from workbench.steps.reweight.core import (OBJECTIVES, Objective, Param, default_aggregation, objective_defaults,
                                           objective_needs, register_objective, resolve_objective, validate_params)
from workbench.steps.reweight.inputs import LossInputs, LossOutput, make_inputs
from workbench.steps.reweight.loss import policy_loss
from workbench.steps.reweight.objectives import clipped_surrogate, m2po_mask, truncated_is_weight
from workbench.steps.reweight import peer_rules  # noqa: F401  (registers dppo_tv, dppo_kl, opsm, vespo, topr_token)
from workbench.steps.reweight import preference  # noqa: F401  (registers the preference objectives)
from workbench.steps.reweight import seed_rules  # noqa: F401  (registers bpo, humanline, hapo)
from workbench.steps.reweight.corrections import PRESETS as CORRECTION_PRESETS, Correction, loglinear_proximal, make_correction
from workbench.steps.reweight.curves import curve_frame, weight_curve, weight_curves

__all__ = [
    "CORRECTION_PRESETS", "Correction", "curve_frame", "loglinear_proximal", "make_correction", "weight_curve",
    "weight_curves",
    "AGGREGATIONS", "LossInputs", "LossOutput", "OBJECTIVES", "Objective", "Param", "default_aggregation",
    "objective_needs", "resolve_objective", "aggregate", "clipped_surrogate",
    "m2po_mask", "make_inputs", "objective_defaults", "policy_loss", "register_objective",
    "truncated_is_weight", "validate_params",
]
