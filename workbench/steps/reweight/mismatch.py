"""Sampler-vs-trainer mismatch, and the split of the objective's log-ratio into drift and mismatch.

Three policies meet in an update (docs/design.md, "Staleness and the behaviour policy"): the
behaviour policy mu (the sampler: an engine with its own kernels and dtype, at version v_b), the
trainer at that same version pi_gen = pi_{theta_{v_b}} (same weights as mu, the trainer's
kernels), and the current trainer pi_theta. Per sampled token the log-ratio the objective sees splits exactly:

    log pi_theta - log mu  =  (log pi_theta - log pi_gen)  +  (log pi_gen - log mu)
         total                    policy drift                   engine mismatch

Drift is staleness (updates since v_b, and earlier minibatches of a reused batch); engine mismatch
is what differs between two programs holding the same weights: kernels, dtype (a bf16 engine),
and a truncated sampling distribution (top-k / top-p: mu is renormalised over fewer tokens than
the trainer's full softmax, so that gap is counted here too, unless ``replay_sampling_mask`` makes
the trainer renormalise over the same kept sets: ``workbench.policy.numerics``), and the injected
logit rounding / noise of ``RunConfig``'s numerics knobs.

Where log pi_gen comes from. A batch consumed by an update that starts at its generating version
(staleness 0, no reuse: the default run) needs nothing extra: the update's own log-probs are
log pi_gen, drift is exactly 0 and ``metrics`` uses them. A batch consumed later (staleness > 0,
``sync_every`` > 1, several updates per batch) gets ``attach_trainer_logprobs`` right after
generation, when the trainer holds exactly the generating weights (always true in workbench: the
buffer generates every batch with the current weights and delays it, ``workbench.steps.buffer``): one
no-grad forward stores log pi_gen as ``Rollouts.trainer_logprobs`` (kept through the buffer and
checkpoints). The loop does that when ``RunConfig.measure_mismatch`` (default on). With
``TransformersSampler`` (same model object, full distribution) engine mismatch is float rounding
(~1e-7) and drift is all of it.

The measured subset (``RunConfig.mismatch_sample`` = k groups per generated batch, 0 = all). The
forward over a whole batch (256 sequences on the default model) was a fifth to a quarter of a
training step, paid on every step of a stale run (``bench/step_throughput.py``: staleness 256 ran at
1.24-1.28x the step time of staleness 0). Chosen by measurement over the alternatives: skipping it
where log pi_gen "equals" log mu is not provable (the sampler's KV-cache decode and the trainer's full
forward round differently, ~1e-7, and that rounding is what ``engine`` measures); fusing it into the
update's forward would backpropagate through rows outside the loss. So ``sampled_rows`` picks k whole
groups of each batch with a generator seeded from (``seed``, the batch's version) alone: no run RNG
stream is touched, a resumed run picks the same rows, and the pick is a uniform random subset of the
batch's groups. Only those rows get the forward; the others hold NaN in ``trainer_logprobs``, and
``metrics`` computes every component (total included) on the measured rows only, so on that subset
drift + engine == total exactly and ``mismatch/sequences`` says how many sequences the split covers
(rows outside the subset that the update's own version generated join it: log pi_gen is free there). The full-batch log-ratio the objective
sees stays in ``offpolicy/*``. The statistics are those of a sample: means are unbiased estimates of
the batch's token-weighted means over groups (a group's tokens are not independent), ``abs_max`` is the
subset's maximum (a lower bound of the batch's).

Metrics (``metrics``; per update over valid tokens; "x" is the log-ratio of a component, rho = e^x
clamped to exp(+-20)):
    mismatch/{total,drift,engine}_mean      signed mean of x (total_mean = drift_mean + engine_mean)
    mismatch/{total,drift,engine}_abs_mean  mean |x|
    mismatch/{total,drift,engine}_abs_max   max |x|
    mismatch/{total,drift,engine}_m2        mean x^2 (M2PO's second moment of that component)
    mismatch/{total,drift,engine}_k3        mean (rho - 1 - x): Schulman's k3; for engine it
                                            estimates KL(mu || pi_gen), samples being from mu
    mismatch/{total,drift,engine}_chi2      mean rho^2 - 1 (token chi^2, verl)
    mismatch/engine_ppl_ratio               mean over sequences of PPL_trainer / PPL_engine =
                                            exp(mean_t (log mu - log pi_gen)) (verl's ppl ratio)
    mismatch/engine_share                   engine_m2 / (drift_m2 + engine_m2): which source the
                                            objective is fighting (nan when both are 0)
    mismatch/sequences                      sequences of the update's batch the split is over (the
                                            measured subset; nan statistics when it is 0)
Engine-vs-trainer numbers (``mismatch/engine_*``) are the usual sampler-vs-trainer measures: max/mean
|delta logp|, k3 KL, perplexity ratio, token chi^2 (docs/design.md, "Diagnostics").

Left out: per-staleness breakdowns, sequence-level chi^2, histograms.
"""

from __future__ import annotations

import torch

from workbench.policy.fast_path import autocast_context
from workbench.policy.logprobs import frozen_logprobs
from workbench.policy.numerics import FORWARD_MEASURE, LogitNumerics, forward_numerics
from workbench.rollouts import Rollouts
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP

COMPONENTS = ("total", "drift", "engine")
_SEED_MIX = 1_000_003  # a prime: (seed, version) pairs map to distinct generator seeds


def sampled_rows(rollouts: Rollouts, groups: int, seed: int) -> torch.Tensor | None:
    """Rows of the ``groups`` groups whose log pi_gen is measured, ascending [b] long; None = every row
    (``groups`` 0, or at least the batch's group count). The groups are a uniform draw without
    replacement, from a generator seeded by ``seed`` and the batch's (newest) policy version only."""
    ids = torch.unique(rollouts.group_id)  # [G] sorted
    if groups <= 0 or groups >= len(ids):
        return None
    version = int(rollouts.policy_version.max()) if len(rollouts) else 0
    gen = torch.Generator().manual_seed((int(seed) * _SEED_MIX + version) % (1 << 63))
    picked = ids[torch.randperm(len(ids), generator=gen)[:groups]]  # [groups]
    return torch.isin(rollouts.group_id, picked).nonzero(as_tuple=True)[0]  # [b]


def attach_trainer_logprobs(model, rollouts: Rollouts, temperature: float, *, groups: int = 0, seed: int = 0,
                            autocast: str = "", numerics: LogitNumerics | None = None) -> Rollouts:
    """``rollouts`` with ``trainer_logprobs`` = the model's log-probs of the sampled tokens (no grad,
    fp32, CPU, zeros at padding), at the sampling ``temperature``, under the trainer's ``autocast``
    (so a bf16 trainer's rounding lands in engine mismatch, not in drift). Call it while ``model``
    holds the weights that generated the batch. ``groups`` > 0 measures only the rows of
    ``sampled_rows``; the other rows hold NaN (module doc, "The measured subset"). ``numerics``: the
    trainer's logit numerics (``policy.numerics``; this forward gets its own noise draw), and a batch with
    ``sampling_kept`` is scored on the sampler's kept sets, like the update's forwards."""
    rows = sampled_rows(rollouts, groups, seed)
    numerics = forward_numerics(numerics, FORWARD_MEASURE, rollouts.policy_version)
    with autocast_context(autocast, model):
        if rows is None:
            return rollouts.with_(trainer_logprobs=frozen_logprobs(model, rollouts, temperature,
                                                                   numerics=numerics).float().cpu())
        part = frozen_logprobs(model, rollouts.select(rows), temperature, numerics=numerics).float().cpu()  # [b, T]
    full = torch.full(tuple(rollouts.response_mask.shape), float("nan"))  # [B, T]
    full[rows] = part
    return rollouts.with_(trainer_logprobs=full)


def decompose(logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor,
              mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token ``total`` = log pi_theta - log mu, ``drift`` = log pi_theta - log pi_gen, ``engine`` =
    log pi_gen - log mu; all [B, T] float64, zero at padding, and drift + engine == total exactly
    up to float64 rounding."""
    lp, gen, beh = (t.detach().to(torch.float64) for t in (logprobs, trainer_logprobs, behavior_logprobs))
    valid = mask.to(lp.device) > 0  # [B, T]
    zero = torch.zeros_like(lp)
    beh, gen = beh.to(lp.device), gen.to(lp.device)
    return {
        "total": torch.where(valid, lp - beh, zero),
        "drift": torch.where(valid, lp - gen, zero),
        "engine": torch.where(valid, gen - beh, zero),
    }


def _stats(x: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    v = x[valid]  # [n] float64
    if v.numel() == 0:
        return {k: float("nan") for k in ("mean", "abs_mean", "abs_max", "m2", "k3", "chi2")}
    xc = v.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    rho = xc.exp()
    return {
        "mean": float(v.mean()),
        "abs_mean": float(v.abs().mean()),
        "abs_max": float(v.abs().max()),
        "m2": float((v * v).mean()),
        "k3": float((rho - 1.0 - xc).mean()),
        "chi2": float((rho * rho).mean() - 1.0),
    }


def metrics(logprobs: torch.Tensor, batch: Rollouts, policy_version: int | None = None) -> dict[str, float]:
    """The ``mismatch/`` metrics of one update. ``logprobs`` [B, T] are the current policy's (what
    the objective sees); ``policy_version`` is the version at the start of the update. log pi_gen is
    ``batch.trainer_logprobs``, or ``logprobs`` themselves when every row was generated by
    ``policy_version`` (staleness 0); otherwise there is nothing to split and the result is empty.
    Rows whose ``trainer_logprobs`` hold NaN were not measured (outside the sampled subset): those
    generated by ``policy_version`` take ``logprobs`` as log pi_gen as above, the rest are left out;
    every statistic is over the rows kept (``mismatch/sequences``), where drift + engine == total exactly."""
    gen = batch.trainer_logprobs
    if gen is None:
        if policy_version is None or not bool((batch.policy_version == int(policy_version)).all()):
            return {}
        gen = logprobs
    gen = gen.detach().to(logprobs.device)
    measured = ~torch.isnan(gen).any(-1)  # [B] rows with log pi_gen (NaN rows: outside the subset)
    if policy_version is not None and not bool(measured.all()):  # rows fresh at this update: pi_gen is pi_theta
        fresh = (batch.policy_version == int(policy_version)).to(gen.device) & ~measured  # [B]
        gen = torch.where(fresh[:, None], logprobs.detach().to(gen.dtype), gen)  # [B, T]
        measured = measured | fresh
    measured = measured.cpu()
    mask = batch.response_mask * measured.to(batch.response_mask.device, batch.response_mask.dtype)[:, None]  # [B, T]
    parts = decompose(logprobs, gen, batch.behavior_logprobs, mask)
    valid = mask.to(parts["total"].device) > 0  # [B, T]
    out: dict[str, float] = {"mismatch/sequences": float(measured.sum())}
    for name in COMPONENTS:
        for stat, value in _stats(parts[name], valid).items():
            out[f"mismatch/{name}_{stat}"] = value
    # perplexity ratio PPL_trainer / PPL_engine per sequence, averaged over sequences
    lengths = valid.sum(-1)  # [B]
    has = lengths > 0
    if bool(has.any()):
        seq_mean = (-parts["engine"]).sum(-1)[has] / lengths[has]  # [b] mean_t (log mu - log pi_gen)
        out["mismatch/engine_ppl_ratio"] = float(seq_mean.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp().mean())
    else:
        out["mismatch/engine_ppl_ratio"] = float("nan")
    denom = out["mismatch/drift_m2"] + out["mismatch/engine_m2"]
    out["mismatch/engine_share"] = out["mismatch/engine_m2"] / denom if denom > 0 else float("nan")
    return out


__all__ = ["COMPONENTS", "attach_trainer_logprobs", "decompose", "metrics", "sampled_rows"]
