"""``policy_loss``: the one entry point of the reweight step (docs/design.md, "The reweight contract").

``policy_loss(objective, logprobs, behavior_logprobs, advantages, response_mask, ...)``

1. resolves the objective (a name is looked up in ``OBJECTIVES``, its parameters filled and
   checked; an ``Objective`` from ``resolve_objective`` is used as it is),
2. checks the context keys the objective needs (``context.CONTEXT_KEYS``),
3. validates the tensors and builds the sanitised ``LossInputs`` (``inputs.make_inputs``),
4. calls the objective (one plain function ``fn(inp, **params) -> LossOutput``),
5. applies the behaviour correction, if any (``corrections``: TIS / MIS / Geo-RS / k1-k3
   rejection, bypass or decoupled),
6. reduces the per-token loss with the shared ``aggregate`` (docs/design.md, "Aggregation") over
   the response mask, or over the tokens the correction kept (``Correction.denominator="kept"``), and
7. computes the shared diagnostics (``diagnostics``) without building a graph: ratio statistics of
   the objective's ratio and of the raw pi_theta / mu, and the fraction of tokens the correction changed.

Every objective also reports ``offpolicy/clipfrac`` and ``offpolicy/masked_frac`` (0.0 if it
neither clips nor masks). An objective may return ``LossOutput.extra_loss``, a scalar added after
aggregation (CHORD's SFT term on the expert batch).

Left out (other steps): entropy, gradient norm, staleness, sampler-vs-trainer mismatch.
"""

from __future__ import annotations

from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.aggregate import aggregate, check_aggregation
from workbench.steps.reweight.context import CONTEXT_KEYS
from workbench.steps.reweight.core import Objective, resolve_objective
from workbench.steps.reweight.corrections import apply_correction, make_correction
from workbench.steps.reweight.diagnostics import diagnostics, to_floats
from workbench.steps.reweight.inputs import make_inputs


def policy_loss(
    objective: str | Objective,
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: str = "token-mean",
    loss_scale_factor: float | None = None,
    prox_logprobs: torch.Tensor | None = None,
    context: dict[str, Any] | None = None,
    correction: Any = None,
    **params: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss of ``objective`` on one batch -> (scalar loss for backward(), metrics).

    ``objective`` is a registry name (``params`` are then its parameters: defaults filled, unknown
    or out-of-range values rejected) or an ``Objective`` from ``resolve_objective`` (its own
    parameters; ``params`` must be empty). Shapes: logprobs, behavior_logprobs, response_mask (and
    prox_logprobs) [B, T]; advantages [B] or [B, T]. ``aggregation`` is one of ``AGGREGATIONS``
    (token-mean unless given; ``Objective.default_aggregation`` is the paper's own, e.g. GSPO's
    seq-mean-token-mean); ``loss_scale_factor`` is the normaliser of ``seq-mean-token-sum-norm``
    (default T; ignored by the other modes). ``prox_logprobs``, when given, replaces behaviour as
    the anchor of the ratio. ``context`` holds what some objectives need beyond the tensors
    (``Objective.needs``; ``context.CONTEXT_KEYS``); a missing key raises. ``correction`` (None, a
    ``corrections.Correction``, a preset name or a dict of its fields) reweights / rejects tokens
    after the objective: bypass mode without ``prox_logprobs``, decoupled with them. Raises
    WorkbenchError (one line) on any bad input.
    """
    if isinstance(objective, Objective):
        if params:
            raise WorkbenchError(f"policy_loss: objective {objective.name!r} is already resolved with its "
                                 f"parameters; got extra parameters {sorted(params)}")
        obj = objective
    else:
        obj = resolve_objective(objective, params)
    check_aggregation(aggregation)
    corr = make_correction(correction)
    context = {} if context is None else context
    if not isinstance(context, dict):
        raise WorkbenchError(f"policy_loss: context must be a dict or None, got {type(context).__name__}")
    for key in obj.needs:
        if context.get(key) is None:
            raise WorkbenchError(
                f"objective {obj.name!r} needs context[{key!r}] ({CONTEXT_KEYS.get(key, 'see its docstring')}): "
                f"pass policy_loss(..., context={{{key!r}: ...}})")
    inp = make_inputs(logprobs, behavior_logprobs, advantages, response_mask, prox_logprobs)
    inp.context = context
    result = obj(inp)
    per_token = result.per_token_loss  # [B, T]
    if tuple(per_token.shape) != tuple(inp.mask.shape):
        raise WorkbenchError(
            f"objective {obj.name!r} returned per_token_loss of shape {tuple(per_token.shape)}, "
            f"expected {tuple(inp.mask.shape)}"
        )
    corr_metrics: dict[str, Any] = {}
    agg_mask, changed = inp.mask, None  # [B, T]
    if corr is not None:  # keep * w * L, normalised by every valid token or by the kept ones
        corrected = apply_correction(corr, inp, behavior_logprobs, per_token, prox_logprobs is not None)
        per_token, agg_mask, changed = corrected.per_token_loss, corrected.mask, corrected.changed
        corr_metrics = corrected.metrics
    loss = aggregate(per_token, agg_mask, aggregation, loss_scale_factor)
    if result.extra_loss is not None:
        loss = loss + result.extra_loss
    with torch.no_grad():
        metrics: dict[str, Any] = {"loss/policy": loss.detach()}
        metrics.update(diagnostics(inp, per_token, behavior_logprobs=behavior_logprobs, changed=changed))
        metrics.setdefault("offpolicy/clipfrac", 0.0)
        metrics.setdefault("offpolicy/masked_frac", 0.0)
        metrics.update(result.metrics)
        metrics.update(corr_metrics)
        return loss, to_floats(metrics)


def logprob_gradient(objective: str | Objective, logprobs: torch.Tensor, behavior_logprobs: torch.Tensor,
                     advantages: torch.Tensor, response_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """dL/dlogp of ``policy_loss`` at every token, by autograd, with no graph into ``logprobs``.

    The same definition for every objective (the replay study's silenced tokens and the per-token
    view's weights): 0 where a token gets no gradient. ``kwargs`` as for ``policy_loss``. [B, T]
    """
    leaf = logprobs.detach().clone().requires_grad_(True)  # [B, T]
    loss, _ = policy_loss(objective, leaf, behavior_logprobs, advantages, response_mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if grad is None else grad.detach()  # [B, T]


__all__ = ["logprob_gradient", "policy_loss"]
