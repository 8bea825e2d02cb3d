"""Ratio rules of three seed papers: BPO (bounded ratio), humanline clipping, HAPO's entropy-adaptive clipping.

Each maps ``LossInputs`` (ratio r_t = pi_theta / mu per token, mu the anchor: behaviour, or the proximal
policy when ``prox_logprobs`` are given; advantages A [B, T]) to a per-token loss that ``policy_loss``
aggregates (token-mean by default). Formulas, papers and the choices made where a paper leaves one open:

- ``bpo`` (Bounded Policy Optimization; Ao, Chen, Lee, Wahd, Czarnobai, Fuernstahl, Schoelkopf, Krause 2026,
  "Bounded Ratio Reinforcement Learning", arXiv:2604.18578). The bounded-ratio problem
  max_pi E_mu[r A] s.t. 1 - eps_low <= r <= 1 + eps_high has the analytic optimum (the paper's
  Theorem 4.1 with its asymmetric bounds c_l, c_h) r*_t = 1 + eps_high where the (median-)advantage is
  positive and 1 - eps_low where it is negative. BPO minimises an advantage-weighted divergence between
  the policy's ratio and r*. Choice, stated plainly: the exact divergence of the paper's closed form is
  not reproduced here; this module uses the advantage-weighted squared ratio distance
  L_t = |A_t| (r_t - r*_t)^2 / (2 eps_t), eps_t = eps_high if A_t > 0 else eps_low,
  normalised by eps_t so that d L / d logp = -A_t at r = 1 (on-policy it is REINFORCE). Gradient:
  d L / d logp = |A_t| (r_t - r*_t) r_t / eps_t = -w A_t with w = r (1 + eps_high - r) / eps_high for
  A > 0 and w = r (r - 1 + eps_low) / eps_low for A < 0: the weight falls to 0 at r*, and past r* it
  turns negative (the ratio is pulled back to the optimum, where PPO's clip only stops). The sign of
  the token's advantage stands for the paper's median advantage (group-relative advantages, as its
  GBPO for LLMs, are centred per prompt); A_t = 0 tokens have no loss. Defaults 0.2 / 0.2 (PPO's).
- ``humanline`` (Liu, Muennighoff, Ethayarajh 2025, "Humanline: Online Alignment as Perceptual Loss",
  arXiv:2509.24207; the humanline variant of GRPO's clipped objective). Humanline clipping: the token
  ratio against the anchor is clipped to [1 - clip_low, 1 + clip_high] *whatever the advantage's
  sign*, L_t = -clip(r_t, 1 - clip_low, 1 + clip_high) A_t, so outside the band the token gets no
  gradient for either sign (PPO's pessimistic min keeps the gradient of a positive token with r < 1 and
  of a negative one with r > 1). Gradient: -r_t A_t inside the band, 0 outside. Humanline syncing (the
  paper resets its reference model to the policy every few steps) is a loop matter: ``anchor``
  "behaviour" (default) uses the batch's sampler (or proximal) log-probs, which the loop keeps recent;
  "reference" uses ``context["ref_logprobs"]`` (the frozen reference, synced by whatever builds it).
  Choices: the paper clips the log-ratio to [log eps_P, log eps_R]; here the bounds are given as
  PPO-style clip_low / clip_high (0.2 / 0.28, asymmetric like DAPO's clip-higher; my choice, not the
  paper's tuned values).
- ``hapo`` (Liu, Liu, Wen, Cai, Cui, He, Zhang 2025, "From Uniform to Heterogeneous: Tailoring Policy
  Optimization to Every Token's Nature" (HAPO), arXiv:2509.16591): two of its four components.
  Asymmetric adaptive clipping: PPO-clip with per-token bounds driven by the token's entropy, the lower
  clip widest on low-entropy tokens (aggressive reduction of confident noise), the upper clip widest on
  high-entropy ones (exploration): with h_t in [0, 1],
  eps_low_t = eps_low_max - (eps_low_max - eps_low_min) h_t, eps_high_t = eps_high_min +
  (eps_high_max - eps_high_min) h_t. Differential advantage redistribution, entropy part:
  A'_t = A_t w_t, w_t = exp(beta h_t) / mean over the row's valid tokens of exp(beta h), so w has mean
  1 over each sequence (beta = 0: uniform). L_t = -min(r_t A'_t, clip(r_t, 1 - eps_low_t,
  1 + eps_high_t) A'_t); gradient -w_t r_t A_t, 0 where clipped. Choices: the loss context carries no
  per-token entropy of the current policy (the update step computes it for the entropy bonus only), so
  h_t = 1 - pi_theta(y_t) (detached), the probability mass the policy leaves to other tokens, stands in
  for the normalised entropy: it is 0 for a certain token, rises with the surprisal -log pi_theta(y_t)
  and is bounded by 1 without batch statistics. The ratio term of the paper's redistribution is left
  out; its adaptive sampling temperature is a sampler option (``RunConfig.adaptive_temperature``,
  workbench/steps/generate/sampler.py). Defaults: eps_low 0.2 -> 0.3,
  eps_high 0.2 -> 0.28 (DAPO's clip-higher at the entropic end), beta 1.

Metrics: ``offpolicy/clipfrac*`` (tokens whose gradient a clip removed: humanline either sign, HAPO
PPO's), ``bpo/overshoot_frac`` (tokens past r*, whose gradient points back), ``hapo/entropy_proxy_mean``
(mean h_t over valid tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.context import token_values
from workbench.steps.reweight.core import Param, register_objective
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP, LossInputs, LossOutput
from workbench.steps.reweight.ppo_family import clipped_surrogate


@register_objective(
    "bpo",
    paper="Ao, Chen, Lee, Wahd, Czarnobai, Fuernstahl, Schoelkopf, Krause 2026, Bounded Ratio Reinforcement "
          "Learning (BPO), arXiv:2604.18578",
    summary="|A| (r - r*)^2 / (2 eps): pulls each ratio to the bounded-ratio optimum r* = 1 + eps sign(A)",
    params=[Param("eps_low", 0.2, low=0.01, high=1.0, live=True,
                  doc="lower ratio bound: the optimum of a negative-advantage token is r* = 1 - eps_low"),
            Param("eps_high", 0.2, low=0.01, high=10.0, live=True,
                  doc="upper ratio bound: the optimum of a positive-advantage token is r* = 1 + eps_high")],
    reduces_to_reinforce=True,
)
def bpo(inp: LossInputs, eps_low: float, eps_high: float) -> LossOutput:
    """L_t = |A_t| (r_t - r*_t)^2 / (2 eps_t), r* = 1 + eps_high (A > 0) or 1 - eps_low (A < 0).

    Gradient w.r.t. logp: |A_t| (r_t - r*_t) r_t / eps_t (= -A_t at r = 1).
    """
    adv = inp.advantages  # [B, T]
    pos = adv > 0  # [B, T]
    target = torch.where(pos, adv.new_tensor(1.0 + eps_high), adv.new_tensor(1.0 - eps_low))  # [B, T]
    eps = torch.where(pos, adv.new_tensor(eps_high), adv.new_tensor(eps_low))  # [B, T]
    loss = adv.abs() * (inp.ratio - target) ** 2 / (2.0 * eps)  # [B, T]
    r = inp.ratio.detach()  # [B, T]
    overshoot = (pos & (r > target)) | ((adv < 0) & (r < target))  # [B, T]
    return LossOutput(loss, {"bpo/overshoot_frac": inp.frac(overshoot)})


def _humanline_needs(params: dict[str, Any]) -> tuple[str, ...]:
    return ("ref_logprobs",) if params["anchor"] == "reference" else ()


@register_objective(
    "humanline",
    paper="Liu, Muennighoff, Ethayarajh 2025, Humanline: Online Alignment as Perceptual Loss, arXiv:2509.24207 "
          "(humanline clipping of GRPO's objective)",
    summary="-clip(r, 1-clip_low, 1+clip_high) A: the ratio clipped whatever A's sign (humanline clipping)",
    params=[Param("clip_low", 0.2, low=0.0, high=1.0, live=True,
                  doc="ratios below 1 - clip_low give no gradient, for either advantage sign"),
            Param("clip_high", 0.28, low=0.0, high=None, live=True,
                  doc="ratios above 1 + clip_high give no gradient, for either advantage sign"),
            Param("anchor", "behaviour", live=False, choices=("behaviour", "reference"),
                  doc="ratio against the sampler / proximal policy, or context['ref_logprobs'] (synced reference)")],
    needs=_humanline_needs,
    reduces_to_reinforce=True,
)
def humanline(inp: LossInputs, clip_low: float, clip_high: float, anchor: str) -> LossOutput:
    """L_t = -clip(r_t, 1 - clip_low, 1 + clip_high) A_t, r_t against the behaviour or the reference policy.

    Gradient w.r.t. logp: -r_t A_t inside the band, 0 outside it (either sign of A_t).
    """
    if anchor == "reference":
        log_ratio = (inp.logprobs - token_values(inp, "ref_logprobs")).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T]
    else:
        ratio = inp.ratio  # [B, T]
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    loss = -ratio.clamp(lo, hi) * inp.advantages  # [B, T]
    r = ratio.detach()  # [B, T]
    return LossOutput(loss, {**inp.clip_fractions(r < lo, r > hi)})


def _check_hapo(params: dict[str, Any]) -> None:
    for side in ("low", "high"):
        lo, hi = params[f"eps_{side}_min"], params[f"eps_{side}_max"]
        if lo > hi:
            raise WorkbenchError(f"hapo.eps_{side}_min={lo!r} is invalid: expected <= eps_{side}_max={hi!r}")


def entropy_proxy(inp: LossInputs) -> torch.Tensor:
    """h_t = 1 - pi_theta(y_t) in [0, 1], detached (0 at padded positions). [B, T]"""
    return -torch.expm1(inp.logprobs.detach().clamp(max=0.0))  # [B, T]


@register_objective(
    "hapo",
    paper="Liu, Liu, Wen, Cai, Cui, He, Zhang 2025, From Uniform to Heterogeneous: Tailoring Policy Optimization "
          "to Every Token's Nature (HAPO), arXiv:2509.16591",
    summary="PPO-clip with entropy-adaptive bounds (low-entropy: wider low clip; high: wider high clip), "
            "advantages redistributed by exp(beta h)",
    params=[Param("eps_low_min", 0.2, low=0.0, high=1.0, live=True,
                  doc="lower clip of the most entropic tokens (h = 1)"),
            Param("eps_low_max", 0.3, low=0.0, high=1.0, live=True,
                  doc="lower clip of certain tokens (h = 0): confident noise may be reduced further"),
            Param("eps_high_min", 0.2, low=0.0, high=10.0, live=True,
                  doc="upper clip of certain tokens (h = 0)"),
            Param("eps_high_max", 0.28, low=0.0, high=10.0, live=True,
                  doc="upper clip of the most entropic tokens (h = 1): room to explore"),
            Param("beta", 1.0, low=0.0, high=10.0, live=True,
                  doc="advantage redistribution: weight exp(beta h) normalised to mean 1 per sequence (0 = off)")],
    check=_check_hapo,
)
def hapo(inp: LossInputs, eps_low_min: float, eps_low_max: float, eps_high_min: float, eps_high_max: float,
         beta: float) -> LossOutput:
    """L_t = -min(r_t A'_t, clip(r_t, 1 - eps_low_t, 1 + eps_high_t) A'_t), A'_t = A_t w_t.

    h_t = 1 - pi_theta(y_t); eps_low_t = eps_low_max - (eps_low_max - eps_low_min) h_t, eps_high_t =
    eps_high_min + (eps_high_max - eps_high_min) h_t; w_t = exp(beta h_t) / (row mean of exp(beta h)).
    Gradient w.r.t. logp: -w_t r_t A_t, 0 where clipped.
    """
    h = entropy_proxy(inp)  # [B, T]
    eps_low = eps_low_max - (eps_low_max - eps_low_min) * h  # [B, T]
    eps_high = eps_high_min + (eps_high_max - eps_high_min) * h  # [B, T]
    spread = torch.exp(beta * h)  # [B, T] in [1, e^beta]
    weight = spread / inp.seq_mean(spread).clamp(min=1.0).unsqueeze(-1)  # [B, T], mean 1 over each row
    adv = inp.advantages * weight  # [B, T]
    loss, low, high = clipped_surrogate(inp.ratio, adv, eps_low, eps_high)  # [B, T] x3
    n = inp.n_valid.clamp(min=1)
    return LossOutput(loss, {
        **inp.clip_fractions(low, high),
        "hapo/entropy_proxy_mean": torch.where(inp.mask, h, h.new_zeros(())).sum() / n,
    })
