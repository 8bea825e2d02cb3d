"""OPE of a model on a logged ``Rollouts`` batch, and the on-policy truth it is scored against.

    table = evaluate_batch(run.model, stale_batch, temperature=1.0)     # one row per estimator
    truth = on_policy_truth(run, prompts=64, seed=123)                  # fresh sample of pi, own RNGs

The target log-probs log pi of the logged tokens are one no-grad forward of the model at the
sampling temperature (``steps.update.proximal_logprobs``); log mu is the batch's
``behavior_logprobs``. The truth is the mean reward of a fresh sample of pi at that temperature on
the training prompt distribution, drawn with generators of its own so a live run's randomness is
untouched; its interval is Wilson's (``stats.wilson_interval``) over the sampled sequences. The
held-out accuracy (greedy decoding) is a different quantity (docs/ope.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from workbench.errors import WorkbenchError
from workbench.ope.estimators import (DEFAULT_MIN_ESS_FRAC, DEFAULT_RESAMPLES, DEFAULT_REWARD_RANGE, ESTIMATORS,
                                      OPEInputs, estimate)
from workbench.policy.chat import render_examples
from workbench.rollouts import Rollouts
from workbench.stats import wilson_interval
from workbench.steps.generate import SamplingParams
from workbench.steps.score import score
from workbench.steps.update import proximal_logprobs

COLUMNS = ("estimator", "estimate", "lo", "hi", "bound_lo", "bound_hi", "ess", "ess_frac", "refused", "reason", "n")


def check_estimators(names: Any) -> list[str]:
    """``names`` (None: all registered) as a checked list; an unknown one is a one-line error."""
    if names is None:
        return ESTIMATORS.names()
    if isinstance(names, str) or not names:
        raise WorkbenchError(f"estimators={names!r} is invalid: expected a non-empty list of "
                             f"{', '.join(ESTIMATORS.names())}")
    for name in names:
        ESTIMATORS.entry(name)  # raises, listing the valid names
    return list(names)


def batch_inputs(model, batch: Rollouts, temperature: float) -> OPEInputs:
    """``OPEInputs`` of ``batch`` under ``model``: log w_i = sum_t mask (log pi - log mu)."""
    if not isinstance(batch, Rollouts):
        raise WorkbenchError(f"batch={type(batch).__name__} is invalid: expected a workbench Rollouts")
    if batch.behavior_logprobs is None:
        raise WorkbenchError("batch.behavior_logprobs=None is invalid: expected log mu per token [B, T] "
                             "(a batch from a sampler)")
    if batch.rewards is None:
        raise WorkbenchError("batch.rewards=None is invalid: expected a scored batch (steps.score)")
    if len(batch) == 0:
        raise WorkbenchError("batch has 0 sequences: expected at least one logged response")
    mask = batch.response_mask.double().cpu()  # [B, T]
    log_pi = proximal_logprobs(model, batch, temperature).double().cpu()  # [B, T]
    log_mu = batch.behavior_logprobs.double().cpu() * mask  # [B, T]
    token_ratio = (log_pi - log_mu) * mask  # [B, T]
    return OPEInputs.of(token_ratio.sum(-1).numpy(), batch.rewards.double().cpu().numpy(),
                        batch.group_id.cpu().numpy(), log_mu.sum(-1).numpy(),
                        token_log_ratio=token_ratio.numpy(), mask=mask.numpy())


def evaluate_inputs(inp: OPEInputs, estimators=None, params: dict[str, dict[str, Any]] | None = None, *,
                    confidence: float = 0.95, seed: int = 0, resamples: int = DEFAULT_RESAMPLES,
                    min_ess_frac: float = DEFAULT_MIN_ESS_FRAC,
                    reward_range: tuple[float, float] = DEFAULT_REWARD_RANGE) -> pl.DataFrame:
    """One tidy row per estimator (``COLUMNS``); ``params``: estimator name -> its params."""
    names = check_estimators(estimators)
    params = dict(params or {})
    for name in params:
        if name not in names:
            raise WorkbenchError(f"params={{{name!r}: ...}} is invalid: {name!r} is not among the estimators "
                                 f"evaluated ({', '.join(names)})")
    rows = [estimate(n, inp, params.get(n), confidence=confidence, seed=seed, resamples=resamples,
                     min_ess_frac=min_ess_frac, reward_range=reward_range).as_row() for n in names]
    return pl.DataFrame(rows, schema={c: _dtype(c) for c in COLUMNS}, orient="row")


def evaluate_batch(model, batch: Rollouts, temperature: float, estimators=None,
                   params: dict[str, dict[str, Any]] | None = None, confidence: float = 0.95, seed: int = 0,
                   **kw: Any) -> pl.DataFrame:
    """The estimators of J(pi) for ``model`` (pi, sampling at ``temperature``) from the logged
    ``batch`` (mu = its behaviour log-probs): a polars DataFrame with ``COLUMNS``."""
    names = check_estimators(estimators)  # before the forward: a bad name costs nothing
    return evaluate_inputs(batch_inputs(model, batch, temperature), names, params, confidence=confidence,
                           seed=seed, **kw)


@dataclass(frozen=True)
class Truth:
    """Mean reward of a fresh on-policy sample (``value``) with its interval and size."""

    value: float
    lo: float
    hi: float
    n: int


def truth_of(rewards: np.ndarray, confidence: float = 0.95) -> Truth:
    """Mean reward with Wilson's interval over the n sequences when rewards lie in [0, 1] (fractional
    rewards enter as successes = mean x n); NaN bounds otherwise. Sequences of one prompt are
    correlated, so with several samples per prompt the interval is somewhat too narrow."""
    r = np.asarray(rewards, dtype=np.float64)
    mean, n = float(r.mean()), len(r)
    if np.all((r >= 0.0) & (r <= 1.0)):
        lo, hi = wilson_interval(mean * n, n, confidence)
        return Truth(mean, float(lo), float(hi), n)
    return Truth(mean, math.nan, math.nan, n)


def fresh_sample(run, prompts: int, seed: int, sampler=None, version: int | None = None) -> Rollouts:
    """A scored batch of ``prompts`` x ``group_size`` responses from ``sampler`` (default the run's,
    i.e. the current policy) at the run's temperature, with a ``random.Random`` and a
    ``torch.Generator`` seeded from ``seed`` alone: the run's own generators are not touched."""
    if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
        raise WorkbenchError(f"truth_prompts={prompts!r} is invalid: expected an int >= 1 (prompts to sample)")
    cfg, kn = run.config, run.knobs.applied
    sampler = run.sampler if sampler is None else sampler
    sync = getattr(sampler, "sync", None)
    if sampler is run.sampler and sync is not None:  # an engine with its own weights: bring it to pi
        sync(run.model, run.version)
    examples = render_examples(run.tokenizer, run.task.sample(random.Random(seed), prompts), run.chat_template)
    sp = SamplingParams(temperature=kn.temperature, top_p=kn.top_p, top_k=kn.top_k,
                        max_new_tokens=cfg.max_new_tokens or run.task.max_answer_tokens)
    rollouts = sampler.generate(examples, cfg.group_size, sp, generator=torch.Generator().manual_seed(seed),
                                policy_version=run.version if version is None else version)
    rollouts, _ = score(rollouts, list(cfg.rewards), advantage=cfg.advantage, filter_zero_variance=False,
                        advantage_params=cfg.advantage_params)
    return rollouts


def on_policy_truth(run, prompts: int, seed: int, confidence: float = 0.95) -> Truth:
    """``truth_of`` a ``fresh_sample`` of the run's current policy."""
    return truth_of(fresh_sample(run, prompts, seed).rewards.double().numpy(), confidence)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``numpy.random.SeedSequence``): the same parts, the same seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _dtype(column: str):
    if column in ("estimator", "reason"):
        return pl.String
    if column == "refused":
        return pl.Boolean
    if column == "n":
        return pl.Int64
    return pl.Float64


__all__ = ["COLUMNS", "Truth", "batch_inputs", "check_estimators", "derived_seed", "evaluate_batch",
           "evaluate_inputs", "fresh_sample", "on_policy_truth", "truth_of"]
