"""``python -m workbench sweep``: a grid of runs (or headless notebooks) on a local pool or Ray.

The sweep's own flags, then every run flag (the base config); the library is ``workbench.sweeps``.
Exit code 1 when a cell failed (each failure printed to stderr as ``failed <cell>: <error>``).
"""

from __future__ import annotations

import argparse
import sys

from workbench.cli.config_flags import add_config_flags, config_from_args, registries_epilog
from workbench.sweeps import SweepStopped, parse_grid, parse_seeds, sweep


def add_parser(sub) -> None:
    """The ``sweep`` subcommand: its own flags, then the run flags."""
    parser = sub.add_parser("sweep", help="a grid of runs (or headless notebooks) on a local pool or Ray",
                            epilog=registries_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    add_arguments(parser)
    add_config_flags(parser)


def add_arguments(parser) -> None:
    """The sweep-specific flags (the run flags are added by ``add_config_flags``)."""
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a grid dimension: a RunConfig field (or FIELD.KEY of a dict field, e.g. "
                             "objective_params.tau=0.02,0.04, or a notebook parameter with --notebook) and its "
                             "values; repeat for more dimensions (cells are the cross product)")
    parser.add_argument("--seeds", default=None, metavar="N|S1,S2,...",
                        help="N seeds (base seed, +1, ...) or a list of seeds; each grid cell runs once per seed")
    parser.add_argument("--notebook", default=None, help="run each cell as a headless notebook (path, stem or number)")
    parser.add_argument("--params-file", default=None,
                        help="with --notebook: YAML of notebook parameters (all: + per notebook), under the cell's")
    parser.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                        help="run the cells as Ray tasks: auto (a running cluster, else a local instance), local, "
                             "or a cluster address (pip install 'workbench[ray]')")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel runs (default: usable cores // threads-per-run; 0 = one after another "
                             "in this process)")
    parser.add_argument("--gpus-per-run", type=float, default=None, metavar="G",
                        help="with --ray: GPUs per run, passed to Ray as num_gpus (0.5 = two runs per GPU; above 1 a "
                             "whole number); each run's device becomes cuda (its --device must be auto or cuda)")
    parser.add_argument("--threads-per-run", type=int, default=None, help="torch threads per run (default 1)")
    parser.add_argument("--name", default=None,
                        help="sweep folder name under --out-dir (default: sweep-<hash of the command>, so the "
                             "same command resumes the same sweep)")
    parser.add_argument("--config", help="a config.json to start the base config from (flags override it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cli_main(args) -> int:
    """``python -m workbench sweep``: returns the exit code (1 when a run failed)."""
    base = config_from_args(args)
    grid = parse_grid(args.grid)
    seeds = parse_seeds(args.seeds)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        merged = sweep(base, grid, seeds, notebook=args.notebook, params_file=args.params_file, ray=args.ray,
                       workers=args.workers, gpus_per_run=args.gpus_per_run,
                       threads_per_run=args.threads_per_run, name=args.name,
                       progress=not args.no_progress, log=log)
    except SweepStopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    failed = (merged.filter(merged["status"] != "ok")["run"].unique(maintain_order=True).to_list()
              if merged.height else [])
    for run in failed:
        err = merged.filter(merged["run"] == run)["error"][0]
        print(f"failed {run}: {err}", file=sys.stderr)
    return 1 if failed else 0
