"""Objectives whose constraint adapts every update: BAPO's bounds and R2VPO's dual variable.

``bapo`` (Xi et al. 2025, BAPO: Balanced Policy Optimization with Adaptive Clipping,
arXiv:2510.18927). PPO-clip with explicit ratio bounds [c_low, c_high] and
dual-clip c (the released code applies it), the bounds re-chosen at every call so that the share
of the loss that comes from positive tokens reaches rho0: rho = pos / (pos + neg) with token
contributions (w_t a token weight, below)

    ``contribution="gradient"`` (default): the tokens whose gradient survives the bounds,
        pos(c_high) = sum_{A>0, r <= c_high} w r A,   neg(c_low) = sum_{A<0, c_low <= r <= c} w r |A|
    ``contribution="value"`` (released code; the summary's |min(rA, clip(r, c_low, c_high) A)|):
        pos(c_high) = sum_{A>0} w min(r, c_high) A,   neg(c_low) = sum_{A<0} w max(r, c_low) |A|

Why two: with "value" a clipped token still counts at its constant loss value, so raising c_low
*increases* neg and can only lower rho; the code's lower-bound phase then runs to b- whenever the
target is unmet. The paper's account ("raising c_low excludes low-probability negative tokens from
the gradient"; the Entropy-Clip Rule counts unclipped tokens only) needs "gradient", where both
raises increase rho.

Search: start at (c_low, c_high) = (a-, a+); ``order="high_first"`` (paper) raises c_high by
``step_high`` up to b+ while rho < rho0, then c_low by ``step_low`` up to b-; ``order="low_first"``
(released code, ``recipe/bapo/policy_loss.py``) raises c_low first. Each raise is
c = min(c + step, max); the search stops at the first bounds with rho >= rho0 (or when both are at
their maxima). rho is undefined when pos + neg = 0 (no non-zero advantage): no search.

Choices where the sources (paper, README, released code, summaries) disagree, all parameters:
- ``rho0`` = 0.5 (README; a summary says 0.4). The released code compares pos/neg with a target t
  (default 1.0, example 0.5): pos/neg >= t is rho >= t / (1 + t), so t = 1 is rho0 = 0.5.
- ``order``: default "high_first" (paper), "low_first" (code).
- ``contribution``: default "gradient" (the paper's account), "value" (the code), see above.
- ``weighting``: "none" (default, the code) or "behavior_prob": each token weighted by the
  sampler's probability pi_rollout(y_t) = exp(anchor log-prob) (the paper's statistic as reported by
  a summary, not confirmed in the PDF). With ``prox_logprobs`` the anchor is the proximal policy.
- steps: ``step_high`` = 0.05, ``step_low`` = 0.02 (paper, per summary; the code uses 0.05 for both).
- ranges [a-, b-] = [0.6, 0.9], [a+, b+] = [1.2, 3.0] (README).

Loss: L_t = -min(r A, clip(r, c_low, c_high) A), and for A < 0 additionally min(., -c A) (dual-clip,
c = ``clip_c`` = 3 as in the code). Gradient w.r.t. logp: -r A, 0 where clipped. On-policy
(r = 1, inside [c_low, c_high]) it is REINFORCE.
Metrics: ``bapo/clip_low``, ``bapo/clip_high``, ``bapo/pos_share`` (rho at the chosen bounds, NaN if
undefined), ``bapo/target_met`` (1 if rho >= rho0), and the clip fractions of ``dual_clip``.

``r2vpo`` (Luo et al. 2026, Ratio-Variance Regularized Policy Optimization, arXiv:2601.03320).
Replace hard clipping by a penalty on the spread of the ratio:

- ``variant="dual"`` (the paper's primal-dual idea; exact form not published, our reading):
  max E[r A] - lambda (V(r) - delta) with V the penalised moment and dual ascent
  lambda <- clip(lambda + dual_lr (V_hat - delta), 0, lam_max) after every call. Per token
  L_t = -r_t A_t + lambda (r_t - sg[m])^2 with m = the token-mean ratio over valid tokens
  (``moment="variance"``: with token-mean aggregation the penalty is exactly lambda Var(r) in value
  and gradient, since sum_t (r_t - m) = 0) or m = 1 (``moment="second_moment"``: E[(r - 1)^2]).
  The loss uses lambda before the update; the new lambda is stored in ``context["state"]`` under
  ``"r2vpo/lambda"`` (initialised from ``lam``), so the loop carries it across updates and
  checkpoints. Token level (the sequence-level option of the paper is not pinned either).
- ``variant="fixed"`` (third-party reimplementations): L_t = -(r A - lambda (r - 1)^2),
  lambda = ``lam`` = 0.04. No state.

Gradient w.r.t. logp: -r A + 2 lambda r (r - m). On-policy (r = 1 = m) it is REINFORCE.
Safety cap (ours, like the +-20 log-ratio clamp): the penalty and its statistic use min(r, ratio_cap)
(ratio_cap = 100): beyond it a token's penalty is flat. Without it one clamped outlier (r = e^20)
drags m and the variance to ~1e8 and every other token's penalty gradient to ~1e8 r (inf in fp16).
Set ratio_cap = 5e8 to disable. Unpinned defaults (ours): delta = 0.01, dual_lr = 1.0,
lam (initial) = 0.04, lam_max = 100.
Metrics: ``r2vpo/lambda`` (used in this loss), ``r2vpo/lambda_next`` (dual: after the ascent step),
``r2vpo/ratio_var`` (population variance of r over valid tokens), ``r2vpo/moment`` (the penalised
statistic V_hat: variance, or mean (r - 1)^2 for second_moment and fixed), both of the capped ratio.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.context import get_state
from workbench.steps.reweight.core import KeyMetric, Param, register_objective
from workbench.steps.reweight.inputs import LossInputs, LossOutput
from workbench.steps.reweight.ppo_family import clipped_surrogate

_MAX_STEPS = 10_000


def _grid(start: float, stop: float, step: float) -> list[float]:
    """start, then c = min(c + step, stop) until stop (the code's loop, in Python floats)."""
    vals, c = [start], start
    if step > 0:
        while c < stop:
            c = min(c + step, stop)
            vals.append(c)
    return vals


def _bound_sums(r: torch.Tensor, wa: torch.Tensor, caps: list[float], upper: bool, value: bool) -> list[float]:
    """For every c in caps, by sorting r once: upper (positive tokens): sum wa min(r, c) (value) or
    sum_{r <= c} wa r; lower (negative tokens): sum wa max(r, c) (value) or sum_{r >= c} wa r."""
    if r.numel() == 0:
        return [0.0] * len(caps)
    rs, order = torch.sort(r)  # [N]
    wa = wa[order]  # [N]
    zero = rs.new_zeros(1)
    pre_rw = torch.cat([zero, torch.cumsum(rs * wa, 0)])  # [N + 1], sum over the k smallest of r wa
    pre_w = torch.cat([zero, torch.cumsum(wa, 0)])  # [N + 1]
    c = torch.tensor(caps, dtype=rs.dtype, device=rs.device)  # [K]
    k = torch.searchsorted(rs, c, right=upper)  # [K]: number of r <= c (upper) or < c (lower)
    if upper:
        out = pre_rw[k] + (c * (pre_w[-1] - pre_w[k]) if value else 0.0)
    else:
        out = (pre_rw[-1] - pre_rw[k]) + (c * pre_w[k] if value else 0.0)
    return out.tolist()


def bapo_bounds(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None, *,
    rho0: float = 0.5, low_start: float = 0.6, low_max: float = 0.9, step_low: float = 0.02,
    high_start: float = 1.2, high_max: float = 3.0, step_high: float = 0.05, order: str = "high_first",
    contribution: str = "gradient", clip_c: float = math.inf,
) -> tuple[float, float, float]:
    """BAPO's bound search -> (c_low, c_high, rho at those bounds; NaN if undefined). No graph.

    ``ratio``, ``advantages``, ``mask`` (bool) and the optional token ``weight`` are [B, T];
    ``clip_c`` (dual clip) removes negative tokens with r > c from the "gradient" contribution.
    """
    r = ratio.detach().double()[mask]  # [N]
    a = advantages.detach().double()[mask]  # [N]
    w = torch.ones_like(r) if weight is None else weight.detach().double()[mask]  # [N]
    value = contribution == "value"
    pos, neg = a > 0, a < 0
    if not value:
        neg = neg & (r <= clip_c)
    highs = _grid(high_start, high_max, step_high)
    lows = _grid(low_start, low_max, step_low)
    p = _bound_sums(r[pos], (w * a)[pos], highs, upper=True, value=value)  # [K_high]
    n = _bound_sums(r[neg], (w * -a)[neg], lows, upper=False, value=value)  # [K_low]

    def share(i_h: int, i_l: int) -> float:
        tot = p[i_h] + n[i_l]
        return p[i_h] / tot if tot > 0 else math.nan

    def met(i_h: int, i_l: int) -> bool:
        s = share(i_h, i_l)
        return math.isnan(s) or s >= rho0

    i_h = i_l = 0
    for phase in (("high", "low") if order == "high_first" else ("low", "high")):
        if phase == "high":
            while not met(i_h, i_l) and i_h < len(highs) - 1:
                i_h += 1
        else:
            while not met(i_h, i_l) and i_l < len(lows) - 1:
                i_l += 1
    return lows[i_l], highs[i_h], share(i_h, i_l)


def _check_bapo(p: dict) -> None:
    if p["low_start"] > p["low_max"]:
        raise WorkbenchError(f"bapo.low_start={p['low_start']!r} is invalid: expected <= low_max={p['low_max']!r}")
    if p["high_start"] > p["high_max"]:
        raise WorkbenchError(f"bapo.high_start={p['high_start']!r} is invalid: expected <= high_max={p['high_max']!r}")
    for side in ("low", "high"):
        span, step = p[f"{side}_max"] - p[f"{side}_start"], p[f"step_{side}"]
        if step > 0 and span / step > _MAX_STEPS:
            raise WorkbenchError(f"bapo.step_{side}={step!r} is invalid: expected at most {_MAX_STEPS} steps "
                                 f"over [{p[f'{side}_start']}, {p[f'{side}_max']}]")
    if not p["clip_c"] > 1.0:
        raise WorkbenchError(f"bapo.clip_c={p['clip_c']!r} is invalid: expected a number > 1")


@register_objective(
    "bapo",
    paper="Xi et al. 2025, BAPO: Stabilizing Off-Policy RL for LLMs via Balanced Policy Optimization with "
          "Adaptive Clipping, arXiv:2510.18927",
    summary="PPO-clip whose bounds are raised every update until positive tokens carry rho0 of the loss",
    params=[
        Param("rho0", 0.5, low=0.0, high=1.0, live=True,
              doc="target positive share of the loss (README 0.5; code target t on pos/neg is rho0 = t/(1+t))"),
        Param("low_start", 0.6, low=0.0, high=1.0, live=True, doc="a-: starting lower ratio bound c_low"),
        Param("low_max", 0.9, low=0.0, high=1.0, live=True, doc="b-: largest lower bound the search may reach"),
        Param("step_low", 0.02, low=0.0, high=1.0, live=True, doc="delta2: step raising c_low (0 = fixed)"),
        Param("high_start", 1.2, low=1.0, high=None, live=True, doc="a+: starting upper ratio bound c_high"),
        Param("high_max", 3.0, low=1.0, high=None, live=True, doc="b+: largest upper bound the search may reach"),
        Param("step_high", 0.05, low=0.0, high=None, live=True, doc="delta1: step raising c_high (0 = fixed)"),
        Param("order", "high_first", live=False, choices=("high_first", "low_first"),
              doc="high_first: raise c_high then c_low (paper); low_first: c_low first (released code)"),
        Param("contribution", "gradient", live=False, choices=("gradient", "value"),
              doc="gradient: count tokens the bounds leave a gradient (paper's account); value: clipped values (code)"),
        Param("weighting", "none", live=False, choices=("none", "behavior_prob"),
              doc="none: the code's statistic; behavior_prob: weight tokens by pi_rollout (paper per summary)"),
        Param("clip_c", 3.0, low=1.0, high=None, live=True,
              doc="dual-clip bound c (> 1) on negative tokens, as in the released code"),
    ],
    check=_check_bapo,
    default_aggregation="token-mean",
    reduces_to_reinforce=True,
    key_metric=KeyMetric(("offpolicy/pos_share", "bapo/pos_share"), "rho0", "positive share of the loss and its target"),
)
def bapo(inp: LossInputs, rho0: float, low_start: float, low_max: float, step_low: float, high_start: float,
         high_max: float, step_high: float, order: str, contribution: str, weighting: str,
         clip_c: float) -> LossOutput:
    """L_t = -min(r A, clip(r, c_low, c_high) A) (and min(., -c A) for A < 0), bounds from ``bapo_bounds``.

    Gradient w.r.t. logp: -r_t A_t, 0 where clipped (A>0, r>c_high), (A<0, r<c_low) or (A<0, r>c).
    """
    weight = torch.exp(inp.anchor_logprobs) if weighting == "behavior_prob" else None
    c_low, c_high, share = bapo_bounds(
        inp.ratio, inp.advantages, inp.mask, weight, rho0=rho0, low_start=low_start, low_max=low_max,
        step_low=step_low, high_start=high_start, high_max=high_max, step_high=step_high, order=order,
        contribution=contribution, clip_c=clip_c)
    adv = inp.advantages  # [B, T]
    loss, low, high = clipped_surrogate(inp.ratio, adv, 1.0 - c_low, c_high - 1.0)
    neg = adv < 0  # [B, T]
    loss = torch.where(neg, torch.minimum(loss, -clip_c * adv), loss)  # [B, T]
    dual = neg & (inp.ratio.detach() > clip_c)  # [B, T]
    return LossOutput(loss, {
        "bapo/clip_low": c_low,
        "bapo/clip_high": c_high,
        "bapo/pos_share": share,
        "bapo/target_met": 1.0 if (math.isnan(share) or share >= rho0) else 0.0,
        **inp.clip_fractions(low, high, dual),
    })


R2VPO_STATE_KEY = "r2vpo/lambda"


def _check_r2vpo(p: dict) -> None:
    if p["lam"] > p["lam_max"]:
        raise WorkbenchError(f"r2vpo.lam={p['lam']!r} is invalid: expected <= lam_max={p['lam_max']!r}")


@register_objective(
    "r2vpo",
    paper="Luo et al. 2026, R2VPO: Ratio-Variance Regularized Policy Optimization, arXiv:2601.03320 "
          "(ICML'26 version arXiv:2605.26784)",
    summary="no clipping: -rA plus lambda times the ratio variance, lambda updated by dual ascent every update",
    params=[
        Param("variant", "dual", live=False, choices=("dual", "fixed"),
              doc="dual: lambda by dual ascent, kept in context['state']; fixed: -(rA - lam (r-1)^2)"),
        Param("lam", 0.04, low=0.0, high=None, live=True,
              doc="lambda of variant fixed (third-party 0.04); dual: initial lambda, until context['state'] holds one"),
        Param("delta", 0.01, low=0.0, high=None, live=True, doc="dual: allowed ratio moment delta (ours: 0.01)"),
        Param("dual_lr", 1.0, low=0.0, high=None, live=True, doc="dual: ascent step on lambda (ours: 1.0)"),
        Param("lam_max", 100.0, low=0.0, high=None, live=True, doc="dual: upper clamp on lambda"),
        Param("moment", "variance", live=False, choices=("variance", "second_moment"),
              doc="dual: penalise (r - mean r)^2 (variance) or (r - 1)^2 (second moment)"),
        Param("ratio_cap", 100.0, low=1.0, high=None, live=True,
              doc="safety cap: the penalty uses min(r, ratio_cap), flat beyond (ours; 5e8 disables)"),
    ],
    check=_check_r2vpo,
    needs=lambda p: ("state",) if p["variant"] == "dual" else (),
    default_aggregation="token-mean",
    reduces_to_reinforce=True,
    key_metric=KeyMetric(("r2vpo/lambda",), title="dual variable lambda"),
)
def r2vpo(inp: LossInputs, variant: str, lam: float, delta: float, dual_lr: float, lam_max: float,
          moment: str, ratio_cap: float) -> LossOutput:
    """L_t = -r_t A_t + lambda (c_t - sg[m])^2, c_t = min(r_t, ratio_cap), m = mean valid c (variance)
    or 1 (second_moment, fixed).

    Gradient w.r.t. logp: -r_t A_t + 2 lambda r_t (r_t - m) (no penalty term beyond the cap). Dual:
    lambda read from and written to context['state'].
    """
    r = inp.ratio  # [B, T]
    rc = r.clamp(max=ratio_cap)  # [B, T] ratio inside the penalty
    n = int(inp.n_valid)
    with torch.no_grad():
        rd = rc.detach().double()
        vals = rd[inp.mask]  # [N]
        mean_r = vals.mean() if n else rd.new_ones(())
        var = ((vals - mean_r) ** 2).mean() if n else rd.new_tensor(math.nan)
        center = mean_r if (variant == "dual" and moment == "variance") else rd.new_ones(())
        stat = ((vals - center) ** 2).mean() if n else rd.new_tensor(math.nan)
    metrics: dict = {"r2vpo/ratio_var": var, "r2vpo/moment": stat}  # over the capped ratios
    if variant == "dual":
        state = get_state(inp)
        lam_now = float(state.get(R2VPO_STATE_KEY, lam))
        if not math.isfinite(lam_now) or lam_now < 0:
            raise WorkbenchError(f"context['state'][{R2VPO_STATE_KEY!r}]={lam_now!r} is invalid: expected a number >= 0")
        lam_next = lam_now
        if n:
            lam_next = min(max(lam_now + dual_lr * (float(stat) - delta), 0.0), lam_max)
        state[R2VPO_STATE_KEY] = lam_next
        metrics["r2vpo/lambda_next"] = lam_next
    else:
        lam_now = lam
    metrics["r2vpo/lambda"] = lam_now
    c = center.to(r.dtype)
    loss = -r * inp.advantages + lam_now * (rc - c) ** 2  # [B, T]
    return LossOutput(loss, metrics)
