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

``python -m workbench ope rank SWEEP_DIR``: policy selection over a sweep's checkpoints
(``workbench.ope.rank``): every run's final checkpoint (``--every-checkpoint``: all of them) is a
candidate, ranked by each estimator on the stale batches queued in a behaviour run's checkpoint
(``--logged RUN_DIR``, default the sweep's first run; ``--logged-update U``, default its newest
checkpoint; ``--logged-prompts N``: a fresh batch of that checkpoint's policy instead) and scored
against a fresh sample of each candidate. Writes ``ope_selection.parquet`` and ``ope_selection.png``
in the sweep folder after everything has been computed; bad input writes nothing.
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
from workbench.ope.rank import FIGURE, FILE, format_selection, rank_sweep
from workbench.ope.rank_chart import selection_chart_spec
from workbench.ope.selection import load_candidates
from workbench.runs import checkpoint as ckpt
from workbench.charts import png_bytes
from workbench.runs.files import atomic_write_bytes
from workbench.runs.rundir import atomic_write_parquet
from workbench.steps.generate import TransformersSampler
from workbench.sweeps import split_values


def add_parser(sub) -> None:
    """The ``ope`` subcommand."""
    names = ", ".join(f"{n} ({ESTIMATORS.meta(n)['summary']})" for n in ESTIMATORS.names())
    parser = sub.add_parser("ope", help="off-policy evaluation: estimate a checkpoint's expected reward from a "
                            "batch logged by an earlier checkpoint, against a fresh on-policy truth",
                            description=__doc__, epilog=f"estimators: {names}", usage=USAGE,
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("run_dir", help="a run folder (holding config.json and checkpoints/update_*), or the "
                        "word rank followed by a sweep folder")
    parser.add_argument("sweep_dir", nargs="?", default=None, help="after rank: a sweep folder (sweep.json, runs/)")
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
    rank = parser.add_argument_group("ope rank SWEEP_DIR")
    rank.add_argument("--k", type=int, default=None, help="rank: SharpeRatio@k over the top k (default 3)")
    rank.add_argument("--logged", default=None, metavar="RUN_DIR",
                      help="rank: the behaviour run whose queued stale batches are the logged data "
                           "(default: the sweep's first run)")
    rank.add_argument("--logged-update", type=int, default=None, metavar="U",
                      help="rank: the behaviour run's checkpoint update_U holding them (default: its newest)")
    rank.add_argument("--logged-prompts", type=int, default=None, metavar="N",
                      help="rank: log a fresh batch of N prompts from that checkpoint instead of its queue")
    rank.add_argument("--every-checkpoint", action="store_true",
                      help="rank: every checkpoint of every run is a candidate (default: each run's final one)")


USAGE = ("python -m workbench ope RUN_DIR [--checkpoint C] [--behavior-checkpoint M | --staleness S] [options]\n"
         "       python -m workbench ope rank SWEEP_DIR [--k K] [--logged RUN_DIR] [--logged-update U] "
         "[--logged-prompts N] [--every-checkpoint] [options]")
RUN_ONLY = ("checkpoint", "behavior_checkpoint", "staleness", "prompts")
RANK_ONLY = ("k", "logged", "logged_update", "logged_prompts", "every_checkpoint")


def cli_main(args) -> int:
    """``python -m workbench ope``: returns the exit code."""
    ranking = args.run_dir == "rank" and (args.sweep_dir is not None or not Path("rank").is_dir())
    if args.sweep_dir is not None and not ranking:
        raise WorkbenchError(f"sweep_dir={args.sweep_dir!r} is invalid after run_dir={args.run_dir!r}: expected "
                             f"'ope RUN_DIR' or 'ope rank SWEEP_DIR'")
    wrong = [f for f in (RUN_ONLY if ranking else RANK_ONLY) if getattr(args, f) not in (None, False)]
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        raise WorkbenchError(f"{flag}={getattr(args, wrong[0])} is invalid for 'ope {'rank SWEEP_DIR' if ranking else 'RUN_DIR'}': "
                             f"it belongs to 'ope {'RUN_DIR' if ranking else 'rank SWEEP_DIR'}'")
    if ranking:
        return rank_main(args)
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


def rank_main(args) -> int:
    """``python -m workbench ope rank SWEEP_DIR``: rank, print, then write the table and the figure."""
    if args.sweep_dir is None:
        raise WorkbenchError("sweep_dir=None is invalid: expected 'ope rank SWEEP_DIR' (a sweep folder)")
    names = None if args.estimators is None else list(split_values(args.estimators))
    table = rank_sweep(args.sweep_dir, names, k=3 if args.k is None else args.k, logged=args.logged,
                       logged_update=args.logged_update, logged_prompts=args.logged_prompts,
                       every_checkpoint=args.every_checkpoint, truth_prompts=args.truth_prompts,
                       confidence=args.confidence, seed=args.seed, min_ess_frac=args.min_ess_frac, log=print)
    png = png_bytes(selection_chart_spec(table))  # rendered before anything is written
    print(format_selection(table))
    print(f"logged data: {table['logged'][0]}; J(pi_b) = its mean reward {table['behavior_value'][0]:.4f}; "
          f"truths: fresh samples of each candidate at temperature {table['temperature'][0]:g} (Wilson, n = "
          f"{table['truth_n'][0]})")
    root = Path(args.sweep_dir)
    atomic_write_parquet(table, root / FILE)
    atomic_write_bytes(root / FIGURE, png)
    print(f"table: {root / FILE}\nfigure: {root / FIGURE}")
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


__all__ = ["add_parser", "cli_main", "format_table", "rank_main"]
