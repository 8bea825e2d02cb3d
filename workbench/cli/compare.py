"""``python -m workbench compare``: the main job (``bash scripts/demo.sh``), on-policy vs stale data,
uncorrected and reweighted, side by side; the library is ``workbench.studies.mission``.

Its own flags, then every run flag as the base config (the mission's scale where not given:
``mission.base_config``). ``--staleness`` sets the stale arms' lag; each arm sets its own objective,
so ``--objective`` / ``--objective-params`` are refused (``--rules`` chooses the rules). Prints the
table, what its intervals are, one sentence per comparison and the files written. Exit code 1 when a
run failed (each printed to stderr as ``failed <cell>: <error>``), 128 + signal when stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from workbench.cli.config_flags import (add_config_flags, check_out_dir, config_from_args, load_config_file,
                                        registries_epilog)
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.sweeps import SweepStopped, split_values

DEFAULT_NAME = "mission"
ARM_FIELDS = {"objective", "objective_params", "staleness", "run_name"}  # each arm (each cell) sets these


def add_parser(sub) -> None:
    """The ``compare`` subcommand: its own flags, then the run flags."""
    parser = sub.add_parser("compare", help="the main job: on-policy vs stale data, uncorrected and with "
                            "reweighting rules, side by side; one figure and one table",
                            description="The run flags are the base config; the defaults printed with them are the "
                                        "single run's, and where one is not given compare uses steps=60, "
                                        "eval_every=10 and measure_mismatch=false. --staleness is the stale arms' "
                                        "lag (default 16); --objective is refused (the arms set it: --rules).",
                            epilog=registries_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    add_arguments(parser)
    add_config_flags(parser)


def add_arguments(parser) -> None:
    """The comparison's own flags (the run flags are added by ``add_config_flags``)."""
    parser.add_argument("--rules", default=None, metavar="OBJ1,OBJ2,...",
                        help="the reweighting rules of the stale arms (default: ppo_clip,m2po)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm (base seed, +1, ...; default 1: "
                        "Wilson intervals; >= 2: bootstrap intervals across seeds)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel runs (default: usable cores; 0 = one after another in this process)")
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help="folder under --out-dir holding the runs, the figure and the table (default mission)")
    parser.add_argument("--config", help="a config.json (JSON or YAML) to start the base config from (flags "
                        "override it; its objective, staleness and run name are the arms' to set)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def cli_main(args) -> int:
    """``python -m workbench compare``: returns the exit code."""
    from workbench.studies import mission  # altair and vl-convert (the figure) load only for this command

    t0 = time.perf_counter()
    if getattr(args, "preset", None) is not None:
        raise WorkbenchError("--preset is invalid for compare: each arm sets its own objective (choose the rules "
                             "with --rules; a preset is for run, sweep and lint)")
    for flag in ("objective", "objective_params"):
        if getattr(args, flag, None) is not None:
            raise WorkbenchError(f"--{flag.replace('_', '-')} is invalid for compare: each arm sets its own "
                                 "objective (choose the rules with --rules)")
    given = config_from_args(args)
    named = set(load_config_file(args.config)) if args.config else set()
    named |= {f.name for f in dataclasses.fields(RunConfig) if getattr(args, f.name, None) is not None}
    fields = {k: getattr(given, k) for k in sorted(named - ARM_FIELDS)}
    base = mission.base_config(**fields)
    check_out_dir(base.out_dir)
    rules = tuple(split_values(args.rules)) if args.rules is not None else mission.RULES
    lag = args.staleness if args.staleness is not None else (given.staleness or mission.STALENESS)  # a file's 0: default
    arm_list = mission.arms(lag, rules)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        result = mission.run_mission(base, arm_list, args.seeds, name=args.name, workers=args.workers,
                                     progress=not args.no_progress, log=log)
    except SweepStopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    for line in result.failed:
        print(f"failed {line}", file=sys.stderr)
    if result.table is None:
        return 1
    print()
    print(mission.markdown_table(result.table))
    print()
    print(mission.interval_note(result.table))
    for sentence in result.sentences:
        print(f"- {sentence}")
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    print(f"compare done in {time.perf_counter() - t0:.0f} s")
    return 0
