"""CHORD: SFT on expert demonstrations mixed into RL with a scheduled weight mu and the phi token weight.

Paper: "On-Policy RL Meets Off-Policy Experts: Harmonizing SFT and RL via Dynamic Weighting" (CHORD),
arXiv:2508.11408 (code Trinity-RFT ``mix_chord``, ``chord_policy_loss.py``):

    L = (1 - mu(step)) L_GRPO(on-policy batch) + mu(step) L_SFT(expert batch)

- L_GRPO: PPO-clip, -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) per token (clip 0.2), reduced
  with the call's aggregation. Returned as the per-token loss (1 - mu) L_GRPO,t.
- L_SFT = -(1/N_e) sum_{expert tokens} phi_t log p_t, token-mean over the expert batch's valid tokens
  (Trinity ``use_token_level_loss_in_sft``), p_t = pi_theta(y*_t) from ``context["expert_logprobs"]``
  (with its graph) and ``context["expert_mask"]``. ``sft_weight``: "phi" phi = sg[p (1 - p)]
  (CHORD-phi), "none" phi = 1 (plain SFT, CHORD-mu), "is" phi = sg[p] (Trinity ``sft_is``). Returned
  as ``LossOutput.extra_loss`` = mu L_SFT, added after aggregation. 0 when there is no expert token.
- mu schedule (``chord_mu``, Trinity ``mu_schedule_function``): step < warmup: (step / warmup) peak;
  step >= warmup + decay: valley; else (peak - valley) (1 + cos(pi (step - warmup) / decay)) / 2 + valley.
  ``step`` = ``context["step"]``, the update index (the loop passes it).
Trinity additionally rescales each part by its share of the micro-batch (``per_micro_batch_weight_*``)
so that each is a mean over its own batch; here each part is already a mean over its own batch.

Defaults: Trinity's example yaml (mu_warmup 200, mu_decay 400, mu_peak 0.5, mu_valley 0.02, phi on).
Presets: ``chord_mu`` (0 / 200 / 0.9 / 0.05, phi off) and ``chord_phi`` (mu constant 0.1, phi on).
Gradient w.r.t. the batch logp: (1 - mu) x PPO-clip's; w.r.t. an expert logp_t: -mu phi_t / N_e.
Metrics: ``chord/mu``, ``chord/sft_loss`` (L_SFT), ``chord/expert_tokens`` and PPO's clip fractions.
The loop builds the expert batch from the minibatch's prompts with ``task.expert`` answers + EOS (one
demonstration per prompt group; ``workbench.policy.warm_start.sft_batch``) and computes its log-probs in the
same forward/backward as the update.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.context import expert_tensors, get_step
from workbench.steps.reweight.core import Param, register_objective
from workbench.steps.reweight.inputs import LossInputs, LossOutput
from workbench.steps.reweight.ppo_family import clipped_surrogate


def chord_mu(step: int, warmup: float, decay: float, peak: float, valley: float) -> float:
    """CHORD's mu at update ``step``: linear warm-up to ``peak``, cosine decay to ``valley``, then flat."""
    if step < warmup:
        return step / warmup * peak
    if step >= warmup + decay:
        return valley
    return (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay)) + valley


def _check_chord(p: dict) -> None:
    for k in ("mu_warmup", "mu_decay"):
        if p[k] != int(p[k]):
            raise WorkbenchError(f"chord.{k}={p[k]!r} is invalid: expected a whole number of updates")


@register_objective(
    "chord",
    paper="Zhang et al. 2025, On-Policy RL Meets Off-Policy Experts: Harmonizing SFT and RL via Dynamic "
          "Weighting (CHORD), arXiv:2508.11408",
    summary="(1-mu) PPO-clip on the batch + mu SFT on expert answers, phi = p(1-p) token weight, mu on a schedule",
    params=[
        Param("mu_warmup", 200.0, low=0.0, high=None, live=True, doc="updates of linear mu warm-up from 0 to mu_peak"),
        Param("mu_decay", 400.0, low=0.0, high=None, live=True, doc="updates of cosine decay from mu_peak to mu_valley"),
        Param("mu_peak", 0.5, low=0.0, high=1.0, live=True, doc="largest SFT weight mu"),
        Param("mu_valley", 0.02, low=0.0, high=1.0, live=True, doc="final SFT weight mu"),
        Param("sft_weight", "phi", live=False, choices=("phi", "none", "is"),
              doc="expert token weight: phi = p(1-p) (CHORD-phi), 1 (plain SFT), p (sft_is)"),
        Param("clip_low", 0.2, low=0.0, high=1.0, live=True, doc="PPO lower clip of the RL part"),
        Param("clip_high", 0.2, low=0.0, high=None, live=True, doc="PPO upper clip of the RL part"),
    ],
    presets={"chord_mu": {"mu_warmup": 0.0, "mu_decay": 200.0, "mu_peak": 0.9, "mu_valley": 0.05,
                          "sft_weight": "none"},
             "chord_phi": {"mu_warmup": 0.0, "mu_decay": 0.0, "mu_peak": 0.1, "mu_valley": 0.1,
                           "sft_weight": "phi"}},
    check=_check_chord,
    needs=("step", "expert_logprobs", "expert_mask"),
    default_aggregation="token-mean",
    reduces_to_reinforce=False,
)
def chord(inp: LossInputs, mu_warmup: float, mu_decay: float, mu_peak: float, mu_valley: float,
          sft_weight: str, clip_low: float, clip_high: float) -> LossOutput:
    """L = (1 - mu) PPO-clip (per token) + mu * [-(1/N_e) sum phi_t log p_t over expert tokens] (extra_loss)."""
    mu = chord_mu(get_step(inp), mu_warmup, mu_decay, mu_peak, mu_valley)
    e_lp, e_mask = expert_tensors(inp)  # [Be, Te] x2
    with torch.no_grad():
        p = torch.exp(e_lp.detach())
        if sft_weight == "phi":
            phi = p * (1.0 - p)
        elif sft_weight == "is":
            phi = p
        else:
            phi = torch.ones_like(p)
    n_e = e_mask.sum()
    sft = torch.where(e_mask, -phi * e_lp, e_lp.new_zeros(())).sum() / n_e.clamp(min=1).to(e_lp.dtype)
    rl, low, high = clipped_surrogate(inp.ratio, inp.advantages, clip_low, clip_high)
    return LossOutput((1.0 - mu) * rl, {  # [B, T]
        "chord/mu": mu,
        "chord/sft_loss": sft.detach(),
        "chord/expert_tokens": float(n_e),
        **inp.clip_fractions(low, high),
    }, extra_loss=mu * sft.to(inp.logprobs.dtype))
