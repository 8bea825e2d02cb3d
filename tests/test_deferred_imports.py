"""workbench/deferred_imports.py: ``import workbench`` keeps altair's jsonschema from building the
rfc3987_syntax grammar at import, and jsonschema's "iri" checks still give the real module's answers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from workbench.deferred_imports import RFC3987, defer_rfc3987_syntax

pytestmark = pytest.mark.skipif(importlib.util.find_spec(RFC3987) is None, reason="rfc3987_syntax not installed")

# The same checks with and without the stand-in (without: the answers rfc3987_syntax itself gives).
CHECKS = ("from jsonschema import FormatChecker; fc = FormatChecker(); "
          "got = [fc.conforms('http://example.com/\\u00e4', 'iri'), fc.conforms('not an iri', 'iri'), "
          "fc.conforms('/x?y#z', 'iri-reference'), fc.conforms('a b', 'iri-reference')]; "
          "assert got == [True, False, True, False], got; ")


def _python(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_altair_under_workbench_imports_no_grammar_and_iri_checks_still_hold():
    _python("import sys, workbench, altair; "
            "assert 'lark' not in sys.modules and type(sys.modules['rfc3987_syntax']).__name__ == '_StandIn'; "
            + CHECKS +
            "assert 'lark' in sys.modules and type(sys.modules['rfc3987_syntax']).__name__ == 'module'")
    _python("import sys; " + CHECKS + "assert 'workbench' not in sys.modules")  # the real module's answers


def test_nothing_is_installed_once_the_module_is_imported():
    assert RFC3987 in sys.modules  # conftest imported workbench (the stand-in) or a test loaded the real one
    assert defer_rfc3987_syntax() is False
