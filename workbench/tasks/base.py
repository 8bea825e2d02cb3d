"""The task base: ``Example``, the ``TASKS`` registry and ``Task``, the class every task extends
(synthetic tasks implement ``_draw``; tasks read from data override ``sample`` and ``heldout``).

The package docstring (``workbench/tasks/__init__.py``) describes the tasks and their guarantees.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from workbench.errors import WorkbenchError, bad_value
from workbench.registry import Registry

HELDOUT_SEED = 1_234_567  # fixed: the held-out set never depends on the run's seed


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer; ``extra`` is passed to reward functions."""

    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)


TASKS: Registry[type["Task"]] = Registry("task")


def _check_int(task: str, name: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_value(f"{task}.{name}", value, f"an int {rng}")
    return value


class Task:
    """Base class. Subclasses set ``name``, ``defaults`` and implement ``_draw`` (synthetic) or
    override ``sample`` and ``heldout``."""

    name: ClassVar[str] = "task"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise WorkbenchError(
                f"unknown param {unknown[0]!r} for task {self.name!r}: valid params are "
                f"{', '.join(sorted(self.defaults))}"
            )
        self.params: dict[str, Any] = {**self.defaults, **params}
        self._validate()
        if "heldout_size" in self.params:
            size, space = self.params["heldout_size"], self._space_size()
            if size > space // 2:
                raise WorkbenchError(
                    f"{self.name}.heldout_size={size} is invalid: expected at most half of the "
                    f"{space} distinct prompts ({space // 2}); lower it or widen the task"
                )

    # ---- to override ----
    def _validate(self) -> None:
        pass

    def _draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    @property
    def alphabet(self) -> str:
        """Every character a prompt or answer of this task can contain."""
        raise NotImplementedError

    @property
    def max_answer_tokens(self) -> int:
        """Generation budget: the longest answer in characters plus one token for EOS."""
        raise NotImplementedError

    def _space_size(self) -> int:
        """Number of distinct prompts (used to refuse a held-out set that would eat the space)."""
        raise NotImplementedError

    # ---- shared behaviour ----
    def spec(self) -> dict[str, Any]:
        """JSON-able description: enough to rebuild the task with ``make_task``."""
        return {"name": self.name, "params": dict(self.params)}

    @property
    def fingerprint(self) -> str:
        """A stable string identifying the task's content (cache keys use it)."""
        return json.dumps(self.spec(), sort_keys=True)

    @cached_property
    def heldout(self) -> list[Example]:
        """A fixed set of ``heldout_size`` distinct examples drawn with a fixed seed."""
        size = self.params["heldout_size"]
        rng = random.Random(HELDOUT_SEED)
        seen: dict[str, Example] = {}
        while len(seen) < size:
            ex = self._draw(rng)
            seen.setdefault(ex.prompt, ex)
        return list(seen.values())

    @cached_property
    def _heldout_prompts(self) -> frozenset[str]:
        return frozenset(ex.prompt for ex in self.heldout)

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        """``n`` training examples drawn i.i.d. with ``rng`` (never a held-out prompt)."""
        _check_int(self.name, "n", n, 0)
        held = self._heldout_prompts
        out = []
        while len(out) < n:
            ex = self._draw(rng)
            if ex.prompt not in held:
                out.append(ex)
        return out

    def verify(self, completion: str, example: Example) -> bool:
        """Exact match after stripping surrounding whitespace."""
        return completion.strip() == example.answer.strip()

    def expert(self, example: Example) -> str:
        """A correct answer (SFT and demonstration-mixing objectives use it)."""
        return example.answer

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"
