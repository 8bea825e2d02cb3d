"""One writer per run directory: the lock file ``<run dir>/run.lock``.

Why: two processes writing one run directory (two runs started with the same ``--run-name``, or a
resume of a run that is still training) interleave metrics rows and checkpoints, and each would move
or truncate what the other wrote; both would exit 0 with a damaged result. So a ``Run`` takes this
lock when it opens its directory for writing (a new run or a resume) and a second writer stops at
once with a one-line error naming the holder.

The file is JSON: ``{"pid", "host", "since", "token", "pid_start"}``, created with
``O_CREAT | O_EXCL`` (atomic: of two processes exactly one creates it). It is removed by
``RunLock.release``: ``Run.close()``, the run object being garbage-collected, or interpreter exit
(``atexit``). A lock whose holder died without releasing is stale:

- same host, the pid is not running (or is a zombie, or a new process reused the pid): taken over
  with a one-line notice;
- another host: its liveness cannot be checked, so the lock is taken over only when its file was not
  refreshed for ``FOREIGN_STALE_AFTER`` seconds (24 h; the holder refreshes it at most once a minute
  while it appends rows); before that the error says how to remove it.

Within one process the lock guards against other processes only: a new ``Run`` on a folder this
process holds (a resume of a run object that is still around, a rerun of a notebook cell) takes it
over, and the earlier object is revoked: its next write is a one-line error instead of a mixed
folder.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.runs.files import file_mode

LOCK_FILE = "run.lock"
FOREIGN_STALE_AFTER = 24 * 3600.0  # seconds without a refresh before another host's lock is stale
REFRESH_EVERY = 60.0  # seconds between mtime refreshes of a held lock
_CREATING_GRACE = 5.0  # an empty or unreadable lock this young is being written: wait for it

_HELD: dict[str, "RunLock"] = {}  # resolved run dir -> the lock object of this process that owns it
# reentrant: a Run collected by the GC releases its lock from a weakref finalizer, which can run in this
# same thread while it holds the guard (inside acquire), and a plain Lock would deadlock there
_GUARD = threading.RLock()


class RunLock:
    """The lock of one run directory, held by this process (``acquire``; ``release`` is idempotent)."""

    def __init__(self, run_dir: Path, info: dict[str, Any]):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.info = info
        self.revoked = False  # another RunLock of this process took the folder over
        self.released = False
        self._touched = time.time()

    @classmethod
    def acquire(cls, run_dir: str | Path, log: Callable[[str], None] = print) -> "RunLock":
        """Create the lock file, take over a stale one, or raise naming the live holder."""
        run_dir = Path(run_dir)
        key = _key(run_dir)
        with _GUARD:
            for attempt in range(50):
                info = _new_info()
                if _create(run_dir / LOCK_FILE, info):
                    return cls._own(run_dir, key, info)
                other = read_holder(run_dir)
                if other is None:  # removed meanwhile, being written, or damaged
                    if not (run_dir / LOCK_FILE).exists():
                        continue
                    if _young(run_dir / LOCK_FILE):
                        time.sleep(0.1)
                    elif _break(run_dir, None):
                        log(f"run directory {run_dir}: removed an unreadable lock file {LOCK_FILE}")
                    continue
                if _ours(other):
                    prev = _HELD.get(key)
                    if prev is not None:
                        prev._revoke()
                    info = dict(other)  # the file stays: ownership moves to the new object
                    return cls._own(run_dir, key, info)
                reason = stale_reason(other, run_dir)
                if reason is None:
                    raise in_use(run_dir, other)
                if _break(run_dir, other):
                    log(f"run directory {run_dir}: took over the lock of {describe(other)} ({reason})")
            raise WorkbenchError(f"run directory {run_dir}: could not take {LOCK_FILE} after 50 attempts: "
                                 f"expected one writer")

    @classmethod
    def _own(cls, run_dir: Path, key: str, info: dict[str, Any]) -> "RunLock":
        lock = cls(run_dir, info)
        _HELD[key] = lock
        return lock

    @property
    def active(self) -> bool:
        return not (self.revoked or self.released)

    def check(self) -> None:
        """Raise when this object no longer owns the folder (it must not write there)."""
        if self.revoked:
            raise WorkbenchError(f"run directory {self.run_dir} is now written by a newer Run of this process "
                                 f"(a resume, or a new Run with the same run_name): this Run no longer writes there")
        if self.released:
            raise WorkbenchError(f"run directory {self.run_dir} was closed (Run.close()): this Run no longer "
                                 f"writes there; Run.resume({str(self.run_dir)!r}) continues it")

    def refresh(self) -> None:
        """Touch the lock file (at most every ``REFRESH_EVERY`` s): another host sees the run is live."""
        now = time.time()
        if self.active and now - self._touched >= REFRESH_EVERY:
            self._touched = now
            try:
                os.utime(self.path)
            except OSError:
                pass

    def moved(self, new_dir: Path) -> None:
        """The folder was renamed while held (``keep_previous``): follow it, so ``release`` finds it."""
        with _GUARD:
            if _HELD.get(_key(self.run_dir)) is self:
                del _HELD[_key(self.run_dir)]
            self.run_dir, self.path = Path(new_dir), Path(new_dir) / LOCK_FILE
            _HELD[_key(self.run_dir)] = self

    def release(self) -> None:
        """Remove the lock file if this object still owns it; safe to call twice, and at exit."""
        with _GUARD:
            if not self.active or self.info.get("pid") != os.getpid():  # a forked child never releases
                self.released = True
                return
            self.released = True
            if _HELD.get(_key(self.run_dir)) is self:
                del _HELD[_key(self.run_dir)]
            current = read_holder(self.run_dir)
            if current is not None and current.get("token") == self.info.get("token"):
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass

    def _revoke(self) -> None:
        self.revoked = True


def read_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The lock file's content, or None when there is none (or it is unreadable)."""
    try:
        info = json.loads((Path(run_dir) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(info, dict) and isinstance(info.get("pid"), int) and isinstance(info.get("host"), str)):
        return None
    return info


def check_free(run_dir: str | Path) -> None:
    """Raise at once when another live process holds ``run_dir`` (before a resume builds anything)."""
    other = read_holder(run_dir)
    if other is not None and not _ours(other) and stale_reason(other, Path(run_dir)) is None:
        raise in_use(Path(run_dir), other)


def is_locked(run_dir: str | Path) -> bool:
    return (Path(run_dir) / LOCK_FILE).exists()


def stale_reason(info: dict[str, Any], run_dir: Path) -> str | None:
    """Why the holder is gone, or None while it may be running."""
    if info.get("host") == socket.gethostname():
        pid = info["pid"]
        if not _alive(pid):
            return f"pid {pid} is not running"
        start = info.get("pid_start")
        if start is not None and _proc_start(pid) not in (None, start):
            return f"pid {pid} is now another process"
        return None
    try:
        age = time.time() - (run_dir / LOCK_FILE).stat().st_mtime
    except OSError:
        return "the lock file is gone"
    if age > FOREIGN_STALE_AFTER:
        return f"not refreshed for {age / 3600:.0f} h"
    return None


def describe(info: dict[str, Any]) -> str:
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {info.get('pid')} on {info.get('host')} since {when}"


def in_use(run_dir: Path, info: dict[str, Any]) -> WorkbenchError:
    where = ("stop it (in a notebook: run.close())" if info.get("host") == socket.gethostname() else
             f"it is on another host: its lock counts as stale after {FOREIGN_STALE_AFTER / 3600:.0f} h "
             f"without an update")
    return WorkbenchError(f"run directory {run_dir} is in use by {describe(info)}: wait for it to finish or "
                          f"{where}; if that process is gone, remove {run_dir / LOCK_FILE}")


# ------------------------------------------------------------------------------ helpers
def _key(run_dir: Path) -> str:
    return str(run_dir.resolve())


def _new_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "token": uuid.uuid4().hex, "pid_start": _proc_start(os.getpid())}


def _ours(info: dict[str, Any]) -> bool:
    return info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()


def _create(path: Path, info: dict[str, Any]) -> bool:
    """Atomically create the lock file holding ``info``; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, file_mode())
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _break(run_dir: Path, expected: dict[str, Any] | None) -> bool:
    """Remove a stale lock file, only if it still holds ``expected`` (None: unreadable). A second
    file created with O_EXCL makes this one process at a time, so a lock that a faster process just
    created is never removed."""
    breaker = run_dir / f"{LOCK_FILE}.break"
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, file_mode())
    except FileExistsError:
        if not _young(breaker):  # left by a process killed while breaking
            breaker.unlink(missing_ok=True)
        else:
            time.sleep(0.1)
        return False
    os.close(fd)
    try:
        current = read_holder(run_dir)
        same = (current is None and expected is None) or (
            current is not None and expected is not None and current.get("token") == expected.get("token")
            and current.get("pid") == expected.get("pid"))
        if same:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
        return same
    finally:
        breaker.unlink(missing_ok=True)


def _young(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < _CREATING_GRACE
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"  # a zombie has exited


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None off Linux."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _proc_start(pid: int) -> str | None:
    """The process start time in clock ticks since boot: with the pid, it names one process."""
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()
