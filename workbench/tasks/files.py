"""From data files to task records: the field mapping shared by every data task, JSONL and parquet.

Every data task (``jsonl``, ``parquet``, ``hf_dataset``; ``workbench.tasks``) turns rows into
``(prompt, answer, extra)`` records through one ``FieldMapping``, built from its task params:

- ``prompt``: a column name, or a template with ``{column}`` placeholders (any ``{`` makes it a
  template; ``{{`` and ``}}`` are literal braces), e.g. ``"Question: {question}\\nAnswer:"``;
  placeholder values may be strings or numbers.
- ``answer``: a column of strings, then its final answer by ``answer_format``: ``"raw"`` (as
  written), ``"gsm8k"`` (the rest of the line after the last ``####``), ``"boxed"`` (the content of
  the last ``\\boxed{...}``); or by ``answer_regex`` (group 1 of the regex's last match, the whole
  match when it has no group).
- ``extra``: the columns kept in ``Example.extra`` (reward functions get them as keyword lists);
  None keeps every other column whose values are JSON-able (strings, numbers, booleans, nulls,
  lists and structs of them: extras travel in checkpoints as JSON), a list keeps exactly those.

Every bad row is a one-line ``WorkbenchError`` naming the file, the row and the field: rows of a
table are counted from 0 (``df.row(i)``, ``ds[i]``), lines of a JSONL file from 1 (``path:line``).
A column missing from a table lists the columns it has. Prompts and answers longer than
``MAX_FIELD_CHARS`` are refused, like JSONL lines longer than ``MAX_JSONL_LINE_BYTES``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import polars as pl

from workbench.errors import WorkbenchError, bad_value, one_line, parse_json, short_repr
from workbench.tasks.math_answers import after_hashes, last_boxed

MAX_JSONL_LINE_BYTES = 1 << 20
"""Longest line (1 MiB) a JSONL task may have: a longer one is refused before it is decoded or
tokenised (a 50 MB prompt would otherwise be read, rendered and tokenised before any length check)."""
MAX_FIELD_CHARS = 1 << 20
"""Longest prompt or answer (characters) a row of any data task may have."""
ANSWER_FORMATS = ("raw", "gsm8k", "boxed")
MAPPING_DEFAULTS: dict[str, Any] = {"prompt": "prompt", "answer": "answer", "extra": None,
                                    "answer_format": "raw", "answer_regex": None}
RESERVED = ("prompts", "completions", "answers", "response_lengths")
"""Keyword arguments every reward function already gets: an extra of that name would shadow one."""

Record = tuple[str, str, dict[str, Any]]


def _describe(value: Any) -> str:
    """``int 5``, ``list ['a']``; ``null`` for a missing value (a table's null, JSON's null)."""
    return "null" if value is None else f"{type(value).__name__} {short_repr(value)}"


def _column_name(task: str, param: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise bad_value(f"{task}.{param}", value, "a column name (a non-empty string)")
    return value


def _placeholders(task: str, template: str) -> tuple[str, ...]:
    """The ``{column}`` names of a prompt template, or a one-line error for a malformed one."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise bad_value(f"{task}.prompt", template, f"a column name or a template of {{column}} "
                        f"placeholders ({e}; write {{{{ and }}}} for literal braces)") from None
    for f in fields:
        if not f or f.isdigit() or any(c in f for c in ".[]"):
            raise bad_value(f"{task}.prompt", template, f"{{column}} placeholders naming columns, not {{{f}}} "
                            "(no positional, attribute or index fields)")
    return tuple(dict.fromkeys(fields))


def _jsonable(dtype: Any) -> bool:
    """Whether a polars column of ``dtype`` yields JSON-able Python values (extras are checkpointed)."""
    if dtype in (pl.String, pl.Boolean, pl.Null, pl.Categorical, pl.Enum):
        return True
    if dtype.is_numeric():
        return not dtype.is_decimal()  # Decimal becomes decimal.Decimal, which json cannot write
    if isinstance(dtype, (pl.List, pl.Array)):
        return _jsonable(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return all(_jsonable(f.dtype) for f in dtype.fields)
    return False


# answer_format -> (final-answer extractor, what a text without one lacks)
_EXTRACTORS = {"gsm8k": (after_hashes, "'#### <final answer>'"), "boxed": (last_boxed, "closed \\boxed{...}")}

@dataclass(frozen=True)
class FieldMapping:
    """How a row becomes a record (module docstring). Build it with ``from_params``."""

    task: str
    prompt: str
    placeholders: tuple[str, ...]  # () when ``prompt`` is a column name
    answer: str
    extra: tuple[str, ...] | None
    answer_format: str
    answer_regex: re.Pattern | None

    @classmethod
    def from_params(cls, task: str, params: dict[str, Any]) -> "FieldMapping":
        prompt = _column_name(task, "prompt", params["prompt"])
        placeholders = _placeholders(task, prompt) if "{" in prompt or "}" in prompt else ()
        answer = _column_name(task, "answer", params["answer"])
        extra = params["extra"]
        if extra is not None:
            if not isinstance(extra, (list, tuple)) or not all(isinstance(c, str) and c for c in extra) \
                    or len(set(extra)) != len(extra):
                raise bad_value(f"{task}.extra", extra, "None (every other column) or a list of distinct column names")
            clash = [c for c in extra if c in RESERVED]
            if clash:
                raise bad_value(f"{task}.extra", extra, f"column names other than {', '.join(RESERVED)} "
                                "(reward functions already get those)")
            extra = tuple(extra)
        fmt, pattern = params["answer_format"], params["answer_regex"]
        if fmt not in ANSWER_FORMATS:
            raise bad_value(f"{task}.answer_format", fmt, " | ".join(ANSWER_FORMATS))
        regex = None
        if pattern is not None:
            if fmt != "raw":
                raise bad_value(f"{task}.answer_regex", pattern, f"None with answer_format={fmt!r} (give one of the two)")
            if not isinstance(pattern, str) or not pattern:
                raise bad_value(f"{task}.answer_regex", pattern, "a regular expression (a non-empty string)")
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise bad_value(f"{task}.answer_regex", pattern, f"a valid regular expression ({e})") from None
            if regex.groups > 1:
                raise bad_value(f"{task}.answer_regex", pattern, "a regex with at most one capturing group")
        return cls(task, prompt, placeholders, answer, extra, fmt, regex)

    @property
    def used(self) -> tuple[str, ...]:
        """The columns the prompt and the answer are read from."""
        return tuple(dict.fromkeys([*(self.placeholders or (self.prompt,)), self.answer]))

    def extra_columns(self, schema: dict[str, Any], where: str) -> list[str]:
        """The extra columns of a table with ``schema`` (after ``check_columns``)."""
        if self.extra is None:
            others = [c for c, dtype in schema.items() if c not in self.used and _jsonable(dtype)]
            clash = [c for c in others if c in RESERVED]
            if clash:
                raise WorkbenchError(f"{where}: column {clash[0]!r} would shadow a reward argument "
                                     f"({', '.join(RESERVED)}); set {self.task}.extra to the columns to keep")
            return others
        for c in self.extra:
            if not _jsonable(schema[c]):
                raise bad_value(f"{self.task}.extra", list(self.extra), f"JSON-able columns: {where} column {c!r} "
                                f"is {schema[c]} (extras are saved in checkpoints as JSON)")
        return list(self.extra)

    def check_columns(self, columns: list[str], where: str) -> None:
        """Every mapped column exists in a table with ``columns``, else a one-line error listing them."""
        wanted = [("prompt", self.prompt, c) for c in self.placeholders or (self.prompt,)]
        wanted += [("answer", self.answer, self.answer)] + [("extra", list(self.extra), c) for c in self.extra or ()]
        for param, value, column in wanted:
            if column not in columns:
                raise bad_value(f"{self.task}.{param}", value, f"a column of {where}, which has no {column!r}; "
                                f"its columns are: {', '.join(columns) or '(none)'}")

    def record(self, row: dict[str, Any], where: str, extra: list[str] | None = None) -> Record:
        """The record of one row; ``extra`` None: every key not used (a JSONL line's own keys)."""
        keys = [*self.used, *(self.extra or ())]
        for key in keys:
            if key not in row:
                raise WorkbenchError(f"{where}: missing {key!r} (keys: {', '.join(row) or 'none'})")
        if self.placeholders:
            values = {}
            for key in self.placeholders:
                v = row[key]
                if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                    raise WorkbenchError(f"{where}: {key!r} (in the prompt template) must be a string or a number, "
                                         f"got {_describe(v)}")
                values[key] = v
            prompt = self.prompt.format_map(values)
        else:
            prompt = self._string(row, self.prompt, where)
        if not prompt.strip():
            raise WorkbenchError(f"{where}: empty prompt ({self.task}.prompt={self.prompt!r})")
        answer = self._final_answer(self._string(row, self.answer, where), where)
        for name, text in (("prompt", prompt), ("answer", answer)):
            if len(text) > MAX_FIELD_CHARS:
                raise WorkbenchError(f"{where}: {name} longer than {MAX_FIELD_CHARS} characters (MAX_FIELD_CHARS)")
        if extra is None and self.extra is None:
            extra = [k for k in row if k not in self.used]
            clash = [k for k in extra if k in RESERVED]
            if clash:
                raise WorkbenchError(f"{where}: field {clash[0]!r} would shadow a reward argument "
                                     f"({', '.join(RESERVED)}); rename it or set {self.task}.extra")
        return prompt, answer, {k: row[k] for k in (self.extra if extra is None else extra)}

    @staticmethod
    def _string(row: dict[str, Any], key: str, where: str) -> str:
        v = row[key]
        if not isinstance(v, str):
            raise WorkbenchError(f"{where}: {key!r} must be a string, got {_describe(v)}")
        return v

    def _final_answer(self, text: str, where: str) -> str:
        field = f"{where}: {self.answer!r}"
        if self.answer_regex is not None:
            matches = list(self.answer_regex.finditer(text))
            found = matches[-1].group(self.answer_regex.groups) if matches else None
            if found is None:
                raise WorkbenchError(f"{field} does not match answer_regex={self.answer_regex.pattern!r} "
                                     f"({short_repr(text, 80)})")
            text = found
        elif self.answer_format in _EXTRACTORS:
            extract, missing = _EXTRACTORS[self.answer_format]
            found = extract(text)
            if found is None:
                raise WorkbenchError(f"{field} has no {missing} (answer_format={self.answer_format!r}): "
                                     f"{short_repr(text, 80)}")
            text = found
        if not text.strip():
            raise WorkbenchError(f"{field}: empty answer (answer_format={self.answer_format!r})")
        return text.strip() if self.answer_format != "raw" or self.answer_regex is not None else text


# ------------------------------------------------------------------------------------ sources
def check_path(task: str, value: Any, what: str) -> Path:
    """``value`` as a Path, or a one-line error (it is checked to exist by the reader)."""
    if not isinstance(value, (str, Path)) or not str(value) or "\0" in str(value):
        raise bad_value(f"{task}.path", value, f"the path of {what}")
    return Path(value)


def jsonl_records(path: Path, mapping: FieldMapping) -> list[Record]:
    """The records of a JSONL task file: one object per non-blank line, UTF-8, lines at most
    ``MAX_JSONL_LINE_BYTES`` long."""
    task = mapping.task
    if not path.is_file():
        raise WorkbenchError(f"{task}.path={str(path)!r} is invalid: no such file")
    try:
        fh = path.open("rb")
    except OSError as e:
        raise WorkbenchError(f"{task}.path={str(path)!r} is invalid: cannot read it ({e.strerror})") from None
    out = []
    with fh:
        for lineno, line in enumerate(_lines(fh, path), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            obj = parse_json(line, where, "bad JSON")
            if not isinstance(obj, dict):
                raise WorkbenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            out.append(mapping.record(obj, where))
    if not out:
        raise WorkbenchError(f"{task}.path={str(path)!r} is invalid: the file has no examples")
    return out


def _lines(fh: BinaryIO, path: Path) -> Iterator[str]:
    """The decoded lines of a binary file, each refused (with its number) when it is longer than
    ``MAX_JSONL_LINE_BYTES`` or not UTF-8; at most that many bytes of a line are ever read at once."""
    lineno = 0
    while True:
        raw = fh.readline(MAX_JSONL_LINE_BYTES + 2)  # + "\r\n"
        if not raw:
            return
        lineno += 1
        if len(raw.rstrip(b"\n").rstrip(b"\r")) > MAX_JSONL_LINE_BYTES:
            raise WorkbenchError(f"{path}:{lineno}: line longer than {MAX_JSONL_LINE_BYTES} bytes "
                                 f"(MAX_JSONL_LINE_BYTES); shorten the prompt or answer")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WorkbenchError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                 "of the line)") from None


def read_parquet(path: Path, task: str) -> pl.DataFrame:
    """A parquet file as a polars DataFrame, or a one-line error naming it."""
    if not path.is_file():
        raise WorkbenchError(f"{task}.path={str(path)!r} is invalid: no such file")
    try:
        return pl.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - polars raises several kinds (ComputeError, OSError, ...) for a bad file
        raise WorkbenchError(f"{task}.path={str(path)!r} is invalid: not a readable parquet file "
                             f"({short_repr(one_line(e), 160)})") from None


def frame_records(df: pl.DataFrame, mapping: FieldMapping, where: str) -> list[Record]:
    """The records of a table (a parquet file, a split of a saved dataset), rows counted from 0."""
    mapping.check_columns(df.columns, where)
    extra = mapping.extra_columns(dict(df.schema), where)
    table = df.select(list(dict.fromkeys([*mapping.used, *extra])))
    out = [mapping.record(row, f"{where} row {i}", extra) for i, row in enumerate(table.iter_rows(named=True))]
    if not out:
        raise WorkbenchError(f"{mapping.task}.path={where!r} is invalid: it has no rows")
    return out


__all__ = ["ANSWER_FORMATS", "FieldMapping", "MAPPING_DEFAULTS", "MAX_FIELD_CHARS", "MAX_JSONL_LINE_BYTES",
           "RESERVED", "Record", "check_path", "frame_records", "jsonl_records", "read_parquet"]
