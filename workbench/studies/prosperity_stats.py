"""Per-run statistics of the prosperity sweeps: one row per run, then objective x staleness over seeds.

Definitions (``workbench.studies.prosperity``'s docstring has the why): ``final`` is the mean of the
last ``FINAL_EVALS`` held-out evaluations, ``best`` the highest one, ``collapse`` the first evaluated
update after the best at which accuracy is below the run's start (None if never), ``zeroed`` /
``truncated`` the mean token fractions whose gradient the objective zeroed / whose weight it capped.

Left out: per-token statistics (the runs log batch means only).
"""

from __future__ import annotations

import math

import polars as pl

from workbench.errors import WorkbenchError

FINAL_EVALS = 3  # "final" accuracy = mean of the last 3 held-out evaluations
ONPOLICY = "on-policy"  # the objective label of the reference runs in tables and charts


def collapse_update(updates: list[int], accuracy: list[float], initial: float) -> int | None:
    """First evaluated update after the best at which accuracy < ``initial`` (None if none)."""
    if not accuracy:
        return None
    best = max(range(len(accuracy)), key=lambda i: (accuracy[i], -i))  # first occurrence of the max
    for u, a in zip(updates[best + 1:], accuracy[best + 1:]):
        if a < initial:
            return int(u)
    return None


def _col_mean(df: pl.DataFrame, col: str) -> float:
    if col not in df.columns:
        return 0.0
    v = df.get_column(col).cast(pl.Float64).drop_nulls().drop_nans()
    return float(v.mean()) if len(v) else 0.0


def _window_mean(part: pl.DataFrame, col: str, last: bool) -> float:
    """Mean of ``col`` over the first (``last=False``) or last tenth of a run's updates (at least one)."""
    if col not in part.columns:
        return math.nan
    v = part.get_column(col).cast(pl.Float64)
    n = max(1, len(v) // 10)
    w = (v.tail(n) if last else v.head(n)).drop_nulls().drop_nans()
    return float(w.mean()) if len(w) else math.nan


def runs_table(df: pl.DataFrame) -> pl.DataFrame:
    """One row per successful run: objective, staleness, seed, initial, final, best, best_update,
    collapse, zeroed, truncated, m2, ess, entropy, entropy_start, entropy_final, response_len,
    run_seconds (module docstring for definitions).

    ``initial`` is the held-out accuracy before the first update (``summary/eval/initial_accuracy``
    when the sweep recorded it, else the first evaluation). ``entropy_start`` / ``entropy_final``:
    mean ``loss/entropy`` over the first / last tenth of the updates (NaN if not logged).
    ``run_seconds``: the run's wall time as the sweep recorded it (NaN if not).
    """
    need = {"run", "status", "objective", "staleness", "seed", "update", "eval/accuracy"}
    missing = sorted(need - set(df.columns))
    if missing:
        raise WorkbenchError(f"sweep metrics lack column(s) {', '.join(missing)}: not a prosperity sweep")
    rows = []
    for (run,), part in df.filter(pl.col("status") == "ok").group_by(["run"], maintain_order=True):
        part = part.sort("update")
        ev = part.filter(pl.col("eval/accuracy").is_not_null())
        updates = [u + 1 for u in ev["update"].to_list()]  # evaluated after update u: policy version u + 1
        acc = [float(a) for a in ev["eval/accuracy"].to_list()]
        initial = part["initial_accuracy"][0] if "initial_accuracy" in part.columns else None
        if initial is None or (isinstance(initial, float) and math.isnan(initial)):
            initial = acc[0] if acc else float("nan")
        best_i = max(range(len(acc)), key=lambda i: (acc[i], -i)) if acc else None
        rows.append({
            "objective": part["objective"][0], "staleness": int(part["staleness"][0]), "seed": int(part["seed"][0]),
            "run": run, "updates": int(part["update"].max()) + 1, "initial": float(initial),
            "final": sum(acc[-FINAL_EVALS:]) / len(acc[-FINAL_EVALS:]) if acc else float("nan"),
            "best": acc[best_i] if acc else float("nan"), "best_update": updates[best_i] if acc else None,
            "collapse": collapse_update(updates, acc, float(initial)),
            "zeroed": _col_mean(part, "offpolicy/clipfrac") + _col_mean(part, "offpolicy/masked_frac"),
            "truncated": _col_mean(part, "offpolicy/truncated_frac"),
            "m2": _col_mean(part, "offpolicy/m2"), "ess": _col_mean(part, "offpolicy/ess_token"),
            "entropy": _col_mean(part, "loss/entropy"), "entropy_start": _window_mean(part, "loss/entropy", False),
            "entropy_final": _window_mean(part, "loss/entropy", True),
            "response_len": _col_mean(part, "reward/response_len_mean"),
            "run_seconds": float(part["run_seconds"][0]) if "run_seconds" in part.columns
            and part["run_seconds"][0] is not None else math.nan,
        })
    if not rows:
        raise WorkbenchError("the sweep has no successful run: nothing to summarise")
    return pl.from_dicts(rows, infer_schema_length=None).sort(["staleness", "objective", "seed"])


STATS = ("initial", "final", "best", "zeroed", "truncated", "m2", "ess", "entropy", "entropy_final", "response_len")


def summary_table(runs: pl.DataFrame) -> pl.DataFrame:
    """Objective x staleness: ``<stat>`` = mean over seeds and ``<stat>_spread`` = (max - min) / 2 for
    every statistic in ``STATS``; ``seeds``; ``collapsed`` = how many seeds collapsed and
    ``collapse`` = the mean collapse update over those (None if none did)."""
    aggs = [pl.len().alias("seeds")]
    for s in STATS:
        aggs += [pl.col(s).mean().alias(s), ((pl.col(s).max() - pl.col(s).min()) / 2).alias(f"{s}_spread")]
    aggs += [pl.col("collapse").is_not_null().sum().alias("collapsed"), pl.col("collapse").mean().alias("collapse")]
    order = {ONPOLICY: -1}
    out = runs.group_by(["objective", "staleness"]).agg(aggs)
    return out.with_columns(pl.col("objective").replace_strict(order, default=0).alias("_o")).sort(
        ["_o", "staleness", "objective"]).drop("_o")


__all__ = ["FINAL_EVALS", "ONPOLICY", "STATS", "collapse_update", "runs_table", "summary_table"]
