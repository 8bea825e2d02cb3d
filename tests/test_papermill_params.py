"""The CI parameters files are papermill's own: one flat YAML per notebook
(notebooks/params/ci/<stem>.yaml) that plain papermill accepts (``-f FILE`` or
``parameters=yaml.safe_load(FILE)``) and injects as it is, and that ``python -m workbench notebook``
reads the same way. Notebooks are only parameterised here (``prepare_only``), never executed
(tests/test_notebooks.py executes them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import yaml

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.notebook import ci_params, load_params_file, notebooks_dir

NOTEBOOKS = sorted(notebooks_dir().glob("*.ipynb"))
REPO = notebooks_dir().parent


def injected(path: Path) -> dict:
    """The assignments of the cell papermill injected (tag ``injected-parameters``), as values."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} injected cells"
    out = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def declared(path: Path) -> dict:
    return dict(pm.inspect_notebook(str(path)))


def test_one_file_per_notebook_and_no_other():
    files = sorted(f for f in (notebooks_dir() / "params" / "ci").glob("*") if f.is_file())  # course/: its own
    assert [f.name for f in files] == [f"{p.stem}.yaml" for p in NOTEBOOKS]
    assert [ci_params(p.stem[:2]) for p in NOTEBOOKS] == files
    assert not (notebooks_dir() / "params" / "ci.yaml").exists()


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_file_is_a_flat_mapping_of_declared_parameters_of_their_types(nb):
    data = yaml.safe_load(ci_params(nb).read_text())
    params = declared(nb)
    assert isinstance(data, dict) and data and set(data) <= set(params), sorted(set(data) - set(params))
    for name, value in data.items():
        default = ast.literal_eval(params[name]["default"])
        assert type(value) is type(default), (name, value, default)  # e.g. 05's staleness is a string list
    if "tiny" in params:  # every notebook that can shrink its model does so in CI
        assert data["tiny"] is True
    assert load_params_file(ci_params(nb), nb.stem, params) == data  # the workbench reads the same mapping


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_python_api_injects_exactly_the_file(nb, tmp_path):
    data = yaml.safe_load(ci_params(nb).read_text())
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(nb), str(out), parameters=data, prepare_only=True, progress_bar=False)
    assert injected(out) == data


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_cli_injects_exactly_the_file(nb, tmp_path):
    out = tmp_path / "out.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(out), "--prepare-only",
                           "-f", str(ci_params(nb))], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert injected(out) == yaml.safe_load(ci_params(nb).read_text())


def test_workbench_cli_passes_the_file_to_papermill_with_overrides(monkeypatch, tmp_path, capsys):
    """``python -m workbench notebook 02 -f FILE -p steps 3``: papermill gets the file's mapping with
    ``steps`` overridden (papermill runs for real, prepare-only, so no summary.json follows)."""
    real = pm.execute_notebook
    monkeypatch.setattr(pm, "execute_notebook", lambda nb, out, **kw: real(nb, out, parameters=kw["parameters"],
                                                                           prepare_only=True, progress_bar=False))
    out = tmp_path / "02.out.ipynb"
    code = main(["notebook", "02", "-f", str(ci_params("02")), "-p", "steps", "3", "--output", str(out),
                 "--cwd", str(tmp_path)])
    assert code == 2 and "wrote no" in capsys.readouterr().err  # prepared, not run
    assert injected(out) == {**yaml.safe_load(ci_params("02").read_text()), "steps": 3}


@pytest.mark.parametrize("text, message", [
    ("all:\n  tiny: true\n01_quickstart:\n  steps: 6\n", "expected a flat mapping of parameter names to values"),
    ("01:\n  steps: 6\n", "expected a flat mapping of parameter names to values"),
    ("all:\n  tiny: true\n", "notebook 01_quickstart declares no parameter 'all'"),
    ("- tiny\n", "; got list"),
    ("tiny: [1\n", "cannot read it as YAML"),
    ("tiny: true\nnope: 1\n", "notebook 01_quickstart declares no parameter 'nope'; valid parameters are tiny, "),
])
def test_bad_files_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(WorkbenchError, match=message) as e:
        load_params_file(p, "01_quickstart", declared(NOTEBOOKS[0]))
    assert "\n" not in str(e.value) and str(p) in str(e.value)
