"""Whole-file writes shared by the run directory, the metrics log and the charts.

Every file a run writes gets the mode a plain ``open(path, "w")`` would give it: 0o666 minus the
process umask (directories 0o777 minus it). Temp files (``tempfile.mkstemp``: 0o600) and files some
libraries create themselves (safetensors: 0o600) are set to that mode before they are renamed into
place, so a finished run directory does not mix 0o600 and 0o644 files and a group-readable umask
works for all of them.

A full disk is the one write failure a user can act on without a traceback: ``disk_full`` turns it
into a one-line ``WorkbenchError`` after the caller has removed its temp file, so the previous
complete file stays the one on disk.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, IO

from workbench.errors import WorkbenchError

# what ``mkstemp(prefix=".<name>.")`` leaves behind when a process is killed mid-write
TEMP_FILE = re.compile(r"^\.[^.].*\.[a-z0-9_]{8}$")


def umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread, briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, or a library error that wraps it (safetensors' Rust writer reports ``StorageFull``)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def disk_full(path: Path) -> WorkbenchError:
    return WorkbenchError(f"disk full while writing {path}: the previous complete files are kept")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """``write(file)`` into a temp file beside ``path``, fsync, chmod, rename over ``path``: all or
    nothing. A full disk is a one-line error with the temp file removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        remove(Path(tmp))
        if is_disk_full(e):
            raise disk_full(path) from None
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def remove(path: Path) -> None:
    """Delete a file or a folder tree; absent is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def temp_leftovers(folder: Path) -> list[Path]:
    """Temp files of interrupted atomic writes directly in ``folder``."""
    try:
        return [p for p in folder.iterdir() if TEMP_FILE.match(p.name) and p.is_file()]
    except FileNotFoundError:
        return []
