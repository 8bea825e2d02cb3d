"""``python -m workbench report``: reproduce "prosperity before collapse" at CPU scale.

Runs (or resumes) the two sweeps of ``workbench.studies.prosperity``, writes the Markdown report
and its figures (``workbench.studies.prosperity_report``), and prints the four checks (again at
the drift-matched staleness when there is one) and statements (e)-(g) at the highest staleness.
``--no-run`` rebuilds the report from the folders on disk; the sweeps' wall time comes from
``workbench.studies.prosperity_sweeps.wall_seconds``.
"""

from __future__ import annotations

import sys
import time

from workbench.sweeps import SweepStopped
from workbench.studies.prosperity import (SIZES, base_config, check_claims, drift_matched_staleness, load_sweeps,
                                          report_path, run_sweeps, runs_table, summary_table, sweep_base,
                                          sweep_prefix)
from workbench.studies.prosperity_sweeps import wall_seconds


def add_parser(sub) -> None:
    """The ``report`` subcommand and its flags."""
    parser = sub.add_parser("report", help="reproduce 'prosperity before collapse' at CPU scale: sweeps + "
                            "reports/prosperity.md", allow_abbrev=False)
    add_arguments(parser)


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES),
                        help="; ".join(f"{k}: {base_config(v).task} task, staleness {v.staleness} x "
                                       f"{len(v.objectives)} objectives x {v.seeds} seed(s) x {v.steps} updates, "
                                       f"{v.minutes} min on 2 cores"
                                       for k, v in SIZES.items()))
    parser.add_argument("--out", default=None, help="the report (figures go to <stem>/; default: "
                        "reports/prosperity.md for --size cpu, reports/prosperity-<size>.md otherwise)")
    parser.add_argument("--out-dir", default="runs", help="where the sweeps' folders go")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: cores // threads)")
    parser.add_argument("--threads-per-run", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--ray", default=None, metavar="auto|local|ADDRESS", help="run the cells as Ray tasks")
    parser.add_argument("--prefix", default=None,
                        help="sweep folders <out-dir>/<prefix>-onpolicy and -stale (default: prosperity for --size "
                             "cpu, prosperity-<size> otherwise)")
    parser.add_argument("--no-run", action="store_true", help="only rebuild the report from the sweeps on disk")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cli_main(args) -> int:
    """``python -m workbench report``: run (or resume) the sweeps and write the report."""
    # altair and vl-convert (the figures) load only for this command, not for every command's parser
    from workbench.studies.prosperity_checks import more_checks
    from workbench.studies.prosperity_report import check_lines, write_report

    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    prefix = args.prefix or sweep_prefix(args.size, out_dir=args.out_dir)
    if args.no_run:
        df = load_sweeps(args.out_dir, prefix)
    else:
        try:
            df = run_sweeps(args.size, out_dir=args.out_dir, prefix=prefix, workers=args.workers,
                            threads_per_run=args.threads_per_run, ray=args.ray, progress=not args.no_progress, log=log)
        except SweepStopped as e:  # Ctrl-C / SIGTERM: one line, the finished runs kept; the same command continues
            print(str(e), file=sys.stderr)
            return e.exit_code
    seconds = None
    if "perf/time_step" in df.columns:
        seconds = float(df["perf/time_step"].sum())
    command = "python -m workbench report" + ("" if args.size == "cpu" else f" --size {args.size}")
    write_report(df, args.out or report_path(args.size), command=command, base=sweep_base(args.out_dir, prefix), size=args.size, seconds=seconds,
                 wall=wall_seconds(args.out_dir, prefix), log=log)
    runs = runs_table(df)
    table = summary_table(runs)
    stale = [s for s in table["staleness"].unique().to_list() if s > 0]
    for line in check_lines(check_claims(table)) + check_lines(more_checks(runs, max(stale) if stale else None)):
        print(line)
    matched = drift_matched_staleness(table)
    if matched is not None:
        print(f"drift-matched staleness: {matched}")
        for line in check_lines(check_claims(table, staleness=matched)):
            print(line)
    log(f"report done in {time.perf_counter() - t0:.0f} s")
    return 0
