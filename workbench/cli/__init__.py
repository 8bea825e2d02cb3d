"""Command line: ``python -m workbench run|resume|list|lint|docs|notebook|sweep|report|compare|fork|ope|course|
null-test|throughput|entropy``.

Every ``RunConfig`` field is a flag (``--staleness 64``, ``--objective m2po``); dict fields take
``key=value`` pairs (``--objective-params tau=0.08 variant=cap``). ``--help`` lists the registered
objectives (each parameter with its default, range and liveness), correction presets, advantage
estimators, tasks and rewards, read from the registries. ``lint`` takes the same flags as ``run``
and prints ``workbench.lint`` warnings (``run`` prints them too, to stderr, before starting);
``docs`` regenerates ``docs/objectives.md`` from the registries (``--check`` only compares).

One module per group of commands: ``config_flags`` (the run flags), ``run`` (run, resume, list,
lint, docs, notebook), ``sweep``, ``report``, ``compare``, ``fork`` (paired branches), ``ope`` (off-policy evaluation),
``course`` (the workshop's prepare / check / cache copy), ``null_test`` (lr = 0 under injected numerics),
``throughput`` (sync vs async wall-clock) and ``entropy`` (per-token entropy of a policy on a task). The
libraries they call never import the CLI.

Errors are one line on stderr. Bad input (a ``WorkbenchError``, an unknown or malformed flag) prints
``error: <message>`` and exits 2; any other exception is a bug in workbench, not in the input: one
line ``internal error: <type>: <message> (traceback written to <file>)``, exit 1, with the full
traceback in ``<run dir>/internal_error.txt`` (or a temporary file before a run directory exists).
``KeyboardInterrupt`` is not caught here.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
import traceback
from pathlib import Path

from workbench.cli import compare, course, entropy, fork, null_test, ope, report, run, sweep, throughput
from workbench.cli.config_flags import check_out_dir, config_from_args
from workbench.validate import field_docs
from workbench.errors import WorkbenchError, one_line
from workbench.runs.rundir import RunDir


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are ``WorkbenchError``s (one line, exit 2 in ``main``)
    instead of a usage block and ``SystemExit``; subcommand parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        hint = self._did_you_mean(message) if message.startswith("unrecognized arguments") else ""
        raise WorkbenchError(f"{self.prog}: {one_line(message)}{hint} (see {self.prog} --help)")

    def _did_you_mean(self, message: str) -> str:
        """`` (did you mean --staleness?)`` for the first unknown ``--flag`` close to a known one."""
        known = {opt for parser in self._all_parsers() for action in parser._actions for opt in action.option_strings}
        for token in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(token, sorted(known), n=1) if token.startswith("--") else []
            if close:
                return f" (did you mean {close[0]}?)"
        return ""

    def _all_parsers(self) -> list[argparse.ArgumentParser]:
        subs = [p for a in self._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
        return [self, *subs]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m workbench", description="Off-policy RL workbench for LMs.",
                           allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parsers(sub)
    sweep.add_parser(sub)
    report.add_parser(sub)
    compare.add_parser(sub)
    fork.add_parser(sub)
    ope.add_parser(sub)
    course.add_parser(sub)
    null_test.add_parser(sub)
    throughput.add_parser(sub)
    entropy.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "sweep":
            return sweep.cli_main(args)
        if args.command == "report":
            check_out_dir(args.out_dir)
            return report.cli_main(args)
        if args.command == "compare":
            return compare.cli_main(args)
        if args.command == "ope":
            return ope.cli_main(args)
        if args.command == "fork":
            return fork.cli_main(args)
        commands = {"course": course, "null-test": null_test, "throughput": throughput, "entropy": entropy}
        if args.command in commands:
            return commands[args.command].cli_main(args)
        return run.cli_main(args)
    except WorkbenchError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in a file
        print(f"internal error: {type(e).__name__}: {one_line(e)} ({_write_traceback(e)})", file=sys.stderr)
        return 1


def _write_traceback(e: BaseException) -> str:
    """Write ``e``'s traceback into the run directory of the run it interrupted, else a temp file;
    returns ``traceback written to <path>`` (or why it could not be written)."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    run_dir = _run_dir_of(e)
    if run_dir is not None:
        try:
            path = run_dir / "internal_error.txt"
            path.write_text(text)
            return f"traceback written to {path}"
        except OSError:
            pass
    try:
        fd, name = tempfile.mkstemp(prefix="workbench-internal-error-", suffix=".txt", dir=tempfile.gettempdir())
        with open(fd, "w") as f:
            f.write(text)
    except OSError as err:
        return f"traceback not written: {err.strerror or type(err).__name__}"
    return f"traceback written to {name}"


def _run_dir_of(e: BaseException) -> Path | None:
    """The directory of a run (an object with a ``RunDir`` as ``.dir``) live in a frame ``e`` went through."""
    for frame, _ in reversed(list(traceback.walk_tb(e.__traceback__))):
        for value in list(frame.f_locals.values()):
            try:
                run_dir = None if isinstance(value, type) else getattr(value, "dir", None)
            except Exception:  # noqa: BLE001 - a property that fails is simply not a run
                continue
            if isinstance(run_dir, RunDir) and run_dir.path.is_dir():
                return run_dir.path
    return None


__all__ = ["OneLineParser", "build_parser", "config_from_args", "field_docs", "main"]
