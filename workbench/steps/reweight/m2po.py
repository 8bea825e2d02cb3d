"""M2PO: second-moment trust policy optimisation (Zheng, Zhao, Chen 2025, arXiv:2510.01161).

Objective (docs/objectives.md#m2po): L_t = -M_t r_t A_t with M in {0, 1}, aggregated token-mean with
the masked tokens still in the normaliser (footnote 2). There is no epsilon-clip. The mask M
keeps the second moment of the log-ratio on the "trust-region" tokens small:

    T = {valid tokens with (A > 0 and r > 1) or (A < 0 and r < 1)}   (where PPO could clip)
    delta_t^2 = (log r_t)^2

``variant="alg1"`` (paper, Algorithm 1): while mean_{t in T} delta_t^2 > tau, mask the T-token with
the largest delta^2 and remove it from T. Vectorised: sort T's delta^2 descending, compute the mean
of the remaining tokens after removing k = 0, 1, ... (suffix sums) and mask the k largest for the
smallest k whose remaining mean is <= tau. Ties at the cut are broken by sort order, exactly as a
greedy argmax would break them in some order.

``variant="cap"`` (released code, ``_solve_tau_from_sorted_delta2``): solve
sum_{t in T} min(delta_t^2, tau*^2) = tau * |T| for tau*, then mask T-tokens with delta^2 > tau*^2.
Difference: Alg. 1 *removes* masked tokens from the mean (renormalises over the rest); the cap
criterion keeps them in the mean at tau*^2. Since the tokens left by the cap rule already satisfy
Alg. 1's stopping test, "cap" masks at least as many tokens as "alg1". The released code applies
tau* as PPO ratio bounds (1 - e^-tau*, e^tau* - 1), which gives clipped tokens a constant loss
value; here they are zeroed, which has the same (zero) gradient. The released code picks T with
the sequence advantage A[:, 0]; here the token advantage is used (identical for [B] advantages).

Metrics: ``m2po/tau_star`` = the cut-off on |log r| (T-tokens above it are masked; for alg1 the
largest kept |log r| in T, 0 if all of T is masked; for cap tau*, or the largest |log r| in T when
no cut is needed; NaN when T is empty), ``m2po/trust_frac`` (fraction of valid tokens in T),
``offpolicy/m2`` (mean delta^2 over valid tokens before masking, also a shared diagnostic),
``offpolicy/m2_after`` (mean delta^2 over valid unmasked tokens; NaN if none),
``offpolicy/masked_frac``; clipfrac is 0 (M2PO masks, it never clips).

Left out: the optional floors ``miniclip_low/high`` (unset in the released scripts) and
per-micro-batch computation (the mask is computed over the whole batch given).
"""

from __future__ import annotations

import math

import torch

from workbench.steps.reweight.core import KeyMetric, Param, register_objective

from workbench.steps.reweight.inputs import LossInputs, LossOutput


def m2po_mask(
    log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, tau: float, variant: str = "alg1"
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """M2PO mask -> (masked [B, T] bool, tau_star, trust [B, T] bool). Inputs are [B, T]; no graph.

    ``masked`` is True for the tokens M2PO drops (subset of the trust-region tokens ``trust``).
    """
    lr = log_ratio.detach()  # [B, T]
    trust = mask & (((advantages > 0) & (lr > 0)) | ((advantages < 0) & (lr < 0)))  # [B, T]
    masked = torch.zeros_like(mask)  # [B, T]
    d2 = lr[trust].double() ** 2  # [n]
    n = d2.numel()
    if n == 0:
        return masked, math.nan, trust
    d2_sorted, order = torch.sort(d2, descending=True)  # [n]
    suffix = torch.flip(torch.cumsum(torch.flip(d2_sorted, (0,)), 0), (0,))  # [n], suffix[k] = sum d2_sorted[k:]
    if variant == "alg1":
        remaining = torch.arange(n, 0, -1, dtype=d2.dtype, device=d2.device)  # [n], n - k
        ok = (suffix / remaining) <= tau  # [n], remaining mean after removing the k largest
        k = int(torch.argmax(ok.to(torch.int8))) if bool(ok.any()) else n
        drop = torch.zeros(n, dtype=torch.bool, device=d2.device)  # [n]
        drop[order[:k]] = True
        tau_star = math.sqrt(float(d2_sorted[k])) if k < n else 0.0
    elif variant == "cap":
        budget = tau * n
        if float(suffix[0]) <= budget:
            drop = torch.zeros(n, dtype=torch.bool, device=d2.device)  # [n]
            tau_star = math.sqrt(float(d2_sorted[0]))
        else:
            # f(c) = sum min(d2, c) at c = d2_sorted[k]: the k larger values capped to d2_sorted[k].
            ks = torch.arange(n, dtype=d2.dtype, device=d2.device)  # [n]
            f_at = ks * d2_sorted + suffix  # [n], non-increasing in k, f_at[0] > budget
            below = f_at <= budget  # [n]
            k = int(torch.argmax(below.to(torch.int8))) if bool(below.any()) else n
            rest = float(suffix[k]) if k < n else 0.0
            floor = float(d2_sorted[k]) if k < n else 0.0
            c = max((budget - rest) / k, floor)  # tau*^2 in [d2_sorted[k], d2_sorted[k-1]]
            drop = d2 > c  # [n]
            tau_star = math.sqrt(c)
    else:  # validated by Param choices; kept for direct callers
        raise ValueError(f"variant={variant!r}: expected alg1 or cap")
    masked[trust] = drop
    return masked, tau_star, trust


@register_objective(
    "m2po",
    paper="Zheng et al. 2025, Prosperity before Collapse (M2PO), arXiv:2510.01161",
    summary="mask the trust-region tokens with the largest (log r)^2 until their mean (log r)^2 <= tau; loss -M r A",
    params=[Param("tau", 0.04, low=0.0, high=10.0, live=True,
                  doc="second-moment budget tau_M2 on mean (log r)^2 of trust-region tokens (paper: 0.04)"),
            Param("variant", "alg1", live=False, choices=("alg1", "cap"),
                  doc="alg1: paper's greedy remove-and-renormalise; cap: released code's capped mean")],
    default_aggregation="token-mean",
    reduces_to_reinforce=True,
    key_metric=KeyMetric(("offpolicy/m2", "offpolicy/m2_after"), "tau", "M2 and its budget tau"),
)
def m2po(inp: LossInputs, tau: float, variant: str) -> LossOutput:
    """L_t = -M_t r_t A_t; M_t = 0 for the trust-region tokens selected by ``m2po_mask``.

    Gradient w.r.t. logp: -r_t A_t for kept tokens, 0 for masked ones.
    """
    with torch.no_grad():
        masked, tau_star, trust = m2po_mask(inp.log_ratio, inp.advantages, inp.mask, tau, variant)
        kept = inp.mask & ~masked  # [B, T]
        n_kept = kept.sum()
        d2 = inp.log_ratio.detach() ** 2  # [B, T]
        m2_after = torch.where(kept, d2, d2.new_zeros(())).sum() / n_kept.clamp(min=1)
        if int(n_kept) == 0:
            m2_after = math.nan
    loss = torch.where(masked, inp.ratio.new_zeros(()), -inp.ratio * inp.advantages)  # [B, T]
    return LossOutput(loss, {
        "m2po/tau_star": tau_star,
        "m2po/trust_frac": inp.frac(trust),
        "offpolicy/m2_after": m2_after,
        "offpolicy/masked_frac": inp.frac(masked),
        "offpolicy/clipfrac": 0.0,
    })
