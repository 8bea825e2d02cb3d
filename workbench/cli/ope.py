"""``python -m workbench ope RUN_DIR``: off-policy evaluation of a run's policy from a stale batch.

Design: pi is the policy of ``--checkpoint`` (default: the newest checkpoint) and mu the policy of
an earlier checkpoint (``--behavior-checkpoint``, or the newest one at least ``--staleness`` updates
before pi; default: the one just before). mu generates the logged batch (``--prompts`` prompts x the
run's group size, at the run's temperature), each estimator estimates J(pi) from it, and a fresh
sample of pi (``--truth-prompts``) is the truth. The library is ``workbench.ope``.

The run folder is only read (weights via safetensors, the config), never resumed: resuming takes the
folder's lock, rewrites its knob journal and, at an older checkpoint, cuts its metrics. The one file
written is ``ope-<pi>-vs-<mu>.parquet`` in the run folder, after everything has been computed; bad
input (no checkpoint, an unknown estimator, ...) is a one-line error and writes nothing.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import polars as pl

from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.ope.estimators import DEFAULT_MIN_ESS_FRAC, ESTIMATORS
from workbench.ope.evaluate import check_estimators, derived_seed, evaluate_batch, fresh_sample, truth_of
from workbench.ope.selection import load_candidates
from workbench.runs import checkpoint as ckpt
from workbench.runs.rundir import atomic_write_parquet
from workbench.steps.generate import TransformersSampler
from workbench.sweeps import split_values


def add_parser(sub) -> None:
    """The ``ope`` subcommand."""
    names = ", ".join(f"{n} ({ESTIMATORS.meta(n)['summary']})" for n in ESTIMATORS.names())
    parser = sub.add_parser("ope", help="off-policy evaluation: estimate a checkpoint's expected reward from a "
                            "batch logged by an earlier checkpoint, against a fresh on-policy truth",
                            description=__doc__, epilog=f"estimators: {names}",
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("run_dir", help="a run folder (holding config.json and checkpoints/update_*)")
    parser.add_argument("--checkpoint", default=None, help="pi: a checkpoint folder or name (default: newest)")
    parser.add_argument("--behavior-checkpoint", default=None,
                        help="mu: the checkpoint that logs the batch (default: from --staleness)")
    parser.add_argument("--staleness", type=int, default=None,
                        help="mu = the newest checkpoint at least this many updates before pi (default: the previous)")
    parser.add_argument("--estimators", default=None, metavar="E1,E2,...",
                        help=f"estimators (default all: {', '.join(ESTIMATORS.names())})")
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts in the logged batch (default prompts_per_step)")
    parser.add_argument("--truth-prompts", type=int, default=None,
                        help="prompts of the truth sample (default --prompts)")
    parser.add_argument("--min-ess-frac", type=float, default=DEFAULT_MIN_ESS_FRAC,
                        help="refuse an estimate when ESS / N is below this (default 0.01)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the logged and truth samples (default 0)")


def cli_main(args) -> int:
    """``python -m workbench ope``: returns the exit code."""
    names = check_estimators(None if args.estimators is None else list(split_values(args.estimators)))
    for flag in ("staleness", "prompts", "truth_prompts"):
        value = getattr(args, flag)
        if value is not None and (value < (0 if flag == "staleness" else 1)):
            raise WorkbenchError(f"--{flag.replace('_', '-')}={value} is invalid: expected an int >= "
                                 f"{0 if flag == 'staleness' else 1}")
    run_dir = Path(args.run_dir)
    config, paths = ckpt.load(run_dir, args.checkpoint)
    pi_path = paths[0]
    mu_path = _behavior_checkpoint(run_dir, pi_path, args.behavior_checkpoint, args.staleness)
    run = Run(config.replace(out_dir="", run_name=""), log=lambda s: None)  # no run folder: nothing written
    pi_model, mu_model = load_candidates(run.model, [pi_path, mu_path]).values()
    run.model.load_state_dict(pi_model.state_dict())  # the run's sampler shares run.model: it samples pi
    run.version = _update(pi_path)
    prompts = args.prompts or config.prompts_per_step
    mu_sampler = TransformersSampler(mu_model, run.tokenizer)  # mu's own copy of the weights
    logged = fresh_sample(run, prompts, derived_seed(args.seed, 1), sampler=mu_sampler, version=_update(mu_path))
    temperature = float(run.knobs.applied.temperature)
    table = evaluate_batch(run.model, logged, temperature, names, confidence=args.confidence, seed=args.seed,
                           min_ess_frac=args.min_ess_frac)
    truth_batch = fresh_sample(run, args.truth_prompts or prompts, derived_seed(args.seed, 2))
    truth = truth_of(truth_batch.rewards.double().numpy(), args.confidence)
    table = table.with_columns(pl.lit(pi_path.name).alias("pi"), pl.lit(mu_path.name).alias("mu"),
                               pl.lit(truth.value).alias("truth"), pl.lit(truth.lo).alias("truth_lo"),
                               pl.lit(truth.hi).alias("truth_hi"), pl.lit(truth.n).alias("truth_n"))
    print(format_table(table, args.confidence))
    print(f"truth: mean reward of a fresh sample of pi at temperature {temperature:g} = {truth.value:.4f} "
          f"[{truth.lo:.4f}, {truth.hi:.4f}] (Wilson, n = {truth.n}); held-out greedy accuracy is another quantity")
    out = run_dir / f"ope-{pi_path.name}-vs-{mu_path.name}.parquet"
    atomic_write_parquet(table, out)
    print(f"table: {out}")
    return 0


def format_table(table: pl.DataFrame, confidence: float = 0.95) -> str:
    """Markdown table; a refused estimate prints its reason instead of numbers."""
    level = f"{100 * confidence:g}%"
    lines = [f"| estimator | estimate | {level} bootstrap | Hoeffding | ESS / N |", "|---|---|---|---|---|"]
    for r in table.iter_rows(named=True):
        if r["refused"]:
            lines.append(f"| {r['estimator']} | refused: {r['reason']} | | | {100 * r['ess_frac']:.1f}% |")
            continue
        bound = "none" if math.isnan(r["bound_lo"]) else f"[{r['bound_lo']:.4f}, {r['bound_hi']:.4f}]"
        lines.append(f"| {r['estimator']} | {r['estimate']:.4f} | [{r['lo']:.4f}, {r['hi']:.4f}] | {bound} | "
                     f"{100 * r['ess_frac']:.1f}% |")
    return "\n".join(lines)


def _update(path: Path) -> int:
    try:
        return int(path.name.split("_")[-1])
    except ValueError:
        raise WorkbenchError(f"checkpoint={str(path)!r} is invalid: expected a folder named update_NNNNNN") from None


def _behavior_checkpoint(run_dir: Path, pi_path: Path, given: str | None, staleness: int | None) -> Path:
    if given is not None:
        _, paths = ckpt.load(run_dir, given)
        return paths[0]
    pi_update = _update(pi_path)
    lag = 1 if staleness is None else staleness
    if lag == 0:  # mu = pi: the on-policy check (every weight 1)
        return pi_path
    earlier = [p for p in sorted((run_dir / "checkpoints").glob("update_*")) if p.is_dir() and p != pi_path
               and _update(p) <= pi_update - lag]
    if not earlier:
        raise WorkbenchError(f"--staleness={lag} is invalid for {str(run_dir)!r}: no checkpoint at least {lag} "
                             f"update(s) before {pi_path.name} to log the batch (checkpoint_every sets how many exist)")
    return earlier[-1]


__all__ = ["add_parser", "cli_main", "format_table"]
