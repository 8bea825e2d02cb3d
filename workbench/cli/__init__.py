"""Command line: ``python -m workbench run|resume|list|lint|docs|notebook|sweep|report``.

Every ``RunConfig`` field is a flag (``--staleness 64``, ``--objective m2po``); dict fields take
``key=value`` pairs (``--objective-params tau=0.08 variant=cap``). ``--help`` lists the registered
objectives (each parameter with its default, range and liveness), correction presets, advantage
estimators, tasks and rewards, read from the registries. ``lint`` takes the same flags as ``run``
and prints ``workbench.lint`` warnings (``run`` prints them too, to stderr, before starting);
``docs`` regenerates ``docs/objectives.md`` from the registries (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (read from the source, never duplicated)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_pairs(flag: str, pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise WorkbenchError(f"--{flag} {pair!r} is invalid: expected key=value")
        k, v = pair.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _registries_epilog() -> str:
    from workbench.steps.reweight import OBJECTIVES
    from workbench.steps.score import ADVANTAGES, REWARDS
    from workbench.tasks import TASKS

    from workbench.steps.reweight.reference import param_line
    from workbench.steps.reweight.corrections import PRESETS, PROXIMAL_MODES, Correction

    lines = ["objectives (--objective NAME --objective-params KEY=VALUE ...):"]
    for name in OBJECTIVES.names():
        meta = OBJECTIVES.meta(name)
        lines.append(f"  {name:14s} {meta.get('summary', '')}")
        lines += [f"      {param_line(p)}" for p in meta.get("params", [])]
    lines.append("corrections (--correction PRESET --correction-params KEY=VALUE ...):")
    lines += [f"  {k:14s} {Correction(**v).describe()}" for k, v in sorted(PRESETS.items())]
    lines.append(f"proximal policies (--proximal): {' | '.join(PROXIMAL_MODES)}")
    for title, reg in (("advantage estimators", ADVANTAGES), ("tasks", TASKS), ("rewards", REWARDS)):
        lines.append(f"{title}: {', '.join(reg.names())}")
    return "\n".join(lines)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from workbench.config import RunConfig

    docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if isinstance(default, dict):
            parser.add_argument(flag, nargs="*", default=None, metavar="KEY=VALUE", help=help_)
        elif f.name == "rewards":
            parser.add_argument(flag, nargs="*", default=None, metavar="NAME=WEIGHT", help=help_)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif isinstance(default, tuple):
            parser.add_argument(flag, nargs=len(default), type=float, default=None, help=help_)
        else:
            parser.add_argument(flag, type=type(default), default=None, help=help_)


def config_from_args(args: argparse.Namespace):
    from workbench.config import RunConfig

    base: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    for f in dataclasses.fields(RunConfig):
        val = getattr(args, f.name, None)
        if val is None:
            continue
        if f.name == "rewards":
            val = [(k, float(v)) for k, v in _parse_pairs("rewards", val).items()]
        elif isinstance(getattr(RunConfig(), f.name), dict):
            val = {**base.get(f.name, {}), **_parse_pairs(f.name.replace("_", "-"), val)}
        base[f.name] = val
    return RunConfig.from_dict(base)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="Off-policy RL workbench for LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run one experiment headless", epilog=_registries_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    run_p.add_argument("--config", help="a config.json to start from (flags override it)")
    run_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(run_p)
    res_p = sub.add_parser("resume", help="continue a run directory from its latest checkpoint")
    res_p.add_argument("run_dir")
    res_p.add_argument("--steps", type=int, default=None, help="run until this many updates in total")
    res_p.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="list objectives, advantage estimators, tasks and rewards")
    lint_p = sub.add_parser("lint", help="warn about config combinations that probably do not do what was meant",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    lint_p.add_argument("--config", help="a config.json to start from (flags override it)")
    lint_p.add_argument("--strict", action="store_true", help="exit 1 when there is any warning")
    _add_config_flags(lint_p)
    docs_p = sub.add_parser("docs", help="write the objective reference docs/objectives.md from the registries")
    docs_p.add_argument("--out", default=None, help="output path (default: the repository's docs/objectives.md)")
    docs_p.add_argument("--check", action="store_true", help="only check that the file is up to date (exit 1 if not)")
    nb_p = sub.add_parser("notebook", help="run a notebook of notebooks/ headless (papermill) with parameters")
    nb_p.add_argument("notebook", help="a path, a stem or a number prefix (02)")
    nb_p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                      help="a notebook parameter; VALUE is parsed as JSON, else kept as a string")
    nb_p.add_argument("--params-file", default=None, help="YAML of parameters: all: + per notebook (notebooks/params/ci.yaml)")
    nb_p.add_argument("--output", default=None, help="the executed notebook (default: <cwd>/<stem>.out.ipynb)")
    nb_p.add_argument("--cwd", default=None, help="the kernel's working directory (run directories are relative to it)")
    from workbench.sweeps import add_arguments as _sweep_arguments

    sweep_p = sub.add_parser("sweep", help="a grid of runs (or headless notebooks) on a local pool or Ray",
                             epilog=_registries_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _sweep_arguments(sweep_p)
    _add_config_flags(sweep_p)
    from workbench.studies.prosperity import add_arguments as _report_arguments

    report_p = sub.add_parser("report", help="reproduce 'prosperity before collapse' at CPU scale: sweeps + "
                              "reports/prosperity.md")
    _report_arguments(report_p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(_registries_epilog())
            return 0
        if args.command == "docs":
            return _docs(args)
        if args.command == "notebook":
            return _notebook(args)
        if args.command == "sweep":
            from workbench.sweeps import cli_main

            return cli_main(args)
        if args.command == "report":
            from workbench.studies.prosperity_report import cli_main as report_main

            return report_main(args)
        if args.command == "lint":
            warnings = _print_lint(config_from_args(args), sys.stdout)
            if not warnings:
                print("no lint warnings")
            return 1 if (warnings and args.strict) else 0
        from workbench.loop import Run

        if args.command == "run":
            config = config_from_args(args)
            _print_lint(config, sys.stderr)
            run = Run(config)
            n = None
        else:
            run = Run.resume(args.run_dir)
            n = (args.steps or run.config.steps) - run.version
        print(f"run directory: {run.dir.path if run.dir else '(none)'}", flush=True)
        run.run(n, progress=not args.no_progress)
        _finish(run)
        return 0
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _print_lint(config, stream) -> list:
    from workbench.lint import lint

    warnings = lint(config)
    for w in warnings:
        print(f"lint warning {w}", file=stream, flush=True)
    return warnings


def _docs(args) -> int:
    from workbench.steps.reweight.reference import DOCS_PATH, objectives_markdown, write_docs

    path = Path(args.out) if args.out else DOCS_PATH
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != objectives_markdown():
            print(f"{path} is out of date: run python -m workbench docs", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    print(f"wrote {write_docs(path)}")
    return 0


def _finish(run) -> None:
    summary = run.write_summary()
    if run.dir is not None and len(run.rows):
        from workbench.charts import run_chart, save_png

        save_png(run_chart(run.metrics, title=run.dir.path.name), run.dir.path / "charts.png")
    print(json.dumps(summary, indent=2))


def _notebook(args) -> int:
    from workbench import notebook

    params = {name: _parse_value(value) for name, value in args.parameter}
    summary = notebook.run_notebook(args.notebook, parameters=params, params_file=args.params_file,
                                    output=args.output, cwd=args.cwd)
    print(json.dumps(summary, indent=2, default=str))
    return 0
