"""Stopping a run on SIGINT / SIGTERM: finish the update in progress, then checkpoint and return.

Why a flag and not an exception: a ``KeyboardInterrupt`` lands wherever the main thread happens to
be (inside a backward pass, halfway through a metrics row or a checkpoint), so what is on disk would
be whatever was half done. The handler here only records the request; the loop acts on it between
updates (``Run.request_stop``, checked by ``Run.run``), where weights, optimizer, buffer, RNG states
and the metrics log agree and a checkpoint resumes exactly. The update in progress finishes (its
optimizer step included: cutting it anywhere would leave those out of step), with one exception: a
sync generating many batches (the prefill of a long lag, possibly hours) stops after the batch being
generated and keeps the batches made, which is a consistent state too (``buffer.SyncStopped``). A
second signal exits at once.

    with StopSignals(lambda signum: run.request_stop()) as stop:
        run.run()
    if stop.signum is not None:
        ...                              # stopped: say how to resume, exit with stop.exit_code

While the context is open the first SIGINT or SIGTERM calls ``on_stop(signum)``; any later one
calls ``on_again(signum)`` (default: ``SystemExit`` with the conventional code 128 + signum, which
unwinds at once, running ``finally`` blocks, with no traceback). On exit the previous handlers are
restored. Handlers can only be installed from the main thread; elsewhere the context does nothing
(``active`` is False) and the caller's own stop request (a flag, an event) is the way to stop.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_now(signum: int) -> None:
    """The default second-signal action: unwind at once with the signal's exit code."""
    raise SystemExit(exit_code(signum))


class StopSignals:
    """Context manager: route ``signals`` to ``on_stop`` (first) and ``on_again`` (every later one)."""

    def __init__(self, on_stop: Callable[[int], Any], *, signals: tuple[int, ...] = STOP_SIGNALS,
                 on_again: Callable[[int], Any] | None = None):
        self.on_stop = on_stop
        self.on_again = on_again or exit_now
        self.signals = tuple(signals)
        self.signum: int | None = None  # the first signal received, None while none came
        self.active = False
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        """128 + the first signal (0 when none came)."""
        return exit_code(self.signum) if self.signum is not None else 0

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.active = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            self.on_stop(signum)
        else:
            self.on_again(signum)


__all__ = ["STOP_SIGNALS", "StopSignals", "exit_code", "exit_now", "signal_name"]
