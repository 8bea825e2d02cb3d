"""The ``RunConfig`` flags shared by ``run``, ``lint`` and ``sweep``, and the registries' help listing.

Every ``RunConfig`` field is a flag (``--staleness 64``, ``--objective m2po``), its help the
docstring written under the field (``field_docs``: read from the source, never duplicated); dict
fields take ``key=value`` pairs (``--objective-params tau=0.08 variant=cap``), each value read as
JSON when it parses, else as a string (``workbench.sweeps.grid.parse_value``, as grid values).

``--config`` is a JSON or YAML mapping of fields (a run's ``config.json`` works); a file that is
missing, unreadable, not a mapping or holds a bad value is one line naming the file. ``run`` and
``sweep`` check that ``--out-dir`` can hold run directories before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.errors import WorkbenchError, one_line, parse_json, short_repr
from workbench.steps.reweight import OBJECTIVES
from workbench.steps.reweight.corrections import PRESETS, PROXIMAL_MODES, Correction
from workbench.steps.reweight.presets import PEER_PRESETS, preset_fields
from workbench.steps.reweight.reference import param_line
from workbench.steps.batch_sources import BATCH_SOURCES
from workbench.steps.score import ADVANTAGES, REWARDS
from workbench.sweeps.grid import parse_value
from workbench.tasks import TASKS
from workbench.validate import field_docs


def parse_pairs(flag: str, pairs: list[str]) -> dict[str, Any]:
    """``["tau=0.08", "variant=cap"]`` -> ``{"tau": 0.08, "variant": "cap"}``."""
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k.strip():
            raise WorkbenchError(f"--{flag} {short_repr(pair)} is invalid: expected key=value")
        try:
            out[k.strip()] = parse_value(v.strip())
        except RecursionError:
            raise WorkbenchError(f"--{flag} {short_repr(pair)} is invalid: the value is nested too deeply") from None
    return out


def parse_rewards(pairs: list[str]) -> list[tuple[str, float]]:
    """``["exact_match=1", "format=0.5"]`` -> ``[("exact_match", 1.0), ("format", 0.5)]``."""
    out = []
    for k, v in parse_pairs("rewards", pairs).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise WorkbenchError(f"--rewards {short_repr(f'{k}={v}')} is invalid: expected NAME=WEIGHT with a "
                                 "number as the weight, e.g. exact_match=1.0")
        out.append((k, float(v)))
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """The mapping of fields in a JSON or YAML ``--config`` file; every problem is one line naming the file."""
    where = f"--config {path!r}"
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise WorkbenchError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise WorkbenchError(f"{where}: is a folder, expected a JSON or YAML file") from None
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise WorkbenchError(f"{where}: cannot read it ({e.strerror or type(e).__name__})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml  # only for YAML configs

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise WorkbenchError(f"{where}: invalid YAML ({one_line(getattr(e, 'problem', None) or e)}{at})") from None
    else:
        data = parse_json(text, where)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise WorkbenchError(f"{where}: expected a mapping of RunConfig fields, got {got}")
    return data


def check_out_dir(out_dir: Any) -> None:
    """Refuse an ``--out-dir`` that cannot hold run directories (a file, under a file, not writable)
    before anything starts; "" (write nothing) passes. The nearest existing folder is probed by
    creating and removing a temporary file, which also catches read-only file systems."""
    if not isinstance(out_dir, str) or not out_dir:
        return
    where = f"--out-dir {out_dir!r}"
    p = Path(out_dir).expanduser()
    while not p.exists():
        if p.is_symlink():
            raise WorkbenchError(f"{where} is invalid: {p} is a broken symbolic link")
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise WorkbenchError(f"{where} is invalid: {p} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".workbench-write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise WorkbenchError(f"{where} is invalid: cannot write in {p} ({e.strerror or type(e).__name__})") from None


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
    lines.append("batch sources (--batch-source NAME --batch-source-params KEY=VALUE ...):")
    for name in BATCH_SOURCES.names():
        meta = BATCH_SOURCES.meta(name)
        lines.append(f"  {name:14s} {meta.get('summary', '')}")
        lines += [f"      {param_line(p)}" for p in meta.get("params", [])]
    return "\n".join(lines)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``RunConfig`` field; every default is None, so only the flags given override."""
    docs = field_docs(RunConfig)
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=f"a peer's default policy loss as config fields, under --config and the flags: "
                             f"{', '.join(PEER_PRESETS)} (python -m workbench list --presets)")
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
    """``--config`` (JSON or YAML) if given, then every flag given over it; for ``run`` and ``sweep``
    the out-dir is checked too. A bad value that comes from the file names the file."""
    file = load_config_file(args.config) if getattr(args, "config", None) else {}
    preset = getattr(args, "preset", None)
    base = {**(preset_fields(preset) if preset else {}), **file}
    for f in dataclasses.fields(RunConfig):
        val = getattr(args, f.name, None)
        if val is None:
            continue
        if f.name == "rewards":
            val = parse_rewards(val)
        elif isinstance(getattr(RunConfig(), f.name), dict):
            given = base.get(f.name)
            val = {**(given if isinstance(given, dict) else {}), **parse_pairs(f.name.replace("_", "-"), val)}
        base[f.name] = val
    try:
        config = RunConfig.from_dict(base)
    except WorkbenchError as e:
        raise _from_file(e, getattr(args, "config", None), file) from None
    if getattr(args, "command", None) in ("run", "sweep"):
        check_out_dir(config.out_dir)
    return config


def _from_file(e: WorkbenchError, path: str | None, file: dict[str, Any]) -> WorkbenchError:
    """``e`` prefixed with ``--config PATH`` when the file alone already fails with the same message."""
    if path:
        try:
            RunConfig.from_dict(file)
        except WorkbenchError as alone:
            if str(alone) == str(e):
                return WorkbenchError(f"--config {path!r}: {e}")
    return e
