"""Reference solutions of the course's "predict, then run" exercises: one plain function per exercise,
each returning the numbers its answer is about (and ``curve``: the rows the notebook overlays on the
reference). ``tests/test_course_exercises.py`` runs each at the "ci" size and asserts what the
answer claims; ``reference_results`` collects them at one size into ``notebooks/course/reference.json``.

Papers behind the exercises:

- importance sampling and its effective sample size: Kong 1992, "A note on importance sampling using
  standardized weights" (Technical Report 348, University of Chicago); Owen 2013, "Monte Carlo theory,
  methods and examples", chapter 9;
- PPO's clipped surrogate: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347;
- CISPO (clips the weight, keeps every token's gradient): MiniMax 2025, "MiniMax-M1", arXiv:2506.13585;
- M2PO and M2 = mean (log r)^2 under a budget tau: Zheng et al. 2025, "Prosperity before Collapse:
  How Far Can Off-Policy RL Reach with Stale Data on LLMs?", arXiv:2510.01161;
- TOPR: Le Roux et al. 2025, "Tapered Off-Policy REINFORCE", arXiv:2503.14286;
- paired branches: common random numbers (Glasserman and Yao 1992, Management Science 38:884-908).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import torch

from workbench.branch import branch_here
from workbench.course.lessons import (course_run, lag_curve, measure_rules, reference_path, signal_batch, size_of,
                                      token_logprobs_now, warm_up)
from workbench.runs.rundir import atomic_write_text, dumps
from workbench.steps.reweight.loss import logprob_gradient, policy_loss
from workbench.steps.reweight.m2po import m2po_mask

RULES = ("reinforce", "ppo_clip", "cispo", "m2po", "topr")  # c5: the same batch through each
LAGS = (0, 1, 2, 4, 8)  # c4 / c6: updates between generating a batch and training on it
SEEDS = (0, 1, 2)  # claims about averages are made over these seeds


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


# ----------------------------------------------------------------------------- c1 · the importance ratio
def c1_ratio_mean(seed: int = 0, samples: int = 4000, outcomes: int = 8) -> dict[str, Any]:
    """A categorical behaviour policy mu and target pi over ``outcomes`` answers, reward f(x) = x / (K-1).
    ``samples`` draws from mu: the mean ratio r = pi/mu (E_mu[r] = 1 exactly), the importance-sampling
    estimate mean(r f) of E_pi[f], the naive mean(f) (which estimates E_mu[f]), their standard errors."""
    rng = np.random.default_rng(seed)
    f = np.arange(outcomes) / (outcomes - 1)  # [K]
    logits_mu = rng.normal(size=outcomes)
    logits_pi = logits_mu + 1.5 * f + rng.normal(scale=0.3, size=outcomes)  # pi leans toward rewarded answers
    mu = np.exp(logits_mu) / np.exp(logits_mu).sum()  # [K]
    pi = np.exp(logits_pi) / np.exp(logits_pi).sum()  # [K]
    x = rng.choice(outcomes, size=samples, p=mu)  # [N] answers drawn from mu
    r = pi[x] / mu[x]  # [N]
    n = np.arange(1, samples + 1)
    marks = sorted({int(round(samples ** (k / 40))) for k in range(1, 41)})
    running = np.cumsum(r) / n  # [N] mean ratio after the first n draws
    return {"mu": mu.tolist(), "pi": pi.tolist(), "f": f.tolist(), "samples": samples,
            "mean_ratio": float(r.mean()), "ratio_se": float(r.std(ddof=1) / math.sqrt(samples)),
            "is_estimate": float((r * f[x]).mean()), "is_se": float((r * f[x]).std(ddof=1) / math.sqrt(samples)),
            "naive_mean": float(f[x].mean()), "naive_se": float(f[x].std(ddof=1) / math.sqrt(samples)),
            "curve": [{"samples": m, "mean ratio": _round(float(running[m - 1]))} for m in marks]}


def c1_onpolicy_ratio(size: str = "course", seed: int = 0, threads: int = 2) -> dict[str, Any]:
    """One batch sampled by the course model: max |log r| over its tokens when the trainer recomputes
    log pi with the very weights that sampled it, and after one update of those weights."""
    run = warm_up(course_run(size, seed, threads), size)
    batch = run.sample()[0]
    valid = batch.response_mask > 0  # [B, T]
    same = (token_logprobs_now(run, batch) - batch.behavior_logprobs)[valid].abs().max()
    run.step()
    log_r = (token_logprobs_now(run, batch) - batch.behavior_logprobs)[valid]  # [N] valid tokens
    return {"max_abs_log_ratio_same_weights": float(same), "max_abs_log_ratio_after_one_update": float(log_r.abs().max()),
            "mean_ratio_after_one_update": float(log_r.exp().mean()), "tokens": int(valid.sum())}


# ----------------------------------------------------------------------------- c2 · on-policy vs stale
def c2_staleness_gauges(size: str = "course", seed: int = 0, threads: int = 2,
                        staleness: Sequence[int] = (0, 4)) -> dict[str, Any]:
    """Runs of the loop at each fixed lag: per lag, the mean clip fraction (ppo_clip), M2 and token ESS
    over the updates that trained at the full lag (the first ``s`` updates ramp up from theta_0's batches)."""
    out: dict[str, Any] = {"staleness": list(staleness), "by_staleness": {}, "curve": []}
    curves = {}
    for s in staleness:
        run = course_run(size, seed, threads, staleness=int(s))
        df = run.run()
        full = df.filter(pl.col("offpolicy/staleness_mean") == float(s))
        out["by_staleness"][str(s)] = {
            "updates_at_full_lag": full.height, "clipfrac": float(full["offpolicy/clipfrac"].mean()),
            "m2_mean": float(full["offpolicy/m2"].mean()), "m2_min": float(full["offpolicy/m2"].min()),
            "m2_max": float(full["offpolicy/m2"].max()), "ess_max": float(full["offpolicy/ess_token"].max()),
            "ess_mean": float(full["offpolicy/ess_token"].mean())}
        curves[s] = df.select("update", "offpolicy/m2")
    for update in curves[staleness[0]]["update"].to_list():
        out["curve"].append({"update": update, **{f"M2 at staleness {s}": _round(float(
            curves[s].filter(pl.col("update") == update)["offpolicy/m2"][0])) for s in staleness}})
    return out


def _stale_batch(size: str, seed: int, threads: int, lag: int):
    """(run, batch, log pi now) with ``batch`` generated ``lag`` updates before the run's weights."""
    run = warm_up(course_run(size, seed, threads), size)
    batch = signal_batch(run)
    for _ in range(lag):
        run.step()
    return run, batch, token_logprobs_now(run, batch)


# ----------------------------------------------------------------------------- c3 · what clipping silences
def c3_clip_silences(size: str = "course", seed: int = 0, threads: int = 2, lag: int = 4,
                     eps: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)) -> dict[str, Any]:
    """One batch ``lag`` updates old through PPO-clip (clip_low = clip_high = eps) and CISPO: the share of
    tokens with A != 0 whose gradient is exactly zero (silenced), the share of those with A > 0, and the
    silenced tokens that lie *inside* [1 - eps, 1 + eps] or on the side A does not push (none should)."""
    run, batch, lp = _stale_batch(size, seed, threads, lag)
    mu, mask = batch.behavior_logprobs, batch.response_mask  # [B, T]
    adv = batch.advantages[:, None].expand_as(lp) if batch.advantages.dim() == 1 else batch.advantages  # [B, T]
    signal = (mask > 0) & (adv != 0)  # [B, T]
    r = (lp - mu).exp()  # [B, T]
    rows = []
    for e in eps:
        g = logprob_gradient("ppo_clip", lp, mu, batch.advantages, mask, clip_low=e, clip_high=e)  # [B, T]
        silenced = signal & (g == 0)  # [B, T]
        pushed_out = ((adv > 0) & (r > 1 + e)) | ((adv < 0) & (r < 1 - e))  # [B, T] outside, in A's direction
        n = int(silenced.sum())
        rows.append({"clip_eps": e, "silenced_frac": n / max(1, int(signal.sum())),
                     "silenced_pos_share": float((silenced & (adv > 0)).sum()) / max(1, n),
                     "silenced_not_pushed_out": int((silenced & ~pushed_out).sum())})
    g_cispo = logprob_gradient("cispo", lp, mu, batch.advantages, mask)  # [B, T]
    return {"lag": lag, "signal_tokens": int(signal.sum()), "ppo_clip": rows,
            "cispo_silenced_frac": float((signal & (g_cispo == 0)).sum()) / max(1, int(signal.sum())),
            "curve": [{"clip_eps": x["clip_eps"], "silenced fraction": _round(x["silenced_frac"])} for x in rows]}


# ----------------------------------------------------------------------------- c4 · M2 and ESS as gauges
TAU_LAG = {"course": 2, "ci": 4}  # c4: the lag whose batch M2PO masks gradually over TAUS, per size
TAUS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)  # c4: M2PO budgets, ascending


def c4_tau_masking(size: str = "course", seed: int = 0, threads: int = 2, lag: int | None = None,
                   taus: Sequence[float] = TAUS) -> dict[str, Any]:
    """One batch ``lag`` updates old (default ``TAU_LAG[size]``: the course size's updates move the
    weights further, so 2 there ages the batch about as much as 4 at the ci size) through M2PO at each
    budget tau. M2PO's budget is on its trust region T only (valid tokens whose log r has the sign of
    their advantage, ``m2po_mask``): it masks the T-tokens with the largest (log r)^2 until the mean over
    the T-tokens left is <= tau. Tokens outside T (zero advantage, or a ratio that moved against the
    advantage) are never masked, so M2 over all kept tokens (``m2_after``) need not meet tau.
    Per tau: masked fraction of the valid tokens, T's M2 before and after masking, the cut-off tau*
    on |log r|; ``trust_d2``: T's (log r)^2, descending (what the greedy rule ranks)."""
    size_of(size)  # a clear error for an unknown size before TAU_LAG is indexed
    lag = TAU_LAG[size] if lag is None else lag
    run, batch, lp = _stale_batch(size, seed, threads, lag)
    log_r = lp - batch.behavior_logprobs  # [B, T]
    valid = batch.response_mask > 0  # [B, T]
    adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand_as(log_r)  # [B, T]
    d2 = log_r.double() ** 2  # [B, T]
    rows = []
    for tau in taus:
        (m,) = _m2po_metrics(run, batch, tau)  # what the trainer logs
        masked, tau_star, trust = m2po_mask(log_r, adv, valid, tau)  # [B, T] bool, the same rule's mask
        kept_trust = trust & ~masked  # [B, T]
        rows.append({"tau": tau, "masked_frac": m["masked_frac"], "m2": m["m2"], "m2_after": m["m2_after"],
                     "trust_frac": float(trust.sum()) / int(valid.sum()), "m2_trust": float(d2[trust].mean()),
                     "m2_trust_kept": float(d2[kept_trust].mean()) if bool(kept_trust.any()) else 0.0,
                     "tau_star": tau_star})
    trust_d2 = sorted(d2[trust].tolist(), reverse=True)
    return {"lag": lag, "tokens": int(valid.sum()), "trust_tokens": len(trust_d2), "trust_d2": trust_d2, "m2po": rows,
            "curve": [{"tau": x["tau"], "masked fraction": _round(x["masked_frac"])} for x in rows]}


def _m2po_metrics(run, batch, tau: float) -> list[dict[str, Any]]:
    """M2PO's own metrics on ``batch`` (masked fraction, M2 before and after masking)."""
    lp = token_logprobs_now(run, batch)
    _, metrics = _policy_loss("m2po", lp, batch, tau=tau)
    return [{"masked_frac": float(metrics["offpolicy/masked_frac"]), "m2": float(metrics["offpolicy/m2"]),
             "m2_after": float(metrics["offpolicy/m2_after"])}]


def _policy_loss(name: str, lp: torch.Tensor, batch, **params: Any):
    return policy_loss(name, lp, batch.behavior_logprobs, batch.advantages, batch.response_mask, **params)


def c4_gauges_by_lag(size: str = "course", seeds: Sequence[int] = SEEDS, threads: int = 2,
                     lags: Sequence[int] = LAGS) -> dict[str, Any]:
    """One batch per seed measured as the weights move away from it (``lag_curve``): M2 and token ESS at
    every lag, per seed and their mean over the seeds."""
    per_seed = {}
    for seed in seeds:
        df = lag_curve(warm_up(course_run(size, seed, threads), size), lags, ["reinforce"])
        per_seed[str(seed)] = {"m2": df["m2"].to_list(), "ess_token": df["ess_token"].to_list()}
    m2 = np.mean([v["m2"] for v in per_seed.values()], axis=0)
    ess = np.mean([v["ess_token"] for v in per_seed.values()], axis=0)
    return {"lags": list(lags), "seeds": list(seeds), "per_seed": per_seed, "m2_mean": m2.tolist(),
            "ess_mean": ess.tolist(),
            "curve": [{"lag": lag, "M2": _round(float(a)), "ESS": _round(float(b))} for lag, a, b in zip(lags, m2, ess)]}


# ----------------------------------------------------------------------------- c5 · the same batch, many rules
def c5_same_batch_rules(size: str = "course", seed: int = 0, threads: int = 2, lags: Sequence[int] = (1, 2, 4, 8),
                        rules: Sequence[str] = RULES) -> dict[str, Any]:
    """One batch through every rule at every lag (``lag_curve``): per rule its clip and mask fractions and
    the share of tokens it silences; M2 and ESS, which belong to the batch, not to the rule."""
    df = lag_curve(warm_up(course_run(size, seed, threads), size), lags, list(rules))
    keep = ["lag", "objective", "clipfrac", "masked_frac", "silenced_frac", "m2", "ess_token"]
    curve = []
    for lag in lags:
        at = df.filter(pl.col("lag") == lag)
        curve.append({"lag": lag, **{f"{o} silenced": _round(float(at.filter(pl.col("objective") == o)["silenced_frac"][0]))
                                     for o in ("ppo_clip", "m2po") if o in rules}})
    return {"lags": list(lags), "rules": list(rules), "rows": df.select(keep).to_dicts(), "curve": curve}


# ----------------------------------------------------------------------------- c6 · a paired branch, how stale
def c6_paired_branch(out_dir: str | Path, size: str = "course", seed: int = 0, threads: int = 2, at: int = 4,
                     staleness: int = 4, steps: int = 6, repeats: int = 2) -> dict[str, Any]:
    """One question, answered by a paired branch (``workbench.branch``): from the run's checkpoint after
    ``at`` on-policy updates, what does switching to ``staleness`` do to M2 and the clip fraction over
    ``steps`` updates? Control and variant of a repeat share every random stream; per repeat, the mean
    over the branch's updates of variant minus control, and the per-update difference of repeat 0."""
    parent = course_run(size, seed, threads, out_dir=str(out_dir), run_name="c6_parent")
    parent.run(at)
    bs = branch_here(parent, [{}, {"staleness": int(staleness)}], steps=steps, repeats=repeats,
                     out_dir=Path(out_dir) / "c6_branches", log=lambda _line: None)
    m = bs.metrics().select("variant", "repeat", "update", "offpolicy/m2", "offpolicy/clipfrac", "reward/mean")
    diffs = []
    for r in range(repeats):
        c = m.filter((pl.col("repeat") == r) & (pl.col("variant") == 0)).sort("update")
        v = m.filter((pl.col("repeat") == r) & (pl.col("variant") == 1)).sort("update")
        diffs.append({"repeat": r, "control_m2": float(c["offpolicy/m2"].mean()), "variant_m2": float(v["offpolicy/m2"].mean()),
                      "clipfrac_diff": float((v["offpolicy/clipfrac"] - c["offpolicy/clipfrac"]).mean()),
                      "reward_diff": float((v["reward/mean"] - c["reward/mean"]).mean()),
                      "per_update_m2_diff": (v["offpolicy/m2"] - c["offpolicy/m2"]).to_list(),
                      "updates": c["update"].to_list()})
    first = diffs[0]
    return {"at": at, "staleness": staleness, "steps": steps, "repeats": repeats, "paired": diffs,
            "curve": [{"update": u, "M2 variant - control": _round(d)}
                      for u, d in zip(first["updates"], first["per_update_m2_diff"])]}


def c6_how_stale(size: str = "course", seeds: Sequence[int] = SEEDS, threads: int = 2, lags: Sequence[int] = LAGS,
                 budget: float = 0.04) -> dict[str, Any]:
    """"How stale can I go?": per lag, M2 of one aging batch per seed and PPO-clip's silenced fraction,
    averaged over the seeds; the largest lag whose mean M2 stays within ``budget`` (M2PO's default tau)
    and the rule each lag calls for: ``ppo_clip`` within the budget, ``m2po`` beyond it."""
    per_seed = []
    for seed in seeds:
        df = lag_curve(warm_up(course_run(size, seed, threads), size), lags, ["ppo_clip", "m2po"])
        per_seed.append(df)
    table = pl.concat(per_seed).group_by("lag", "objective").agg(
        pl.col("m2").mean(), pl.col("silenced_frac").mean(), pl.col("masked_frac").mean()).sort("lag", "objective")
    m2 = table.filter(pl.col("objective") == "ppo_clip")["m2"].to_list()
    clip_silenced = table.filter(pl.col("objective") == "ppo_clip")["silenced_frac"].to_list()
    m2po_masked = table.filter(pl.col("objective") == "m2po")["masked_frac"].to_list()
    within = [lag for lag, v in zip(lags, m2) if v <= budget]
    largest = max((lag for i, lag in enumerate(lags) if all(v <= budget for v in m2[: i + 1])), default=None)
    return {"lags": list(lags), "seeds": list(seeds), "budget": budget, "m2_mean": m2,
            "ppo_clip_silenced_mean": clip_silenced, "m2po_masked_mean": m2po_masked, "within_budget": within,
            "largest_lag_within_budget": largest,
            "rule": {str(lag): ("ppo_clip" if v <= budget else "m2po") for lag, v in zip(lags, m2)},
            "curve": [{"lag": lag, "M2": _round(v), "budget": budget} for lag, v in zip(lags, m2)]}


# ----------------------------------------------------------------------------- the reference results
def reference_results(size: str = "course", out_dir: str | Path = "runs/course_reference", threads: int = 2) -> dict[str, Any]:
    """Every notebook's answers and curve at ``size``, seed 0 (the seed-averaged ones over ``SEEDS``);
    deterministic for the seed and thread count. ``write_reference`` commits it."""
    s = size_of(size)
    answers = {
        "c1_importance_ratio": {"ratio": c1_ratio_mean(0, s["samples"]), "model": c1_onpolicy_ratio(size, 0, threads)},
        "c2_on_policy_vs_stale": c2_staleness_gauges(size, 0, threads),
        "c3_what_clipping_silences": c3_clip_silences(size, 0, threads),
        "c4_m2_and_ess_gauges": {"tau": c4_tau_masking(size, 0, threads), "lags": c4_gauges_by_lag(size, SEEDS, threads)},
        "c5_same_batch_many_rules": c5_same_batch_rules(size, 0, threads),
        "c6_paired_branch_and_how_stale": {"branch": c6_paired_branch(out_dir, size, 0, threads),
                                           "how_stale": c6_how_stale(size, SEEDS, threads)},
    }
    curve_of = {"c1_importance_ratio": ("ratio",), "c4_m2_and_ess_gauges": ("lags",),
                "c6_paired_branch_and_how_stale": ("branch",)}
    notebooks = {}
    for stem, a in answers.items():
        src = a[curve_of[stem][0]] if stem in curve_of else a
        notebooks[stem] = {"curve": src["curve"], "answers": _strip(a)}
    return {"size": size, "seed": 0, "seeds": list(SEEDS), "threads": threads, "notebooks": notebooks}


def _strip(value: Any) -> Any:
    """The answers without their curves and long lists (the reference stays small), numbers rounded."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("curve", "per_update_m2_diff", "updates", "rows")}
    if isinstance(value, list):
        return [_strip(v) for v in value] if len(value) <= 16 else f"{len(value)} values"
    return _round(value) if isinstance(value, float) else value


def write_reference(size: str = "course", path: str | Path | None = None, out_dir: str | Path = "runs/course_reference") -> Path:
    """``reference_results(size)`` written as JSON (default ``notebooks/course/reference.json``)."""
    p = Path(path) if path else reference_path()
    atomic_write_text(p, dumps(reference_results(size, out_dir)))
    return p
