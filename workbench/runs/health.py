"""Health warnings: conditions under which a run's numbers stop meaning what they seem to.

Checked after every update from the metrics row alone (so a resumed run, replaying its rows, sees
the same warnings). Each warning *starts* at the first update its condition holds and *ends* at the
first update it no longer does; both are events ``{"update", "code", "event": "start" | "end",
"message"}``, appended to ``<run dir>/health.jsonl``, announced in one line through the run's log
(the CLI's stderr) and shown as a banner in the notebook panel while active.

=====================  ==================================================================================
code                   condition at update k (row keys)
=====================  ==================================================================================
``collapse``           held-out accuracy below its start after a best that was above the start by
                       more than the 95% Wilson half-width of that best (so the rise was not noise):
                       "prosperity before collapse" (M2PO, arXiv:2510.01161) as it happens
``zero_variance``      over half of the groups have all-equal rewards (``reward/zero_var_group_frac``
                       > 0.5; it ends below 0.4): their advantages are 0, the batch teaches little
``truncation``         most of the batch's tokens are clipped, masked or truncated
                       (``offpolicy/clipfrac``, ``masked_frac``, ``truncated_frac`` > 0.5; ends < 0.4)
``initial_policy``     the lag is longer than the updates done (``knob/staleness`` > k > 0 and the
                       batch is k updates old): the run still trains on the initial policy's samples
``nonfinite``          the update was skipped for a non-finite loss or gradient
                       (``loss/skipped_nonfinite``)
=====================  ==================================================================================

Why from rows: the rows are the run's record, on disk and in memory alike; nothing here needs the
model, and the same function labels a finished run's ``metrics.parquet`` (``scan``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from workbench.stats import wilson_interval

HEALTH_FILE = "health.jsonl"
MAJORITY = 0.5  # "most of the batch" / "over half the groups": a warning starts above this ...
RECOVERED = 0.4  # ... and ends below this (a fraction hovering near 0.5 does not start one every update)
CODES = ("collapse", "zero_variance", "truncation", "initial_policy", "nonfinite")


def _num(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclass
class HealthMonitor:
    """Edge-triggered warnings over a run's rows (module docstring).

    ``eval_n``: problems per evaluation (the Wilson half-width of the collapse rule);
    ``initial_accuracy``: held-out accuracy before the first update; ``emit(event)``: called for
    every start and end. In a ``Run``: ``watch`` after every update, with ``log`` (one line per
    event) and ``journal`` (the ``RunDir``: ``health.jsonl``)."""

    eval_n: int
    initial_accuracy: float | None = None
    emit: Callable[[dict[str, Any]], None] | None = None
    log: Callable[[str], None] | None = None
    journal: Any = None
    active: dict[str, dict[str, Any]] = field(default_factory=dict)  # code -> its start event
    _best: tuple[int, float] | None = None  # (update, accuracy) of the best evaluation so far
    _watching: bool = False

    def watch(self, row: dict[str, Any], initial_accuracy: float | None, rows: list[dict[str, Any]]) -> None:
        """A run's update: the first time (fresh or resumed) replay the earlier ``rows`` and rewrite
        ``health.jsonl`` to exactly their events (a resume drops those of updates past its
        checkpoint); then check ``row`` (the last of ``rows``), logging and journalling its events."""
        if not self._watching:
            self._watching, self.initial_accuracy = True, initial_accuracy
            replayed = self.replay(rows[:-1])
            if self.journal is not None and (replayed or (self.journal.path / HEALTH_FILE).exists()):
                self.journal.rewrite_jsonl(HEALTH_FILE, replayed)
            self.emit = self._record
        self.observe(row)

    def _record(self, event: dict[str, Any]) -> None:
        if self.log is not None:
            self.log(log_line(event))
        if self.journal is not None:
            self.journal.append_jsonl(HEALTH_FILE, event)

    def observe(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Check one update's row; returns (and emits) the events it starts or ends."""
        k = int(row["update"])
        found = self._conditions(row)
        events = []
        for code in CODES:
            message = found.get(code)
            if message is not None and code not in self.active:
                events.append({"update": k, "code": code, "event": "start", "message": message})
                self.active[code] = events[-1]
            elif message is None and code in self.active and self._decided(code, row):
                events.append({"update": k, "code": code, "event": "end",
                               "message": f"{code} ended (it started at update {self.active[code]['update']})"})
                del self.active[code]
        for e in events:
            if self.emit is not None:
                self.emit(e)
        return events

    def replay(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rebuild the state from earlier rows (a resumed run); returns their events, not emitted."""
        emit, self.emit, events = self.emit, None, []
        try:
            for row in rows:
                events += self.observe(row)
        finally:
            self.emit = emit
        return events

    def banner(self) -> list[str]:
        """One line per active warning, oldest first: what the panel shows."""
        return [f"update {e['update']}: {e['message']}" for e in sorted(self.active.values(), key=lambda e: e["update"])]

    # -------------------------------------------------------------------------------- the rules
    def _decided(self, code: str, row: dict[str, Any]) -> bool:
        """Whether this row can end ``code``: collapse is only judged on rows with an evaluation."""
        return code != "collapse" or _num(row, "eval/accuracy") is not None

    def _conditions(self, row: dict[str, Any]) -> dict[str, str]:
        k, out = int(row["update"]), {}
        acc = _num(row, "eval/accuracy")
        if acc is not None:
            message = self._collapse(k, acc)
            if message is not None:
                out["collapse"] = message
            if self._best is None or acc > self._best[1]:
                self._best = (k, acc)
        elif "collapse" in self.active:
            out["collapse"] = self.active["collapse"]["message"]  # held until the next evaluation
        zv = _num(row, "reward/zero_var_group_frac")
        if zv is not None and zv > self._threshold("zero_variance"):
            out["zero_variance"] = (f"{100 * zv:.0f}% of the groups have all-equal rewards: their advantages "
                                    f"are 0 and they teach nothing (harder or easier prompts, a larger group_size)")
        silenced = {name: _num(row, f"offpolicy/{name}") for name in ("clipfrac", "masked_frac", "truncated_frac")}
        worst = max(((v, name) for name, v in silenced.items() if v is not None), default=None)
        if worst is not None and worst[0] > self._threshold("truncation"):
            out["truncation"] = (f"{100 * worst[0]:.0f}% of the batch's tokens are {_SILENCED[worst[1]]}: the "
                                 f"update learns from the few left (a wider clip range or less staleness)")
        lag, stale = _num(row, "knob/staleness"), _num(row, "offpolicy/staleness_min")
        if lag is not None and stale is not None and 0 < k < lag and stale >= k:
            out["initial_policy"] = (f"staleness {lag:g} is longer than the {k} updates done: every batch so "
                                     f"far comes from the initial policy (until update {lag:g})")
        if row.get("loss/skipped_nonfinite"):
            out["nonfinite"] = "the update was skipped: its loss or gradient is not finite"
        return out

    def _threshold(self, code: str) -> float:
        return RECOVERED if code in self.active else MAJORITY

    def _collapse(self, k: int, acc: float) -> str | None:
        start, best = self.initial_accuracy, self._best
        if start is None or best is None or acc >= start:
            return None
        lo, hi = wilson_interval(round(best[1] * self.eval_n), self.eval_n)
        if not best[1] - start > (hi - lo) / 2:  # the rise was within the noise of one evaluation
            return None
        return (f"collapse: held-out accuracy {100 * acc:.1f}% is below its start {100 * start:.1f}% after a best "
                f"of {100 * best[1]:.1f}% at update {best[0]} (one evaluation of {self.eval_n} problems: "
                f"about ±{50 * (hi - lo):.0f} points)")


_SILENCED = {"clipfrac": "clipped", "masked_frac": "masked", "truncated_frac": "truncated"}


def scan(rows: Iterable[dict[str, Any]], initial_accuracy: float | None, eval_n: int) -> list[dict[str, Any]]:
    """Every health event of a finished run's rows (``read_metrics(dir).to_dicts()``)."""
    events: list[dict[str, Any]] = []
    monitor = HealthMonitor(eval_n, initial_accuracy, emit=events.append)
    for row in rows:
        monitor.observe(row)
    return events


def log_line(event: dict[str, Any]) -> str:
    """The one line the CLI prints for an event."""
    return f"health: {event['message']} (update {event['update']})"
