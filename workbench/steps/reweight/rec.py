"""REC: group-relative REINFORCE with an explicit clip mask, weight and regulariser.

Yao, Chen et al. 2025, "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm",
arXiv:2509.24203 (Trinity-RFT ``RECPolicyLossFn``). With r = exp(logp - log anchor)
*detached*:

    L_t = -A_t w_t logp_t M_t + reg_t

``clip_mode`` chooses M (1 = the token keeps its policy-gradient term):
- ``none``: M = 1.
- ``one-side`` (default; REC-OneSide, PPO's effective mask): (A >= 0 and r <= 1 + eps_high) or
  (A <= 0 and r >= 1 - eps_low).
- ``two-side``: 1 - eps_low <= r <= 1 + eps_high.
- ``ring``: two-side, or (A >= 0 and r <= 1 - eps_low_prime), or (A <= 0 and r >= 1 + eps_high_prime).
``weight`` chooses w (detached): ``none`` (1; REC-*-NoIS), ``importance_sampling`` (r),
``gspo_importance_sampling`` (the row's exp(mean_t log r_t)), ``advantage`` (exp(A / temp), the
exponent clamped at 20).
``regularizer``: ``none``; ``k2`` (+ reg_coef (logp - log anchor)^2: OPMD, the paper's
(tau/2K) sum (log pi - log pi_old)^2 with the 1/2 absorbed into the coefficient, as in the code);
``forward_kl`` (- reg_coef logp: AsymRE, the baseline shift r_bar - beta). The regulariser applies
to every valid token, clipped or not.

Gradient w.r.t. logp: -A_t w_t M_t + 2 reg_coef log r_t (k2) or - reg_coef (forward_kl). With the
defaults (one-side, no weight, no regulariser) REC is REINFORCE on-policy.
Defaults: eps 0.2 / 0.2, eps' 0.6 / 2.0, temp 1 (Trinity ``default_args``); clip_mode one-side is
ours (the paper's recommended REC-OneSide; Trinity defaults to none and the paper reports that
removing clipping collapses training); reg_coef 0.1 is ours (Trinity's 0.0 disables the regulariser).
Presets: ``opmd`` (no clip, k2), ``asymre`` (no clip, forward_kl), ``ring`` (ring mask).
Metrics: ``offpolicy/clipfrac`` = fraction of valid tokens with M = 0 (their PG term is dropped).
Left out: ``gspo-one-side`` (Trinity marks it experimental).
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.core import Param, register_objective
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP, LossInputs, LossOutput


def rec_mask(ratio: torch.Tensor, adv: torch.Tensor, clip_mode: str, eps_low: float, eps_high: float,
             eps_low_prime: float, eps_high_prime: float) -> torch.Tensor:
    """REC's keep-mask M [B, T] (bool) from the detached ratio and the advantages."""
    r = ratio.detach()
    if clip_mode == "none":
        return torch.ones_like(r, dtype=torch.bool)
    two = (r >= 1.0 - eps_low) & (r <= 1.0 + eps_high)
    if clip_mode == "two-side":
        return two
    if clip_mode == "one-side":
        return ((adv >= 0) & (r <= 1.0 + eps_high)) | ((adv <= 0) & (r >= 1.0 - eps_low))
    if clip_mode == "ring":
        return two | ((adv >= 0) & (r <= 1.0 - eps_low_prime)) | ((adv <= 0) & (r >= 1.0 + eps_high_prime))
    raise ValueError(f"clip_mode={clip_mode!r}")


def _check_rec(p: dict) -> None:
    if not p["temp"] > 0.0:
        raise WorkbenchError(f"rec.temp={p['temp']!r} is invalid: expected a number > 0")


@register_objective(
    "rec",
    paper="Yao, Chen et al. 2025, Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm (REC), "
          "arXiv:2509.24203",
    summary="REINFORCE -A w logp with a clip mask (none/one-side/two-side/ring), weight and k2 (OPMD) or forward-KL (AsymRE) term",
    params=[
        Param("clip_mode", "one-side", live=False, choices=("one-side", "none", "two-side", "ring"),
              doc="which tokens keep their policy-gradient term (one-side = PPO's effective mask)"),
        Param("eps_low", 0.2, low=0.0, high=1.0, live=True, doc="lower bound 1 - eps_low of the kept region"),
        Param("eps_high", 0.2, low=0.0, high=None, live=True, doc="upper bound 1 + eps_high of the kept region"),
        Param("eps_low_prime", 0.6, low=0.0, high=1.0, live=True, doc="ring: A >= 0 tokens with r <= 1 - eps' kept"),
        Param("eps_high_prime", 2.0, low=0.0, high=None, live=True, doc="ring: A <= 0 tokens with r >= 1 + eps' kept"),
        Param("weight", "none", live=False,
              choices=("none", "importance_sampling", "gspo_importance_sampling", "advantage"),
              doc="detached token weight: 1, r, the row's exp(mean log r), or exp(A / temp)"),
        Param("temp", 1.0, low=0.0, high=None, live=True, doc="temperature of the advantage weight (> 0)"),
        Param("regularizer", "none", live=False, choices=("none", "k2", "forward_kl"),
              doc="k2: + coef (log r)^2 (OPMD); forward_kl: - coef logp (AsymRE)"),
        Param("reg_coef", 0.1, low=0.0, high=None, live=True, doc="regulariser coefficient (ours: 0.1)"),
    ],
    presets={"opmd": {"clip_mode": "none", "regularizer": "k2"},
             "asymre": {"clip_mode": "none", "regularizer": "forward_kl"},
             "ring": {"clip_mode": "ring"}},
    check=_check_rec,
    default_aggregation="token-mean",
    reduces_to_reinforce=True,
)
def rec(inp: LossInputs, clip_mode: str, eps_low: float, eps_high: float, eps_low_prime: float,
        eps_high_prime: float, weight: str, temp: float, regularizer: str, reg_coef: float) -> LossOutput:
    """L_t = -A_t sg[w_t] logp_t M_t + reg_t (see the module docstring).

    Gradient w.r.t. logp: -A_t w_t M_t (+ 2 coef log r_t for k2, - coef for forward_kl).
    """
    adv = inp.advantages  # [B, T]
    keep = rec_mask(inp.ratio, adv, clip_mode, eps_low, eps_high, eps_low_prime, eps_high_prime)  # [B, T]
    with torch.no_grad():
        if weight == "none":
            w = torch.ones_like(adv)
        elif weight == "importance_sampling":
            w = inp.ratio.detach()
        elif weight == "gspo_importance_sampling":
            w = torch.exp(inp.seq_mean(inp.log_ratio.detach())).unsqueeze(-1).expand_as(adv)
        else:
            w = torch.exp((adv / temp).clamp(max=LOG_RATIO_CLAMP))
        coef = torch.where(keep, -adv * w, adv.new_zeros(()))  # [B, T]
    loss = coef * inp.logprobs  # [B, T]
    if regularizer == "k2":
        loss = loss + reg_coef * inp.log_ratio ** 2
    elif regularizer == "forward_kl":
        loss = loss - reg_coef * inp.logprobs
    return LossOutput(loss, {"offpolicy/clipfrac": inp.frac(~keep)})
