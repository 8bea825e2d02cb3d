"""The ``RunConfig`` flags shared by ``run``, ``lint`` and ``sweep``, and the registries' help listing.

Every ``RunConfig`` field is a flag (``--staleness 64``, ``--objective m2po``), its help the
docstring written under the field (``field_docs``: read from the source, never duplicated); dict
fields take ``key=value`` pairs (``--objective-params tau=0.08 variant=cap``), each value read as
JSON when it parses, else as a string (``workbench.sweeps.grid.parse_value``, as grid values).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.steps.reweight import OBJECTIVES
from workbench.steps.reweight.corrections import PRESETS, PROXIMAL_MODES, Correction
from workbench.steps.reweight.reference import param_line
from workbench.steps.score import ADVANTAGES, REWARDS
from workbench.sweeps.grid import parse_value
from workbench.tasks import TASKS


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (read from the source, never duplicated)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def parse_pairs(flag: str, pairs: list[str]) -> dict[str, Any]:
    """``["tau=0.08", "variant=cap"]`` -> ``{"tau": 0.08, "variant": "cap"}``."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise WorkbenchError(f"--{flag} {pair!r} is invalid: expected key=value")
        k, v = pair.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def registries_epilog() -> str:
    """Every registered objective (with its parameters), correction preset, advantage, task and reward."""
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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``RunConfig`` field; every default is None, so only the flags given override."""
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


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """``--config`` (a config.json) if given, then every flag given over it."""
    base: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    for f in dataclasses.fields(RunConfig):
        val = getattr(args, f.name, None)
        if val is None:
            continue
        if f.name == "rewards":
            val = [(k, float(v)) for k, v in parse_pairs("rewards", val).items()]
        elif isinstance(getattr(RunConfig(), f.name), dict):
            val = {**base.get(f.name, {}), **parse_pairs(f.name.replace("_", "-"), val)}
        base[f.name] = val
    return RunConfig.from_dict(base)
