"""A run's metrics on disk: one row per update, appended at the same cost at any run length.

    metrics.parquet                 the compacted rows (the base); every row once a run's ``run()`` ends
    metrics.parts/<a>-<b>.parquet   rows a..b-1: sealed from the tail every ``segment_rows`` rows
    metrics.tail.jsonl              the latest rows: a header {"metrics_tail": 1, "start": a},
                                    then one JSON object per update (row a, a+1, ...)

Why: rewriting one parquet file of all rows after every update costs O(rows) per update, quadratic
over a run. Here an update appends one line; every ``segment_rows`` lines become one immutable part
(O(segment_rows), so O(1) per update amortised), which keeps the JSON tail short and reading fast.
Parts and tail are folded into ``metrics.parquet`` (O(rows), once) when a run ends (``RunDir.write_summary``)
(``RunDir.write_summary``: the end of ``Run.run``, the CLI, ``ControlPanel.finish``), so a finished
run holds a single ``metrics.parquet``.

Crash consistency, with a kill -9 at any moment. The rows are the base, then each part that starts
where the rows so far end, then the tail if its ``start`` is where they end (the chain):
- a tail line counts only when complete (newline-terminated, parses to an object), and reading stops
  at the first line that is not, so a reader gets whole rows, a prefix of the updates;
- files are replaced atomically (temp file, fsync, rename), and every change writes the new file
  first, then removes what it replaces: a file left over by an interrupted seal, compaction or resume
  no longer chains (its rows are in the new file, or were dropped), so no row appears twice;
- opening the log for writing deletes temp files and files that do not chain, and cuts a torn line.
Values: tail rows (and a part's rows, when sealed) go through ``pl.from_dicts(rows,
infer_schema_length=None)``, the call ``Run.metrics`` makes, on the same Python values (JSON
round-trips ints, floats including nan/inf, strings, bools and None exactly); the pieces are joined
with ``pl.concat(how="diagonal_relaxed")``. A damaged file (not a crash leftover) is a one-line error.
One writer per run directory (thread-safe within it); any number of readers, at any moment.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from workbench.errors import WorkbenchError
from workbench.runs.files import atomic_write

BASE = "metrics.parquet"
PARTS = "metrics.parts"
TAIL = "metrics.tail.jsonl"
SEGMENT_ROWS = 512  # a seal costs ~ a 512-row parquet write; 100,000 rows are ~200 parts
_HEADER = "metrics_tail"
_PART = re.compile(r"^(\d+)-(\d+)\.parquet$")
_TEMP_PREFIXES = (f".{BASE}.", f".{TAIL}.")


@dataclass(frozen=True)
class _Tail:
    """A scan of the tail file. ``ends[i]``: byte offset just past line ``i`` (line 0 is the header),
    so ``ends[-1]`` is where the valid prefix ends; ``size``: the file's length."""
    state: str  # "missing" | "stale" (torn header, or it does not chain) | "live"
    rows: list[dict[str, Any]] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    size: int = 0


@dataclass(frozen=True)
class _Chain:
    """The parts that extend a base of ``base_rows`` rows, in order, and those that do not."""
    parts: tuple[tuple[int, int, Path], ...]  # (first row, end row, file)
    stale: tuple[tuple[int, int, Path], ...]
    end: int  # rows before the tail


def read_metrics(run_dir: str | Path) -> pl.DataFrame:
    """Every complete row of a run (live, finished or crashed), as one DataFrame."""
    for _ in range(10):
        try:
            return _read(Path(run_dir))
        except FileNotFoundError:  # a part removed by a compaction since it was listed: read again
            continue
    raise WorkbenchError(f"run_dir={str(run_dir)!r} changed during 10 reads of its metrics: expected one writer")


def rows_problem(df: pl.DataFrame) -> str | None:
    """What is wrong with a run's rows (``read_metrics``): row i is the row of update i, for every i."""
    if not df.height:
        return None
    if "update" not in df.columns or not df["update"].dtype.is_integer():
        return f"no integer 'update' column (columns: {', '.join(df.columns[:8])}{', ...' if df.width > 8 else ''})"
    for i, update in enumerate(df["update"].to_list()):
        if update != i:
            return f"row {i} is of update {update}, expected {i} (one row per update, in order)"
    return None


class MetricsLog:
    """The writer of one run directory's metrics: ``append`` a row, ``compact``, ``truncate``."""

    def __init__(self, run_dir: str | Path, segment_rows: int | None = None):
        segment_rows = SEGMENT_ROWS if segment_rows is None else segment_rows
        if segment_rows < 1:
            raise WorkbenchError(f"segment_rows={segment_rows} is invalid: expected >= 1")
        self.dir = Path(run_dir)
        self.segment_rows = segment_rows
        self._lock = threading.Lock()
        self._recover()

    @property
    def rows(self) -> int:
        """Rows on disk (base + parts + tail)."""
        return self._end + len(self._tail or ())

    def append(self, row: dict[str, Any]) -> None:
        """One line appended to the tail (the header first when the tail is new); every
        ``segment_rows`` rows the tail is sealed into a part. O(1) in the rows already written."""
        data = _encode(row)
        with self._lock:
            if self._tail is None:
                data = _header(self._end) + data
            with open(self.dir / TAIL, "ab", buffering=0) as f:  # unbuffered: nothing written after a failure
                start = f.tell()
                try:
                    view = memoryview(data)
                    while view:
                        view = view[f.write(view):]
                except BaseException:
                    f.truncate(start)  # never leave a torn line for the next append to extend
                    raise
            if self._tail is None:
                self._tail = []
            self._tail.append(dict(row))  # a copy: a hook may change the row after this
            if len(self._tail) >= self.segment_rows:
                self._seal()

    def compact(self) -> None:
        """Fold parts and tail into ``metrics.parquet`` (O(rows)); only that file remains."""
        with self._lock:
            if self._tail or self._end > self._base_rows:
                df = self._read_all()
                _write_parquet(df, self.dir / BASE)  # from here parts and tail do not chain
                self._base_rows = self._end = df.height
            self._remove_parts_and_tail()

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` rows of what ``read_metrics`` returns (a resume drops the updates
        after its checkpoint), as a new base: O(rows), once per resume. Interrupted at any point,
        the log reads as before, as after, or as before cut at or after ``rows``; never a row twice."""
        with self._lock:
            if not 0 <= rows <= self.rows:
                raise WorkbenchError(f"rows={rows} is invalid for {self.dir / BASE}: expected 0..{self.rows}")
            if rows == self.rows:
                return
            df = self._read_all().head(rows)
            # first what starts at or after `rows` (only dropped rows), or it could chain from the new base
            chain = _chain(self.dir, self._base_rows)
            for a, _, path in chain.parts + chain.stale:
                if a >= rows:
                    _unlink(path)
            if self._end >= rows:
                _unlink(self.dir / TAIL)
            _write_parquet(df, self.dir / BASE)
            self._base_rows = self._end = rows
            self._remove_parts_and_tail()

    def _read_all(self) -> pl.DataFrame:
        df = read_metrics(self.dir)
        if df.height != self.rows:  # never fold or cut what another writer left
            raise WorkbenchError(f"metrics in {str(self.dir)!r} hold {df.height} rows, this writer wrote "
                                 f"{self.rows}: expected one writer per run directory")
        return df

    def _seal(self) -> None:
        """The tail's rows (kept in memory: the values its lines hold) become a part."""
        end = self._end + len(self._tail)
        (self.dir / PARTS).mkdir(exist_ok=True)
        _write_parquet(_frame(self._tail), self.dir / PARTS / f"{self._end:09d}-{end:09d}.parquet")
        _unlink(self.dir / TAIL)  # it starts where the new part does: it no longer chains
        self._end, self._tail = end, None

    def _remove_parts_and_tail(self) -> None:
        _unlink(self.dir / TAIL)
        shutil.rmtree(self.dir / PARTS, ignore_errors=True)
        self._tail = None

    def _recover(self) -> None:
        for folder in (self.dir, self.dir / PARTS):
            for p in folder.glob(".*"):
                if folder != self.dir or p.name.startswith(_TEMP_PREFIXES):
                    _unlink(p)
        self._base_rows = _base_height(self.dir / BASE)
        chain = _chain(self.dir, self._base_rows)
        for _, _, path in chain.stale:
            _unlink(path)
        self._end = chain.end
        self._tail: list[dict[str, Any]] | None = None  # the tail's rows; None: no tail file
        tail = _scan_tail(self.dir / TAIL, self._end)
        if tail.state == "stale":
            _unlink(self.dir / TAIL)
        elif tail.state == "live":
            if tail.size > tail.ends[-1]:  # a torn or invalid end: cut it so appends extend whole rows
                os.truncate(self.dir / TAIL, tail.ends[-1])
            self._tail = tail.rows
            if len(self._tail) >= self.segment_rows:
                self._seal()


# ------------------------------------------------------------------------------ helpers
def _encode(row: dict[str, Any]) -> bytes:
    for k in row:
        if not isinstance(k, str):
            raise WorkbenchError(f"metrics column {k!r} is invalid: expected a str name")
    return (json.dumps(row, allow_nan=True, separators=(",", ":"), default=_reject) + "\n").encode()


def _reject(o: Any) -> Any:
    raise WorkbenchError(f"metrics value {o!r} ({type(o).__name__}) is invalid: expected a number, str, bool or None")


def _header(start: int) -> bytes:
    return (json.dumps({_HEADER: 1, "start": start}) + "\n").encode()


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.from_dicts(rows, infer_schema_length=None) if rows else pl.DataFrame()


def _read(run_dir: Path) -> pl.DataFrame:
    base = _read_parquet(run_dir / BASE) if (run_dir / BASE).exists() else pl.DataFrame()
    chain = _chain(run_dir, base.height)
    frames = [base] + [_read_parquet(path, b - a) for a, b, path in chain.parts]
    frames.append(_frame(_scan_tail(run_dir / TAIL, chain.end).rows))
    frames = [df for df in frames if df.height]
    if not frames:
        return pl.DataFrame()
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")


def _chain(run_dir: Path, base_rows: int) -> _Chain:
    parts = []
    for path in (run_dir / PARTS).glob("*.parquet"):
        m = _PART.match(path.name)
        if m:
            parts.append((int(m[1]), int(m[2]), path))
    chain, stale, end = [], [], base_rows
    for a, b, path in sorted(parts):
        if a == end and b > a:
            chain.append((a, b, path))
            end = b
        else:
            stale.append((a, b, path))
    return _Chain(tuple(chain), tuple(stale), end)


def _scan_tail(path: Path, start: int) -> _Tail:
    """The tail's valid prefix; stale when its header is torn or it does not start at ``start``."""
    try:
        data = path.read_bytes()  # one read: a concurrent append or rename cannot mix two states
    except FileNotFoundError:
        return _Tail("missing")
    rows: list[dict[str, Any]] = []
    ends: list[int] = []
    pos = 0
    while (nl := data.find(b"\n", pos)) >= 0:
        try:
            obj = json.loads(data[pos:nl])
        except ValueError:
            break
        if not isinstance(obj, dict):
            break
        if not ends:
            if obj.get(_HEADER) != 1 or obj.get("start") != start:
                break
        else:
            rows.append(obj)
        pos = nl + 1
        ends.append(pos)
    if not ends:
        return _Tail("stale", size=len(data))
    return _Tail("live", rows, ends, len(data))


def _read_parquet(path: Path, rows: int | None = None) -> pl.DataFrame:
    data = path.read_bytes()  # one read: the file may be replaced (renamed over) meanwhile
    try:
        df = pl.read_parquet(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - polars raises several kinds for a damaged file
        raise WorkbenchError(f"metrics={str(path)!r} is unreadable: {type(e).__name__}: {e}".splitlines()[0]) from None
    if rows is not None and df.height != rows:
        raise WorkbenchError(f"metrics={str(path)!r} is damaged: holds {df.height} rows, its name says {rows}")
    return df


def _base_height(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        return int(pl.scan_parquet(path).select(pl.len()).collect().item())  # the footer only
    except Exception as e:  # noqa: BLE001 - as in _read_parquet
        raise WorkbenchError(f"metrics={str(path)!r} is unreadable: {type(e).__name__}: {e}".splitlines()[0]) from None


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    atomic_write(path, df.write_parquet)  # temp file, fsync, umask mode, rename: all or nothing


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
