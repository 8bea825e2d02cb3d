"""One error type for everything a user can get wrong.

Every message is one line and names the field, the value and what would have been valid, so a
notebook cell or a CLI run fails with something a person can act on. A value's repr is cut to
``MAX_REPR`` characters: a 50 MB prompt or a long list in an error message hides the message.
"""

from __future__ import annotations

import json

MAX_REPR = 200
"""Longest repr of a bad value quoted in a message (longer ones end in ``...``)."""


class WorkbenchError(ValueError):
    """Bad input: a config field, a registry name, a data file, a reward function's output."""


def short_repr(value: object, limit: int = MAX_REPR) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the error being reported
        text = f"<{type(value).__name__}>"
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: object) -> str:
    """``str(text)`` with its lines joined by spaces (CLI errors are one line)."""
    return " ".join(str(text).split("\n")).strip()


def bad_value(field: str, value: object, expected: str) -> WorkbenchError:
    """Build the standard one-line error: ``field=value is invalid: expected ...``."""
    return WorkbenchError(one_line(f"{field}={short_repr(value)} is invalid: expected {expected}"))


def parse_json(text: str, where: str, what: str = "invalid JSON") -> object:
    """``json.loads(text)``, or a one-line WorkbenchError ``<where>: <what> (<problem> at line L,
    column C)``; also for input nested too deeply to parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{where}: {what} ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise WorkbenchError(f"{where}: {what} (nested too deeply)") from None
