"""``python -m workbench fork RUN_DIR``: paired branches from a run's checkpoint (``workbench.branch``).

    python -m workbench fork runs/r --at 40 --set staleness=4 --set staleness=16 --steps 30 --repeats 4

Flags. Each ``--set KEY=VALUE [KEY=VALUE ...]`` is one variant (several pairs in one ``--set`` change
those knobs together); the control (no change) is always started as well, so ``--set staleness=4
--set staleness=16`` starts 3 variants: the control and two changes that differ from it only in the
given knobs. ``--branches N`` is that number of variants, control included: optional, and when given
it must match (a command line that says how many runs it starts). ``--repeats R`` starts each variant
R times on R shared random streams (repeat 0 = the checkpoint's own streams); total runs: N x R.
``KEY`` is a live knob (staleness, sync_every, max_staleness, objective, objective_params, lr,
temperature); ``objective_params.tau=0.1`` sets one objective parameter. Values parse as JSON, else
stay strings. ``--at K`` (default: the latest checkpoint), ``--steps M`` (default: up to the run's
``steps``).

Prints the paired-difference table of the final values (variant - control with 95% intervals),
what the intervals are, one sentence per variant saying whether its interval excludes 0, the chart
and the folders written. Errors are one line (exit 2); nothing is written before every variant is
valid.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from workbench.branch import nest_changes
from workbench.cli.config_flags import check_out_dir, parse_pairs
from workbench.errors import WorkbenchError

DEFAULT_METRICS = ("eval/accuracy",)


def add_parser(sub) -> None:
    """The ``fork`` subcommand."""
    parser = sub.add_parser("fork", help="paired branches from a run's checkpoint: variants that differ only "
                            "in the given knobs, against a control, with paired-difference intervals",
                            description=__doc__.split("\n\n", 2)[2], allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run folder to branch (it must hold checkpoints/update_*)")
    parser.add_argument("--at", type=int, default=None, help="the update whose checkpoint the branches start "
                        "from (default: the latest checkpoint)")
    parser.add_argument("--set", dest="sets", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                        help="one variant's knob changes (repeat --set for more variants; the control is added)")
    parser.add_argument("--branches", type=int, default=None, help="variants started, control included "
                        "(default and required value: one per --set plus 1)")
    parser.add_argument("--steps", type=int, default=None, help="updates each branch trains (default: up to the "
                        "run's config.steps)")
    parser.add_argument("--repeats", type=int, default=1, help="random streams per variant (default 1; >= 2 gives "
                        "t-intervals for every metric)")
    parser.add_argument("--seed-offset", type=int, default=0, help="the first repeat's random stream (default 0 = "
                        "the checkpoint's own streams; another offset gives R new streams)")
    parser.add_argument("--out-dir", default=None, help="the set's folder (default: <run_dir>-branches-at<K>)")
    parser.add_argument("--metric", dest="metrics", action="append", default=None,
                        help="a metric to compare (repeatable; default eval/accuracy)")


def variants_from_sets(sets: list[list[str]]) -> list[dict[str, Any]]:
    """``[["staleness=4"], ["lr=1e-4", "objective_params.tau=0.1"]]`` -> the control plus one dict per group."""
    out: list[dict[str, Any]] = [{}]
    for group in sets:
        changes = nest_changes(parse_pairs("set", group))
        if not changes:
            raise WorkbenchError("--set is invalid without KEY=VALUE pairs: expected e.g. --set staleness=8")
        out.append(changes)
    return out


def cli_main(args) -> int:
    """``python -m workbench fork``: returns the exit code."""
    from workbench.branch import fork  # torch and the model code load only for this command
    from workbench.branch_report import interval_note, markdown_table, paired_chart_spec, paired_differences, sentences
    from workbench.charts import save_png

    t0 = time.perf_counter()
    variants = variants_from_sets(args.sets)
    if args.branches is not None and args.branches != len(variants):
        raise WorkbenchError(f"--branches {args.branches} is invalid: {len(args.sets)} --set group(s) plus the "
                             f"control start {len(variants)} variants (each --set is one variant)")
    if args.out_dir is not None:
        check_out_dir(args.out_dir)
    bs = fork(Path(args.run_dir), at=args.at, changes=variants, steps=args.steps, repeats=args.repeats,
              out_dir=args.out_dir, seed_offset=args.seed_offset, log=lambda s: print(s, flush=True))
    tables = [paired_differences(bs, m) for m in (args.metrics or DEFAULT_METRICS)]
    charts = []
    for m, diffs in zip(args.metrics or DEFAULT_METRICS, tables):
        path = bs.folder / f"paired-{m.replace('/', '_')}.png"
        if diffs.filter(~diffs["final"]).height:
            save_png(paired_chart_spec(diffs, title=f"{Path(args.run_dir).name} at update {bs.at}: {m}"), path)
            charts.append(path)
    print()
    for diffs in tables:
        print(markdown_table(diffs))
        print()
        print(interval_note(diffs))
        for sentence in sentences(diffs):
            print(f"- {sentence}")
        print()
    print(f"branch set: {bs.folder}")
    for b in bs.branches:
        print(f"branch: {b.path}")
    for path in charts:
        print(f"chart: {path}")
    print(f"fork done in {time.perf_counter() - t0:.0f} s")
    return 0
