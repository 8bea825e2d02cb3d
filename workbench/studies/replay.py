"""Same-batch replay: stale batches pushed through every objective, side by side, repeated.

    table = same_batch_replay(run, staleness=8, repeats=8)
    intervals = replay_intervals(table)      # mean cosine per objective with its 95% interval
    replay_findings(intervals)               # one sentence per objective, only what the intervals show

1. **The logged stale batches.** Generate and score ``repeats`` independent batches with the run's
   current weights theta_k (their sampler log-probs are the behaviour log-probs mu), as the loop would.
2. **Let them go stale.** Train ``staleness`` ordinary updates (``run.step()``), once, so the weights
   are theta_{k+s}: every batch is now s versions old, as under the fixed-lag setting of the buffer
   (docs/design.md, "Staleness and the behaviour policy").
3. **Replay.** With theta_{k+s} frozen, for every stale batch and every objective: one forward pass
   (shared), the objective's loss with its paper's aggregation, the gradient with respect to every
   parameter, its norm, and its cosine similarity to the **on-policy gradient**; plus the objective's
   own clip / mask fractions, the share of tokens it silences (zero gradient at a token with A != 0,
   computed with autograd, so the same definition for every objective), and ESS / M2 of the batch.
4. **The on-policy gradient** is estimated from one large fresh sample of theta_{k+s}
   (``onpolicy_factor`` x the batch's prompts, same group size, scored the same way): the REINFORCE
   gradient -A grad log pi with token-mean aggregation (every objective reduces to it at ratio 1).
   **The noise floor** is the row ``fresh batch (REINFORCE)``: per repeat, a fresh on-policy batch of
   the stale batch's size, its cosine to the same reference. It is what fresh data of that size
   achieves; an objective level with it recovers the on-policy direction as well as fresh data would.

Design of the repeats (the cheapest that gives every cosine an honest interval): a cosine of one
batch varies with that batch's sampling, so each repeat draws its own stale batch and its own fresh
batch; the s updates (the expensive part) and the large reference sample are shared by all repeats.
The intervals (``replay_intervals``: percentile bootstrap across repeats, ``workbench.stats``) thus
hold the reference fixed: its own noise shrinks every cosine alike (stale and fresh rows), which is
why the objectives are compared with the floor and with 0, never with 1.

Nothing here changes the run's weights after step 2 (gradients are taken with ``autograd.grad``,
the optimizer is not touched), but the sampling in steps 1 and 4 draws from the run's generators.

Left out: the gradient of the KL / entropy terms (policy loss only), proximal-policy recompute
(``prox_logprobs`` is passed through when the batch has it), independent reference samples per repeat.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import polars as pl
import torch

from workbench.errors import bad_value
from workbench.policy.logprobs import token_logprobs
from workbench.rollouts import Rollouts
from workbench.steps.reweight.core import OBJECTIVES, Objective, resolve_objective
from workbench.steps.reweight.loss import logprob_gradient, policy_loss
from workbench.steps.update import expert_batch, loss_context
from workbench.studies.replay_report import (FRESH_ROW, replay_chart, replay_findings, replay_intervals,
                                             replay_summary, replay_verdict)

REPEATS = 8  # stale and fresh batches per replay: enough for a percentile-bootstrap interval of each cosine
SUPPORTED_CONTEXT = ("group_id", "rewards", "step", "state", "ref_logprobs", "expert_logprobs", "expert_mask",
                     "generator")


def replay_context(run, batch: Rollouts, objective: Objective, model=None) -> dict[str, Any]:
    """The ``policy_loss`` context the loop would pass for ``batch`` (``steps.update.loss_context``),
    except that a replay never moves the run: ``state`` is a *copy* of the run's objective state, and
    without a reference model the behaviour log-probs stand in as the reference (the batch's own
    sampler). CHORD's expert demonstrations are scored by ``model`` (default the run's) with gradients.
    """
    model = run.model if model is None else model
    needs = objective.needs
    ref_lp = batch.behavior_logprobs if ("ref_logprobs" in needs and run.ref_model is None) else None
    expert = expert_batch(batch, run.tokenizer, run.task) if "expert_logprobs" in needs else None
    return loss_context(objective, batch, model, temperature=run.knobs.applied.temperature,
                        extra={"step": run.version, "state": copy.deepcopy(run.objective_state)},
                        ref_model=run.ref_model, ref_logprobs=ref_lp, expert=expert)


def _params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat(grads, params) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def onpolicy_gradient(model, batch: Rollouts, temperature: float, chunk: int = 256) -> torch.Tensor:
    """The REINFORCE gradient (token-mean) of ``batch`` sampled from ``model`` itself, flattened."""
    params = _params(model)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    n_tokens = float(batch.response_mask.sum())
    for start in range(0, len(batch), chunk):
        sub = batch.select(list(range(start, min(start + chunk, len(batch)))))
        lp, _ = token_logprobs(model, sub, temperature=temperature)  # [b, T]
        mask = sub.response_mask  # [b, T]
        adv = sub.advantages if sub.advantages.dim() == 2 else sub.advantages[:, None]
        loss = -(adv * lp * mask).sum() / max(n_tokens, 1.0)  # token-mean over the whole batch
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        total += _flat(grads, params).double()
    return total


def replay_objectives(run, batch: Rollouts, g_on: torch.Tensor, objectives: list[str], temperature: float,
                      params: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Push ``batch`` through each objective with the run's current weights; one row per objective."""
    params = params or {}
    model = run.model
    weights = _params(model)
    model.train()
    lp, _ = token_logprobs(model, batch, temperature=temperature)  # [B, T], one shared graph
    mask = batch.response_mask  # [B, T]
    valid = mask > 0
    adv_t = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand_as(lp)
    signal = valid & (adv_t != 0)  # [B, T] tokens that carry a gradient on-policy
    rows = []
    for name in objectives:
        obj = resolve_objective(name, params.get(name, {}))
        agg = obj.default_aggregation
        ctx = replay_context(run, batch, obj)
        g_tok = logprob_gradient(obj, lp, batch.behavior_logprobs, batch.advantages, mask, aggregation=agg,
                                 prox_logprobs=batch.prox_logprobs,
                                 context={**ctx, "state": dict(ctx["state"])})  # [B, T] dL/dlogp
        loss, metrics = policy_loss(obj, lp, batch.behavior_logprobs, batch.advantages, mask, aggregation=agg,
                                    prox_logprobs=batch.prox_logprobs, context=ctx)
        grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        g = _flat(grads, weights).double()
        rows.append({
            "objective": name, "aggregation": agg, "loss": float(loss.detach()), "grad_norm": float(g.norm()),
            "cosine_to_onpolicy": _cos(g, g_on),
            "clipfrac": float(metrics.get("offpolicy/clipfrac", 0.0)),
            "masked_frac": float(metrics.get("offpolicy/masked_frac", 0.0)),
            "silenced_frac": float((signal & (g_tok == 0)).sum()) / max(1, int(signal.sum())),
            "ess_token": float(metrics.get("offpolicy/ess_token", math.nan)),
            "ess_seq": float(metrics.get("offpolicy/ess_seq", math.nan)),
            "m2": float(metrics.get("offpolicy/m2", math.nan)),
        })
    return rows


def same_batch_replay(run, staleness: int, objectives: list[str] | None = None, *,
                      params: dict[str, dict[str, Any]] | None = None, onpolicy_factor: int = 8,
                      warmup: int = 0, repeats: int = REPEATS) -> pl.DataFrame:
    """Steps 1-4 of the module doc on ``run`` with ``repeats`` stale and fresh batches; returns the
    long table: per repeat (``repeat`` column, 0-based), one row per objective plus the fresh row.

    ``params`` maps objective name -> parameter overrides (defaults from the registry otherwise).
    ``warmup`` ordinary updates run first (an untrained model's batches often carry no reward
    variance, hence no gradient at all). The frame's ``staleness`` column is the batches' actual
    staleness (policy versions behind); ``signal_tokens`` counts each repeat's tokens with A != 0.
    Intervals across the repeats: ``replay_intervals``; the sentences they support: ``replay_findings``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise bad_value("repeats", repeats, "an int >= 1 (stale and fresh batches; >= 2 for an interval)")
    objectives = list(objectives or OBJECTIVES.names())
    temperature = run.knobs.applied.temperature
    for _ in range(int(warmup)):
        run.step()
    prompts = run.config.prompts_per_step
    stales = [_fresh(run, prompts) for _ in range(repeats)]  # 1. all generated (and scored) by theta_k
    v0 = run.version
    for _ in range(int(staleness)):  # 2. s ordinary updates, once: every stale batch is s versions old
        run.step()
    s = run.version - v0
    model = run.model
    big = _fresh(run, prompts * onpolicy_factor)  # 4. the on-policy reference: one large sample of theta_{k+s}
    g_on = onpolicy_gradient(model, big, temperature)
    frames = []
    for r, stale in enumerate(stales):
        rows = replay_objectives(run, stale, g_on, objectives, temperature, params)  # 3.
        g_fresh = onpolicy_gradient(model, _fresh(run, prompts), temperature)  # the floor's r-th draw
        rows.append({"objective": FRESH_ROW, "aggregation": "token-mean", "loss": math.nan,
                     "grad_norm": float(g_fresh.norm()), "cosine_to_onpolicy": _cos(g_fresh, g_on), "clipfrac": 0.0,
                     "masked_frac": 0.0, "silenced_frac": 0.0, "ess_token": 1.0, "ess_seq": 1.0, "m2": 0.0})
        adv = stale.advantages if stale.advantages.dim() == 2 else stale.advantages[:, None]
        signal = int(((stale.response_mask > 0) & (adv != 0)).sum())
        frames.append(pl.DataFrame(rows).with_columns(
            pl.lit(r).alias("repeat"), pl.lit(s).alias("staleness"), pl.lit(len(stale)).alias("sequences"),
            pl.lit(len(big)).alias("onpolicy_sequences"), pl.lit(signal).alias("signal_tokens")))
    return pl.concat(frames).select("repeat", pl.exclude("repeat"))


def _fresh(run, prompts: int) -> Rollouts:
    """A fresh on-policy batch of ``prompts`` prompts x group_size, sampled and scored like the loop
    (``Run.sample``), with every group kept."""
    with torch.no_grad():
        batch, _ = run.sample(prompts, filter_zero_variance=False)
    return batch




__all__ = ["FRESH_ROW", "REPEATS", "onpolicy_gradient", "replay_chart", "replay_context", "replay_findings",
           "replay_intervals", "replay_objectives", "replay_summary", "replay_verdict", "same_batch_replay"]
