"""Run ``Run.step()`` in a background thread so the kernel stays free for widget changes.

    trainer = BackgroundTrainer(run)
    trainer.start(until=300)   # returns at once; updates run in a daemon thread
    trainer.pause()            # stops after the update in progress
    trainer.step()             # exactly one more update (when paused)
    trainer.wait()             # block until the thread is idle (scripts and tests only)

Knob changes (``run.knobs.set``) may be made from any thread at any time: the loop takes them at
the start of the next update (``Knobs`` is locked). Exceptions from an update stop the thread and
are kept in ``error`` (the panel shows them); nothing is raised into the widget callbacks.

**Interrupts.** ``interrupt()`` stops after the update in progress and writes a checkpoint (the
run can be resumed, in this kernel or with ``python -m workbench resume``); ``stop()`` (the
panel's ``close``) does the same and waits. A kernel interrupt (SIGINT) interrupts every running
trainer: starting one from the main thread chains a handler in front of the one in place. In an
ipykernel that is the idle handler the kernel restores after each cell (``saved_sigint_handler``):
while a cell runs, the interrupt is that cell's ``KeyboardInterrupt`` as usual, and ``wait()``
turns it into an interrupt of the trainer it waits on. Updates are never cut in half: a checkpoint
is only consistent between updates.
"""

from __future__ import annotations

import signal
import sys
import threading
import weakref
from typing import Any, Callable

_TRAINERS: "weakref.WeakSet[BackgroundTrainer]" = weakref.WeakSet()  # what a kernel interrupt stops
_hooked = False


class BackgroundTrainer:
    """One worker thread at a time driving ``run.step()`` until a target policy version."""

    def __init__(self, run, on_state: Callable[[str], None] | None = None):
        self.run = run
        self.on_state = on_state
        self.error: BaseException | None = None
        self.target: int = run.config.steps
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held while an update runs (reset waits on it)
        self._state = "idle"
        self._save_on_stop = False  # interrupt(): the worker writes a checkpoint when it stops
        self._saved_version = -1
        _TRAINERS.add(self)

    # ---------------------------------------------------------------- state
    @property
    def state(self) -> str:
        """idle | running | paused | done | error"""
        return self._state

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _set_state(self, state: str) -> None:
        self._state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # a display callback never kills training
                pass

    # ---------------------------------------------------------------- commands
    def start(self, until: int | None = None) -> bool:
        """Run updates until ``policy_version == until`` (default: the current target). False if busy."""
        if until is not None:
            self.target = int(until)
        if self.running or self.run.version >= self.target:
            if not self.running:
                self._set_state("done")
            return False
        self._launch(self.target)
        return True

    resume = start

    def step(self, n: int = 1) -> bool:
        """Run exactly ``n`` more updates in the thread. False (nothing done) while running."""
        if self.running:
            return False
        self._launch(self.run.version + int(n))
        return True

    def pause(self) -> None:
        """Stop after the update in progress (returns at once; ``wait`` blocks until idle)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker is idle; True if it is. Re-raises nothing (see ``error``)."""
        t = self._thread
        if t is not None:
            try:
                t.join(timeout)
            except KeyboardInterrupt:  # the kernel interrupted this wait: stop training cleanly too
                self.interrupt()
                t.join()
                raise
        return not self.running

    def interrupt(self) -> None:
        """Stop after the update in progress and write a checkpoint (returns at once; signal-safe)."""
        self._save_on_stop = True
        self._stop.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop after the update in progress, wait, and checkpoint the updates since the last one."""
        self.interrupt()
        idle = self.wait(timeout)
        if idle:
            self.save_checkpoint()
        return idle

    def save_checkpoint(self) -> None:
        """A checkpoint of the run's current version unless one was written for it (never mid-update)."""
        run = self.run
        with self._lock:
            cfg = run.config
            written = cfg.checkpoint_every and run.version % cfg.checkpoint_every == 0  # by the loop
            if run.dir is None or run.version == 0 or written or self._saved_version == run.version:
                return
            run.save_checkpoint()
            self._saved_version = run.version

    # ---------------------------------------------------------------- worker
    def _launch(self, until: int) -> None:
        _hook_interrupts()
        self._stop.clear()
        self._save_on_stop = False
        self.error = None
        self._thread = threading.Thread(target=self._work, args=(until,), name="workbench-trainer", daemon=True)
        self._set_state("running")
        self._thread.start()

    def _work(self, until: int) -> None:
        try:
            while self.run.version < until and not self._stop.is_set():
                with self._lock:
                    self.run.step()
        except BaseException as e:  # noqa: BLE001  (shown in the panel's status line)
            self.error = e
            self._set_state("error")
            return
        if self._save_on_stop:
            try:
                self.save_checkpoint()
            except Exception as e:  # noqa: BLE001  (shown in the panel's status line)
                self.error = e
                self._set_state("error")
                return
        if self.run.version >= self.target:
            self._set_state("done")
        else:
            self._set_state("paused")

    def info(self) -> dict[str, Any]:
        return {"state": self.state, "version": self.run.version, "target": self.target,
                "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}"}


def _hook_interrupts() -> None:
    """Once per process, from the main thread: SIGINT interrupts every running trainer, then does
    what the handler it displaced did (raise ``KeyboardInterrupt``, or nothing in an idle kernel)."""
    global _hooked
    if _hooked or threading.current_thread() is not threading.main_thread():
        return
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    kernel = getattr(shell, "kernel", None)
    if kernel is not None and hasattr(kernel, "saved_sigint_handler"):
        kernel.saved_sigint_handler = _chained(kernel.saved_sigint_handler)  # restored after this cell
    else:
        signal.signal(signal.SIGINT, _chained(signal.getsignal(signal.SIGINT)))
    _hooked = True


def _chained(previous: Any) -> Callable[[int, Any], None]:
    def on_sigint(signum: int, frame: Any) -> None:
        for trainer in list(_TRAINERS):
            if trainer.running:
                trainer.interrupt()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.default_int_handler(signum, frame)
    return on_sigint


__all__ = ["BackgroundTrainer"]
