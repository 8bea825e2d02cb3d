"""Third-party imports moved to their first use, installed by ``import workbench`` (before altair loads).

``jsonschema``, which ``altair`` imports (so every chart, notebook kernel and CLI start pays it),
imports the optional ``rfc3987_syntax`` whenever it is installed (JupyterLab's server brings it in)
for two string-format checks, "iri" and "iri-reference". That module builds a Lark grammar parser
while it imports: 2.5-5 s of the 6-12 s that a course notebook's first cell spends importing on 2
cores (``python -X importtime``), the largest single import after torch. Nothing in workbench
validates those formats.

``defer_rfc3987_syntax`` puts a stand-in module under that name: its ``is_valid_syntax`` (the one
name jsonschema takes from it at import) and any other attribute import the real module on first
use and hand the call over, so jsonschema behaves exactly as before and the cost moves to a call
that workbench never makes. Where the package is not installed, or already imported, it does nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

RFC3987 = "rfc3987_syntax"


def _real(name: str) -> types.ModuleType:
    """The real module ``name``, imported now in place of its stand-in (once: later calls find it)."""
    module = sys.modules.get(name)
    if not isinstance(module, _StandIn):
        return module if module is not None else importlib.import_module(name)
    del sys.modules[name]
    try:
        return importlib.import_module(name)
    except BaseException:
        sys.modules[name] = module  # as it was: the next use tries again
        raise


class _StandIn(types.ModuleType):
    """A module object standing in for ``name`` until first use; attribute reads load the real one."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # introspection (copy, pickle, help) must not import the real module
            raise AttributeError(attr)
        return getattr(_real(self.__name__), attr)


def _is_valid_syntax(*args: Any, **kwargs: Any) -> Any:
    return _real(RFC3987).is_valid_syntax(*args, **kwargs)


def defer_rfc3987_syntax() -> bool:
    """Install the stand-in for ``rfc3987_syntax`` (module doc); True when it was installed now."""
    if RFC3987 in sys.modules:
        return False
    spec = importlib.util.find_spec(RFC3987)
    if spec is None:  # not installed: jsonschema's own ImportError path stays as it is
        return False
    stand_in = _StandIn(RFC3987, "Stand-in until first use (workbench/deferred_imports.py).")
    stand_in.__spec__ = spec  # importlib.util.find_spec(name) keeps answering as for the real module
    stand_in.is_valid_syntax = _is_valid_syntax  # type: ignore[attr-defined]
    sys.modules[RFC3987] = stand_in
    return True
