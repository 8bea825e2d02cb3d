"""Every notebook executed headless at its *defaults* (no parameters file), as a user who opens it and
runs all cells gets it: no error, no warning, no traceback, no network reference in any output, and
the time its first cell states holds within 2x (on idle cores; ``test_notebooks.load_factor``
discounts other work on the machine). Slow: about 20 minutes on 2 cores in all, so it is marked
``slow`` and run with ``bash scripts/test.sh -m slow tests/test_notebooks_defaults.py``."""

from __future__ import annotations

import re

import nbformat
import pytest

from workbench.charts import network_refs
from workbench.notebook import notebooks_dir, run_notebook

from test_notebooks import NOTEBOOKS, load_factor, stated_time

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("contention")]
WARNING = re.compile(r"\b\w*Warning\b|lint warning|^warning:", re.MULTILINE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_at_its_defaults_is_clean_and_takes_the_time_it_states(path, tmp_path):
    summary = run_notebook(path.stem, cwd=tmp_path)
    seconds = summary["notebook_seconds"] / load_factor()
    stated = stated_time(notebooks_dir() / path.name)["default_seconds"]
    assert 0.5 <= stated / seconds <= 2.0, (path.stem, "stated", stated, "measured", seconds)
    nb = nbformat.read(summary["executed_notebook"], as_version=4)
    assert network_refs(nb) == []
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"], path.stem
    texts = [str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs]
    assert not [t for t in texts if "Traceback" in t], path.stem
    assert not [t for t in texts if WARNING.search(t)], (path.stem, [t[:300] for t in texts if WARNING.search(t)])
