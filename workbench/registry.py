"""Registries: one per extension point (objectives, advantage estimators, tasks, rewards; the samplers
are the ``Sampler`` protocol and ``steps.generate.engines.SAMPLERS``).

A registry maps a name to a plain function (or class) plus metadata. Registering a name twice
raises; looking up an unknown name raises a one-line error listing the valid names. Widget
dropdowns, the CLI's ``--help`` and the docs read from the registry, so they never drift from
the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from workbench.errors import WorkbenchError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered item: the object and its free-form metadata (paper, summary, params...)."""

    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A name -> object map with metadata, strict about duplicates and unknown names.

    >>> OBJ = Registry("objective")
    >>> @OBJ.register("reinforce", summary="plain policy gradient")
    ... def reinforce(...): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; raises if the name is taken."""

        def deco(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return deco

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if not isinstance(name, str) or not name:
            raise WorkbenchError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise WorkbenchError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, obj, dict(meta))

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise WorkbenchError(
                f"unknown {self.kind} {name!r}: valid {self.kind}s are {', '.join(self.names())}"
            ) from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def meta(self, name: str) -> dict[str, Any]:
        return self.entry(name).meta

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
