"""How busy the machine is with *other* work while a timed test runs, for the checks of the times the
notebooks state (they are for idle cores).

``Contention`` samples, every ``interval`` seconds in a daemon thread, the threads of every process
that are runnable (state R in ``/proc/<pid>/task/<tid>/stat``) at normal or higher priority (nice
<= 0): work at a lower priority (``nice``) takes a core only when nothing else wants it, so it does
not stretch the measurement. ``factor()`` is the mean count over the cores, at least 1: the timed
notebook's own threads keep the cores busy (about the core count), and each further runnable thread
stretches the wall time by about 1 / cores. Without ``/proc`` (not Linux) it is 1.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PROC = Path("/proc")


def runnable_threads() -> int:
    """Runnable threads at nice <= 0, over all processes (fields 3 and 19 of ``stat``: state, nice)."""
    count = 0
    for task in PROC.glob("[0-9]*/task/[0-9]*/stat"):
        try:
            fields = task.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread exited between the listing and the read
            continue
        if fields[0] == "R" and int(fields[16]) <= 0:
            count += 1
    return count


class Contention:
    """A sampler of ``runnable_threads`` (module docstring); ``start`` / ``stop`` / ``factor``."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(runnable_threads() - 1)  # not this sampler itself

    def start(self) -> "Contention":
        if PROC.is_dir():
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def factor(self) -> float:
        if not self.samples:
            return 1.0
        return max(1.0, sum(self.samples) / len(self.samples) / (os.cpu_count() or 1))


CURRENT: list[Contention] = []  # the meter of the test that is running (the ``contention`` fixture)


# The machine the notebooks' stated times were measured on ran a fresh ``import workbench.notebook``
# in about 4.5 s (4.7 s measured with other work on its cores). A machine that runs it in 1.9 s ran
# every notebook at CI size 1.8-3.4x faster (median 2.3x): a notebook's CI execution is mostly such
# fixed cost (kernel start, imports), so the import is the yardstick between machines.
REFERENCE_IMPORT_SECONDS = 4.5


def import_seconds(repeats: int = 3) -> float:
    """The fastest of ``repeats`` wall times of ``python -c "import workbench.notebook"`` in a fresh
    interpreter (the fastest: a cold disk cache or a passing job only slows a run down)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import workbench.notebook"], check=True, env=os.environ.copy())
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def speed_factor() -> float:
    """How many times slower than the reference machine this one is (< 1: faster), from
    ``import_seconds``; measured once per test session."""
    return import_seconds() / REFERENCE_IMPORT_SECONDS
