"""``python -m workbench throughput``: synchronous vs asynchronous wall-clock per update, from the
closed-form model ``workbench.studies.throughput``, then the peers' published speed-ups and the
specs that reproduce them. Nothing is run or written; bad input is a one-line error.

    python -m workbench throughput --batch 256 --workers 256 --decode-step-s 0.01 --update-s 60 \\
        --length-median 4000 --length-sigma 0.3 --length-max 27648 --bound 4
"""

from __future__ import annotations

import argparse
import math

from workbench.errors import WorkbenchError
from workbench.studies.throughput import ThroughputSpec, compare, published_comparison, published_speedups

DEFAULT = ThroughputSpec()
FLAGS = ("batch", "group_size", "workers", "decode_step_s", "update_s", "length_median", "length_sigma",
         "length_max", "bound", "samples", "seed")


def add_parser(sub) -> None:
    """The ``throughput`` subcommand."""
    parser = sub.add_parser("throughput", help="closed-form wall-clock of synchronous vs asynchronous RL per update, "
                            "with the peers' published speed-ups", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    add("--batch", type=int, default=DEFAULT.batch, help=f"B: sequences per update (default {DEFAULT.batch})")
    add("--group-size", type=int, default=DEFAULT.group_size,
        help=f"sequences per prompt; --batch must be a multiple (default {DEFAULT.group_size})")
    add("--workers", type=int, default=DEFAULT.workers, help=f"W: generation slots (default {DEFAULT.workers})")
    add("--decode-step-s", type=float, default=DEFAULT.decode_step_s,
        help=f"seconds per engine decode step, every active slot one token (default {DEFAULT.decode_step_s:g})")
    add("--update-s", type=float, default=DEFAULT.update_s,
        help=f"seconds per learner update (default {DEFAULT.update_s:g})")
    add("--length-median", type=float, default=DEFAULT.length_median,
        help=f"median response length in tokens, lognormal (default {DEFAULT.length_median:g})")
    add("--length-sigma", type=float, default=DEFAULT.length_sigma,
        help=f"lognormal shape of the lengths, 0 constant (default {DEFAULT.length_sigma:g})")
    add("--length-max", type=int, default=DEFAULT.length_max,
        help=f"generation limit in tokens, 0 none (default {DEFAULT.length_max})")
    add("--bound", default=str(DEFAULT.bound), metavar="ETA",
        help=f"staleness bound: updates the generator may run ahead, 0 synchronous, 'none' unbounded "
             f"(default {DEFAULT.bound})")
    add("--samples", type=int, default=DEFAULT.samples,
        help=f"lognormal lengths drawn for the expectations (default {DEFAULT.samples})")
    add("--seed", type=int, default=DEFAULT.seed, help=f"seed of that draw (default {DEFAULT.seed})")


def spec_from_args(args) -> ThroughputSpec:
    """The ``ThroughputSpec`` of the flags (one-line ``WorkbenchError`` on bad values)."""
    values = {f: getattr(args, f) for f in FLAGS}
    values["bound"] = _bound(values["bound"])
    return ThroughputSpec(**values)


def _bound(text: str) -> int | None:
    if str(text).strip().lower() in ("none", "inf", "unbounded"):
        return None
    try:
        return int(text)
    except ValueError:
        raise WorkbenchError(f"--bound={text!r} is invalid: expected an int >= 0 or 'none' (unbounded)") from None


def cli_main(args) -> int:
    """``python -m workbench throughput``: print the tables; returns the exit code."""
    spec = spec_from_args(args)
    print(format_comparison(spec))
    print()
    print(format_published())
    return 0


def _num(v: float, digits: int = 1) -> str:
    return "unbounded" if math.isinf(v) else f"{v:,.{digits}f}"


def format_comparison(spec: ThroughputSpec) -> str:
    """Markdown: both modes' seconds per update, then the speed-up, regime and staleness in one line."""
    c = compare(spec)
    lines = ["| mode | seconds / update | generation (s) | update (s) | staleness (updates) |",
             "|---|---|---|---|---|",
             f"| sync | {_num(c['sync_s'])} | {_num(c['sync_generation_s'])} | {_num(spec.update_s)} | 0 |",
             f"| async | {_num(c['async_s'])} | {_num(c['async_generation_s'])} | {_num(spec.update_s)} | "
             f"{_num(c['staleness'])} |"]
    lengths = "measured lengths" if spec.lengths else (
        f"lognormal(median {spec.length_median:g}, sigma {spec.length_sigma:g})"
        + (f" cut at {spec.length_max}" if spec.length_max else ""))
    lines.append("")
    lines.append(f"speed-up sync / async: {c['speedup']:.2f}x, {c['regime']}; B = {spec.batch}, W = {spec.workers} "
                 f"(effective {c['workers_effective']}), {lengths}: E[L] = {c['mean_length']:,.0f} tokens, "
                 f"E[max of {min(spec.batch, spec.workers)}] = {c['expected_max_length']:,.0f} (straggler factor "
                 f"{c['straggler_factor']:.2f}); async start-up {c['async_startup_s']:,.1f} s")
    return "\n".join(lines)


def format_published() -> str:
    """Markdown: the published figures as reported, then the model's speed-up for the specs of each."""
    lines = ["published speed-ups (as reported):", "",
             "| system | speed-up | reported as | setting | baseline | source |", "|---|---|---|---|---|---|"]
    for r in published_speedups().iter_rows(named=True):
        lines.append(f"| {r['system']} | {r['reported_speedup']:.2f}x | {r['reported_as']} | {r['setting']} | "
                     f"{r['baseline']} | {r['source']} |")
    lines += ["", "the model on specs for them (workbench.studies.throughput_published.SPECS):", "",
              "| spec | reported | model | regime | inputs |", "|---|---|---|---|---|"]
    for r in published_comparison().iter_rows(named=True):
        lines.append(f"| {r['spec']} | {r['reported_speedup']:.2f}x | {r['model_speedup']:.2f}x | {r['regime']} | "
                     f"{r['inputs']} |")
    return "\n".join(lines)


__all__ = ["add_parser", "cli_main", "format_comparison", "format_published", "spec_from_args"]
