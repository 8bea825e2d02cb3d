"""Three more statements checked on the prosperity sweeps, and which statements reproduce.

Each statement comes from its own paper and is decided the way statements (a)-(d) of
``workbench.studies.prosperity.check_claims`` are: ``holds`` from the estimates (means over
seeds), and each comparison's 95% percentile-bootstrap interval across seeds says whether the
verdict lies outside the noise (``settled``; ``workbench.studies.prosperity_intervals``). A
statement whose objectives are not in the grid is "not measured: add X to the grid", never a claim.

- (e) Le Roux et al. 2025, "Tapered Off-Policy REINFORCE: Stable and efficient reinforcement
  learning for LLMs", arXiv:2503.14286: off-policy REINFORCE with unclipped importance weights is
  unstable, TOPR (weights truncated only for negative rewards) is stable. Holds when ``is`` (and
  ``reinforce``, when the grid has it) collapses in most seeds (more than half; collapse as in
  ``prosperity_stats.collapse_update``) and TOPR's final - start accuracy (per run) is not below 0
  outside its interval (with one seed, not below 0 at all).
- (f) Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
  Models", arXiv:2505.22617: PPO's policy entropy collapses, Clip-Cov and KL-Cov keep it up. Holds
  when each of ``clip_cov`` / ``kl_cov`` in the grid ends with a higher final-window entropy (mean
  ``loss/entropy`` over the last tenth of the updates) than ``ppo_clip`` at the same staleness.
- (g) Noukhovitch et al. 2024, "Asynchronous RLHF: Faster and More Efficient Off-Policy RL for
  Language Models", arXiv:2410.18252: online DPO is the most robust to off-policy data. Holds when
  ``online_dpo``'s drop in final accuracy from the grid's lowest to its highest staleness is smaller
  than every other objective's. The drop starts at the lowest stale staleness, not at 0: the grid
  runs staleness 0 once (``ppo_clip``, the on-policy reference, where the ratio objectives coincide)
  and online DPO, which has no ratio, would not coincide with it.

Left out: corrections for the many comparisons (read one settled verdict among many as suggestive).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import polars as pl

from workbench.stats import RESAMPLES, Interval, difference_interval
from workbench.studies.prosperity import Check, check_claims
from workbench.studies.prosperity_intervals import (CONFIDENCE, Part, _ci, check_parts, part_side, part_text,
                                                    seed_values, settled)
from workbench.studies.prosperity_stats import ONPOLICY

TOPR_PAPER = ("Le Roux et al. 2025, Tapered Off-Policy REINFORCE: Stable and efficient reinforcement learning for "
              "LLMs, arXiv:2503.14286")
ENTROPY_PAPER = ("Cui et al. 2025, The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models, "
                 "arXiv:2505.22617")
ASYNC_PAPER = ("Noukhovitch et al. 2024, Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language "
               "Models, arXiv:2410.18252")
M2PO_PAPER = ("Zheng et al. 2025, Prosperity before Collapse: How Far Can Off-Policy RL Reach with Stale Data on "
              "LLMs?, arXiv:2510.01161")
SHORT = {"b": "stale IS improves then degrades, ppo_clip ends below on-policy", "c": "m2po stays near on-policy",
         "d": "m2po masks <= 1/10 of what ppo_clip clips", "e": "unclipped IS collapses, TOPR stays stable",
         "f": "Clip-Cov / KL-Cov keep entropy above PPO's", "g": "online DPO degrades least with staleness"}


def _present(runs: pl.DataFrame, objective: str, staleness: int, column: str = "final") -> np.ndarray:
    return seed_values(runs, objective, staleness, column) if "objective" in runs.columns else np.array([])


def _missing(objectives: list[str]) -> str:
    return f"not measured: add {', '.join(objectives)} to the grid"


def check_topr(runs: pl.DataFrame, staleness: int) -> Check:
    """(e) at ``staleness``: ``is`` (and ``reinforce``) collapse in most seeds, TOPR does not fall below its start."""
    s = staleness
    unclipped = ["is"] + (["reinforce"] if len(_present(runs, "reinforce", s)) else [])
    statement = (f"at staleness {s}, unclipped {' / '.join(unclipped)} collapses in most seeds while topr's final "
                 "accuracy is not below its start outside its 95% CI")
    missing = [o for o in ("is", "topr") if not len(_present(runs, o, s))]
    if missing:
        return Check("e", statement, None, _missing(missing), source=TOPR_PAPER)
    counts = []
    for o in unclipped:
        part = runs.filter((pl.col("objective") == o) & (pl.col("staleness") == s))
        counts.append((o, int(part["collapse"].is_not_null().sum()), part.height))
    per_run = runs.with_columns((pl.col("final") - pl.col("initial")).alias("_gain"))
    gain = Part("topr final - start", _ci(seed_values(per_run, "topr", s, "_gain")), 0.0, True)  # paired: per run
    side, has_interval = part_side(gain), math.isfinite(gain.interval.lo)
    stable = side is not False if has_interval else gain.interval.estimate >= 0
    holds = all(c > n / 2 for _, c, n in counts) and stable
    evidence = "; ".join(f"{o}: {c} of {n} seed(s) collapsed" for o, c, n in counts)
    evidence += f"; topr final - start {100 * gain.interval.estimate:+.1f} points"
    return Check("e", statement, holds, evidence, source=TOPR_PAPER, intervals=part_text(gain),
                 settled=has_interval)


def check_entropy(runs: pl.DataFrame, staleness: int) -> Check:
    """(f) at ``staleness``: clip_cov / kl_cov end with a higher final-window entropy than ppo_clip."""
    s = staleness
    covs = [o for o in ("clip_cov", "kl_cov") if len(_present(runs, o, s))]
    names = " / ".join(covs) or "clip_cov / kl_cov"
    statement = (f"at staleness {s}, {names} end{'s' if len(covs) == 1 else ''} with a higher entropy (mean over the "
                 "last tenth of the updates) than ppo_clip")
    missing = [o for o in ("ppo_clip", "clip_cov", "kl_cov") if o not in covs and not len(_present(runs, o, s))]
    if not covs or "ppo_clip" in missing:
        return Check("f", statement, None, _missing(missing), source=ENTROPY_PAPER)
    ppo = _present(runs, "ppo_clip", s, "entropy_final")
    values = {o: _present(runs, o, s, "entropy_final") for o in covs}
    if not len(ppo) or not all(len(v) for v in values.values()):
        return Check("f", statement, None, "not measured: the runs logged no loss/entropy", source=ENTROPY_PAPER)
    parts = [Part(f"{o} - ppo_clip final entropy", _difference(values[o], ppo), 0.0, True, 3, " nats", 1.0)
             for o in covs]
    holds = all(p.interval.estimate > 0 for p in parts)
    start = float(np.mean(_present(runs, "ppo_clip", s, "entropy_start")))
    evidence = (f"ppo_clip entropy {start:.3f} -> {float(np.mean(ppo)):.3f} nats per token (first -> last tenth); "
                + ", ".join(f"{o} final {float(np.mean(values[o])):.3f}" for o in covs))
    if missing:
        evidence += f" ({', '.join(missing)} not in the grid)"
    return Check("f", statement, holds, evidence, source=ENTROPY_PAPER, intervals="; ".join(map(part_text, parts)),
                 settled=settled(holds, parts))


def check_online_dpo(runs: pl.DataFrame, staleness: int) -> Check:
    """(g) online_dpo's drop in final accuracy from the lowest stale staleness to ``staleness`` is the smallest."""
    stale = sorted(x for x in runs["staleness"].unique().to_list() if 0 < x <= staleness)
    low = stale[0] if stale else staleness
    start = f"staleness {low}" if low < staleness else "a lower staleness"  # a grid of one staleness: not "256 to 256"
    statement = (f"online_dpo's drop in final accuracy from {start} to {staleness} is the smallest of the "
                 "grid's objectives")
    if not (len(_present(runs, "online_dpo", low)) and len(_present(runs, "online_dpo", staleness))):
        return Check("g", statement, None, _missing(["online_dpo"]), source=ASYNC_PAPER)
    if low == staleness:
        return Check("g", statement, None, "not measured: needs two stale staleness values in the grid",
                     source=ASYNC_PAPER)
    names = [o for o in runs["objective"].unique(maintain_order=True).to_list() if o not in (ONPOLICY, "online_dpo")
             and len(_present(runs, o, low)) and len(_present(runs, o, staleness))]
    if not names:
        return Check("g", statement, None, _missing(["another objective"]), source=ASYNC_PAPER)
    d0, d1 = _present(runs, "online_dpo", low), _present(runs, "online_dpo", staleness)
    drops = {o: float(np.mean(_present(runs, o, low)) - np.mean(_present(runs, o, staleness)))
             for o in ["online_dpo"] + names}
    parts = [Part(f"{o} drop - online_dpo drop",
                  drop_gap(_present(runs, o, low), _present(runs, o, staleness), d0, d1), 0.0, True) for o in names]
    holds = all(p.interval.estimate > 0 for p in parts)
    evidence = f"drop from staleness {low} to {staleness}: " + ", ".join(
        f"{o} {100 * d:+.1f} points" for o, d in sorted(drops.items(), key=lambda kv: kv[1]))
    return Check("g", statement, holds, evidence, source=ASYNC_PAPER, intervals="; ".join(map(part_text, parts)),
                 settled=settled(holds, parts))


def _difference(a: np.ndarray, b: np.ndarray) -> Interval:
    """mean(a) - mean(b) with its unpaired bootstrap interval (different runs)."""
    return difference_interval(a, b, CONFIDENCE)


def drop_gap(a0, a1, b0, b1, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """(mean a0 - mean a1) - (mean b0 - mean b1) with a percentile-bootstrap interval, each of the four
    groups of runs resampled on its own (Efron 1979, "Bootstrap methods: another look at the
    jackknife", Ann. Statist. 7:1-26); a group of fewer than two runs: no interval (NaN bounds)."""
    groups = [np.asarray(g, dtype=np.float64) for g in (a0, a1, b0, b1)]
    estimate = float(np.mean(groups[0]) - np.mean(groups[1]) - np.mean(groups[2]) + np.mean(groups[3]))
    if min(len(g) for g in groups) < 2:
        return Interval(estimate, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    m = [g[rng.integers(0, len(g), size=(resamples, len(g)))].mean(axis=1) for g in groups]  # 4 x [R]
    lo, hi = np.quantile(m[0] - m[1] - m[2] + m[3], [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(estimate, float(lo), float(hi))


def more_checks(runs: pl.DataFrame, staleness: int | None) -> list[Check]:
    """Statements (e), (f), (g) at ``staleness`` (None: all three not measured)."""
    if staleness is None:
        return [Check(n, SHORT[n], None, "not measured: no stale runs", source=src)
                for n, src in (("e", TOPR_PAPER), ("f", ENTROPY_PAPER), ("g", ASYNC_PAPER))]
    return [check_topr(runs, staleness), check_entropy(runs, staleness), check_online_dpo(runs, staleness)]


def all_checks(table: pl.DataFrame, runs: pl.DataFrame, staleness: int | None) -> list[Check]:
    """Statements (b)-(g) at ``staleness``, each with ``settled`` filled ((a) is the reference, not a claim)."""
    first = [replace(c, source=M2PO_PAPER, settled=settled(c.holds, check_parts(c.name, runs, staleness)))
             for c in check_claims(table, staleness=staleness)[1:]] if staleness is not None else []
    return first + more_checks(runs, staleness)


def reproduce_lines(checks: list[Check], staleness: int | None) -> list[str]:
    """"What reproduces and what does not": each statement sorted by its verdict and whether the
    intervals settle it (generated from ``checks``; nothing is written by hand)."""
    groups = {"reproduces (holds, outside the intervals)": (True, True),
              "holds on the means, not settled by the intervals": (True, False),
              "does not reproduce (fails, outside the intervals)": (False, True),
              "fails on the means, not settled by the intervals": (False, False)}
    out = []
    for label, (holds, sure) in groups.items():
        hit = [c for c in checks if c.holds is holds and bool(c.settled) is sure]
        if hit:
            out.append(f"- {label[0].upper() + label[1:]}: " + "; ".join(f"({c.name}) {SHORT[c.name]}" for c in hit)
                       + ".")
    missing = [c for c in checks if c.holds is None]
    if missing:
        out.append("- Not measured: " + "; ".join(f"({c.name}) {SHORT.get(c.name, c.statement)}: {c.evidence}"
                                                 for c in missing) + ".")
    where = f"at staleness {staleness}" if staleness is not None else "(no stale runs)"
    return [f"Statements (b)-(g) {where}:", ""] + out


__all__ = ["ASYNC_PAPER", "ENTROPY_PAPER", "M2PO_PAPER", "SHORT", "TOPR_PAPER", "all_checks", "check_entropy",
           "check_online_dpo", "check_topr", "drop_gap", "more_checks", "reproduce_lines"]
