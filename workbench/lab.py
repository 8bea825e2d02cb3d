"""The estimator lab: how well each objective's gradient on stale data estimates the on-policy
gradient, over a range of staleness, with an interval on every number.

    config, model, tokenizer = setup(tiny, **SIZES["default"]["run"])
    run = Run(config, model=model, tokenizer=tokenizer)
    table = estimator_lab(run, **SIZES["default"]["lab"])   # tidy: objective x staleness x metric
    lab_findings(table)                                    # sentences that state only what the intervals show
    lab_chart(table)                                       # metrics over staleness, the noise floor drawn

**Design: one trajectory, one target.** ``T = max(staleness)`` ordinary on-policy updates
(``run.step()``) move the run from its snapshot theta_0 to theta_T. On the way, at version T - s for
every s of ``staleness``, ``batches`` (K) independent batches are generated and scored with the
weights of that moment (their sampler log-probs are the behaviour log-probs mu). At theta_T, frozen,
every batch is s versions old for its s, and every objective's gradient is taken there. The target
policy, the on-policy gradient g* and the noise floor are therefore *the same for every s*: a
difference between two staleness values is the staleness and nothing else, and one large reference
sample serves them all. (The alternative, batches generated once at theta_0 and evaluated at
theta_s for each s, needs one reference sample per s and compares every s against a different
target.) It costs T updates plus (len(staleness) + 1) x K batches plus one reference sample; the
weights are never copied. The same construction as ``workbench.studies.replay`` (batches, then s
updates), extended to several s along one trajectory.

**Per (objective, s)**, for each of the K stale batches k, with theta_T frozen: g_k = the gradient of
the objective's policy loss (its paper's aggregation, an optional ``corrections`` preset on top;
``workbench.steps.reweight.loss.policy_loss``) with respect to every parameter, and

- ``cosine`` = <g_k, g*> / (|g_k| |g*|);
- ``projection`` = <g_k, g*> / |g*|^2, the share of g* the estimate carries along g*;
- ``relative_error`` = |g_k - g*| / |g*|;
- ``grad_norm`` = |g_k| and ``norm/<group>`` per parameter group (embedding, attention, mlp,
  norm, head; ``parameter_group``);
- ``ess_token`` / ``ess_seq``: (sum w)^2 / (N sum w^2) of the batch's importance weights
  w = pi_theta_T / mu per token and per sequence (product over its tokens) (Kong 1992, "A note on
  importance sampling using standardized weights", Tech. Rep. 348, U. Chicago; the same formula as
  ``workbench.steps.reweight.diagnostics.effective_sample_size``);

each the mean over the K batches with a percentile-bootstrap 95% interval across them
(``workbench.stats.bootstrap_ci``), and ``variance`` = mean_k |g_k - gbar|^2 / |gbar|^2 (the trace of
the batches' covariance over the squared norm of their mean: the noise-to-signal ratio of one
batch), its interval from resampling the K batches (computed from their Gram matrix).

**The on-policy gradient g*** is the REINFORCE gradient (token-mean, the one every objective with
``reduces_to_reinforce`` equals at ratio 1) of ``reference_chunks`` independent fresh samples of
theta_T, ``reference_factor`` x the batch's prompts in all (``workbench.studies.replay.onpolicy_gradient``),
their token-weighted mean. **Its precision is reported** in the rows of ``REFERENCE_ROW``:
``relative_se`` = sqrt(sum_c |g_c - gbar|^2 / (C (C - 1))) / |g*| (the standard error of the mean of C
chunk estimates, relative to |g*|), ``split_cosine`` (the cosine between the means of the two halves
of the chunks) and ``cosine_ceiling`` = 1 / sqrt(1 + relative_se^2), about the cosine an exact
gradient would reach against this noisy g*. **The noise floor** (``FRESH_ROW``) is K fresh on-policy
batches of the stale batches' size at theta_T, through REINFORCE, with every metric above: what fresh
data of that size achieves. Compare an objective with the floor, never with 1.

**Time.** ``SIZES["ci"]`` (tiny untrained model, staleness (0, 2, 8), 4 objectives, K = 4 batches of
32 sequences): about 5 s on 2 cores. ``SIZES["default"]`` (the built-in warm-started model and task,
staleness (0, 1, 4, 16, 64, 256), 4 objectives, K = 8 batches of 128 sequences, a 2048-sequence
reference): 207 s measured on 2 shared cores (about 2 minutes on idle ones), plus the built-in
model's warm start on its first use. At that size the built-in model's per-batch gradients are
noisy (a fresh batch reaches a cosine of about 0.1 to g*): the findings say what is resolved.

Left out: the gradients of the KL / entropy terms (policy loss only), proximal-policy recompute, a
reference sample per repeat, staleness beyond the trajectory (no weights are stored).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import polars as pl
import torch

from workbench.errors import WorkbenchError, bad_value
from workbench.lab_report import FRESH_ROW, REFERENCE_ROW, TABLE_COLUMNS, lab_chart, lab_findings, metric_interval
from workbench.policy.logprobs import token_logprobs
from workbench.rollouts import Rollouts
from workbench.stats import bootstrap_ci
from workbench.steps.reweight.core import OBJECTIVES, resolve_objective
from workbench.steps.reweight.corrections import PRESETS, make_correction
from workbench.steps.reweight.diagnostics import effective_sample_size
from workbench.steps.reweight.loss import policy_loss
from workbench.studies.replay import onpolicy_gradient, replay_context

DEFAULT_STALENESS = (0, 1, 4, 16, 64, 256)
DEFAULT_OBJECTIVES = ("reinforce", "ppo_clip", "is", "m2po")
BATCHES = 8  # K stale batches per staleness: enough for a percentile-bootstrap interval
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "ci": {"run": {"prompts_per_step": 8, "group_size": 4, "lr": 0.01},
           "lab": {"staleness": (0, 2, 8), "objectives": DEFAULT_OBJECTIVES, "batches": 4, "batch_prompts": 8,
                   "reference_factor": 8, "reference_chunks": 4, "warmup": 2}},
    "default": {"run": {"prompts_per_step": 8, "group_size": 8, "lr": 3e-4},
                "lab": {"staleness": DEFAULT_STALENESS, "objectives": DEFAULT_OBJECTIVES, "batches": BATCHES,
                        "batch_prompts": 16, "reference_factor": 16, "reference_chunks": 4, "warmup": 0}},
}
GROUP_KEYS = (("norm", ("norm",)), ("embedding", ("embed", "wte", "wpe")), ("attention", ("attn", "attention")),
              ("mlp", ("mlp", "ffn", "feed_forward")), ("head", ("lm_head", "head")))


def lab_settings(size: str, corrections: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(RunConfig fields, ``estimator_lab`` keyword arguments) of a named size of ``SIZES``, with
    ``corrections`` (comma-separated presets) crossed with every objective besides the plain one."""
    if size not in SIZES:
        raise bad_value("size", size, f"one of {', '.join(SIZES)}")
    if not isinstance(corrections, str):
        raise bad_value("corrections", corrections, "a comma-separated string of correction presets ('' for none)")
    extra = [c.strip() for c in corrections.split(",") if c.strip()]
    return dict(SIZES[size]["run"]), {**SIZES[size]["lab"], "corrections": [None, *extra]}


def parameter_group(name: str) -> str:
    """The group of a parameter by its name: the first of ``GROUP_KEYS`` whose key it contains
    (norms first: ``post_attention_layernorm`` is a norm), else ``other``."""
    lowered = name.lower()
    return next((group for group, keys in GROUP_KEYS if any(k in lowered for k in keys)), "other")


def estimator_label(objective: str, correction: str | None) -> str:
    """The table's name of an objective with an optional correction: ``reinforce+token_tis``."""
    return objective if correction is None else f"{objective}+{correction}"


def check_lab_inputs(staleness: Any, objectives: Any, corrections: Any, batches: Any, reference_chunks: Any) -> None:
    """One-line ``WorkbenchError`` naming the field, the value and what is valid."""
    values = list(staleness) if isinstance(staleness, (list, tuple)) else None
    if not values or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values):
        raise bad_value("staleness", staleness, "a non-empty list of ints >= 0 (policy versions behind)")
    if len(set(values)) != len(values):
        raise bad_value("staleness", staleness, "distinct values")
    if isinstance(objectives, str) or not isinstance(objectives, (list, tuple)) or not objectives:
        raise bad_value("objectives", objectives, "a non-empty list of objective names")
    for name in objectives:
        if name not in OBJECTIVES.names():
            raise bad_value("objectives", name, f"registered objectives: {', '.join(OBJECTIVES.names())}")
    if isinstance(corrections, str) or not isinstance(corrections, (list, tuple)) or not corrections:
        raise bad_value("corrections", corrections, "a non-empty list of None and correction preset names")
    for corr in corrections:
        if corr is not None and corr not in PRESETS:
            raise bad_value("corrections", corr, f"None or a preset: {', '.join(sorted(PRESETS))}")
    for field, value, least in (("batches", batches, 2), ("reference_chunks", reference_chunks, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise bad_value(field, value, f"an int >= {least} (an interval needs two)")


def gradient_metrics(grads: torch.Tensor, g_star: torch.Tensor) -> dict[str, list[float]]:
    """Per row of ``grads`` [K, P] against ``g_star`` [P]: cosine, projection, relative_error and
    grad_norm (the module doc); NaN cosine for a zero gradient (it has no direction)."""
    g = grads.double()  # [K, P]
    ref = g_star.double()  # [P]
    dots = g @ ref  # [K]
    norms = g.norm(dim=1)  # [K]
    ref_sq = float(ref @ ref)
    cos = torch.where(norms > 0, dots / (norms * math.sqrt(ref_sq)), torch.full_like(dots, math.nan))  # [K]
    return {"cosine": cos.tolist(), "projection": (dots / ref_sq).tolist(),
            "relative_error": ((g - ref).norm(dim=1) / math.sqrt(ref_sq)).tolist(), "grad_norm": norms.tolist()}


def relative_variance(gram: np.ndarray, counts: np.ndarray) -> float:
    """mean |g_k - gbar|^2 / |gbar|^2 of a multiset of K gradients given by their Gram matrix [K, K]
    and the multiplicities ``counts`` [K] (summing to the multiset's size): with n = sum counts,
    gbar = sum c_k g_k / n, mean |g_k - gbar|^2 = sum c_k |g_k|^2 / n - |gbar|^2."""
    n = float(counts.sum())
    mean_sq = float(counts @ gram @ counts) / n**2  # |gbar|^2
    spread = float(counts @ np.diag(gram)) / n - mean_sq
    return max(spread, 0.0) / mean_sq if mean_sq > 0 else math.nan


def variance_interval(grads: torch.Tensor, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``relative_variance`` of the K rows of ``grads`` [K, P] with a percentile-bootstrap interval
    over resampled batches (``bootstrap_ci`` of a statistic of the resampled indices)."""
    gram = (grads.double() @ grads.double().T).numpy()  # [K, K]
    k = gram.shape[0]

    def stat(indices: np.ndarray) -> float:
        value = relative_variance(gram, np.bincount(indices.astype(int), minlength=k).astype(float))
        return value if math.isfinite(value) else 0.0  # a resample of zero gradients only: no spread

    if not math.isfinite(relative_variance(gram, np.ones(k))):
        return math.nan, math.nan, math.nan
    return tuple(bootstrap_ci(np.arange(k, dtype=float), stat=stat, confidence=confidence, seed=seed))


def batch_ess(lp: torch.Tensor, batch: Rollouts) -> tuple[float, float]:
    """Token and sequence ESS of w = pi / mu on ``batch`` (``lp`` [B, T]: log pi at the target)."""
    valid = batch.response_mask > 0  # [B, T]
    log_w = (lp.detach().double() - batch.behavior_logprobs.double()) * valid  # [B, T]
    rows = valid.any(dim=1)  # [B] sequences with a response token
    return (float(effective_sample_size(log_w[valid])), float(effective_sample_size(log_w.sum(dim=1)[rows])))


def estimator_gradients(run, batch: Rollouts, estimators: Sequence[tuple[str, str | None]],
                        params: dict[str, dict[str, Any]]) -> tuple[list[list[torch.Tensor]], tuple[float, float]]:
    """With the run's current weights, per estimator (objective, correction): the gradient of its
    policy loss on ``batch`` per parameter (float64); and the batch's (token, sequence) ESS."""
    model = run.model
    weights = [p for p in model.parameters() if p.requires_grad]
    model.train()
    lp, _ = token_logprobs(model, batch, temperature=run.knobs.applied.temperature)  # [B, T], one shared graph
    out = []
    for name, corr in estimators:
        obj = resolve_objective(name, params.get(name, {}))
        loss, _ = policy_loss(obj, lp, batch.behavior_logprobs, batch.advantages, batch.response_mask,
                              aggregation=obj.default_aggregation, prox_logprobs=batch.prox_logprobs,
                              context=replay_context(run, batch, obj), correction=make_correction(corr))
        grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        out.append([(g if g is not None else torch.zeros_like(p)).detach().double() for g, p in zip(grads, weights)])
    return out, batch_ess(lp, batch)


def reference_gradient(run, prompts: int, chunks: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """g* at the run's weights from ``chunks`` independent fresh samples of ``prompts`` prompts in
    all (token-weighted mean of their REINFORCE gradients), and the rows of its precision."""
    temperature = run.knobs.applied.temperature
    grads, tokens, sequences = [], [], 0
    for _ in range(chunks):
        sample = _fresh(run, max(1, prompts // chunks))
        grads.append(onpolicy_gradient(run.model, sample, temperature))  # [P]
        tokens.append(float(sample.response_mask.sum()))
        sequences += len(sample)
    stacked, w = torch.stack(grads), torch.tensor(tokens, dtype=torch.float64)  # [C, P], [C]
    g_star = (w[:, None] * stacked).sum(dim=0) / w.sum()  # [P] the token-mean of the whole sample
    if float(g_star.norm()) == 0:
        raise WorkbenchError(f"the on-policy reference gradient is zero ({sequences} fresh sequences, every group's "
                             "rewards equal): nothing to compare with; raise reference_factor or batch_prompts, or "
                             "lower lr so the policy keeps reward variance")
    spread = float(((stacked - stacked.mean(dim=0)) ** 2).sum()) / (chunks * (chunks - 1))
    rel_se = math.sqrt(spread) / float(g_star.norm())
    half = chunks // 2
    split = _cosine(stacked[:half].mean(dim=0), stacked[half:].mean(dim=0))
    rows = [{"metric": "relative_se", "mean": rel_se}, {"metric": "split_cosine", "mean": split},
            {"metric": "cosine_ceiling", "mean": 1.0 / math.sqrt(1.0 + rel_se**2) if math.isfinite(rel_se) else math.nan},
            {"metric": "sequences", "mean": float(sequences)}]
    return g_star, [{"objective": REFERENCE_ROW, "staleness": 0, **r, "lo": math.nan, "hi": math.nan, "n": chunks}
                    for r in rows]


def cell_rows(label: str, s: int, per_param: list[list[torch.Tensor]], groups: list[str], g_star: torch.Tensor,
              ess: list[tuple[float, float]], seed: int) -> list[dict[str, Any]]:
    """The tidy rows of one (estimator, staleness) cell from its K gradients (per parameter)."""
    flat = torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in per_param])  # [K, P]
    values = gradient_metrics(flat, g_star)
    for group in dict.fromkeys(groups):
        values[f"norm/{group}"] = [math.sqrt(sum(float((g * g).sum()) for g, gr in zip(grads, groups) if gr == group))
                                   for grads in per_param]
    values["ess_token"], values["ess_seq"] = [e[0] for e in ess], [e[1] for e in ess]
    rows = [{"objective": label, "staleness": s, "metric": m, **metric_interval(v, seed)} for m, v in values.items()]
    est, lo, hi = variance_interval(flat, seed=seed)
    rows.append({"objective": label, "staleness": s, "metric": "variance", "mean": est, "lo": lo, "hi": hi,
                 "n": len(per_param)})
    return rows


def estimator_lab(run, staleness: Sequence[int] = DEFAULT_STALENESS, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                  *, corrections: Sequence[str | None] = (None,), batches: int = BATCHES, batch_prompts: int | None = None,
                  reference_factor: int = 8, reference_chunks: int = 4, warmup: int = 0,
                  params: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> pl.DataFrame:
    """The lab of the module doc on ``run`` (trained ``warmup`` + max(staleness) updates in place);
    returns the tidy table: one row per objective x staleness x metric (``TABLE_COLUMNS``), the
    estimators first, then the floor (``FRESH_ROW``) and the reference's precision (``REFERENCE_ROW``).

    ``corrections``: None (the objective alone) and/or preset names (``corrections.PRESETS``), each
    crossed with every objective; ``params``: objective name -> parameter overrides; ``seed``: the
    bootstrap's. The run must train on-policy (its ``staleness`` knob 0)."""
    staleness, objectives, corrections = list(staleness), list(objectives), list(corrections)
    check_lab_inputs(staleness, objectives, corrections, batches, reference_chunks)
    if run.knobs.staleness != 0:
        raise bad_value("run.knobs.staleness", run.knobs.staleness, "0: the lab's trajectory trains on-policy")
    prompts = batch_prompts or run.config.prompts_per_step
    params = params or {}
    estimators = [(name, corr) for name in objectives for corr in corrections]
    for _ in range(int(warmup)):
        run.step()
    target = max(staleness)
    stale: dict[int, list[Rollouts]] = {}
    for done in range(target + 1):  # at version start + done the batches that are T - done old at the end
        if target - done in staleness:
            stale[target - done] = [_fresh(run, prompts) for _ in range(batches)]
        if done < target:
            run.step()
    floor_batches = [_fresh(run, prompts) for _ in range(batches)]  # the noise floor's draws, at theta_T
    g_star, reference_rows = reference_gradient(run, prompts * reference_factor, reference_chunks)
    groups = [parameter_group(n) for n, p in run.model.named_parameters() if p.requires_grad]
    rows: list[dict[str, Any]] = []
    for s in staleness:
        per_est: list[list[list[torch.Tensor]]] = [[] for _ in estimators]
        ess = []
        for batch in stale[s]:
            grads, batch_ess_values = estimator_gradients(run, batch, estimators, params)
            for i, g in enumerate(grads):
                per_est[i].append(g)
            ess.append(batch_ess_values)
        for (name, corr), per_param in zip(estimators, per_est):
            rows += cell_rows(estimator_label(name, corr), s, per_param, groups, g_star, ess, seed)
    floor, floor_ess = [], []
    for batch in floor_batches:
        grads, batch_ess_values = estimator_gradients(run, batch, [("reinforce", None)], {})
        floor.append(grads[0])
        floor_ess.append(batch_ess_values)
    rows += cell_rows(FRESH_ROW, 0, floor, groups, g_star, floor_ess, seed)
    rows += reference_rows
    schema = {"objective": pl.String, "staleness": pl.Int64, "metric": pl.String, "mean": pl.Float64,
              "lo": pl.Float64, "hi": pl.Float64, "n": pl.Int64}
    return pl.DataFrame(rows, schema=schema).select(TABLE_COLUMNS)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def _fresh(run, prompts: int) -> Rollouts:
    """A fresh on-policy batch of ``prompts`` prompts x group_size from the run's weights, every group kept."""
    with torch.no_grad():
        batch, _ = run.sample(prompts, filter_zero_variance=False)
    if not len(batch):
        raise WorkbenchError(f"batch_prompts={prompts} gave an empty batch: raise it")
    return batch


__all__ = ["BATCHES", "DEFAULT_OBJECTIVES", "DEFAULT_STALENESS", "FRESH_ROW", "GROUP_KEYS", "REFERENCE_ROW", "SIZES",
           "batch_ess", "check_lab_inputs", "estimator_gradients", "estimator_lab", "estimator_label",
           "gradient_metrics", "lab_chart", "lab_findings", "lab_settings", "parameter_group", "reference_gradient",
           "relative_variance", "variance_interval"]
