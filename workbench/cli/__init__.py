"""Command line: ``python -m workbench run|resume|list|lint|docs|notebook|sweep|report``.

Every ``RunConfig`` field is a flag (``--staleness 64``, ``--objective m2po``); dict fields take
``key=value`` pairs (``--objective-params tau=0.08 variant=cap``). ``--help`` lists the registered
objectives (each parameter with its default, range and liveness), correction presets, advantage
estimators, tasks and rewards, read from the registries. ``lint`` takes the same flags as ``run``
and prints ``workbench.lint`` warnings (``run`` prints them too, to stderr, before starting);
``docs`` regenerates ``docs/objectives.md`` from the registries (``--check`` only compares).

One module per group of commands: ``config_flags`` (the run flags), ``run`` (run, resume, list,
lint, docs, notebook), ``sweep`` and ``report``. The libraries they call never import the CLI.
"""

from __future__ import annotations

import argparse
import sys

from workbench.cli import report, run, sweep
from workbench.cli.config_flags import config_from_args, field_docs
from workbench.errors import WorkbenchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="Off-policy RL workbench for LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parsers(sub)
    sweep.add_parser(sub)
    report.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "sweep":
            return sweep.cli_main(args)
        if args.command == "report":
            return report.cli_main(args)
        return run.cli_main(args)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "config_from_args", "field_docs", "main"]
