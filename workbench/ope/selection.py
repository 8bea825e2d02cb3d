"""Policy selection with OPE: rank candidate policies by their estimates on one logged batch and
score the ranking against their true values.

Per estimator: Spearman's rank correlation of estimates and truths (average ranks for ties; NaN
when either side is constant), regret@1 = max truth - truth of the estimator's top pick, and
SharpeRatio@k of Kiyohara, Kishimoto, Kawakami, Kobayashi, Nakata and Saito 2023, "Towards
Assessing and Benchmarking Risk-Return Tradeoff of Off-Policy Evaluation" (arXiv:2311.18207):

    SharpeRatio@k = (best@k - J(pi_b)) / std@k

with the top-k policies by estimate, best@k their largest true value, std@k the standard deviation
of their true values (population, ddof = 0: the k policies are the whole set deployed, not a
sample) and J(pi_b) the behaviour policy's value. std@k = 0 (k = 1, or equal truths) makes the
ratio undefined: it is NaN, and ``excess_at_k`` = best@k - J(pi_b) is reported beside it always.
Ties in the estimates are broken by candidate order (stable sort).

``load_candidates`` builds candidate models from checkpoint folders (``model.safetensors`` only).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from safetensors.torch import load_file

from workbench.errors import WorkbenchError
from workbench.ope.evaluate import batch_inputs, check_estimators, evaluate_inputs
from workbench.policy.build import frozen_copy


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with tied values sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    """Pearson correlation of the average ranks; NaN when either side is constant or n < 2."""
    ra, rb = rank_average(np.asarray(a, float)), rank_average(np.asarray(b, float))
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / denom) if denom > 0 else math.nan


def selection_metrics(estimates: dict[str, float], truth: dict[str, float], behavior_value: float,
                      k: int = 3) -> dict[str, float]:
    """Spearman, regret@1, best@k, std@k, excess_at_k and SharpeRatio@k of one estimator."""
    names = list(estimates)
    missing = [n for n in names if n not in truth]
    if missing or len(names) < 2:
        raise WorkbenchError(f"truth is missing candidates {missing}" if missing else
                             f"candidates={names} is invalid: expected at least 2 policies to select from")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(names):
        raise WorkbenchError(f"k={k!r} is invalid: expected an int in [1, {len(names)}] (the candidates)")
    est = np.array([estimates[n] for n in names], dtype=np.float64)
    tru = np.array([truth[n] for n in names], dtype=np.float64)
    top = np.argsort(-est, kind="stable")[:k]  # [k] best estimates first
    best, std = float(tru[top].max()), float(tru[top].std())
    excess = best - float(behavior_value)
    return {"spearman": spearman(est, tru), "regret_at_1": float(tru.max() - tru[top[0]]),
            "top_pick": names[int(top[0])], "best_at_k": best, "std_at_k": std, "excess_at_k": excess,
            "sharpe_at_k": excess / std if std > 0 else math.nan, "k": k}


def select_policies(candidates: dict[str, Any], logged_batch, truth: dict[str, float], estimators=None, *,
                    temperature: float, behavior_value: float, k: int = 3,
                    params: dict[str, dict[str, Any]] | None = None, seed: int = 0, **kw: Any) -> pl.DataFrame:
    """One row per estimator: ``selection_metrics`` of its estimates for every candidate model on
    ``logged_batch``, plus ``refused`` (candidates whose estimate was refused for low ESS; their
    number still enters the ranking)."""
    names = check_estimators(estimators)
    tables = {c: evaluate_inputs(batch_inputs(m, logged_batch, temperature), names, params, seed=seed, **kw)
              for c, m in candidates.items()}
    rows = []
    for est in names:
        values = {c: float(t.filter(pl.col("estimator") == est)["estimate"][0]) for c, t in tables.items()}
        refused = sum(bool(t.filter(pl.col("estimator") == est)["refused"][0]) for t in tables.values())
        rows.append({"estimator": est, **selection_metrics(values, truth, behavior_value, k), "refused": refused})
    return pl.DataFrame(rows)


def load_candidates(base_model, checkpoints: list[str | Path]) -> dict[str, Any]:
    """Frozen copies of ``base_model`` holding the weights of each checkpoint folder's
    ``model.safetensors`` (strict: every tensor name and shape must match), named
    ``<run folder>/<checkpoint folder>``."""
    out: dict[str, Any] = {}
    for path in map(Path, checkpoints):
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise WorkbenchError(f"checkpoint={str(path)!r} is invalid: expected a folder holding model.safetensors")
        model = frozen_copy(base_model)
        try:
            model.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise WorkbenchError(f"checkpoint={str(path)!r} does not fit the model: {first}") from None
        out[f"{path.parent.parent.name}/{path.name}"] = model
    return out


__all__ = ["load_candidates", "rank_average", "select_policies", "selection_metrics", "spearman"]
