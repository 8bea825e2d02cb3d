"""reweight core: the objective registry, its typed parameters and the resolved ``Objective``.

An objective is one plain function ``fn(inp: LossInputs, **params) -> LossOutput`` registered with
``@register_objective(name, paper=..., summary=..., params=[Param(...), ...])``. Its metadata is
checked at import (non-empty paper and summary, ``Param`` names matching the keyword arguments,
defaults in range), so a broken registration fails before any run starts. ``key_metric=KeyMetric(...)``
names the statistic that tells whether the objective is doing its job (CISPO's truncated fraction,
M2PO's M2 against tau); the run charts (``workbench.charts.style``) draw it in a panel of its own.

``resolve_objective(name, params)`` looks the objective up once and returns an ``Objective``: its
function, the filled and checked parameters, the context keys it needs and its default aggregation.
The loop resolves the live objective when a knob change takes effect and passes that object to
every call (``policy_loss`` accepts a name or an ``Objective``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from numbers import Real
from types import MappingProxyType
from typing import Any, Callable, Mapping

from workbench.errors import WorkbenchError
from workbench.registry import Registry
from workbench.steps.reweight.aggregate import check_aggregation
from workbench.steps.reweight.inputs import LossInputs, LossOutput

OBJECTIVES: Registry[Callable[..., "LossOutput"]] = Registry("objective")

# --------------------------------------------------------------------------------------------
# parameters and registration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One objective parameter: default, inclusive range (None = unbounded), liveness, doc.

    String parameters list their ``choices``; numeric ones use ``low`` / ``high``. ``live`` says
    whether the value may change between updates of one run (a slider) or fixes the algorithm.
    """

    name: str
    default: Any
    low: float | None = None
    high: float | None = None
    live: bool = True
    doc: str = ""
    choices: tuple[str, ...] | None = None

    def check(self, objective: str, value: Any) -> Any:
        """Return the value (numbers as float) or raise a one-line WorkbenchError."""
        where = f"{objective}.{self.name}"
        if self.choices is not None:
            if value not in self.choices:
                raise WorkbenchError(f"{where}={value!r} is invalid: expected one of {', '.join(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
            raise WorkbenchError(f"{where}={value!r} is invalid: expected a finite number in {self.range_text()}")
        value = float(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise WorkbenchError(f"{where}={value!r} is out of range: expected a number in {self.range_text()}")
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else repr(self.low)
        hi = "inf" if self.high is None else repr(self.high)
        return f"[{lo}, {hi}]"


@dataclass(frozen=True)
class KeyMetric:
    """The statistic an objective is judged by, as the charts draw it.

    ``columns``: metric keys the objective's ``LossOutput`` (or the shared diagnostics) logs, the
    first one the statistic itself; ``reference``: the name of a numeric ``Param`` whose value is the
    statistic's target or budget (drawn as a dashed line, e.g. M2PO's ``tau``), or None; ``title``:
    the chart panel's title.
    """

    columns: tuple[str, ...]
    reference: str | None = None
    title: str = ""

    def check(self, objective: str, params: tuple[Param, ...]) -> None:
        """Raise a one-line WorkbenchError unless the columns are keys and the reference a numeric param."""
        cols = self.columns
        if not (isinstance(cols, tuple) and cols and all(isinstance(c, str) and "/" in c for c in cols)):
            raise WorkbenchError(f"objective {objective!r}: key_metric.columns={cols!r} is invalid: expected a "
                                 "non-empty tuple of metric keys such as 'offpolicy/truncated_frac'")
        numeric = [p.name for p in params if p.choices is None]
        if self.reference is not None and self.reference not in numeric:
            raise WorkbenchError(f"objective {objective!r}: key_metric.reference={self.reference!r} is invalid: "
                                 f"expected None or one of its numeric params ({', '.join(numeric) or 'none'})")


def register_objective(
    name: str,
    *,
    paper: str,
    summary: str,
    params: list[Param] | tuple[Param, ...] = (),
    default_aggregation: str = "token-mean",
    reduces_to_reinforce: bool = False,
    presets: dict[str, dict[str, Any]] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
    key_metric: KeyMetric | None = None,
    **extra: Any,
) -> Callable[[Callable[..., "LossOutput"]], Callable[..., "LossOutput"]]:
    """Decorator registering an objective ``fn(inp: LossInputs, **params) -> LossOutput``.

    The metadata is checked here, so a broken registration fails at import, not mid-run:
    non-empty paper/summary, unique ``Param`` names matching the function's keyword arguments,
    defaults inside their ranges (and passing ``check``), presets naming real params, a
    ``key_metric`` naming metric keys and a numeric param. ``check(filled_params)`` is the
    objective's own extra validation (e.g. dual-clip c > 1); it raises WorkbenchError.
    """
    if not (isinstance(paper, str) and paper.strip() and isinstance(summary, str) and summary.strip()):
        raise WorkbenchError(f"objective {name!r}: paper and summary must be non-empty strings")
    params = tuple(params)
    names = [p.name for p in params]
    if len(set(names)) != len(names) or not all(isinstance(p, Param) for p in params):
        raise WorkbenchError(f"objective {name!r}: params must be Param objects with unique names")
    check_aggregation(default_aggregation)
    if key_metric is not None:
        if not isinstance(key_metric, KeyMetric):
            raise WorkbenchError(f"objective {name!r}: key_metric={key_metric!r} is invalid: expected a KeyMetric")
        key_metric.check(name, params)

    def deco(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        sig = list(inspect.signature(fn).parameters)
        if sorted(sig[1:]) != sorted(names):
            raise WorkbenchError(f"objective {name!r}: function keywords {sig[1:]} do not match params {names}")
        _validate(name, params, check, {})
        for preset in (presets or {}).values():
            _validate(name, params, check, preset)
        OBJECTIVES.add(
            name, fn, paper=paper, summary=summary, params=params, default_aggregation=default_aggregation,
            reduces_to_reinforce=bool(reduces_to_reinforce), presets=dict(presets or {}), check=check,
            key_metric=key_metric, **extra,
        )
        return fn

    return deco


def objective_defaults(name: str, preset: str | None = None) -> dict[str, Any]:
    """Default parameters of objective ``name`` (optionally overlaid with one of its presets)."""
    meta = OBJECTIVES.meta(name)
    values = {p.name: p.default for p in meta["params"]}
    if preset is not None:
        presets = meta.get("presets", {})
        if preset not in presets:
            valid = ", ".join(sorted(presets)) or "(none)"
            raise WorkbenchError(f"objective {name!r} has no preset {preset!r}: valid presets are {valid}")
        values.update(presets[preset])
    return values


def objective_needs(name: str, params: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Context keys objective ``name`` needs with ``params`` (defaults filled): metadata ``needs``."""
    return resolve_objective(name, params).needs


def validate_params(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill defaults and check ``params`` for objective ``name``; returns the complete dict.

    Unknown parameter, wrong type or out-of-range value -> one-line WorkbenchError naming the
    objective, the parameter, the value and what is valid. The config layer calls this at config
    time, ``policy_loss`` at every call.
    """
    meta = OBJECTIVES.meta(name)
    return _validate(name, meta["params"], meta.get("check"), params)


def _validate(
    name: str, spec_list: tuple[Param, ...], check: Callable[[dict[str, Any]], None] | None,
    params: dict[str, Any] | None,
) -> dict[str, Any]:
    spec = {p.name: p for p in spec_list}
    params = dict(params or {})
    for key in params:
        if key not in spec:
            valid = ", ".join(sorted(spec)) or "(none)"
            raise WorkbenchError(f"objective {name!r} has no parameter {key!r}: valid parameters are {valid}")
    filled = {k: p.check(name, params.get(k, p.default)) for k, p in spec.items()}
    if check is not None:
        check(filled)
    return filled


@dataclass(frozen=True)
class Objective:
    """An objective resolved once: what ``policy_loss`` needs to call it without a registry lookup.

    ``params`` are filled with defaults and checked; ``needs`` are the context keys it reads
    (``context.CONTEXT_KEYS``); ``default_aggregation`` is the paper's reduction.
    """

    name: str
    fn: Callable[..., "LossOutput"]
    params: Mapping[str, Any]
    needs: tuple[str, ...]
    default_aggregation: str

    def __call__(self, inp: "LossInputs") -> "LossOutput":
        return self.fn(inp, **self.params)

    def aggregation(self, override: str = "") -> str:
        """``override`` when set (``RunConfig.aggregation``), else the objective's own default."""
        return override or self.default_aggregation


def resolve_objective(name: str, params: dict[str, Any] | None = None) -> Objective:
    """Look ``name`` up, fill and check ``params``; one-line WorkbenchError on anything invalid."""
    fn = OBJECTIVES.get(name)
    filled = validate_params(name, params)
    meta = OBJECTIVES.meta(name)
    needs = meta.get("needs", ())
    needs = tuple(needs(filled) if callable(needs) else needs)
    return Objective(name, fn, MappingProxyType(filled), needs, meta["default_aggregation"])


def default_aggregation(name: str) -> str:
    """The registered default aggregation of objective ``name``."""
    return OBJECTIVES.meta(name)["default_aggregation"]


__all__ = ["OBJECTIVES", "KeyMetric", "Objective", "Param", "default_aggregation", "objective_defaults",
           "objective_needs", "register_objective", "resolve_objective", "validate_params"]
