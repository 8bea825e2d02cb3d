"""TB: trajectory balance in VarGrad form (TBA, Bartoldson et al. 2025, arXiv:2503.18929).

Target distribution pi*(y|x) proportional to pi_ref(y|x) exp(R(x, y) / beta). With the sequence
log-ratio s_i = sum_t [log pi_theta(y_it) - log pi_ref(y_it)] over the row's valid tokens, the
VarGrad loss (code ``bbartoldson/TBA`` ``tb_loss``) is

    log Z_hat(x) = mean_{j in group(x)} (R_j / beta - s_j)          (per-prompt batch estimate)
    L_i          = (sg[log Z_hat(x_i)] + s_i - R_i / beta)^2

broadcast to the row's tokens; the default aggregation seq-mean-token-mean gives the paper's
(1/BK) sum_{i,j}. Gradient of L_i w.r.t. every valid logp_t of row i: 2 (log Z_hat + s_i - R_i / beta).
Because the residuals of a group sum to zero, the stop-gradient changes nothing in the gradient.
On-policy with pi_ref = the sampler it is REINFORCE with A_i = (R_i - mean R) / beta, scaled by 2
(the paper: REINFORCE with A = (r - r_bar) - beta (KL - KL_bar), up to the factor 2 / beta).
Valid off-policy: no importance ratio appears.

Choices (the paper gives the form; TBA's code the rest):
- ``reference``: "ref" (default, the paper: a frozen reference policy, ``context["ref_logprobs"]``;
  the loop supplies it from the frozen initial model) or "anchor" (pi_ref = the behaviour/proximal
  policy: a KL-regularised step of size 1/beta away from the sampler, TBA's "reference reset" done at
  every batch).
- ``reward``: "rewards" (default, R = ``context["rewards"]``, the paper's r) or "advantages" (R = the
  row's mean advantage: any per-group shift cancels in log Z_hat, so Dr. GRPO-style advantages give
  the same loss as raw rewards; GRPO's 1/std rescales R per group).
- ``beta`` = 0.012: TBA's GSM8K ``kl_coef`` (annealed to 0.004 there; anneal it with a live knob).
Rows without valid tokens are not samples: they are left out of log Z_hat. Needs
``context["group_id"]``.
Metrics: ``tb/log_z_mean`` (mean log Z_hat over groups), ``tb/residual_rms`` (sqrt of mean L_i over rows).
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.context import group_index, group_mean, row_values, token_values, valid_rows
from workbench.steps.reweight.core import Param, register_objective
from workbench.steps.reweight.inputs import LossInputs, LossOutput


def tb_log_z(seq_log_ratio: torch.Tensor, rewards: torch.Tensor, beta: float, inv: torch.Tensor,
             n_groups: int) -> torch.Tensor:
    """Per-row log Z_hat [B] = mean over the row's group of (R_j / beta - s_j) (no graph)."""
    return group_mean((rewards / beta - seq_log_ratio).detach(), inv, n_groups)


def _needs(p: dict) -> tuple[str, ...]:
    out = ["group_id"]
    if p["reference"] == "ref":
        out.append("ref_logprobs")
    if p["reward"] == "rewards":
        out.append("rewards")
    return tuple(out)


def _check_tb(p: dict) -> None:
    if not p["beta"] > 0.0:
        raise WorkbenchError(f"tb.beta={p['beta']!r} is invalid: expected a number > 0")


@register_objective(
    "tb",
    paper="Bartoldson et al. 2025, Trajectory Balance with Asynchrony (TBA), arXiv:2503.18929",
    summary="VarGrad trajectory balance (log Z_hat + log pi/pi_ref - R/beta)^2 with a per-prompt log Z estimate",
    params=[
        Param("beta", 0.012, low=0.0, high=None, live=True,
              doc="KL strength: target pi_ref exp(R / beta) (TBA GSM8K: 0.012 annealed to 0.004; > 0)"),
        Param("reference", "ref", live=False, choices=("ref", "anchor"),
              doc="ref: frozen reference context['ref_logprobs'] (paper); anchor: the sampler's log-probs"),
        Param("reward", "rewards", live=False, choices=("rewards", "advantages"),
              doc="R: context['rewards'] (paper) or the row's mean advantage"),
    ],
    check=_check_tb,
    needs=_needs,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=False,
)
def tb(inp: LossInputs, beta: float, reference: str, reward: str) -> LossOutput:
    """L_i = (sg[log Z_hat(x_i)] + s_i - R_i / beta)^2, s_i = sum_t log pi_theta - log pi_ref.

    Gradient w.r.t. logp_t: 2 (log Z_hat + s_i - R_i / beta) for every valid token of row i.
    """
    ref = inp.anchor_logprobs if reference == "anchor" else token_values(inp, "ref_logprobs")  # [B, T]
    s = inp.seq_sum(inp.logprobs - ref)  # [B]
    rew = row_values(inp, "rewards") if reward == "rewards" else inp.seq_advantages  # [B]
    inv, n_groups = group_index(inp)
    log_z = tb_log_z(s, rew, beta, inv, n_groups)  # [B]
    resid = log_z + s - rew / beta  # [B]
    loss = resid ** 2  # [B]
    with torch.no_grad():
        rows = valid_rows(inp)
        if n_groups:
            first = torch.zeros(n_groups + 1, dtype=log_z.dtype, device=log_z.device).index_copy(0, inv, log_z)
            log_z_mean = first[:n_groups].double().mean()
            rms = loss.detach()[rows].double().mean().sqrt()
        else:
            log_z_mean = rms = math.nan
    return LossOutput(loss.unsqueeze(-1).expand_as(inp.logprobs), {  # [B, T]
        "tb/log_z_mean": log_z_mean,
        "tb/residual_rms": rms,
    })
