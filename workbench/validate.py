"""Type checks of ``RunConfig`` fields, run before any range or registry check.

The range checks in ``RunConfig.__post_init__`` compare values (``0 < lr < 1``) and look names up
in registries; on a value of the wrong type Python answers with its own exception, which names no
field (``'<' not supported between 'str' and 'float'``), or quietly does something else: ``True``
is the int 1, a string iterates as its characters (``rewards="exact_match"`` would be read as the
entries ``'e', 'x', ...``) and a huge int only overflows once it reaches torch. So every field is
checked against its annotation first and each mismatch is a one-line ``WorkbenchError`` naming the
field; the later checks then only ever see the types they were written for.

The expected type of a field is read from its annotation, so a new field of a plain type (``int``,
``float``, ``bool``, ``str``, ``dict[...]``) is covered without being listed here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
from typing import Any

from workbench.errors import WorkbenchError, bad_value
from workbench.policy.model import ModelConfig
from workbench.policy.warm_start import SFTConfig
from workbench.steps.rewards import validate_spec

INT64_MAX = 2**63 - 1
"""Largest int a config field may hold: seeds and counters reach torch as int64."""

REWARDS_EXPECTED = ("a non-empty list of (name, weight) or (name, weight, {params}) entries, "
                    "e.g. [(\"exact_match\", 1.0)]")

SUB_CONFIGS = {"model_params": ModelConfig, "sft_params": SFTConfig}
"""Dict fields that override a dataclass: their keys must be its fields, their values pass its checks."""


def is_int(v: Any) -> bool:
    """An int that is not a bool and fits in int64."""
    return isinstance(v, int) and not isinstance(v, bool) and -INT64_MAX - 1 <= v <= INT64_MAX


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool (strings and None are not numbers)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_known(cls: type, args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse unknown keyword fields (``RunConfig(foo=1)``) with the valid names, before ``__init__``
    turns them into a ``TypeError`` that names no field."""
    names = [f.name for f in dataclasses.fields(cls)]
    if len(args) > len(names):
        raise WorkbenchError(f"{cls.__name__} takes at most {len(names)} positional fields, got {len(args)}")
    unknown = sorted(set(kwargs) - set(names), key=str)
    if unknown:
        raise WorkbenchError(f"unknown config field {unknown[0]!r}: valid fields are {', '.join(sorted(names))}")


def check_types(cfg: Any) -> None:
    """Check every field of ``cfg`` against its annotation; normalise rewards and adam_betas to tuples."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        kind = str(f.type)
        if f.name == "rewards":
            object.__setattr__(cfg, "rewards", _rewards(v))
        elif f.name == "adam_betas":
            if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(is_number(b) for b in v)):
                raise bad_value("adam_betas", v, "two floats in [0, 1)")
            object.__setattr__(cfg, "adam_betas", tuple(v))
        elif kind == "bool":
            if not isinstance(v, bool):
                raise bad_value(f.name, v, "true or false")
        elif kind == "int":
            if not is_int(v):
                expected = ("an integer, not a bool" if isinstance(v, bool) else "an integer" if not isinstance(v, int)
                            else "an integer of at most 64 bits (|n| < 2**63)")
                raise bad_value(f.name, v, expected)
        elif kind == "float":
            if not is_number(v):
                raise bad_value(f.name, v, "a finite number, not a bool" if isinstance(v, bool) else "a finite number")
        elif kind == "str":
            if not isinstance(v, str):
                raise bad_value(f.name, v, "a string")
        elif kind.startswith("dict"):
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise bad_value(f.name, v, "a dict with string keys")
            if f.name in SUB_CONFIGS:
                _check_sub_config(f.name, SUB_CONFIGS[f.name], v)


def _rewards(v: Any) -> tuple[tuple, ...]:
    """``rewards`` as a tuple of tuples, each (registry name, finite weight[, params dict])."""
    if not isinstance(v, (tuple, list)) or not v:
        raise bad_value("rewards", v, REWARDS_EXPECTED)
    out = []
    for entry in v:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3) or not isinstance(entry[0], str):
            raise bad_value("rewards", entry, "an entry (name, weight) or (name, weight, {params})")
        if not is_number(entry[1]):
            raise bad_value("rewards", entry, f"a finite number as the weight of {entry[0]!r}")
        if len(entry) == 3 and not (isinstance(entry[2], dict) and all(isinstance(k, str) for k in entry[2])):
            raise bad_value("rewards", entry, f"a dict of keyword arguments as the params of {entry[0]!r}")
        out.append(tuple(entry))
    validate_spec(out)  # registered names, and params each function really takes
    return tuple(out)


def _check_sub_config(name: str, cls: type, params: dict[str, Any]) -> None:
    """Unknown keys name the valid ones; values go through ``cls``'s own checks (one-line errors)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise WorkbenchError(f"{name} has no key {unknown[0]!r}: valid keys are {', '.join(valid)} "
                             f"(the fields of {cls.__name__})")
    try:
        cls(**params)
    except WorkbenchError as e:  # "ModelConfig.hidden_size=0 ..." -> "model_params.hidden_size=0 ..."
        msg = str(e)
        prefix = f"{cls.__name__}."
        raise WorkbenchError(f"{name}.{msg[len(prefix):]}" if msg.startswith(prefix) else f"{name}: {msg}") from None
    except (TypeError, ValueError) as e:  # a comparison the dataclass's checks did not guard
        raise bad_value(name, params, f"values accepted by {cls.__name__} ({type(e).__name__}: {e})") from None


__all__ = ["INT64_MAX", "check_known", "check_types", "field_docs", "is_int", "is_number"]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (read from the source, never duplicated):
    the CLI's flag help and the knob reference (``docs/knobs.md``) both read them here."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return {node.target.id: " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}
