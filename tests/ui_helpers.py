"""Helpers shared by the control-panel tests (test_ui.py) and the notebook-02 replay test."""

from __future__ import annotations

import time


def wait_until(cond, timeout=30.0):
    """Poll ``cond`` every 5 ms; AssertionError after ``timeout`` seconds."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)


def scripted_session(panel, staleness: int, timeout: float = 60.0) -> None:
    """Start, move staleness while training runs, pause, switch objective to m2po, resume to the end:
    two knob events, one made while the thread trains and one while it is paused."""
    panel.start()
    wait_until(lambda: panel.run.version >= 2, timeout)
    panel.widgets["staleness"].value = staleness  # while the thread trains
    wait_until(lambda: panel.run.version >= 5, timeout)
    panel.pause()
    panel.wait(60)
    panel.widgets["objective"].value = "m2po"  # while paused
    panel.resume()
    panel.wait(60)
    panel.close()
