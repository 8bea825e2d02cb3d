"""The shared off-policy diagnostics ``policy_loss`` reports for every objective (no graph).

All floats, over valid tokens (response_mask 1). Two ratios, named apart:

- r = pi_theta / anchor, *the objective's ratio*: the anchor is pi_prox in decoupled mode
  (``prox_logprobs`` given, or ``proximal`` set) and mu otherwise, so it is taken after the proximal
  re-anchoring and before any correction weight (a correction multiplies the loss, never the
  ratio). Every ``offpolicy/ratio_*`` statistic below and m2, ess, kl, chi2 are of r.
- ``offpolicy/raw_ratio_mean|raw_ratio_min|raw_ratio_max``: of pi_theta / mu (the behaviour
  policy), before any correction or re-anchoring; equal to the ``ratio_*`` ones in bypass mode.

``offpolicy/correction_changed_frac``: fraction of valid tokens whose weight the correction
changed (rejected, truncated, or weight != 1; 0.0 without a correction or a valid token).

``offpolicy/ratio_mean|ratio_min|ratio_max``;
``offpolicy/ratio_pos_q05|q50|q95`` and ``offpolicy/ratio_neg_q05|q50|q95`` (r split by advantage
sign; NaN when no such token); ``offpolicy/m2`` = mean (log r)^2 (M2PO, arXiv:2510.01161);
``offpolicy/ess_token`` = (sum w)^2 / (N sum w^2) with w = r, and ``offpolicy/ess_seq`` the same
over sequences with w_i = exp(sum_t log r_t) (both after subtracting the max log-weight, so they
are stable); ``offpolicy/kl_k1`` = mean(log anchor - log pi) and ``offpolicy/kl_k3`` =
mean(r - 1 - log r) (estimates of KL(anchor || pi) from the anchor's samples, Schulman's k1/k3);
``offpolicy/chi2_token`` = mean(r^2) - 1; ``offpolicy/pos_share`` = sum_{A>0}|L_t| / sum|L_t|
(BAPO's balance statistic, arXiv:2510.18927; NaN when the denominator is 0);
``offpolicy/cov_logp_adv`` = population covariance of (logp, A) (Entropy Mechanism,
arXiv:2505.22617). With no valid token, every statistic is NaN. docs/design.md, "Diagnostics",
defines each one.
"""

from __future__ import annotations

from typing import Any

import torch

from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP, LossInputs

_NAN = float("nan")
_QUANTILES = (0.05, 0.5, 0.95)


def diagnostics(inp: LossInputs, per_token_loss: torch.Tensor, behavior_logprobs: torch.Tensor | None = None,
                changed: torch.Tensor | None = None) -> dict[str, Any]:
    """Shared off-policy diagnostics over valid tokens (see the module docstring); no graph.

    ``behavior_logprobs`` [B, T] (mu) gives the raw ratio; None means the anchor is mu (bypass).
    ``changed`` [B, T] bool: the tokens a correction changed (None: no correction).
    """
    valid = inp.mask  # [B, T]
    out: dict[str, Any] = {"offpolicy/correction_changed_frac": 0.0 if changed is None else inp.frac(changed)}
    lr = inp.log_ratio.detach()[valid].double()  # [N]
    n = lr.numel()
    names = ["ratio_mean", "ratio_min", "ratio_max", "raw_ratio_mean", "raw_ratio_min", "raw_ratio_max", "m2",
             "ess_token", "ess_seq", "kl_k1", "kl_k3", "chi2_token", "pos_share", "cov_logp_adv"]
    if n == 0:
        out.update({f"offpolicy/{k}": _NAN for k in names})
        for sign in ("pos", "neg"):
            out.update({f"offpolicy/ratio_{sign}_q{round(q * 100):02d}": _NAN for q in _QUANTILES})
        return out
    r = lr.exp()  # [N]
    adv = inp.advantages[valid].double()  # [N]
    lp = inp.logprobs.detach()[valid].double()  # [N]
    loss = per_token_loss.detach()[valid].double().abs()  # [N]
    out["offpolicy/ratio_mean"] = r.mean()
    out["offpolicy/ratio_min"] = r.min()
    out["offpolicy/ratio_max"] = r.max()
    if behavior_logprobs is None:
        raw = r  # [N], the anchor is mu
    else:
        beh = behavior_logprobs.detach().to(inp.logprobs.dtype)[valid].double()  # [N]
        raw = (inp.logprobs.detach()[valid].double() - beh).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [N]
    out["offpolicy/raw_ratio_mean"] = raw.mean()
    out["offpolicy/raw_ratio_min"] = raw.min()
    out["offpolicy/raw_ratio_max"] = raw.max()
    qs = torch.tensor(_QUANTILES, dtype=torch.float64, device=r.device)
    for sign, sel in (("pos", adv > 0), ("neg", adv < 0)):
        rs = r[sel]  # [N_sign]
        vals = torch.quantile(rs, qs).tolist() if rs.numel() else [_NAN] * len(_QUANTILES)
        for q, v in zip(_QUANTILES, vals):
            out[f"offpolicy/ratio_{sign}_q{round(q * 100):02d}"] = v
    out["offpolicy/m2"] = (lr * lr).mean()
    out["offpolicy/ess_token"] = effective_sample_size(lr)
    seq_lw = inp.seq_sum(inp.log_ratio.detach()).double()[inp.seq_lengths > 0]  # [B']
    out["offpolicy/ess_seq"] = effective_sample_size(seq_lw)
    out["offpolicy/kl_k1"] = (-lr).mean()
    out["offpolicy/kl_k3"] = (r - 1.0 - lr).mean()
    out["offpolicy/chi2_token"] = (r * r).mean() - 1.0
    den = loss.sum()
    out["offpolicy/pos_share"] = loss[adv > 0].sum() / den if float(den) > 0 else _NAN
    out["offpolicy/cov_logp_adv"] = ((lp - lp.mean()) * (adv - adv.mean())).mean()
    return out


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / (N sum w^2) from log-weights, shifted by the max so nothing overflows."""
    w = torch.exp(log_w - log_w.max())  # [N], max weight 1
    return w.sum() ** 2 / (log_w.numel() * (w * w).sum())


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Convert tensor/float metrics to Python floats with one ``tolist`` (one device sync)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        dev = metrics[keys[0]].device
        stacked = torch.stack([metrics[k].detach().reshape(()).to(dev, torch.float64) for k in keys])
        out.update(zip(keys, stacked.tolist()))
    return {k: out[k] for k in metrics}


__all__ = ["diagnostics", "effective_sample_size", "to_floats"]
