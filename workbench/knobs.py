"""The live knobs of a run: the few settings that may change between updates.

``Knobs`` holds staleness, sync period, max staleness, objective and its parameters, learning rate
and temperature (``LIVE_FIELDS``); every change is validated the same way as the ``RunConfig``
(``workbench/config.py``) and recorded with the update index it takes effect at, so a headless run
can replay an interactive session.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

from workbench.config import RunConfig
from workbench.errors import WorkbenchError, bad_value
from workbench.steps.reweight.core import OBJECTIVES, validate_params

LIVE_FIELDS = ("staleness", "sync_every", "max_staleness", "objective", "objective_params", "lr", "temperature")


@dataclass(frozen=True)
class KnobValues:
    """The live knobs' values at one moment (``Knobs.applied``: those the current update uses)."""

    staleness: int
    sync_every: int
    max_staleness: int
    objective: str
    objective_params: dict[str, Any]
    lr: float
    temperature: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in dataclasses.asdict(self).items()}


class Knobs:
    """What may change while a run is live. A change applies at the next update and is recorded.

    ``knobs.set(staleness=64)`` or ``knobs.staleness = 64``; objective parameters merge:
    ``knobs.set(objective_params={"tau": 0.08})`` keeps the other parameters. Switching objective
    resets its parameters to that objective's defaults unless given in the same call.

    Reading a knob (``knobs.staleness``, ``as_dict()``) gives what was last set: the value the next
    update will use. ``knobs.applied`` is the ``KnobValues`` the current (or latest) update uses;
    the loop reads only that, once per update, so a change made from another thread (a notebook
    widget) mid-update never leaks into it. ``take_pending`` (start of the next update) makes the
    set values the applied ones and returns what changed.
    """

    def __init__(self, config: RunConfig):
        values = {k: getattr(config, k) for k in LIVE_FIELDS}
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_applied", KnobValues(**values))
        object.__setattr__(self, "_requested", values)  # what applies at the next update
        object.__setattr__(self, "pending", [])  # changes not yet applied to an update
        object.__setattr__(self, "_lock", threading.RLock())  # widgets set() while the loop take_pending()s

    def __getattr__(self, name: str) -> Any:
        requested = object.__getattribute__(self, "_requested")
        if name in requested:
            value = requested[name]
            return dict(value) if isinstance(value, dict) else value
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(**{name: value})

    @property
    def applied(self) -> KnobValues:
        """The values in effect for the current (or latest) update."""
        return self._applied

    def as_dict(self) -> dict[str, Any]:
        """The values set so far (those the next update will use)."""
        with self._lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._requested.items()}

    @property
    def requested(self) -> dict[str, Any]:
        """Same as ``as_dict()``: the values that apply at the next update."""
        return self.as_dict()

    def set(self, **changes: Any) -> dict[str, Any]:
        """Validate and apply ``changes``; returns what actually changed. Raises on bad input."""
        with self._lock:
            return self._set(changes)

    def _set(self, changes: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(changes) - set(LIVE_FIELDS))
        if unknown:
            raise WorkbenchError(f"{unknown[0]!r} is not a live knob: live knobs are {', '.join(LIVE_FIELDS)}")
        if "objective_params" in changes and not isinstance(changes["objective_params"], (dict, type(None))):
            raise bad_value("objective_params", changes["objective_params"], "a dict of objective parameters")
        new = dict(self._requested)
        switched = "objective" in changes and changes["objective"] != new["objective"]
        if switched:
            OBJECTIVES.entry(changes["objective"])
            new["objective"] = changes["objective"]
            new["objective_params"] = {}
        if "objective_params" in changes:
            params = changes["objective_params"] or {}
            live = {p.name: p.live for p in OBJECTIVES.meta(new["objective"]).get("params", [])}
            for p in params:  # a switch sets every parameter of the new objective (a recorded switch replays)
                if not switched and p in live and not live[p] and params[p] != new["objective_params"].get(p):
                    raise WorkbenchError(f"objective parameter {p!r} of {new['objective']} cannot change live")
            new["objective_params"] = {**new["objective_params"], **params}
        new["objective_params"] = validate_params(new["objective"], new["objective_params"])
        for k in ("staleness", "sync_every", "max_staleness", "lr", "temperature"):
            if k in changes:
                new[k] = changes[k]
        # Same validation as the config: build a config with the new values.
        dataclasses.replace(self._config, **new)
        diff = {k: new[k] for k in LIVE_FIELDS if new[k] != self._requested[k]}
        if diff:
            object.__setattr__(self, "_requested", new)
            self.pending.append(diff)
        return diff

    def take_pending(self) -> dict[str, Any]:
        """Merge and clear the changes made since the last update (the loop calls this)."""
        merged: dict[str, Any] = {}
        with self._lock:
            for d in self.pending:
                merged.update(d)
            self.pending.clear()
            object.__setattr__(self, "_applied", KnobValues(**self._requested))  # now in effect
        return merged
