"""``run``, ``resume``, ``list``, ``lint``, ``docs`` and ``notebook``: one run, or the registries.

``lint`` takes the same flags as ``run`` and prints ``workbench.lint`` warnings (``run`` prints them
too, to stderr, before starting); ``docs`` regenerates ``docs/objectives.md`` and, beside it,
the knob reference ``docs/knobs.md`` from the registries (``--check`` only compares both);
``notebook`` executes a notebook of ``notebooks/`` headless.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from pathlib import Path

from workbench import notebook
from workbench.cli.config_flags import add_config_flags, config_from_args, registries_epilog
from workbench.course.knob_reference import knobs_markdown, write_knob_docs
from workbench.errors import WorkbenchError
from workbench.runs.stop import StopSignals, exit_code, signal_name
from workbench.steps.reweight.presets import PEER_PRESETS
from workbench.steps.reweight.reference import DOCS_PATH, objectives_markdown, write_docs
from workbench.sweeps.grid import parse_value


def add_parsers(sub) -> None:
    """The subcommands of this module, in the order ``--help`` lists them."""
    run_p = sub.add_parser("run", help="run one experiment headless", epilog=registries_epilog(), allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    run_p.add_argument("--config", help="a config.json to start from (flags override it)")
    run_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(run_p)
    res_p = sub.add_parser("resume", help="continue a run directory from its latest checkpoint", allow_abbrev=False)
    res_p.add_argument("run_dir")
    res_p.add_argument("--checkpoint", default=None,
                       help="a checkpoint folder (or its name, e.g. update_000040) instead of the latest intact one")
    res_p.add_argument("--steps", type=int, default=None, help="run until this many updates in total")
    res_p.add_argument("--no-progress", action="store_true")
    list_p = sub.add_parser("list", help="list objectives, advantage estimators, tasks and rewards", allow_abbrev=False)
    list_p.add_argument("--presets", action="store_true",
                        help="list the peer presets (a peer framework's default policy loss as RunConfig fields)")
    lint_p = sub.add_parser("lint", help="warn about config combinations that probably do not do what was meant",
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    lint_p.add_argument("--config", help="a config.json to start from (flags override it)")
    lint_p.add_argument("--strict", action="store_true", help="exit 1 when there is any warning")
    add_config_flags(lint_p)
    docs_p = sub.add_parser("docs", help="write the objective reference docs/objectives.md and the knob reference "
                            "docs/knobs.md from the registries",
                            allow_abbrev=False)
    docs_p.add_argument("--out", default=None, help="output path (default: the repository's docs/objectives.md; "
                        "knobs.md goes beside it)")
    docs_p.add_argument("--check", action="store_true", help="only check that the file is up to date (exit 1 if not)")
    nb_p = sub.add_parser("notebook", help="run a notebook of notebooks/ headless (papermill) with parameters",
                          allow_abbrev=False)
    nb_p.add_argument("notebook", help="a path, a stem or a number prefix (02)")
    nb_p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                      help="a notebook parameter; VALUE is parsed as JSON, else kept as a string")
    nb_p.add_argument("-f", "--params-file", default=None,
                      help="papermill's parameters file, a flat YAML of name: value (the CI sizes: "
                           "notebooks/params/ci/<stem>.yaml); -p overrides it")
    nb_p.add_argument("--output", default=None, help="the executed notebook (default: <cwd>/<stem>.out.ipynb)")
    nb_p.add_argument("--cwd", default=None, help="the kernel's working directory (run directories are relative to it)")


def cli_main(args) -> int:
    """One of this module's commands; returns the exit code (a ``WorkbenchError`` is the caller's: exit 2)."""
    if args.command == "list":
        print(_presets_text() if args.presets else registries_epilog())
        return 0
    if args.command == "docs":
        return _docs(args)
    if args.command == "notebook":
        return _notebook(args)
    if args.command == "lint":
        warnings = _print_lint(config_from_args(args), sys.stdout)
        if not warnings:
            print("no lint warnings")
        return 1 if (warnings and args.strict) else 0
    from workbench.loop import Run  # transformers and the model code: only the commands that train load them

    built: list = []  # the run, once built (a signal before that exits at once: nothing to keep yet)
    try:
        with StopSignals(lambda signum: _on_stop(args, built, signum),
                         on_again=lambda signum: _exit_now(args, built, signum)) as stop:
            if args.command == "run":
                config = config_from_args(args)
                _print_lint(config, sys.stderr)
                run = Run(config)
                n = None
            else:
                run = Run.resume(args.run_dir, checkpoint=args.checkpoint)
                n = _resume_updates(run, args.steps)
            built.append(run)
            print(f"run directory: {run.dir.path if run.dir else '(none)'}", flush=True)
            target = run.version + (run.config.steps - run.version if n is None else n)
            run.run(n, progress=not args.no_progress)
        if stop.signum is not None and run.version < target:  # stopped early: checkpoint and summary written
            print(_stop_line(run, f"stopped at update {run.version}"), file=sys.stderr, flush=True)
            return stop.exit_code
        _finish(run)
    except KeyboardInterrupt:  # outside the stop handlers (the charts): the run itself is complete
        print("interrupted while writing the run's charts: the run and its summary are complete", file=sys.stderr)
        return exit_code(signal.SIGINT)
    return 0


def _presets_text() -> str:
    """``list --presets``: each peer preset's fields, description and source."""
    lines = ["peer presets (--preset NAME on run, sweep, lint; workbench.steps.reweight.presets.preset_fields NAME):"]
    for name, p in PEER_PRESETS.items():
        lines.append(f"  {name:22s} {p.peer}: " + ", ".join(f"{k}={v!r}" for k, v in p.fields.items()))
        lines += [f"      {p.description}", f"      source: {p.source}"]
    return "\n".join(lines)


def _resume_updates(run, steps: int | None) -> int:
    """Updates left for ``resume [--steps N]``; refuses a resume that would train nothing."""
    if steps is not None and steps <= run.version:
        raise WorkbenchError(f"resume --steps {steps} is not past the run's update {run.version}: expected the "
                             f"total to reach, > {run.version}")
    if steps is None and run.version >= run.config.steps:
        raise WorkbenchError(f"{run.dir.path} is complete ({run.version} of steps={run.config.steps} updates): "
                             f"pass --steps N > {run.version} to train further")
    return (steps or run.config.steps) - run.version


def _stop_line(run, what: str) -> str:
    """``<what>; resume with: python -m workbench resume DIR`` (or why there is nothing to resume)."""
    if run is None or run.dir is None:
        return f"{what}; nothing to resume (no run directory)"
    return f"{what}; resume with: python -m workbench resume {shlex.quote(str(run.dir.path))}"


def _on_stop(args, built: list, signum: int) -> None:
    """First SIGINT / SIGTERM: the run stops after the update in progress; before it exists, exit now."""
    if built:
        built[0].request_stop()
        return
    if args.command == "resume":
        print(f"stopped by {signal_name(signum)} while loading {args.run_dir}: nothing changed; resume with: "
              f"python -m workbench resume {shlex.quote(str(args.run_dir))}", file=sys.stderr, flush=True)
    else:
        print(f"stopped by {signal_name(signum)} before the first update: nothing was trained", file=sys.stderr,
              flush=True)
    raise SystemExit(exit_code(signum))


def _exit_now(args, built: list, signum: int) -> None:
    """Second signal: leave at once (the latest checkpoint on disk is where a resume starts)."""
    run = built[0] if built else None
    what = f"{signal_name(signum)} again: exited at once during update {run.version if run else 0}"
    if run is None or run.dir is None or run.dir.latest_checkpoint() is None:
        print(f"{what}; no checkpoint was written yet: nothing to resume", file=sys.stderr, flush=True)
    else:
        print(_stop_line(run, f"{what} (a resume starts from the latest checkpoint)"), file=sys.stderr, flush=True)
    raise SystemExit(exit_code(signum))


def _print_lint(config, stream) -> list:
    """Print the linter's notes (plain lines: deliberate choices) then its warnings; return the warnings."""
    from workbench.lint import lint, notes

    for line in notes(config):
        print(line, file=stream, flush=True)
    warnings = lint(config)
    for w in warnings:
        print(f"lint warning {w}", file=stream, flush=True)
    return warnings


def _docs(args) -> int:
    path = Path(args.out) if args.out else DOCS_PATH
    knobs = path.with_name("knobs.md")  # the knob reference sits beside the objective reference
    if args.check:
        stale = [p for p, text in ((path, objectives_markdown()), (knobs, knobs_markdown()))
                 if (p.read_text() if p.exists() else "") != text]
        for p in stale:
            print(f"{p} is out of date: run python -m workbench docs", file=sys.stderr)
        if stale:
            return 1
        print(f"{path} and {knobs} are up to date")
        return 0
    print(f"wrote {write_docs(path)}")
    print(f"wrote {write_knob_docs(knobs)}")
    return 0


def _finish(run) -> None:
    summary = run.write_summary()
    if run.dir is not None and len(run.rows):
        import polars as pl

        from workbench.charts import run_chart, save_png  # altair and vl-convert: only once a run has rows
        from workbench.ope.chart import ope_chart_spec
        from workbench.ope.monitor import FILE as OPE_FILE

        save_png(run_chart(run.metrics, run.dir.path.name, run.knob_events), run.dir.path / "charts.png")
        if (run.dir.path / OPE_FILE).is_file():  # --ope-every: the estimates against the truth
            save_png(ope_chart_spec(pl.read_parquet(run.dir.path / OPE_FILE)), run.dir.path / "ope.png")
    print(json.dumps(summary, indent=2))


def _notebook(args) -> int:
    params = {name: parse_value(value) for name, value in args.parameter}
    summary = notebook.run_notebook(args.notebook, parameters=params, params_file=args.params_file,
                                    output=args.output, cwd=args.cwd)
    print(json.dumps(summary, indent=2, default=str))
    return 0
