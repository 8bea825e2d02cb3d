"""Policy-loss rules that peer frameworks ship: DPPO (TV / KL), OPSM, VESPO, token-level TOPR.

Each maps ``LossInputs`` (ratio r_t = pi_theta / mu per token, mu = the anchor: behaviour, or the
proximal policy when ``prox_logprobs`` are given; advantages A [B, T]) to a per-token loss that
``policy_loss`` aggregates (token-mean by default, as the peers). Formulas, papers and the choices
made where the peers differ:

- ``dppo_tv`` / ``dppo_kl`` (DPPO, Qi et al. 2026, "Rethinking the Trust Region in LLM
  Reinforcement Learning", arXiv:2602.04879; prime-rl's default loss, verl ``dppo_tv`` /
  ``dppo_kl``, SkyRL ``dppo``): L_t = -M_t r_t A_t with a binary trust-region mask M_t in {0, 1}
  on the token's probabilities p = pi_theta(y_t), q = mu(y_t). TV: M_t = 0 if A_t > 0 and
  p - q > delta_high, or A_t < 0 and q - p > delta_low. KL: with the binary (Bernoulli) KL
  D = q log(q/p) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8)), M_t = 0 if A_t > 0, p > q and
  D > delta_high, or A_t < 0, p < q and D > delta_low. So only a move *in the direction the
  advantage pushes* is stopped. Gradient w.r.t. logp_t: -M_t r_t A_t. Choices: the loss -M r A
  (prime-rl, SkyRL; verl's -sg[min(r, C)] A logp M has the same gradient below its C, which its
  DPPO recipe sets to 1e4); A_t = 0 tokens are never masked (SkyRL; prime-rl and verl count them
  in the low branch, which changes no gradient, only masked_frac); thresholds: TV 0.2 / 0.2
  (prime-rl, SkyRL; verl's recipe 0.15), KL 0.05 / 0.05 (verl's recipe, SkyRL's recommendation).
  Left out: prime-rl's extra 1e-3 (log r)^2 regulariser (KL terms belong to the update step) and
  the paper's top-K divergence approximations. p and q are exp(min(logp, 0)): a log-prob above 0
  is not a probability, and the clamp keeps D finite; the mask carries no gradient.
- ``opsm`` (off-policy sequence masking, DeepSeek-AI 2025, "DeepSeek-V3.2", arXiv:2512.02556,
  eq. 9; TRL ``off_policy_mask_threshold``, slime ``--use-opsm``): KL_i = mean over row i's valid
  tokens of (log mu - log pi_theta) (no gradient); tokens with A_t < 0 in rows with KL_i > delta are
  dropped (M_t = 0), every other token keeps PPO-clip: L_t = M_t * -min(r A, clip(r, 1 - clip_low,
  1 + clip_high) A). Gradient: M_t times PPO's. As TRL and slime, the sign is the token's
  advantage (the row's for [B] advantages). Default delta 0.5: TRL's suggested starting point
  (its default is off; slime's default 1e-4; the paper states none); clip 0.2 / 0.2 (TRL, slime).
- ``vespo`` (Shen, Zhao, Cheng, Huang, Yu 2026, "VESPO: Variational Sequence-Level Soft Policy
  Optimization for Stable Off-Policy LLM Training", arXiv:2602.10693; TRL ``loss_type="vespo"``):
  L_t = -sg[phi_i] A_t logp_t with the Gamma-shaped kernel phi(W) = W^k exp(lambda (1 - W)) of the
  sequence ratio W_i = exp(clamp(sum_t log r_t, log 1e-8, 20)) (per-token log r already clamped to
  +-20, as TRL); (k, lambda) = (k_pos, lambda_pos) if A_t >= 0 else (k_neg, lambda_neg), defaults
  2 / 3 and 3 / 2 (TRL, the paper's c1 / c2). phi(1) = 1, so on-policy it is REINFORCE.
  Gradient: -phi_i A_t. Computed as exp(lambda + k log W - lambda W). The ranges k in [0, 10] and
  lambda in [0.01, 20] (TRL clamps lambda >= 1e-4) keep log phi <= 60, finite in float32. Left out:
  TRL's folding of the sampler-correction weight into W (``corrections`` applies one on top).
- ``topr_token`` (TOPR, Le Roux, Bellemare et al. 2025, "Tapered Off-Policy REINFORCE",
  arXiv:2503.14286, in the token-level form of Trinity-RFT's ``topr`` and ROLL's TOPR terms):
  ``topr`` truncates the *sequence* ratio; here each token's weight is its own ratio truncated,
  w_t = clip(r_t, pos_low, pos_high) if A_t >= 0 else clip(r_t, neg_low, neg_high);
  L_t = -sg[w_t] A_t logp_t, gradient -w_t A_t. Defaults [1, 1] / [0, 1]: SFT-like weight 1 on
  positives, min(r_t, 1) on negatives (Trinity-RFT, ROLL). Trinity-RFT's ``advantage_threshold``
  (default 0) is the sign split here.

Metrics: ``offpolicy/masked_frac`` (fraction of valid tokens whose gradient a mask removed; DPPO
also ``dppo/masked_frac_high`` for A > 0 and ``dppo/masked_frac_low`` for A < 0; OPSM
``opsm/masked_seq_frac`` over non-empty rows and ``opsm/seq_kl_mean``), PPO's clip fractions for
OPSM (counted on unmasked tokens, so clipfrac + masked_frac is the zeroed fraction),
``vespo/weight_mean`` (mean phi over valid tokens), ``offpolicy/truncated_frac`` for TOPR.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.core import KeyMetric, Param, register_objective
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP, LossInputs, LossOutput
from workbench.steps.reweight.ppo_family import clipped_surrogate

BINARY_KL_EPS = 1e-8
"""The peers' guard inside log((1 - q) / (1 - p)) of DPPO's binary KL."""

VESPO_LOG_W_MIN = math.log(1e-8)
"""Lower clamp of VESPO's sequence log-ratio (TRL's, from the released code)."""

_DPPO_PAPER = ("Qi, Zhou, Liu, Pang, Du, Lin, Lee 2026, Rethinking the Trust Region in LLM Reinforcement Learning "
               "(DPPO), arXiv:2602.04879; prime-rl default loss, verl dppo_tv / dppo_kl, SkyRL dppo")


def _token_logprobs(inp: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) of DPPO's mask: current and anchor log-probs clamped at 0, no graph. [B, T] x2"""
    return inp.logprobs.detach().clamp(max=0.0), inp.anchor_logprobs.clamp(max=0.0)


def _dppo_output(inp: LossInputs, high: torch.Tensor, low: torch.Tensor) -> LossOutput:
    """L_t = -M_t r_t A_t with M = 0 where ``high`` (A > 0) or ``low`` (A < 0) masks the token."""
    masked = high | low  # [B, T]
    loss = torch.where(masked, inp.ratio.new_zeros(()), -inp.ratio * inp.advantages)  # [B, T]
    return LossOutput(loss, {
        "offpolicy/masked_frac": inp.frac(masked),
        "dppo/masked_frac_high": inp.frac(high),
        "dppo/masked_frac_low": inp.frac(low),
        "offpolicy/clipfrac": 0.0,
    })


@register_objective(
    "dppo_tv",
    paper=_DPPO_PAPER,
    summary="DPPO-Binary-TV: -rA with the token masked once |pi - mu| leaves delta in the direction A pushes",
    params=[Param("delta_low", 0.2, low=0.0, high=1.0, live=True,
                  doc="A < 0 tokens whose probability fell by more than delta_low (mu - pi) are masked"),
            Param("delta_high", 0.2, low=0.0, high=1.0, live=True,
                  doc="A > 0 tokens whose probability rose by more than delta_high (pi - mu) are masked")],
    reduces_to_reinforce=True,
)
def dppo_tv(inp: LossInputs, delta_low: float, delta_high: float) -> LossOutput:
    """L_t = -M_t r_t A_t, M_t = 0 iff (A_t > 0 and p - q > delta_high) or (A_t < 0 and q - p > delta_low).

    p = pi_theta(y_t), q = mu(y_t). Gradient w.r.t. logp: -M_t r_t A_t.
    """
    log_p, log_q = _token_logprobs(inp)
    diff = torch.exp(log_p) - torch.exp(log_q)  # [B, T] pi - mu
    adv = inp.advantages  # [B, T]
    return _dppo_output(inp, (adv > 0) & (diff > delta_high), (adv < 0) & (-diff > delta_low))


@register_objective(
    "dppo_kl",
    paper=_DPPO_PAPER,
    summary="DPPO-Binary-KL: -rA with the token masked once the binary KL(mu, pi) exceeds delta in A's direction",
    params=[Param("delta_low", 0.05, low=0.0, high=None, live=True,
                  doc="A < 0 tokens whose probability fell with binary KL above delta_low are masked"),
            Param("delta_high", 0.05, low=0.0, high=None, live=True,
                  doc="A > 0 tokens whose probability rose with binary KL above delta_high are masked")],
    reduces_to_reinforce=True,
)
def dppo_kl(inp: LossInputs, delta_low: float, delta_high: float) -> LossOutput:
    """L_t = -M_t r_t A_t, M_t = 0 iff (A_t > 0, p > q, D > delta_high) or (A_t < 0, p < q, D > delta_low).

    D = q log(q/p) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8)). Gradient w.r.t. logp: -M_t r_t A_t.
    """
    log_p, log_q = _token_logprobs(inp)
    q = torch.exp(log_q)  # [B, T]
    not_p, not_q = -torch.expm1(log_p), -torch.expm1(log_q)  # [B, T] 1 - p, 1 - q without cancellation
    kl = q * (log_q - log_p) + not_q * torch.log((not_q + BINARY_KL_EPS) / (not_p + BINARY_KL_EPS))  # [B, T]
    adv = inp.advantages  # [B, T]
    high = (adv > 0) & (log_p > log_q) & (kl > delta_high)  # [B, T]
    low = (adv < 0) & (log_p < log_q) & (kl > delta_low)  # [B, T]
    return _dppo_output(inp, high, low)


@register_objective(
    "opsm",
    paper="DeepSeek-AI 2025, DeepSeek-V3.2 (off-policy sequence masking, eq. 9), arXiv:2512.02556; "
          "TRL off_policy_mask_threshold, slime --use-opsm",
    summary="PPO-clip, dropping negative-advantage tokens of rows whose mean log(mu/pi) exceeds delta",
    params=[Param("delta", 0.5, low=0.0, high=None, live=True,
                  doc="row KL threshold: mean_t (log mu - log pi) > delta drops the row's A < 0 tokens (TRL: 0.5)"),
            Param("clip_low", 0.2, low=0.0, high=1.0, live=True,
                  doc="PPO lower clip: ratios below 1 - clip_low stop negative-advantage gradients"),
            Param("clip_high", 0.2, low=0.0, high=None, live=True,
                  doc="PPO upper clip: ratios above 1 + clip_high stop positive-advantage gradients")],
    reduces_to_reinforce=True,
)
def opsm(inp: LossInputs, delta: float, clip_low: float, clip_high: float) -> LossOutput:
    """L_t = M_t * -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t), M_t = 0 iff A_t < 0 and KL_i > delta.

    KL_i = mean over row i's valid tokens of (log mu - log pi_theta). Gradient: M_t times PPO-clip's.
    """
    seq_kl = inp.seq_mean(inp.anchor_logprobs - inp.logprobs.detach())  # [B]
    adv = inp.advantages  # [B, T]
    masked = (adv < 0) & (seq_kl > delta).unsqueeze(-1)  # [B, T]
    loss, low, high = clipped_surrogate(inp.ratio, adv, clip_low, clip_high)  # [B, T] x3
    loss = torch.where(masked, loss.new_zeros(()), loss)  # [B, T]
    rows = inp.seq_lengths > 0  # [B]
    with torch.no_grad():
        dropped = (masked & inp.mask).any(dim=-1)  # [B]
        nan = seq_kl.new_tensor(math.nan)
        seq_frac = dropped[rows].double().mean() if bool(rows.any()) else nan
        kl_mean = seq_kl[rows].mean() if bool(rows.any()) else nan
    return LossOutput(loss, {
        **inp.clip_fractions(low & ~masked, high & ~masked),
        "offpolicy/masked_frac": inp.frac(masked),
        "opsm/masked_seq_frac": seq_frac,
        "opsm/seq_kl_mean": kl_mean,
    })


_K_RANGE = dict(low=0.0, high=10.0)
_LAMBDA_RANGE = dict(low=0.01, high=20.0)


@register_objective(
    "vespo",
    paper="Shen, Zhao, Cheng, Huang, Yu 2026, VESPO: Variational Sequence-Level Soft Policy Optimization for "
          "Stable Off-Policy LLM Training, arXiv:2602.10693; TRL loss_type vespo",
    summary="REINFORCE weighted by a detached Gamma kernel W^k exp(lambda (1 - W)) of the sequence ratio W",
    params=[Param("k_pos", 2.0, **_K_RANGE, live=True, doc="power k of the kernel for A >= 0 (paper c1)"),
            Param("lambda_pos", 3.0, **_LAMBDA_RANGE, live=True, doc="decay lambda of the kernel for A >= 0 (c2)"),
            Param("k_neg", 3.0, **_K_RANGE, live=True, doc="power k of the kernel for A < 0 (paper c1)"),
            Param("lambda_neg", 2.0, **_LAMBDA_RANGE, live=True, doc="decay lambda of the kernel for A < 0 (c2)")],
    reduces_to_reinforce=True,
)
def vespo(inp: LossInputs, k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> LossOutput:
    """L_t = -sg[phi_i] A_t logp_t, phi(W) = W^k exp(lambda (1 - W)), W_i = exp(clamp(sum_t log r_t, log 1e-8, 20)).

    (k, lambda) by the sign of A_t (>= 0: pos). Gradient w.r.t. logp: -phi_i A_t.
    """
    log_w = inp.seq_sum(inp.log_ratio.detach()).clamp(VESPO_LOG_W_MIN, LOG_RATIO_CLAMP).unsqueeze(-1)  # [B, 1]
    adv = inp.advantages  # [B, T]
    pos = adv >= 0  # [B, T]
    k = torch.where(pos, adv.new_tensor(k_pos), adv.new_tensor(k_neg))  # [B, T]
    lam = torch.where(pos, adv.new_tensor(lambda_pos), adv.new_tensor(lambda_neg))  # [B, T]
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))  # [B, T]
    weight_mean = phi[inp.mask].mean() if bool(inp.mask.any()) else phi.new_tensor(math.nan)
    return LossOutput(-phi * adv * inp.logprobs, {  # [B, T]
        "vespo/weight_mean": weight_mean,
    })


def _check_topr_token(params: dict) -> None:
    for side in ("pos", "neg"):
        lo, hi = params[f"{side}_low"], params[f"{side}_high"]
        if lo > hi:
            raise WorkbenchError(f"topr_token.{side}_low={lo!r} is invalid: expected <= {side}_high={hi!r}")


@register_objective(
    "topr_token",
    paper="Le Roux, Bellemare et al. 2025, Tapered Off-Policy REINFORCE, arXiv:2503.14286 (token-level form: "
          "Trinity-RFT topr, ROLL)",
    summary="token-level TOPR: weight 1 on positive tokens, each negative token's own ratio truncated to [0, 1]",
    params=[Param("pos_low", 1.0, low=0.0, high=None, live=True, doc="lower truncation of the A >= 0 token weight"),
            Param("pos_high", 1.0, low=0.0, high=None, live=True, doc="upper truncation of the A >= 0 token weight"),
            Param("neg_low", 0.0, low=0.0, high=None, live=True, doc="lower truncation of the A < 0 token weight"),
            Param("neg_high", 1.0, low=0.0, high=None, live=True, doc="upper truncation of the A < 0 token weight")],
    check=_check_topr_token,
    reduces_to_reinforce=True,
    key_metric=KeyMetric(("offpolicy/truncated_frac",), title="tokens with a truncated weight"),
)
def topr_token(inp: LossInputs, pos_low: float, pos_high: float, neg_low: float, neg_high: float) -> LossOutput:
    """L_t = -sg[w_t] A_t logp_t, w_t = clip(r_t, a, b) with (a, b) the pos or neg bounds by the sign of A_t.

    Gradient w.r.t. logp: -w_t A_t.
    """
    r = inp.ratio.detach()  # [B, T]
    pos = inp.advantages >= 0  # [B, T]
    lo = torch.where(pos, r.new_tensor(pos_low), r.new_tensor(neg_low))  # [B, T]
    hi = torch.where(pos, r.new_tensor(pos_high), r.new_tensor(neg_high))  # [B, T]
    weight = torch.minimum(torch.maximum(r, lo), hi)  # [B, T]
    tapered = (pos & (pos_low < pos_high)) | (~pos & (neg_low < neg_high))  # [B, T]
    truncated = tapered & ((r < lo) | (r > hi))  # [B, T]
    return LossOutput(-weight * inp.advantages * inp.logprobs, {  # [B, T]
        "offpolicy/truncated_frac": inp.frac(truncated),
    })
