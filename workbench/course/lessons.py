"""What the course notebooks call besides the exercises: the course's run sizes, a stale batch measured
against the weights as they move away from it, and the chart that overlays the reference on yours.

    run = course_run("ci", seed=0)
    table = lag_curve(run, lags=(0, 1, 2, 4), objectives=["ppo_clip", "m2po"])   # one batch, aging
    chart = overlay_chart(yours, reference_curve("c4_m2_and_ess_gauges"), title="M2 by lag")

**A batch that ages.** ``lag_curve`` generates and scores one batch with the run's current weights
theta_k (its sampler log-probs are the behaviour log-probs mu), then trains the run's ordinary updates
(on fresh batches of its own: staleness 0) and, at every lag in ``lags``, pushes the same frozen batch
through each rule with theta_{k+lag} (``workbench.studies.replay.replay_objectives``: clip / mask
fractions, the share of tokens whose gradient is exactly zero although A != 0, M2 = mean (log r)^2 and
the token ESS). So the lag is exact and nothing but the weights changes between two rows: the fixed-lag
setting of the buffer (docs/design.md, "Staleness and the behaviour policy") seen from one batch.

**The course model** is the ~35 k-parameter untrained model of ``workbench.notebook.setup(tiny=True)``
with its length-shaped reward: it learns nothing worth evaluating in a few updates, but its policy
moves, which is all the ratio, M2 and ESS measure. It needs no warm start, so a laptop runs every
notebook in seconds to a minute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import polars as pl
import torch

from workbench.charts import chart_spec
from workbench.charts.style import Panel
from workbench.errors import bad_value
from workbench.loop import Run
from workbench.notebook import notebooks_dir, setup
from workbench.policy.logprobs import token_logprobs
from workbench.rollouts import Rollouts
from workbench.studies.replay import replay_objectives

# sizes of the course: "course" is what the notebooks run by default, "ci" what the tests run
SIZES: dict[str, dict[str, int]] = {
    "course": {"prompts_per_step": 16, "group_size": 8, "warmup": 8, "steps": 24, "samples": 4000},
    "ci": {"prompts_per_step": 4, "group_size": 4, "warmup": 2, "steps": 8, "samples": 1000},
}
COURSE_LR = 0.01  # the tiny model's rate: far enough per update that a few updates of lag show in M2
REFERENCE_NAME = "reference.json"


def size_of(size: str) -> dict[str, int]:
    """The settings of course size ``size`` (``SIZES``)."""
    if size not in SIZES:
        raise bad_value("size", size, f"one of {', '.join(SIZES)}")
    return SIZES[size]


def course_run(size: str = "course", seed: int = 0, threads: int = 2, out_dir: str = "",
               run_name: str = "", **fields: Any) -> Run:
    """A ``Run`` of the course model at ``size`` (``fields``: any other ``RunConfig`` field, e.g.
    ``staleness``); ``out_dir=""`` writes no run directory. Logs nothing (the notebooks print)."""
    s = size_of(size)
    fields = {"prompts_per_step": s["prompts_per_step"], "group_size": s["group_size"], "lr": COURSE_LR,
              "steps": s["steps"], "eval_every": 10_000, "eval_size": 8, **fields}
    config, model, tokenizer = setup(True, seed=seed, threads=threads, out_dir=out_dir, run_name=run_name, **fields)
    return Run(config, model=model, tokenizer=tokenizer, log=lambda _line: None)


def token_logprobs_now(run: Run, batch: Rollouts) -> torch.Tensor:
    """log pi_theta of every response token of ``batch`` under the run's current weights, no graph. [B, T]"""
    run.model.eval()
    with torch.no_grad():
        lp, _ = token_logprobs(run.model, batch, temperature=run.knobs.applied.temperature)  # [B, T]
    return lp


def measure_rules(run: Run, batch: Rollouts, objectives: Sequence[str],
                  params: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``batch`` through every rule with the run's current weights (``replay_objectives``, no cosine)."""
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    no_reference = torch.zeros(n_params, dtype=torch.float64)  # cosines are not part of the course
    rows = replay_objectives(run, batch, no_reference, list(objectives), run.knobs.applied.temperature, params)
    for row in rows:
        row.pop("cosine_to_onpolicy")
    return rows


def lag_curve(run: Run, lags: Sequence[int], objectives: Sequence[str],
              params: dict[str, dict[str, Any]] | None = None, batch: Rollouts | None = None) -> pl.DataFrame:
    """One batch of theta_k measured at theta_{k+lag} for every lag (module doc): one row per lag and
    rule. ``lags`` ascending ints >= 0; ``batch`` defaults to a fresh batch of the current weights."""
    lags = list(lags)
    if not lags or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in lags) or lags != sorted(set(lags)):
        raise bad_value("lags", lags, "ascending distinct ints >= 0, e.g. (0, 1, 2, 4)")
    batch = signal_batch(run) if batch is None else batch
    v0, rows = run.version, []
    for lag in lags:
        while run.version - v0 < lag:
            run.step()
        rows.extend({"lag": lag, **r} for r in measure_rules(run, batch, objectives, params))
    return pl.DataFrame(rows)


def signal_batch(run: Run, tries: int = 8) -> Rollouts:
    """A fresh batch of the current weights with at least one nonzero advantage: the course model's
    small groups are sometimes all equally rewarded, and such a batch has nothing to clip or mask.
    Draws up to ``tries`` batches from the run's own generators (deterministic for the seed)."""
    for _ in range(tries):
        batch = run.sample()[0]
        if bool((batch.advantages != 0).any()):
            return batch
    return batch


def warm_up(run: Run, size: str) -> Run:
    """The size's ``warmup`` ordinary updates, so that groups carry reward variance (an advantage)."""
    for _ in range(size_of(size)["warmup"]):
        run.step()
    return run


# ----------------------------------------------------------------------------- the reference overlay
def reference_path() -> Path:
    """``notebooks/course/reference.json``: the course's expected numbers."""
    return notebooks_dir() / "course" / REFERENCE_NAME


def load_reference(path: str | Path | None = None) -> dict[str, Any]:
    """The committed reference results (``exercises.reference_results``), or ``{}`` if the file is absent."""
    p = Path(path) if path else reference_path()
    return json.loads(p.read_text()) if p.is_file() else {}


def reference_curve(stem: str, reference: dict[str, Any] | None = None) -> pl.DataFrame:
    """The reference curve of course notebook ``stem`` (empty when the reference has none)."""
    ref = load_reference() if reference is None else reference
    rows = ref.get("notebooks", {}).get(stem, {}).get("curve", [])
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def overlay_chart(yours: pl.DataFrame, reference: pl.DataFrame, x: str, title: str, axis: str = "") -> dict[str, Any]:
    """One panel: each numeric column of ``yours`` (besides ``x``) as ``yours: <col>`` and the same column
    of ``reference`` as ``reference: <col>``, joined on ``x`` (the one chart system, ``chart_spec``)."""
    cols = [c for c in yours.columns if c != x and yours.schema[c].is_numeric()]
    wide = yours.select([pl.col(x).cast(pl.Float64)] + [pl.col(c).cast(pl.Float64).alias(f"yours: {c}") for c in cols])
    shown = [f"yours: {c}" for c in cols]
    if reference.height and x in reference.columns:
        ref_cols = [c for c in cols if c in reference.columns]
        ref = reference.select([pl.col(x).cast(pl.Float64)]
                               + [pl.col(c).cast(pl.Float64).alias(f"reference: {c}") for c in ref_cols])
        wide = wide.join(ref, on=x, how="full", coalesce=True).sort(x)
        shown += [f"reference: {c}" for c in ref_cols]
    panel = Panel("course", title, axis or ", ".join(cols), tuple(shown))
    return chart_spec(wide, panels=[panel], step=x, title=title, columns=1, width=420, height=180)


__all__ = ["COURSE_LR", "SIZES", "course_run", "lag_curve", "load_reference", "measure_rules", "overlay_chart",
           "reference_curve", "reference_path", "signal_batch", "size_of", "token_logprobs_now", "warm_up"]
