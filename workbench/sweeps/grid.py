"""A sweep's text: grid and seed flags in; grid keys checked; folder names and one-line errors out.

Grid keys are ``RunConfig`` fields, or ``field.key`` for a dict field
(``objective_params.tau=0.02,0.04``, ``task_params.max_digits=2,3``), or, for a notebook sweep, the
notebook's declared parameters. Values are read as JSON when they parse (numbers, true/false,
lists, dicts), else kept as strings (``parse_value``, which the CLI's ``KEY=VALUE`` flags use too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Iterable

from workbench.config import RunConfig
from workbench.errors import WorkbenchError

RESERVED = {"out_dir", "run_name", "threads"}  # the sweep sets these per cell / per worker


def parse_value(text: str) -> Any:
    """JSON when ``text`` parses as JSON (``4``, ``true``, ``[1,2]``), else ``text`` itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_values(text: str) -> list[str]:
    """Split ``a,b,[1,2],"x,y"`` at top-level commas (brackets, braces and quotes are respected)."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["staleness=0,4", "objective=m2po,is"]`` -> ``{"staleness": [0, 4], "objective": ["m2po", "is"]}``.

    Each value is read as JSON when it parses (numbers, true/false, lists, dicts), else as a string.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise WorkbenchError(f"--grid {item!r} is invalid: expected KEY=V1,V2,...")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in grid:
            raise WorkbenchError(f"--grid {key!r} is given twice: give all its values in one --grid {key}=V1,V2")
        vals = [v for v in split_values(text)]
        if not text.strip() or any(v == "" for v in vals):
            raise WorkbenchError(f"--grid {item!r} is invalid: expected KEY=V1,V2,... with no empty value")
        grid[key] = [parse_value(v) for v in vals]
    return grid


def parse_seeds(text: str | None) -> int | list[int] | None:
    """``"3"`` -> 3 (three seeds); ``"0,5,7"`` -> [0, 5, 7]."""
    if text is None:
        return None
    parts = split_values(text)
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise WorkbenchError(f"--seeds {text!r} is invalid: expected a count (3) or a list of seeds (0,5,7)") from None
    return nums[0] if len(parts) == 1 else nums


def seed_list(base_seed: int, seeds: int | list[int] | None, grid: dict[str, list[Any]]) -> list[int]:
    """The seeds every grid point runs with: ``seeds=3`` is ``base_seed + 0, 1, 2``; a list is itself."""
    if seeds is None:
        return [base_seed]
    if "seed" in grid:
        raise WorkbenchError("grid key 'seed' and seeds= are both given: use one of them")
    if isinstance(seeds, bool):
        raise WorkbenchError(f"seeds={seeds!r} is invalid: expected an int >= 1 or a list of ints >= 0")
    if isinstance(seeds, int):
        if seeds < 1:
            raise WorkbenchError(f"seeds={seeds!r} is invalid: expected an int >= 1 or a list of ints >= 0")
        return [base_seed + i for i in range(seeds)]
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise WorkbenchError(f"seeds={seeds!r} is invalid: expected an int >= 1 or a list of ints >= 0")
    if len(set(seeds)) != len(seeds):
        raise WorkbenchError(f"seeds={seeds!r} is invalid: a seed is repeated")
    return seeds


def canon(obj: Any) -> str:
    """Canonical JSON: equal specs compare (and hash) equal whatever their key order."""
    return json.dumps(obj, sort_keys=True, default=str)


def short_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(canon(obj).encode()).hexdigest()[:n]


def value_text(v: Any) -> str:
    """A grid value as written in names and parquet columns: strings as is, the rest as compact JSON."""
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))


def cell_name(values: dict[str, Any], seed: int | None) -> str:
    """A readable, filesystem-safe folder name: ``staleness=4__objective=m2po__seed=0``."""
    parts = [f"{k}={value_text(v)}" for k, v in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    raw = "__".join(parts) or "base"
    safe = re.sub(r"[^A-Za-z0-9._=+\-]", "_", raw)
    if safe != raw or len(safe) > 120:
        safe = f"{safe[:100]}-{short_hash([values, seed], 8)}"
    return safe


def describe(values: dict[str, Any], seed: int) -> str:
    """``staleness=4, objective=m2po, seed=0``: how errors name a cell."""
    return ", ".join([f"{k}={value_text(v)}" for k, v in values.items()] + [f"seed={seed}"])


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def one_line(e: BaseException) -> str:
    """A failed cell's error as one line: ``ExceptionType: first line`` (a WorkbenchError's own text)."""
    if isinstance(e, WorkbenchError):
        return first_line(e) or type(e).__name__
    msg = first_line(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def validate_keys(grid: dict[str, list[Any]], notebook_params: dict[str, Any] | None) -> None:
    """Every grid key names a RunConfig field, ``FIELD.KEY`` of a dict field, or a declared notebook parameter."""
    if not isinstance(grid, dict):
        raise WorkbenchError(f"grid={grid!r} is invalid: expected a dict of key -> list of values")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    dict_fields = sorted(n for n, f in fields.items() if f.default_factory is dict)  # type: ignore[comparison-overlap]
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise WorkbenchError(f"grid {key}={values!r} is invalid: expected a non-empty list of values")
        if len({canon(v) for v in values}) != len(values):
            raise WorkbenchError(f"grid {key}={list(values)!r} is invalid: a value is repeated")
        head = key.split(".", 1)[0]
        if head in RESERVED:
            raise WorkbenchError(f"grid key {key!r} is invalid: the sweep sets {head} itself")
        if notebook_params is not None:
            if head not in notebook_params:
                raise WorkbenchError(f"grid key {key!r} is invalid: the notebook declares no parameter {head!r} "
                                     f"(parameters: {', '.join(notebook_params)})")
            continue
        if "." in key:
            if head not in dict_fields or not key.split(".", 1)[1]:
                raise WorkbenchError(f"grid key {key!r} is invalid: a dotted key must be FIELD.KEY of a dict field "
                                     f"({', '.join(dict_fields)})")
        elif key not in fields:
            raise WorkbenchError(f"grid key {key!r} is invalid: expected a RunConfig field "
                                 f"({', '.join(sorted(fields))}) or FIELD.KEY of a dict field")


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Grid values over a dict of fields: plain keys replace, dotted keys merge into dict fields."""
    out = dict(base)
    for k, v in values.items():
        if "." not in k:
            out[k] = v
    for k, v in values.items():
        if "." in k:
            head, sub = k.split(".", 1)
            cur = out.get(head) or {}
            if not isinstance(cur, dict):
                raise WorkbenchError(f"grid key {k!r} is invalid: {head} is not a dict in this cell ({cur!r})")
            out[head] = {**cur, sub: v}
    return out
