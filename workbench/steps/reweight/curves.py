"""Weight curves: each objective's effective per-token gradient weight as a function of the ratio.

Every objective's gradient with respect to a token's log-prob can be written
``d loss / d logp = -w(r, A) * A``: ``w`` is the weight the token receives relative to plain
REINFORCE (``reinforce`` has w = 1, ``is`` has w = r, ``ppo_clip`` has w = r inside the band and 0
where clipped, ``cispo`` has w = clip(r) ...). ``weight_curve`` computes w for a grid of ratios,
for one advantage sign, through autograd on the *real* registered objective, so a curve can never
drift from the code it describes and every objective registered later has one for free:

    r = torch.linspace(0.05, 3.0, 300)
    w_pos = weight_curve("ppo_clip", r, +1, clip_high=0.28)
    w_neg = weight_curve("ppo_clip", r, -1)

How (the generic path): the ratios become a batch of one-token responses with behaviour log-prob
``behavior_logprob`` and current log-prob ``behavior_logprob + log r`` (a leaf requiring grad),
advantage ``advantage_sign * advantage_scale``, and the objective is evaluated through
``policy_loss`` with the sum aggregation (``seq-mean-token-sum-norm`` with factor 1, so the scalar
is the plain sum of the per-token losses). Then w = -grad / A.

- Sequence-level objectives (``gspo``, ``geo_mean``, ``topr``'s sequence ratio, ...) are exact for
  length-1 responses: the sequence ratio *is* the token ratio, so the curve is the weight of a
  response as a function of its (geometric-mean / product) sequence ratio. For a response of
  length L the per-token gradient additionally carries the aggregation's 1/L factors.
- By default each ratio is evaluated in its own batch of one token (``batched=False``), so
  objectives with batch-level statistics (M2PO's second-moment mask, adaptive bounds, covariance
  selection) give the weight a token would get *alone*. For M2PO that is: masked iff the token is
  in the trust region (A > 0 and r > 1, or A < 0 and r < 1) and (log r)^2 > tau. ``batched=True``
  evaluates all ratios in one batch (faster; identical for row-separable objectives, and for the
  others it is the weight *inside that batch*).
- Objectives whose loss depends on the probability itself (not only on r) depend on
  ``behavior_logprob`` (default log 0.05, so ratios up to 20 stay valid probabilities).
- Objectives that need a ``context`` get a default one: rewards = A, step 0, a fresh state,
  reference = behaviour, one expert token; objectives that need ``group_id`` see each point in a
  two-sample group with an on-policy partner (ratio 1, advantage and reward -A), so group
  statistics (GBPO's median, TB's log Z) are not degenerate. Pass ``context=`` to choose another.
- An objective that the generic path cannot express registers an exact curve with
  ``register_weight_curve(name)``; none needs one today.

``weight_curves(name, ratios)`` returns both signs; ``curve_frame(names, ratios)`` is a long
polars DataFrame (objective, advantage_sign, ratio, weight) ready for an Altair chart.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.core import OBJECTIVES, objective_needs
from workbench.steps.reweight.loss import policy_loss

CurveFn = Callable[..., torch.Tensor]
"""``fn(ratios [N] float64, advantage_sign, **params) -> weights [N]``."""

_CURVES: dict[str, CurveFn] = {}

DEFAULT_BEHAVIOR_LOGPROB = math.log(0.05)


def register_weight_curve(name: str) -> Callable[[CurveFn], CurveFn]:
    """Decorator: an exact curve for objective ``name``, used instead of the autograd path."""

    def deco(fn: CurveFn) -> CurveFn:
        if name in _CURVES:
            raise WorkbenchError(f"weight curve {name!r} is already registered")
        _CURVES[name] = fn
        return fn

    return deco


def _check(name: str, ratios: Any, advantage_sign: Any, advantage_scale: Any) -> torch.Tensor:
    OBJECTIVES.entry(name)  # unknown name -> one-line error listing the valid ones
    if not isinstance(ratios, torch.Tensor):
        ratios = torch.as_tensor(ratios, dtype=torch.float64)
    if ratios.dim() != 1 or ratios.numel() == 0:
        raise WorkbenchError(f"ratios must be a non-empty 1-D tensor, got shape {tuple(ratios.shape)}")
    r = ratios.detach().to(torch.float64)  # [N]
    if not bool((torch.isfinite(r) & (r > 0)).all()):
        raise WorkbenchError("ratios must be finite and > 0 (log r is taken)")
    if advantage_sign not in (1, -1) or isinstance(advantage_sign, bool):
        raise WorkbenchError(f"advantage_sign={advantage_sign!r} is invalid: expected +1 or -1")
    if isinstance(advantage_scale, bool) or not (isinstance(advantage_scale, (int, float))
                                                 and math.isfinite(advantage_scale) and advantage_scale > 0):
        raise WorkbenchError(f"advantage_scale={advantage_scale!r} is invalid: expected a number > 0")
    return r


def _default_context(name: str, params: dict[str, Any], n: int, adv: torch.Tensor, beh: torch.Tensor,
                     given: dict[str, Any] | None) -> dict[str, Any] | None:
    """The context an objective needs for the rows built by ``_autograd_weight``; ``given`` keys win.

    Defaults: ``group_id`` pairs row i with its partner n + i (see ``_autograd_weight``),
    ``rewards`` = the rows' advantages, ``step`` 0, a fresh ``state`` dict (a stateful objective
    starts from its initial state at every point of the curve), the reference policy = the
    behaviour policy, and one expert token.
    """
    needs = objective_needs(name, params)
    if not needs and not given:
        return None
    rows = beh.shape[0]
    ctx: dict[str, Any] = {}
    for key in needs:
        if key == "group_id":
            ctx[key] = torch.arange(rows, device=beh.device) % n
        elif key == "rewards":
            ctx[key] = adv.clone()
        elif key == "step":
            ctx[key] = 0
        elif key == "state":
            ctx[key] = {}
        elif key == "ref_logprobs":
            ctx[key] = beh.clone()
        elif key == "expert_logprobs":
            ctx[key] = torch.full((1, 1), float(beh[0, 0]), dtype=torch.float64, device=beh.device,
                                  requires_grad=True)
        elif key == "expert_mask":
            ctx[key] = beh.new_ones(1, 1)
    ctx.update(given or {})
    return ctx


def _autograd_weight(name: str, r: torch.Tensor, adv: float, behavior_logprob: float,
                     params: dict[str, Any], context: dict[str, Any] | None = None) -> torch.Tensor:
    """-grad/A of the summed per-token loss of ``name`` on one-token rows at ratios ``r [N]``.

    Objectives that need ``group_id`` get a partner row per point (ratio 1, advantage and reward
    -A, same group), so group statistics are not degenerate; only the point's gradient is read.
    """
    n = r.numel()
    partner = "group_id" in objective_needs(name, params)
    ratios = torch.cat([r, r.new_ones(n)]) if partner else r  # [R]
    ones = torch.ones(n, device=r.device)  # [N]
    signs = torch.cat([ones, -ones]) if partner else ones  # [R]
    rows = ratios.numel()
    beh = r.new_full((rows, 1), float(behavior_logprob))  # [R, 1]
    lp = (beh + torch.log(ratios)[:, None]).requires_grad_()  # [R, 1]
    advantages = adv * signs.to(torch.float64)  # [R]
    mask = r.new_ones(rows, 1)  # [R, 1]
    ctx = _default_context(name, params, n, advantages, beh, context)
    loss, _ = policy_loss(name, lp, beh, advantages, mask, aggregation="seq-mean-token-sum-norm",
                          loss_scale_factor=1.0, context=ctx, **params)
    grad = torch.autograd.grad(loss, lp, allow_unused=True)[0] if loss.requires_grad else None
    if grad is None:  # the loss does not depend on logp at all (weight 0 everywhere)
        return r.new_zeros(n)
    return -grad[:n, 0] / adv + 0.0  # [N]; + 0.0 turns -0.0 into 0.0


def weight_curve(
    name: str,
    ratios: torch.Tensor,
    advantage_sign: int,
    *,
    advantage_scale: float = 1.0,
    behavior_logprob: float = DEFAULT_BEHAVIOR_LOGPROB,
    batched: bool = False,
    context: dict[str, Any] | None = None,
    **params: Any,
) -> torch.Tensor:
    """Effective per-token gradient weight w(r) of objective ``name``: d loss/d logp = -w A.

    ``ratios [N]`` (> 0), ``advantage_sign`` +1 or -1 (A = sign * advantage_scale), ``params``
    the objective's parameters (defaults filled, validated as in ``policy_loss``). Returns a
    float64 tensor [N]. See the module docstring for what the curve means for sequence-level and
    batch-statistic objectives. ``context`` overrides keys of the default ``policy_loss``
    context built for objectives that need one (``_default_context``).
    """
    r = _check(name, ratios, advantage_sign, advantage_scale)
    if name in _CURVES:
        return _CURVES[name](r, advantage_sign, **params).to(torch.float64)
    adv = float(advantage_sign) * float(advantage_scale)
    with torch.enable_grad():
        if batched:
            return _autograd_weight(name, r, adv, behavior_logprob, params, context)
        return torch.cat([_autograd_weight(name, r[i:i + 1], adv, behavior_logprob, params, context)
                          for i in range(r.numel())])


def weight_curves(name: str, ratios: torch.Tensor, **kw: Any) -> dict[int, torch.Tensor]:
    """``{+1: w(r | A > 0), -1: w(r | A < 0)}`` (same keywords as ``weight_curve``)."""
    return {s: weight_curve(name, ratios, s, **kw) for s in (1, -1)}


def curve_frame(names: Iterable[str] | None = None, ratios: torch.Tensor | None = None,
                params: dict[str, dict[str, Any]] | None = None, **kw: Any):
    """Long polars DataFrame (objective, advantage_sign, ratio, weight) for plotting.

    ``names`` default to every registered objective, ``ratios`` to 200 points in [0.05, 3];
    ``params`` maps objective name -> its parameters.
    """
    import polars as pl

    names = list(OBJECTIVES.names() if names is None else names)
    r = torch.linspace(0.05, 3.0, 200, dtype=torch.float64) if ratios is None else ratios
    rows: dict[str, list] = {"objective": [], "advantage_sign": [], "ratio": [], "weight": []}
    for name in names:
        for sign, w in weight_curves(name, r, **kw, **(params or {}).get(name, {})).items():
            rows["objective"] += [name] * len(w)
            rows["advantage_sign"] += [sign] * len(w)
            rows["ratio"] += torch.as_tensor(r, dtype=torch.float64).tolist()
            rows["weight"] += w.tolist()
    return pl.DataFrame(rows)


__all__ = ["DEFAULT_BEHAVIOR_LOGPROB", "curve_frame", "register_weight_curve", "weight_curve", "weight_curves"]
