""""Prosperity before collapse" at CPU scale: the sweep, its per-run statistics, the checks, the report.

    python -m workbench report --size cpu        # runs (or resumes) the sweeps, writes reports/prosperity.md
                                                 # (the command: workbench.cli.report)

    from workbench.studies import prosperity
    df = prosperity.run_sweeps("workshop")       # merged metrics of every run (on-policy + stale grid)
    runs = prosperity.runs_table(df)             # one row per run: final / best accuracy, collapse, fractions
    table = prosperity.summary_table(runs)       # objective x staleness: mean and spread over seeds
    checks = prosperity.check_claims(table)      # the paper's four statements, evaluated on the data

The claim being reproduced (M2PO, Zheng et al. 2025, "Prosperity before Collapse: How Far Can
Off-Policy RL Reach with Stale Data on LLMs?", arXiv:2510.01161): with stale rollouts, unclipped
importance sampling first improves and then collapses, PPO/GRPO clipping degrades (it clips the
high-entropy tokens that carry the learning signal: 1.22% of tokens clipped at staleness 256 on
Qwen2.5-32B), while masking only the tokens that push the second moment M2 = mean (log r)^2 above
tau (0.06% masked) keeps on-policy accuracy at staleness 256.

**What runs.** Two resumable sweeps (``workbench.sweeps``) under ``<out_dir>/``: the on-policy
reference ``prosperity-onpolicy`` (staleness 0, ``ppo_clip``: at staleness 0 with one minibatch
every objective here sees ratios of 1 and computes the same gradient, so it is run once, not once
per objective) and the grid ``prosperity-stale`` (``staleness`` x ``objective``), each over the
same seeds. ``SIZES`` names the scales, each a grid and its overrides of the built-in default run.

**Statistics** (``runs_table``, in ``workbench.studies.prosperity_stats``). ``final``: mean of the
last ``FINAL_EVALS`` held-out evaluations (one evaluation on 256 problems has a binomial standard
error of ~3 points; averaging three reduces it). ``best``: the highest single evaluation.
``collapse``: the first evaluated update after the best at which accuracy is below the run's
starting accuracy (the policy became worse than where it began; None if never). ``zeroed``: mean
fraction of tokens whose gradient the objective zeroed (``offpolicy/clipfrac`` +
``offpolicy/masked_frac``: PPO clipping, M2PO masking); ``truncated``: mean fraction whose weight
was capped but still carries gradient (CISPO, TOPR). Seeds are summarised as mean and spread (half
the max - min range; with two seeds, the distance of each seed from the mean); the report's
intervals across seeds are in ``workbench.studies.prosperity_intervals``. Three more statements
from other papers (TOPR, Clip-Cov / KL-Cov, online DPO), which statements reproduce, and "How
stale can I go?" are in ``workbench.studies.prosperity_checks`` and
``workbench.studies.prosperity_howstale``.

**Sizes.** The report's grid (``SIZES["cpu"]``) and its classroom version (``"workshop"``) run
the scratchpad regime (``SCRATCHPAD``): the ``scratchpad`` task, whose long answers have few
forking tokens, at the learning rate where a lag of 256 updates drifts about as far as the
paper's. ``"addition"`` and ``"addition-workshop"`` are the same grid on the built-in default
task (3-token answers, lr 2e-4), where one update moves the policy much farther
(reports/prosperity-addition.md).

**Seeds, and what they cost.** The report's grid runs 3 seeds per cell (39 runs of 100 updates).
Two seeds give a bootstrap interval that is just their range, one seed none at all; three is the
fewest at which an interval across seeds means something, and still covers less than 95%. The
workshop size keeps one seed (4 runs, for a classroom): its report shows each run's Wilson
interval of one evaluation instead, the evaluation noise only. A named size's folders do not
carry its seed count: a 2-seed folder resumed by the 3-seed grid keeps the runs whose configs are
unchanged and adds the third seed, said in one line before it runs; two folders recording
different seed counts are refused, and the report states its seed count
(``workbench.studies.prosperity_sweeps``).

Left out: staleness-adaptive learning rates, the paper's model sizes and tasks (see the report's
scale section), significance tests (two or three seeds cannot support them).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import polars as pl

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.notebook import TINY_REWARDS
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model, save_policy
from workbench.policy.tokenizer import build_char_tokenizer
from workbench.steps.reweight import OBJECTIVES
from workbench.studies.prosperity_stats import FINAL_EVALS, ONPOLICY, STATS, collapse_update, runs_table, summary_table
from workbench.studies.prosperity_sweeps import check_seed_counts, record_wall, seed_change
from workbench.sweeps import MERGED_FILE, RUNS_FILE, SPEC_FILE, read_sweep, sweep



@dataclass(frozen=True)
class Size:
    """One scale of the reproduction."""

    staleness: tuple[int, ...]
    """Staleness values of the stale grid (the on-policy reference is staleness 0)."""
    objectives: tuple[str, ...]
    """Objectives of the stale grid (registry names)."""
    seeds: int
    """Seeds per cell (base seed, +1, ...)."""
    steps: int
    """Updates per run."""
    minutes: str
    """Measured wall time on 2 CPU cores (documentation only)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """RunConfig fields over the defaults (empty: the built-in default run)."""


# The report's regime (docs/design.md, "Tasks with LLM-like token statistics"): long answers with few
# forking tokens (workbench/tasks/scratchpad.py), graded on the final answer only, at the learning rate
# where a lag of 256 updates drifts about as far as the paper's: ppo_clip clipped 1.38% of tokens at lr
# 2e-5 over the report's grid (3.5% at 2e-4 in a pilot; GRPO 1.22% in the paper). Every run generates only the batches it trains on
# (prefill_to_steps), and no run measures the sampler/trainer mismatch (exact fp32 here: ~1e-7).
SCRATCHPAD = {"task": "scratchpad", "rewards": (("final_answer", 1.0),), "lr": 2e-5, "prefill_to_steps": True,
              "measure_mismatch": False}

SIZES: dict[str, Size] = {
    "cpu": Size(staleness=(16, 256), objectives=("ppo_clip", "is", "m2po", "topr", "clip_cov", "online_dpo"),
                seeds=3, steps=100, minutes="about 77 (measured: 39 runs, ~220 s each, 2 in parallel)",
                overrides=SCRATCHPAD),
    "workshop": Size(staleness=(256,), objectives=("ppo_clip", "is", "m2po"), seeds=1, steps=50,
                     minutes="about 7 (6 min 39 s measured, the warm start's 38 s included)", overrides=SCRATCHPAD),
    "addition": Size(staleness=(4, 16, 64, 256), objectives=("ppo_clip", "is", "m2po", "cispo", "topr"), seeds=3,
                     steps=300, minutes="about 135 (estimated: 2 seeds took about 90)"),
    "addition-workshop": Size(staleness=(64, 256), objectives=("ppo_clip", "is", "m2po"), seeds=1, steps=150,
                              minutes="about 10 (9 min 45 s measured)"),
}
REPORTS = {"cpu": "reports/prosperity.md"}
"""Where ``python -m workbench report --size <size>`` writes; other sizes: reports/prosperity-<size>.md."""


def report_path(size: str) -> str:
    """The report file of a named size (``REPORTS``, else ``reports/prosperity-<size>.md``)."""
    return REPORTS.get(size, f"reports/prosperity-{size}.md")


def base_config(size: Size, out_dir: str = "runs", **fields: Any):
    """The base ``RunConfig`` of a size: the built-in default with ``steps`` and the overrides."""
    return RunConfig(**{"steps": size.steps, "out_dir": out_dir, **size.overrides, **fields})


def resolve_size(size: str | Size = "cpu", *, steps: int = 0, staleness: str | tuple = "", objectives: str | tuple = "",
                 seeds: int = 0) -> Size:
    """A named size with some of its fields replaced (0 / empty keeps the size's value); for notebooks."""
    base = _size(size)
    if isinstance(staleness, str):
        try:
            staleness = tuple(int(s) for s in staleness.split(",") if s.strip())
        except ValueError:
            raise WorkbenchError(f"staleness={staleness!r} is invalid: expected comma-separated integers") from None
    if isinstance(objectives, str):
        objectives = tuple(o.strip() for o in objectives.split(",") if o.strip())
    for o in objectives:
        OBJECTIVES.get(o)  # unknown names: one line listing the valid ones
    if any(s < 1 for s in staleness):
        raise WorkbenchError(f"staleness={staleness!r} is invalid: the grid's values must be >= 1 (0 is the "
                             "on-policy reference, always run)")
    for name, v in (("steps", steps), ("seeds", seeds)):
        if not isinstance(v, int) or v < 0:
            raise WorkbenchError(f"{name}={v!r} is invalid: expected an int >= 0 (0 keeps the size's)")
    return replace(base, staleness=tuple(staleness) or base.staleness, objectives=tuple(objectives) or base.objectives,
                   seeds=seeds or base.seeds, steps=steps or base.steps)


def tiny_base(size: Size, out_dir: str = "runs"):
    """A base config on an untrained ~35 k-parameter checkpoint saved under ``out_dir`` (CI, seconds a run).

    An untrained model is never right, so the reward adds a length-shaped term (``notebook.TINY_REWARDS``).
    """
    path = Path(out_dir) / "tiny_model"
    if not (path / "config.json").is_file():
        tok = build_char_tokenizer()
        save_policy(build_model(ModelConfig(**TINY_MODEL), tok, seed=0), tok, path)
    return base_config(size, out_dir, model=str(path.resolve()), rewards=TINY_REWARDS, prompts_per_step=4,
                       group_size=4, eval_every=2, eval_size=8, lr=1e-2, task_params={"heldout_size": 8})


def sweep_prefix(size: str | Size = "cpu", base=None, out_dir: str = "runs") -> str:
    """The sweeps' folder prefix: ``prosperity`` for the report's grid (``cpu`` on the default base),
    ``prosperity-<size>`` for another named size, ``prosperity-custom-<hash>`` for anything else, so
    different grids or bases never share (and never overwrite) each other's runs."""
    size = _size(size)
    default = base_config(size, out_dir)
    if base is None or base.to_dict() == default.to_dict():
        for name, known in SIZES.items():
            if known == size:
                return "prosperity" if name == "cpu" else f"prosperity-{name}"
    key = json.dumps({"size": repr(size), "base": (base or default).to_dict()}, sort_keys=True, default=str)
    return "prosperity-custom-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def run_sweeps(size: str | Size = "cpu", *, base=None, out_dir: str = "runs", prefix: str | None = None,
               workers: int | None = None, threads_per_run: int = 1, ray: str | None = None,
               progress: bool = True, log: Callable[[str], None] = print) -> pl.DataFrame:
    """Run (or resume) the on-policy reference and the stale grid; returns their merged metrics.

    ``base`` replaces ``base_config(size, out_dir)`` (tests pass a tiny model). The folders are
    ``<out_dir>/<prefix>-onpolicy`` and ``-stale`` (``prefix`` default: ``sweep_prefix``). The result
    has one row per (run, update) with ``objective`` = ``ON_POLICY`` for the reference runs.
    """
    size = _size(size)
    base = base if base is not None else base_config(size, out_dir)
    prefix = prefix or sweep_prefix(size, base, base.out_dir or "runs")
    common = dict(seeds=size.seeds, workers=workers, threads_per_run=threads_per_run, ray=ray, progress=progress,
                  log=log)
    out, t0 = base.out_dir or "runs", time.perf_counter()
    for line in seed_change(out, prefix, size.seeds):  # a 2-seed folder resumed with 3 seeds: said, never silent
        log(line)
    try:
        sweep(base, {"staleness": [0], "objective": ["ppo_clip"]}, name=f"{prefix}-onpolicy", **common)
        sweep(base, {"staleness": list(size.staleness), "objective": list(size.objectives)}, name=f"{prefix}-stale",
              **common)
    finally:  # a stopped sweep's time counts too: the next call continues it
        record_wall(out, prefix, time.perf_counter() - t0)
    return load_sweeps(out, prefix)


def load_sweeps(out_dir: str = "runs", prefix: str = "prosperity") -> pl.DataFrame:
    """The merged metrics of sweeps already run (``run_sweeps``' folders), without running anything.

    Adds ``initial_accuracy`` (each run's held-out accuracy before its first update) and
    ``run_seconds`` (its wall time), both from ``sweep_runs.parquet``; the reference runs'
    ``objective`` is ``ON_POLICY``. Two folders recording different seed counts are refused
    (``prosperity_sweeps.check_seed_counts``).
    """
    check_seed_counts(out_dir, prefix)
    parts = []
    for kind in ("onpolicy", "stale"):
        folder = Path(out_dir) / f"{prefix}-{kind}"
        if not (folder / MERGED_FILE).is_file():  # a fresh clone has no runs: say which command makes them
            raise WorkbenchError(f"prefix={prefix!r} is invalid: {folder} holds no finished sweep ({MERGED_FILE}); "
                                 f"make it with {make_command(out_dir, prefix)}")
        df = read_sweep(folder)
        runs_file = folder / RUNS_FILE
        col = "summary/eval/initial_accuracy"
        if runs_file.is_file():
            runs = pl.read_parquet(runs_file)
            extra = [pl.col(c).cast(pl.Float64).alias(a) for c, a in ((col, "initial_accuracy"),
                                                                       ("seconds", "run_seconds")) if c in runs.columns]
            if extra:
                df = df.join(runs.select("run", *extra), on="run", how="left")
        if kind == "onpolicy":
            df = df.with_columns(pl.lit(ONPOLICY).alias("objective"))
        parts.append(df)
    return pl.concat(parts, how="diagonal_relaxed")


def make_command(out_dir: str = "runs", prefix: str = "prosperity") -> str:
    """What makes the sweeps ``load_sweeps(out_dir, prefix)`` reads: ``python -m workbench report``
    for a named size's prefix, else the notebook with ``run_sweep = True`` (a custom grid or base)."""
    where = "" if str(out_dir) == "runs" else f" --out-dir {out_dir}"
    for name in SIZES:
        if prefix == sweep_prefix(name):
            size = "" if name == "cpu" else f" --size {name}"
            return f"`python -m workbench report{size}{where}` (or run this grid with run_sweep = True)"
    return "notebooks/05_prosperity_before_collapse.ipynb run with run_sweep = True and the same grid"


def sweep_base(out_dir: str = "runs", prefix: str = "prosperity") -> dict[str, Any]:
    """The stale grid's base config as recorded in its ``sweep.json`` ({} if absent)."""
    path = Path(out_dir) / f"{prefix}-stale" / SPEC_FILE
    return json.loads(path.read_text()).get("base", {}) if path.is_file() else {}


def _size(size: str | Size) -> Size:
    if isinstance(size, Size):
        return size
    if size not in SIZES:
        raise WorkbenchError(f"size={size!r} is invalid: expected one of {', '.join(SIZES)}")
    return SIZES[size]


# ----------------------------------------------------------------------------- the four checks
@dataclass(frozen=True)
class Check:
    """One must-hold statement evaluated on the data: ``holds`` is None when the data cannot say."""

    name: str
    """Its letter: a-d (``check_claims``), e-g (``prosperity_checks``)."""
    statement: str
    """What is claimed, with the rule that decides it."""
    holds: bool | None
    """True / False from the estimates; None: not measured."""
    evidence: str
    """The numbers behind ``holds`` (or what to add to the grid to measure it)."""
    source: str = ""
    """The paper the statement comes from (authors, year, title, arXiv id); a-d: M2PO."""
    intervals: str = ""
    """Its 95% intervals across seeds, when the check computes them itself (e-g)."""
    settled: bool | None = None
    """Whether the intervals settle ``holds`` (e-g; a-d: ``prosperity_intervals.settled``)."""


def _cell(table: pl.DataFrame, objective: str, staleness: int) -> dict[str, Any] | None:
    hit = table.filter((pl.col("objective") == objective) & (pl.col("staleness") == staleness))
    return hit.row(0, named=True) if hit.height else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pm(row: dict[str, Any], stat: str) -> str:
    """``<stat>`` with its spread over seeds (none shown for one seed)."""
    return _pct(row[stat]) + (f" +- {_pct(row[stat + '_spread'])}" if row["seeds"] > 1 else "")


PAPER_CLIPFRAC = 0.0122  # GRPO's clipped-token fraction at staleness 256, Qwen2.5-32B (arXiv:2510.01161)


def drift_matched_staleness(table: pl.DataFrame, target: float = PAPER_CLIPFRAC) -> int | None:
    """The grid staleness at which ``ppo_clip`` clips the fraction of tokens closest to ``target``
    (in log ratio), or None without ``ppo_clip`` runs.

    "Staleness 256" is a number of updates, and how far a policy moves per update depends on the
    model, the task and the learning rate. PPO's clipped fraction (eps 0.2) measures that distance
    in the same units here and in the paper, so the staleness where ``ppo_clip`` clips what GRPO
    clipped in the paper is where this setup's data is as stale as the paper's staleness-256 data.
    """
    rows = table.filter((pl.col("objective") == "ppo_clip") & (pl.col("staleness") > 0) & (pl.col("zeroed") > 0))
    if not rows.height:
        return None
    dist = [abs(math.log(z / target)) for z in rows["zeroed"].to_list()]
    return int(rows["staleness"][dist.index(min(dist))])


def check_claims(table: pl.DataFrame, *, staleness: int | None = None, margin: float = 0.03, degrade: float = 0.05,
                 ratio: float = 0.1) -> list[Check]:
    """The paper's four statements at ``staleness`` (default: the highest of ``table``, a ``summary_table``).

    (a) the on-policy reference's final accuracy; (b) ``is`` improves by >= ``degrade`` over its start
    and then ends >= ``degrade`` below its best, and ``ppo_clip`` ends >= ``margin`` below on-policy;
    (c) ``m2po`` ends at most ``margin`` below on-policy; (d) ``m2po``'s masked fraction is at most
    ``ratio`` x ``ppo_clip``'s clipped fraction. Accuracies are fractions (0.03 = 3 points).
    """
    ref = _cell(table, ONPOLICY, 0)
    stale = [s for s in table["staleness"].unique().to_list() if s > 0]
    s = staleness if staleness is not None else (max(stale) if stale else None)
    out = []
    if ref is None:
        return [Check("a", "on-policy reference", None, "no on-policy reference run in the data")]
    out.append(Check("a", "on-policy reference final accuracy", True,
                     f"{_pm(ref, 'final')} from {_pct(ref['initial'])} "
                     f"({ref['seeds']} seed(s))"))
    is_, clip, m2 = (_cell(table, o, s) if s is not None else None for o in ("is", "ppo_clip", "m2po"))
    if is_ is None or clip is None:
        out.append(Check("b", "stale IS improves then degrades; clipping alone degrades", None,
                         f"needs is and ppo_clip at staleness {s}"))
    else:
        rise, fall = is_["best"] - is_["initial"], is_["best"] - is_["final"]
        gap = ref["final"] - clip["final"]
        holds = rise >= degrade and fall >= degrade and gap >= margin
        out.append(Check("b", f"at staleness {s}, unclipped IS improves then degrades; ppo_clip ends below "
                              "on-policy", holds,
                         f"is: start {_pct(is_['initial'])} -> best {_pct(is_['best'])} -> final "
                         f"{_pct(is_['final'])} (rise {_pct(rise)}, fall {_pct(fall)}; {is_['collapsed']} of "
                         f"{is_['seeds']} seed(s) fell below the start); ppo_clip final {_pct(clip['final'])} vs "
                         f"on-policy {_pct(ref['final'])} (gap {_pct(gap)})"))
    if m2 is None:
        out.append(Check("c", "m2po within 3 points of on-policy", None, f"needs m2po at staleness {s}"))
    else:
        gap = ref["final"] - m2["final"]
        out.append(Check("c", f"at staleness {s}, m2po ends within {100 * margin:.0f} points of on-policy",
                         gap <= margin, f"m2po final {_pm(m2, 'final')} vs "
                                        f"on-policy {_pct(ref['final'])} (gap {_pct(gap)})"))
    if m2 is None or clip is None:
        out.append(Check("d", "m2po masks <= 1/10 of what ppo_clip clips", None, "needs m2po and ppo_clip"))
    else:
        holds = m2["zeroed"] <= ratio * clip["zeroed"]
        out.append(Check("d", f"at staleness {s}, m2po's masked fraction <= {ratio:g} x ppo_clip's clipped "
                              "fraction", holds,
                         f"m2po masked {m2['zeroed']:.3%} vs ppo_clip clipped {clip['zeroed']:.3%} "
                         f"(ratio {m2['zeroed'] / clip['zeroed'] if clip['zeroed'] else math.inf:.3f})"))
    return out


__all__ = ["FINAL_EVALS", "ONPOLICY", "PAPER_CLIPFRAC", "SIZES", "STATS", "Check", "Size", "base_config",
           "check_claims", "collapse_update", "drift_matched_staleness", "load_sweeps", "report_path", "resolve_size",
           "run_sweeps",
           "runs_table", "summary_table", "sweep_base", "sweep_prefix", "tiny_base"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m workbench report")
