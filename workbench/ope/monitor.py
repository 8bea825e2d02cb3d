"""``OPEMonitor``: off-policy evaluation during a run, as a ``Run.hooks`` entry.

    mon = OPEMonitor(every=10, truth_prompts=32)
    run.hooks.append(mon)
    run.run(100)
    mon.table            # polars: update, staleness_mean, estimator, estimate, lo, hi, ..., truth, truth_lo, truth_hi

Every ``every`` updates it evaluates ``run.last_batch`` (the minibatch the update just trained on;
its behaviour log-probs are mu, generated ``offpolicy/staleness_mean`` updates earlier) against the
model after the update (pi), and scores the estimates against a fresh on-policy sample of pi drawn
with generators seeded from (config.seed, update) alone: the run's ``prompt_rng`` and ``generator``
are never touched, so a run with the monitor has the same metrics as one without (tested). The
greedy held-out accuracy of the row, when the update evaluated it, is kept as ``heldout_greedy``:
a different quantity (greedy decoding, held-out prompts). Rows are written to ``ope.parquet`` in the
run directory (whole-file atomic rewrite, ``runs.rundir.atomic_write_parquet``) after every evaluation;
a monitor on a resumed run keeps the file's rows of earlier updates.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from workbench.errors import WorkbenchError
from workbench.ope.estimators import DEFAULT_MIN_ESS_FRAC, DEFAULT_RESAMPLES
from workbench.ope.evaluate import check_estimators, derived_seed, evaluate_batch, on_policy_truth
from workbench.runs.rundir import atomic_write_parquet

FILE = "ope.parquet"
TRUTH_STREAM = 0x0BE  # third part of the truth sample's seed: no other stream of the run uses it


class OPEMonitor:
    """A ``hook(run, row)`` evaluating OPE estimators every ``every`` updates (module docstring)."""

    def __init__(self, every: int, estimators=None, truth_prompts: int = 32, *,
                 params: dict[str, dict[str, Any]] | None = None, confidence: float = 0.95,
                 min_ess_frac: float = DEFAULT_MIN_ESS_FRAC, resamples: int = DEFAULT_RESAMPLES):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise WorkbenchError(f"every={every!r} is invalid: expected an int >= 1 (updates between evaluations)")
        if isinstance(truth_prompts, bool) or not isinstance(truth_prompts, int) or truth_prompts < 1:
            raise WorkbenchError(f"truth_prompts={truth_prompts!r} is invalid: expected an int >= 1")
        self.every, self.truth_prompts = every, truth_prompts
        self.estimators = check_estimators(estimators)
        self.params, self.confidence = dict(params or {}), confidence
        self.min_ess_frac, self.resamples = min_ess_frac, resamples
        self.rows: list[dict[str, Any]] = []
        self._kept_earlier = False  # rows of an earlier segment of a resumed run, read once

    def __call__(self, run, row: dict[str, Any]) -> None:
        if run.version % self.every != 0 or run.last_batch is None:
            return
        update, temperature = int(row["update"]), float(run.knobs.applied.temperature)
        seed = derived_seed(run.config.seed, update, TRUTH_STREAM)
        table = evaluate_batch(run.model, run.last_batch, temperature, self.estimators, self.params,
                               self.confidence, seed=seed % (2**32), resamples=self.resamples,
                               min_ess_frac=self.min_ess_frac)
        truth = on_policy_truth(run, self.truth_prompts, seed, self.confidence)
        greedy = row.get("eval/accuracy")
        common = {"update": update, "policy_version": int(run.version),
                  "staleness_mean": float(row.get("offpolicy/staleness_mean", math.nan)),
                  "truth": truth.value, "truth_lo": truth.lo, "truth_hi": truth.hi, "truth_n": truth.n,
                  "heldout_greedy": math.nan if greedy is None else float(greedy)}
        if run.dir is not None and not self._kept_earlier:  # a resumed run: keep the rows before this update
            self._kept_earlier = True
            path = run.dir.path / FILE
            if path.is_file():
                self.rows[:0] = pl.read_parquet(path).filter(pl.col("update") < update).to_dicts()
        self.rows.extend({**common, **r} for r in table.iter_rows(named=True))
        if run.dir is not None:
            atomic_write_parquet(self.table, run.dir.path / FILE)

    @property
    def table(self) -> pl.DataFrame:
        return pl.from_dicts(self.rows, infer_schema_length=None) if self.rows else pl.DataFrame()


__all__ = ["FILE", "OPEMonitor"]
