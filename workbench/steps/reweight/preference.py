"""The preference family: objectives on pairs of completions of one prompt, formed from the group's rewards.

Noukhovitch et al. 2024 ("Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language Models",
arXiv:2410.18252) found online DPO the most robust of PPO, RLOO and online DPO to off-policy data: its
loss has no importance ratio, so stale samples only change which pairs it sees.

Pairs. Each prompt's group (``context["group_id"]``) is compared by the rows' scalar rewards
(``context["rewards"]``, exact float comparison); rows without a valid token never join a pair.
``pairs="best_worst"`` (default): at most one pair per group, the row with the highest reward against
the row with the lowest (among equal rewards the lowest row index, so the choice is deterministic).
``pairs="all"``: every ordered pair (w, l) of one group with r_w > r_l strictly: with 0/1 rewards every
correct x incorrect pair, with graded rewards every better x worse pair (the group mean plays no
role). A tie never makes a pair, so a group whose rewards are all equal (or a group of one) adds zero
loss and exactly zero gradient; a batch without a pair has loss 0 and gradient 0.

Reduction. Each objective has a loss l_p per pair; the batch loss is the mean over the batch's P pairs,
(1/P) sum_p l_p (DPO's mean over a batch of pairs). It reaches the shared aggregation as a per-row loss
broadcast to the row's tokens: row i carries (B'/P) (1/2) (sum of l_p over the pairs it is in), B' =
rows with a valid token. The default ``seq-mean-token-mean`` averages each row's tokens and then the B'
rows, which gives exactly (1/P) sum_p l_p; every pair's gradient reaches both its rows. Other
aggregations weight each row's half by its token count (``token-mean``: row i by |y_i| / mean_j |y_j|);
a correction (TIS / MIS / rejection) scales each token's share.

Metrics (over the batch's pairs; NaN without a pair): ``pref/pairs`` (P), ``pref/margin`` (mean of
s_w - s_l, the pair score difference the loss acts on: z below, or for ``slic`` the log-likelihood
margin) and ``pref/accuracy`` (fraction of pairs with s_w > s_l: the model's implicit reward already
orders the pair as the rewards do); ``wpo/weight_mean`` and ``copg/residual_mean`` as named.

Notation: over each row's valid tokens, h_i = sum_t [log pi_theta - log pi_ref] (the implicit reward
over beta) and log pi(y_i) = sum_t log pi_theta; z = h_w - h_l. ``reference``: "initial" (default,
``context["ref_logprobs"]``: the frozen initial policy, which the loop builds for any objective that
needs it, as for the KL penalty) or "behaviour" (pi_ref = the sampler mu, or the proximal policy in
decoupled mode: each update is then regularised towards the data's policy instead of the start).
Without ``context["ref_logprobs"]``, ``policy_loss`` refuses a reference="initial" call naming that
key, and the objective itself names the option (``<name>.reference='initial'``, set 'behaviour').

- ``online_dpo`` (DPO, Rafailov et al. 2023, arXiv:2305.18290, on fresh pairs as in Guo et al. 2024,
  "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792):
  l = -log sigmoid(beta z). dl/dh_w = -beta sigmoid(-beta z) = -dl/dh_l. beta = 0.1 (TRL's
  OnlineDPOConfig and DPOConfig default).
- ``ipo`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036): l = (z - 1/(2 tau))^2, dl/dh_w = 2 (z - 1/(2 tau)). tau = 0.1 (TRL's
  default beta, used as tau by its ipo loss). Sequence sums as in the paper (TRL's ipo averages the
  log-probs over tokens instead).
- ``wpo`` (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
  arXiv:2406.11827): l = w_p * (-log sigmoid(beta z)) with the detached pair weight
  w_p = min(1, exp(mean_t log q_w + mean_t log q_l)), the product of the two length-normalised sequence
  likelihoods (the clamp at 1 as in TRL's ``use_weighting``). Variant, ``alignment``: the paper's
  sampled alignment divides each token's probability by sum_v pi(v)^2 over the vocabulary, which this
  step does not receive (it sees the sampled tokens' log-probs only). "none" (default): q = pi_theta,
  the paper's unaligned weight; "behaviour": q = pi_theta / mu, which gives every on-policy pair weight
  exactly 1, the property the paper's alignment is built for. Not normalised over the batch (the paper
  and TRL multiply the pair losses by the weights and take the mean).
- ``copg`` (Flet-Berliac et al. 2024, "Contrastive Policy Gradient: Aligning LLMs on sequence-level
  scores in a supervised-friendly fashion", arXiv:2406.19185, EMNLP 2024): the paper's supervised-friendly
  squared loss on one pair, in its unscaled form: with the regularised reward
  R_b(y) = R(y) - beta ln(pi(y) / pi_ref(y)) = R(y) - beta h(y) (sequence level),
  l = (R_b(y_w) - R_b(y_l))^2 = ((r_w - r_l) - beta z)^2, no 1/2, 1/beta or 1/(4 beta) in front. The
  same form, for k completions of a prompt 1/(k - 1) sum_{i > j} (R_b(y_i) - R_b(y_j))^2, is the CoPG
  loss of the authors' group in Cohere's "Command A" report (2025, arXiv:2504.00698), which is this
  for k = 2. Its gradient, -2 beta [(r_w - r_l) - beta z] (grad log pi(y_w) - grad log pi(y_l)), is
  4 beta times (minus) the contrastive policy-gradient step (1/2) (R_b(y_w) - R_b(y_l))
  (grad log pi(y_w) - grad log pi(y_l)), a policy gradient with the other sample as baseline: no
  importance ratio, hence valid on off-policy pairs (the learning rate absorbs the 4 beta); with
  r_w - r_l = 1/2 and beta = tau it is IPO (times tau^2); the optimum is h_w - h_l = (r_w - r_l) / beta.
  beta = 0.1 (the family's default; the reward scale sets the right value). The paper
  contrasts any two samples; a tied pair carries only the term (beta z)^2 and is left out here like in
  the rest of the family.
- ``slic`` (SLiC-HF, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
  arXiv:2305.10425, rank-calibration loss): l = max(0, delta - log pi(y_w) + log pi(y_l)); gradient
  -1 on y_w's and +1 on y_l's log-probs while the margin is under delta, else 0. delta = 1.0 (the unit
  margin of TRL's hinge loss with beta = 1). No reference. The paper's regulariser, cross-entropy on
  SFT targets (-lambda log pi(y_ref|x)), is omitted: the batch holds no SFT targets (anchor with
  ``kl_coef`` or see ``chord``). Summed log-probs favour short answers: a shorter winner can meet the
  margin from the start and give no gradient (about 7 nats on the tiny addition task with a length
  reward), so delta is scaled to the task.

Per-token gradient: every valid token of a row gets its row's d loss / d h (they enter through sums).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.steps.reweight.context import group_index, row_values, token_values, valid_rows
from workbench.steps.reweight.core import Param, register_objective
from workbench.steps.reweight.inputs import LossInputs, LossOutput

# --------------------------------------------------------------------------------------------
# pairs, reference, reduction (shared by the five objectives)
# --------------------------------------------------------------------------------------------

PAIR_MODES: tuple[str, ...] = ("best_worst", "all")
REFERENCES: tuple[str, ...] = ("initial", "behaviour")


def preference_pairs(inp: LossInputs, mode: str) -> torch.Tensor:
    """[B, B] bool: entry (w, l) is True when row w is preferred to row l in a pair of ``mode``."""
    rewards = row_values(inp, "rewards")  # [B]
    inv, _ = group_index(inp)  # [B]
    rows = valid_rows(inp)  # [B]
    same = (inv[:, None] == inv[None, :]) & rows[:, None] & rows[None, :]  # [B, B] same group, both samples
    better = same & (rewards[:, None] > rewards[None, :])  # [B, B] r_i > r_j strictly
    if mode == "all":
        return better
    idx = torch.arange(rows.shape[0], device=rows.device)
    earlier = same & (idx[None, :] < idx[:, None])  # [B, B] j is an earlier row of i's group
    is_max = rows & (~same | (rewards[:, None] >= rewards[None, :])).all(dim=1)  # [B]
    is_min = rows & (~same | (rewards[:, None] <= rewards[None, :])).all(dim=1)  # [B]
    first_max = is_max & ~(earlier & is_max[None, :]).any(dim=1)  # [B] lowest index among the maxima
    first_min = is_min & ~(earlier & is_min[None, :]).any(dim=1)  # [B]
    return better & first_max[:, None] & first_min[None, :]  # [B, B]; better: no pair when max == min


def reference_logprobs(inp: LossInputs, reference: str, objective: str) -> torch.Tensor:
    """log pi_ref [B, T]: the frozen initial policy (``context["ref_logprobs"]``) or the behaviour policy.

    "behaviour" is the anchor of the call: the sampler's log-probs, or the proximal policy's when
    ``prox_logprobs`` are given (decoupled mode).
    """
    if reference == "behaviour":
        return inp.anchor_logprobs
    if inp.context.get("ref_logprobs") is None:
        raise WorkbenchError(
            f"{objective}.reference='initial' needs the frozen initial policy's log-probs (context['ref_logprobs']; "
            f"a run gets them from its reference model): pass them or set reference='behaviour'")
    return token_values(inp, "ref_logprobs")  # [B, T]


def seq_log_ratio(inp: LossInputs, reference: str, objective: str) -> torch.Tensor:
    """h_i = sum_t [log pi_theta(y_it) - log pi_ref(y_it)] over each row's valid tokens -> [B] (graph).

    Not clamped: no preference loss exponentiates it (the +-20 clamp of ``LossInputs.log_ratio`` would
    stop the gradient of far-off rows).
    """
    return inp.seq_sum(inp.logprobs - reference_logprobs(inp, reference, objective))  # [B]


def pair_differences(x: torch.Tensor) -> torch.Tensor:
    """[B, B] x_i - x_j for ``x [B]`` (entry (w, l) is the winner's value minus the loser's)."""
    return x[:, None] - x[None, :]


def pair_output(inp: LossInputs, pairs: torch.Tensor, pair_loss: torch.Tensor, margin: torch.Tensor,
                metrics: dict[str, Any] | None = None) -> LossOutput:
    """The per-token loss whose ``seq-mean-token-mean`` is the mean of ``pair_loss [B, B]`` over ``pairs``.

    ``margin [B, B]`` is s_w - s_l (reported, not differentiated). See the module docstring.
    """
    chosen = torch.where(pairs, pair_loss, pair_loss.new_zeros(()))  # [B, B], exactly 0 off the pairs
    n_pairs = pairs.sum()
    dtype = pair_loss.dtype
    scale = valid_rows(inp).sum().to(dtype) / n_pairs.clamp(min=1).to(dtype)  # B' / P
    row = 0.5 * scale * (chosen.sum(dim=1) + chosen.sum(dim=0))  # [B] winner half + loser half
    with torch.no_grad():
        m = margin.detach()[pairs]  # [P]
        out: dict[str, Any] = {
            "pref/pairs": float(n_pairs),
            "pref/margin": m.double().mean() if m.numel() else math.nan,
            "pref/accuracy": (m > 0).double().mean() if m.numel() else math.nan,
        }
        out.update(metrics or {})
    return LossOutput(row.unsqueeze(-1).expand_as(inp.logprobs), out)  # [B, T]


def pair_mean(x: torch.Tensor, pairs: torch.Tensor) -> Any:
    """Mean of ``x [B, B]`` over the pairs (no graph; NaN without a pair)."""
    vals = x.detach()[pairs]  # [P]
    return vals.double().mean() if vals.numel() else math.nan


def pair_needs(params: dict[str, Any]) -> tuple[str, ...]:
    """Context keys of a preference objective: groups and rewards, the reference for reference='initial'."""
    out = ["group_id", "rewards"]
    if params.get("reference") == "initial":
        out.append("ref_logprobs")
    return tuple(out)


def positive(objective: str, key: str) -> Callable[[dict[str, Any]], None]:
    """A ``check`` for ``register_objective``: params[key] must be > 0 (ranges are inclusive)."""
    def check(params: dict[str, Any]) -> None:
        if not params[key] > 0.0:
            raise WorkbenchError(f"{objective}.{key}={params[key]!r} is invalid: expected a number > 0")
    return check


# --------------------------------------------------------------------------------------------
# the objectives
# --------------------------------------------------------------------------------------------

_PAIRS = Param("pairs", "best_worst", live=False, choices=PAIR_MODES,
               doc="best_worst: highest- vs lowest-reward row of each group; all: every pair with r_w > r_l")
_REFERENCE = Param("reference", "initial", live=False, choices=REFERENCES,
                   doc="pi_ref: initial = frozen initial policy (context['ref_logprobs']); behaviour = the sampler")
_ONLINE_DPO_PAPER = ("Rafailov et al. 2023, DPO, arXiv:2305.18290; online: Guo et al. 2024, arXiv:2402.04792; "
                     "off-policy robustness: Noukhovitch et al. 2024, Asynchronous RLHF, arXiv:2410.18252")


def _beta(default: float, doc: str) -> Param:
    return Param("beta", default, low=0.0, high=None, live=True, doc=doc)


def _dpo_pairs(inp: LossInputs, beta: float, pairs: str, reference: str, objective: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pair mask [B, B], z = h_w - h_l [B, B], DPO pair loss -log sigmoid(beta z) [B, B])."""
    z = pair_differences(seq_log_ratio(inp, reference, objective))  # [B, B]
    return preference_pairs(inp, pairs), z, F.softplus(-beta * z)  # softplus(-x) = -log sigmoid(x)


@register_objective(
    "online_dpo",
    paper=_ONLINE_DPO_PAPER,
    summary="DPO on pairs from each group: -log sigmoid(beta (h_w - h_l)), h = sum_t log pi/pi_ref; no ratio",
    params=[_beta(0.1, "DPO temperature: implicit reward beta h (TRL default 0.1; > 0)"), _PAIRS, _REFERENCE],
    check=positive("online_dpo", "beta"),
    needs=pair_needs,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=False,
)
def online_dpo(inp: LossInputs, beta: float, pairs: str, reference: str) -> LossOutput:
    """l_p = -log sigmoid(beta (h_w - h_l)); the loss is the mean over the batch's pairs."""
    mask, z, loss = _dpo_pairs(inp, beta, pairs, reference, "online_dpo")
    return pair_output(inp, mask, loss, z)


@register_objective(
    "ipo",
    paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences "
          "(IPO), arXiv:2310.12036",
    summary="IPO on pairs from each group: ((h_w - h_l) - 1/(2 tau))^2, h = sum_t log pi/pi_ref",
    params=[Param("tau", 0.1, low=0.0, high=None, live=True,
                  doc="regularisation: the loss pulls h_w - h_l to 1/(2 tau) (TRL default 0.1; > 0)"),
            _PAIRS, _REFERENCE],
    check=positive("ipo", "tau"),
    needs=pair_needs,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=False,
)
def ipo(inp: LossInputs, tau: float, pairs: str, reference: str) -> LossOutput:
    """l_p = ((h_w - h_l) - 1/(2 tau))^2."""
    z = pair_differences(seq_log_ratio(inp, reference, "ipo"))  # [B, B]
    return pair_output(inp, preference_pairs(inp, pairs), (z - 1.0 / (2.0 * tau)) ** 2, z)


@register_objective(
    "wpo",
    paper="Zhou et al. 2024, WPO: Enhancing RLHF with Weighted Preference Optimization, arXiv:2406.11827",
    summary="online DPO with each pair weighted by sg[min(1, product of its length-normalised likelihoods)]",
    params=[_beta(0.1, "DPO temperature (TRL default 0.1; > 0)"), _PAIRS, _REFERENCE,
            Param("alignment", "none", live=False, choices=("none", "behaviour"),
                  doc="token likelihood in the weight: none = pi (paper, unaligned); behaviour = pi / mu")],
    check=positive("wpo", "beta"),
    needs=pair_needs,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=False,
)
def wpo(inp: LossInputs, beta: float, pairs: str, reference: str, alignment: str) -> LossOutput:
    """l_p = w_p (-log sigmoid(beta (h_w - h_l))), w_p = sg[min(1, exp(mean_t log q_w + mean_t log q_l))]."""
    mask, z, loss = _dpo_pairs(inp, beta, pairs, reference, "wpo")
    with torch.no_grad():
        token_q = inp.logprobs if alignment == "none" else inp.logprobs - inp.anchor_logprobs  # [B, T]
        log_q = inp.seq_mean(token_q.detach())  # [B] length-normalised log-likelihood
        log_w = log_q[:, None] + log_q[None, :]  # [B, B]
        weight = torch.exp(log_w.clamp(max=0.0))  # [B, B], min(1, exp(.)) without overflow
    return pair_output(inp, mask, weight * loss, z, {"wpo/weight_mean": pair_mean(weight, mask)})


@register_objective(
    "copg",
    paper="Flet-Berliac et al. 2024, Contrastive Policy Gradient: Aligning LLMs on sequence-level scores in a "
          "supervised-friendly fashion (CoPG), arXiv:2406.19185",
    summary="CoPG: ((r_w - beta h_w) - (r_l - beta h_l))^2 on pairs from each group; off-policy, no ratio",
    params=[_beta(0.1, "KL strength of the regularised reward r - beta h (> 0)"), _PAIRS, _REFERENCE],
    check=positive("copg", "beta"),
    needs=pair_needs,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=False,
)
def copg(inp: LossInputs, beta: float, pairs: str, reference: str) -> LossOutput:
    """l_p = ((r_w - r_l) - beta (h_w - h_l))^2, r = context['rewards']."""
    z = pair_differences(seq_log_ratio(inp, reference, "copg"))  # [B, B]
    gap = pair_differences(row_values(inp, "rewards"))  # [B, B] r_w - r_l
    resid = gap - beta * z  # [B, B]
    mask = preference_pairs(inp, pairs)
    return pair_output(inp, mask, resid ** 2, z, {"copg/residual_mean": pair_mean(resid, mask)})


@register_objective(
    "slic",
    paper="Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback, arXiv:2305.10425",
    summary="SLiC-HF rank calibration: max(0, delta - log pi(y_w) + log pi(y_l)) on pairs from each group",
    params=[Param("delta", 1.0, low=0.0, high=None, live=True,
                  doc="hinge margin on log pi(y_w) - log pi(y_l) (TRL hinge's unit margin)"), _PAIRS],
    needs=pair_needs,
    default_aggregation="seq-mean-token-mean",
    reduces_to_reinforce=False,
)
def slic(inp: LossInputs, delta: float, pairs: str) -> LossOutput:
    """l_p = max(0, delta - (log pi(y_w) - log pi(y_l))), log pi(y) = sum_t log pi_theta(y_t)."""
    z = pair_differences(inp.seq_sum(inp.logprobs))  # [B, B]
    return pair_output(inp, preference_pairs(inp, pairs), F.relu(delta - z), z)


__all__ = ["PAIR_MODES", "REFERENCES", "copg", "ipo", "online_dpo", "pair_output", "preference_pairs",
           "reference_logprobs", "seq_log_ratio", "slic", "wpo"]
