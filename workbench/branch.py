"""Paired branches: "what did my knob change do?" answered against a control that shares everything else.

    bs = fork("runs/r", at=40, changes=[{}, {"staleness": 8}], steps=30, repeats=4)
    paired_differences(bs, "eval/accuracy")      # workbench.branch_report: variant - control, per update

``fork`` restores the checkpoint a run wrote after update K (``checkpoints/update_<K>``) into one new
run directory per variant and repeat, applies the variant's knob changes through the run's own knob
mechanism (``Run.knobs.set``: applied at update K and journalled in ``knob_events.jsonl`` like a live
change) and trains ``steps`` updates. Each branch is a normal run directory (config, metrics with the
parent's rows before K, checkpoints, summary), so every tool that reads run directories reads it,
plus ``branch.json``: the parent run directory, K, the variant's changes and the repeat index. The
set's folder holds ``branches.json`` (``load_branch_set`` reads it back).

Common random numbers. Every variant of repeat r starts from the same checkpoint state (weights,
optimizer, buffered batches, knobs) and the same random streams: prompt sampling (``Run.prompt_rng``)
and token sampling / minibatch shuffles (``Run.generator``). For stream 0 (repeat 0 with
``seed_offset=0``) the streams are exactly the checkpoint's, so the control branch reproduces the
parent's own continuation after K bit for bit (resume is exact: ``workbench/runs/checkpoint.py``); for stream
s > 0 both generators are reseeded from ``numpy.random.SeedSequence([seed, K, s])``, the same for all
variants of that repeat. The difference of two branches of one repeat then carries only the effect of
the change (and its downstream chaos), not the noise of different prompts and samples: the variance of
a difference shrinks by the covariance the shared streams induce (the method of common random numbers;
Glasserman and Yao 1992, "Some guidelines and guarantees for common random numbers", Management
Science 38:884-908).

Validation is complete before anything is written: the checkpoint at K exists (else the list of
those that do), K is within the run, every variant names only live knobs (``knobs.LIVE_FIELDS``; a
config field fixed at the start is refused naming them) with valid values, no branch folder exists.

Left out: running branches in parallel processes (they run one after another in this process);
reseeding a vLLM engine's own sampler state (only the run's generators are reseeded); a damaged
checkpoint at K is found by the first branch's restore (that branch's folder is then left behind).
"""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from workbench.config import RunConfig
from workbench.knobs import LIVE_FIELDS, Knobs
from workbench.errors import WorkbenchError, bad_value, one_line, short_repr
from workbench.loop import Run
from workbench.runs import checkpoint as ckpt
from workbench.runs.metrics import read_metrics
from workbench.runs.rundir import atomic_write_parquet, atomic_write_text, dumps
from workbench.steps.reweight.core import resolve_objective

MANIFEST = "branches.json"  # in the set's folder
BRANCH_FILE = "branch.json"  # in each branch's run directory
CONTROL = "control"
ModelFactory = Callable[[RunConfig], tuple[Any, Any]]  # config -> (model, tokenizer), a fresh pair per branch


@dataclass(frozen=True)
class Branch:
    """One branch: its run directory, the variant index (0 = the control), the repeat and its stream."""

    path: Path
    variant: int
    repeat: int
    label: str
    changes: dict[str, Any]

    def info(self) -> dict[str, Any]:
        """Its ``branch.json``."""
        return json.loads((self.path / BRANCH_FILE).read_text())


@dataclass
class BranchSet:
    """The branches of one ``fork``: ``variants[i]`` are the changes of variant i (``variants[0] == {}``,
    the control), ``branches`` one per variant and repeat, in the folder ``folder``."""

    folder: Path
    parent: Path
    at: int
    steps: int
    repeats: int
    seed_offset: int
    variants: list[dict[str, Any]]
    labels: list[str]
    branches: list[Branch] = field(default_factory=list)

    def metrics(self) -> pl.DataFrame:
        """The branches' own rows (updates K..), long: ``variant``, ``label``, ``repeat`` + the metrics."""
        parts = []
        for b in self.branches:
            df = read_metrics(b.path)
            if df.height:
                tags = [pl.lit(b.variant).alias("variant"), pl.lit(b.label).alias("label"),
                        pl.lit(b.repeat).alias("repeat")]
                parts.append(df.filter(pl.col("update") >= self.at).with_columns(tags))
        return pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()

    def finals(self, metric: str) -> pl.DataFrame:
        """One row per branch: ``variant``, ``repeat``, ``update`` (the last one), ``value``: the metric
        after the branch's last update (``eval/accuracy``: its final evaluation, ``branch.json``), else
        the last non-null value of its rows; null where it has none."""
        out = []
        for b in self.branches:
            final = b.info().get("final", {})
            value = final.get(metric)
            if value is None:
                df = read_metrics(b.path)
                col = df.filter(pl.col("update") >= self.at)[metric].drop_nulls() if metric in df.columns else []
                value = float(col[-1]) if len(col) else None
            out.append({"variant": b.variant, "repeat": b.repeat, "update": self.at + self.steps - 1,
                        "value": None if value is None else float(value)})
        return pl.DataFrame(out, schema={"variant": pl.Int64, "repeat": pl.Int64, "update": pl.Int64,
                                         "value": pl.Float64})

    def eval_n(self) -> int:
        """Held-out problems of one evaluation (the binomial n of ``eval/accuracy``)."""
        return int(self.branches[0].info()["eval_n"])


def fork(run_dir: str | Path, at: int | None = None, changes: list[dict[str, Any]] | tuple = ({},),
         steps: int | None = None, repeats: int = 1, out_dir: str | Path | None = None, seed_offset: int = 0, *,
         model_factory: ModelFactory | None = None, setup: Callable[[Run, Branch], None] | None = None,
         log: Callable[[str], None] = print) -> BranchSet:
    """Branch run ``run_dir`` at its checkpoint after update ``at`` (None: the latest checkpoint).

    ``changes``: one dict of live-knob changes per variant; ``{}`` is the control (prepended when
    absent: paired differences are taken against it). ``steps``: updates each branch trains (default:
    up to the parent's ``config.steps``). ``repeats``: branches per variant; repeat r uses random
    stream ``r + seed_offset`` (stream 0 = the checkpoint's own streams; module doc). ``out_dir``:
    the set's folder (default ``<run_dir>-branches-at<K>`` beside the run). ``model_factory(config)``:
    a fresh (model, tokenizer) per branch (default: built from the config, as ``Run`` does).
    ``setup(run, branch)``: called on each branch's restored ``Run`` before it trains (e.g. to add
    ``run.hooks``)."""
    plan = _plan(Path(run_dir), at, changes, steps, repeats, out_dir, seed_offset)
    bs = BranchSet(plan["folder"], plan["parent"], plan["at"], plan["steps"], repeats, seed_offset,
                   plan["variants"], plan["labels"])
    plan["folder"].mkdir(parents=True, exist_ok=True)
    for r in range(repeats):
        for i, variant in enumerate(plan["variants"]):
            path = plan["folder"] / branch_name(i, plan["labels"][i], r)
            bs.branches.append(Branch(path, i, r, plan["labels"][i], variant))
    atomic_write_text(plan["folder"] / MANIFEST, dumps(_manifest(bs)))
    for b in bs.branches:
        log(f"branch {b.path.name}: {b.label}, repeat {b.repeat}, updates {bs.at}..{bs.at + bs.steps - 1}")
        _run_branch(b, bs, plan, model_factory, setup, log)
    return bs


def branch_here(run: Run, changes: list[dict[str, Any]], steps: int, repeats: int = 1,
                out_dir: str | Path | None = None, *, log: Callable[[str], None] | None = None) -> BranchSet:
    """Checkpoint a live ``run`` now (``run.save_checkpoint()``) and fork from it (the panel's "Branch
    here"). Call it between updates; each branch trains a deep copy of ``run.model``'s architecture
    with the checkpoint's weights, so a run built with a model object of its own branches too.
    Knob changes set but not yet applied by an update are not in the checkpoint."""
    if run.dir is None:
        raise WorkbenchError("branch_here needs a run with a run directory: out_dir='' writes no checkpoint")
    run.save_checkpoint()
    factory = _copy_factory(run)
    return fork(run.dir.path, at=run.version, changes=changes, steps=steps, repeats=repeats, out_dir=out_dir,
                model_factory=factory, log=log or run.log)


def load_branch_set(folder: str | Path) -> BranchSet:
    """The ``BranchSet`` of a set folder written by ``fork`` (its ``branches.json``)."""
    folder = Path(folder)
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"folder={str(folder)!r} is invalid: expected a branch set holding {MANIFEST} "
                             f"({type(e).__name__})") from None
    bs = BranchSet(folder, Path(m["parent"]), m["at"], m["steps"], m["repeats"], m["seed_offset"], m["variants"],
                   m["labels"])
    bs.branches = [Branch(folder / b["name"], b["variant"], b["repeat"], m["labels"][b["variant"]],
                          m["variants"][b["variant"]]) for b in m["branches"]]
    return bs


def branch_name(variant: int, label: str, repeat: int) -> str:
    """``v1-staleness=8-r0``: one folder name (characters outside ``[A-Za-z0-9._=+-]`` become ``_``)."""
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", label)[:60].strip("._") or "variant"
    return f"v{variant}-{slug}-r{repeat}"


def variant_label(changes: dict[str, Any]) -> str:
    """``control`` for ``{}``, else ``staleness=8 lr=0.001`` (objective parameters by their own names)."""
    if not changes:
        return CONTROL
    parts = []
    for k, v in changes.items():
        if k == "objective_params" and isinstance(v, dict):
            parts.extend(f"{p}={x:g}" if isinstance(x, float) else f"{p}={x}" for p, x in v.items())
        else:
            parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def stream_seeds(seed: int, at: int, stream: int) -> tuple[int, int] | None:
    """(prompt_rng seed, generator seed) of random stream ``stream`` > 0 of a fork at ``at``; None for
    stream 0 (the checkpoint's own streams). Independent of the variant: common random numbers."""
    if stream == 0:
        return None
    a, b = np.random.SeedSequence([seed, at, stream]).generate_state(2, dtype=np.uint64)
    return int(a), int(b)


# ----------------------------------------------------------------------------- planning (no writes)
def _plan(run_dir: Path, at: Any, changes: Any, steps: Any, repeats: Any, out_dir: Any, seed_offset: Any) -> dict:
    """Everything the branches need, validated; raises a one-line ``WorkbenchError`` before any write."""
    if not (run_dir / "config.json").is_file():
        raise bad_value("run_dir", str(run_dir), "a run folder holding config.json")
    for name, v, low in (("repeats", repeats, 1), ("seed_offset", seed_offset, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise bad_value(name, v, f"an integer >= {low}")
    available = _checkpoints(run_dir)
    if not available:
        raise WorkbenchError(f"run_dir={str(run_dir)!r} has no checkpoint to branch from: expected "
                             f"checkpoints/update_* (set checkpoint_every, or branch a finished run)")
    config, _ = ckpt.load(run_dir)  # the config (one-line errors) and a refusal of another process's live run
    rows = read_metrics(run_dir)
    updates = rows.height
    names = ", ".join(str(k) for k in available)
    if at is None:
        at = available[-1]
    if isinstance(at, bool) or not isinstance(at, int) or at < 0:
        raise bad_value("at", at, f"an update with a checkpoint ({names}) or None for the latest")
    if at > updates:
        raise WorkbenchError(f"at={at} is beyond the run: {run_dir} has {updates} updates (checkpoints at {names})")
    if at not in available:
        raise WorkbenchError(f"at={at} is invalid: {run_dir} has no checkpoint after update {at}; "
                             f"checkpoints at: {names}")
    checkpoint = run_dir / "checkpoints" / f"update_{at:06d}"
    if steps is None:
        steps = config.steps - at
        if steps < 1:
            raise WorkbenchError(f"steps=None is invalid here: the run's config ends at update {config.steps} "
                                 f"<= at={at}; pass steps >= 1 (updates each branch trains)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise bad_value("steps", steps, "an integer >= 1 (updates each branch trains after the fork)")
    variants = _check_variants(changes, config, checkpoint)
    labels = [variant_label(v) for v in variants]
    folder = Path(out_dir) if out_dir is not None else run_dir.with_name(f"{run_dir.name}-branches-at{at}")
    if folder.exists() and not folder.is_dir():
        raise bad_value("out_dir", str(folder), "a folder (or a path where one can be created)")
    taken = [n for n in (branch_name(i, labels[i], r) for r in range(repeats) for i in range(len(variants)))
             if (folder / n).exists()] + ([MANIFEST] if (folder / MANIFEST).exists() else [])
    if taken:
        raise WorkbenchError(f"out_dir={str(folder)!r} already holds {taken[0]}: choose another out_dir "
                             f"(branches never overwrite a run)")
    return {"parent": run_dir.resolve(), "at": at, "steps": steps, "config": config, "checkpoint": checkpoint,
            "variants": variants, "labels": labels, "folder": folder,
            "rows": rows.filter(pl.col("update") < at) if rows.height else rows, "seed_offset": seed_offset}


def _checkpoints(run_dir: Path) -> list[int]:
    """Updates with a checkpoint folder (read without creating anything in the run directory)."""
    out = []
    for p in (run_dir / "checkpoints").glob("update_*"):
        digits = p.name.removeprefix("update_")
        if p.is_dir() and digits.isdigit():
            out.append(int(digits))
    return sorted(out)


def _check_variants(changes: Any, config: RunConfig, checkpoint: Path) -> list[dict[str, Any]]:
    """The variants, control first; each change validated on the checkpoint's knob state."""
    if not isinstance(changes, (list, tuple)) or not all(isinstance(c, dict) for c in changes) or not changes:
        raise bad_value("changes", changes, "a non-empty list of dicts of knob changes, one per variant ({} = control)")
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        knobs_at = dict(state["knobs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WorkbenchError(f"checkpoint={str(checkpoint)!r} is damaged: state.json has no knobs "
                             f"({type(e).__name__})") from None
    fields = set(RunConfig.__dataclass_fields__)
    controls = [i for i, c in enumerate(changes) if not c]
    if len(controls) > 1:
        raise WorkbenchError(f"changes[{controls[1]}]={{}} is invalid: the control ({{}}) is given twice")
    variants = [dict(c) for c in changes]
    if not controls:
        variants.insert(0, {})
    elif controls[0] != 0:
        variants.insert(0, variants.pop(controls[0]))
    check_knob_changes(changes, config, knobs_at)
    return variants


def check_knob_changes(changes: list[dict[str, Any]], config: RunConfig, knobs_at: dict[str, Any]) -> None:
    """Refuse a change that names a field that is not a live knob, or a value the knobs refuse when
    set over ``knobs_at`` (the knob values the branch starts from); one line naming ``changes[i]``."""
    fields, live = set(RunConfig.__dataclass_fields__), ", ".join(LIVE_FIELDS)
    for i, c in enumerate(changes):
        for key in c:
            if key not in LIVE_FIELDS:
                what = ("a config field fixed when a run starts, not a live knob" if key in fields
                        else "not a config field or knob")
                raise WorkbenchError(f"changes[{i}]: {key!r} is {what}: a branch can change only the live "
                                     f"knobs {live}")
        knobs = Knobs(config)
        knobs.set(**knobs_at)
        knobs.take_pending()
        try:
            knobs.set(**c)
        except WorkbenchError as e:
            raise WorkbenchError(f"changes[{i}]={short_repr(c)}: {one_line(e)}") from None


def nest_changes(pairs: dict[str, Any]) -> dict[str, Any]:
    """``{"lr": 4e-4, "objective_params.tau": 0.1}`` -> ``{"lr": 4e-4, "objective_params": {"tau": 0.1}}``:
    the ``KEY=VALUE`` pairs of one variant (the CLI's ``--set``, the panel's text) as knob changes."""
    changes: dict[str, Any] = {}
    for key, value in pairs.items():
        if key.startswith("objective_params."):
            changes.setdefault("objective_params", {})[key.split(".", 1)[1]] = value
        else:
            changes[key] = value
    return changes


# ----------------------------------------------------------------------------- running
def _run_branch(b: Branch, bs: BranchSet, plan: dict, factory: ModelFactory | None,
                setup: Callable[[Run, Branch], None] | None, log: Callable[[str], None]) -> None:
    cfg = plan["config"].replace(out_dir=str(b.path.parent), run_name=b.path.name)
    model, tokenizer = factory(cfg) if factory is not None else (None, None)
    run = Run(cfg, model=model, tokenizer=tokenizer, log=log)  # writes config.json, holds the folder's lock
    try:
        if plan["rows"].height:  # the parent's rows before K: the restore checks them, the charts draw them
            atomic_write_parquet(plan["rows"], b.path / "metrics.parquet")
        ckpt.restore(run, [plan["checkpoint"]])
        kn = run.knobs.applied
        run.objective = resolve_objective(kn.objective, kn.objective_params)
        stream = b.repeat + bs.seed_offset
        seeds = stream_seeds(cfg.seed, bs.at, stream)
        if seeds is not None:  # the same for every variant of this repeat
            run.prompt_rng = random.Random(seeds[0])
            run.generator.manual_seed(seeds[1])
        applied = run.knobs.set(**b.changes) if b.changes else {}  # applied and journalled at update K
        info = {"parent": str(bs.parent), "at": bs.at, "checkpoint": str(plan["checkpoint"]), "variant": b.variant,
                "label": b.label, "changes": b.changes, "applied_changes": applied, "repeat": b.repeat,
                "stream": stream, "seeds": None if seeds is None else {"prompt_rng": seeds[0], "generator": seeds[1]},
                "steps": bs.steps, "eval_n": min(cfg.eval_size, len(run.task.heldout)), "status": "running"}
        atomic_write_text(b.path / BRANCH_FILE, dumps(info))
        if setup is not None:
            setup(run, b)
        run.run(bs.steps)
        last = run.rows[-1] if run.rows else {}
        acc = last.get("eval/accuracy")
        if acc is None and run.final_accuracy is not None and run.final_accuracy[0] == run.version:
            acc = run.final_accuracy[1]
        if acc is None:  # a final evaluation after the rows (greedy: it draws nothing from the streams)
            acc = run.evaluate()
        info.update(status="done", final={"update": run.version - 1, "eval/accuracy": float(acc)})
        atomic_write_text(b.path / BRANCH_FILE, dumps(info))
    finally:
        run.close()


def _copy_factory(run: Run) -> ModelFactory:
    model, tokenizer = run.model, run.tokenizer

    def factory(_config: RunConfig) -> tuple[Any, Any]:
        return copy.deepcopy(model), tokenizer
    return factory


def _manifest(bs: BranchSet) -> dict[str, Any]:
    return {"parent": str(bs.parent), "at": bs.at, "steps": bs.steps, "repeats": bs.repeats,
            "seed_offset": bs.seed_offset, "variants": bs.variants, "labels": bs.labels,
            "branches": [{"name": b.path.name, "variant": b.variant, "repeat": b.repeat} for b in bs.branches]}


__all__ = ["BRANCH_FILE", "Branch", "BranchSet", "CONTROL", "MANIFEST", "branch_here", "branch_name", "fork",
           "load_branch_set", "stream_seeds", "variant_label"]
