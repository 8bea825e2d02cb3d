"""Notebooks headless, and the small helpers the notebooks call.

    from workbench.notebook import run_notebook
    summary = run_notebook("02", parameters={"staleness": 64},
                           params_file="notebooks/params/ci/02_staleness_and_clipping_live.yaml")

``run_notebook`` executes a notebook of ``notebooks/`` (by number, stem or path) with papermill,
in a kernel running *this* Python (``ensure_kernel`` registers ``workbench``, an absolute path
to ``sys.executable``, under ``sys.prefix/share/jupyter/kernels``), with ``WORKBENCH_HEADLESS=1``
so the control panel degrades to a progress bar and PNG charts. Every notebook writes
``<out_dir>/<run_name>/summary.json``; ``run_notebook`` returns it (with ``notebook_seconds`` and
the executed notebook's path). ``python -m workbench notebook 02 -p staleness 64`` is the CLI.

A parameters file is papermill's own: a flat YAML mapping of one notebook's parameter names to
values, so ``papermill NB OUT -f FILE`` and ``run_notebook(NB, params_file=FILE)`` read the same
file (``-p`` / ``parameters`` override it). ``notebooks/params/ci/<stem>.yaml`` (``ci_params``)
shrinks each notebook for CI.

``setup(tiny, **config_fields)`` is what the notebooks call to get (config, model, tokenizer):
``tiny=True`` builds a ~35 k-parameter untrained model (seconds, for CI); an untrained model is
never right, so it also adds a length-shaped reward (``overlong``) that gives groups reward
variance. ``tiny=False`` uses the built-in warm-started model (trained and cached on first use,
about a minute) or a local checkpoint (``model=``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workbench import PROCESS_DEFAULTS
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model
from workbench.policy.tokenizer import build_char_tokenizer
from workbench.runs.rundir import atomic_write_text, dumps

KERNEL_NAME = "workbench"
KERNEL_ENV = dict(PROCESS_DEFAULTS)  # the kernel's process gets the package's defaults before torch loads
TINY_REWARDS = (("exact_match", 1.0), ("overlong", 1.0, {"max_len": 4, "cache_len": 3}))


def notebooks_dir() -> Path:
    """``notebooks/`` of the repository this package is installed from (editable install)."""
    return Path(__file__).resolve().parents[1] / "notebooks"


COURSE_DIR = "course"  # the workshop course: notebooks/course/*.ipynb, CI params in params/ci/course/


def _all_notebooks(d: Path) -> list[Path]:
    """The top-level notebooks, then the course's (``notebooks/course/``)."""
    return sorted(d.glob("*.ipynb")) + sorted((d / COURSE_DIR).glob("*.ipynb"))


def find_notebook(name: str | Path) -> Path:
    """A path, a stem (``02_staleness_and_clipping_live``, ``c1_importance_ratio``) or a number prefix
    (``02``, ``2``, ``c1``)."""
    p = Path(name)
    if p.suffix == ".ipynb" and p.exists():
        return p.resolve()
    d = notebooks_dir()
    stem = str(name)
    if stem.isdigit():
        stem = f"{int(stem):02d}_"
    hits = [x for x in _all_notebooks(d) if x.stem == stem or x.stem.startswith(stem)]
    if len(hits) != 1:
        valid = ", ".join(x.stem for x in _all_notebooks(d))
        raise WorkbenchError(f"notebook={str(name)!r} is invalid: expected a path or one of {valid}")
    return hits[0]


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Register (or refresh) a kernel spec running ``sys.executable``; returns its name."""
    d = Path(sys.prefix) / "share" / "jupyter" / "kernels" / name
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"workbench ({Path(sys.prefix).name})", "language": "python",
            "env": KERNEL_ENV, "metadata": {"debugger": False}}
    path = d / "kernel.json"
    if not path.exists() or json.loads(path.read_text()) != spec:
        d.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec, indent=1))
    return name


def ci_params(notebook: str | Path) -> Path:
    """``notebooks/params/ci/<stem>.yaml`` (a course notebook: ``params/ci/course/<stem>.yaml``): the
    parameters that shrink ``notebook`` for CI."""
    path = find_notebook(notebook)
    sub = COURSE_DIR if path.parent.name == COURSE_DIR else ""
    return notebooks_dir() / "params" / "ci" / sub / f"{path.stem}.yaml"


def load_params_file(path: str | Path | None, notebook: str = "", declared: Any = None) -> dict[str, Any]:
    """The parameters in a papermill parameters file (a flat YAML mapping name -> value).

    With ``declared`` (the notebook's parameters, ``papermill.inspect_notebook``), a name the
    notebook does not declare is a one-line ``WorkbenchError`` naming the file (``notebook``, its
    stem, only words the message).
    """
    if not path:
        return {}
    import yaml  # the notebooks extra

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise WorkbenchError(f"params_file={str(path)!r} is invalid: cannot read it as YAML "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    data = {} if data is None else data
    if not isinstance(data, dict) or not all(isinstance(k, str) and k.isidentifier() for k in data):
        raise WorkbenchError(f"params_file={str(path)!r} is invalid: expected a flat mapping of parameter "
                             f"names to values, one file per notebook as papermill -f reads it (e.g. "
                             f"notebooks/params/ci/<stem>.yaml); got {type(data).__name__} {str(data)[:60]}")
    unknown = sorted(set(data) - set(declared)) if declared is not None else []
    if unknown:
        where = f"notebook {notebook} " if notebook else "the notebook "
        raise WorkbenchError(f"params_file={str(path)!r} is invalid: {where}declares no parameter "
                             f"{unknown[0]!r}; valid parameters are {', '.join(declared)}")
    return dict(data)


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_notebook(notebook: str | Path, parameters: dict[str, Any] | None = None, *,
                 params_file: str | Path | None = None, output: str | Path | None = None,
                 cwd: str | Path | None = None, kernel_name: str | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """Execute a notebook headless (see the module doc); returns its summary.json as a dict."""
    import papermill as pm

    path = find_notebook(notebook)
    declared = {p["name"]: p for p in pm.inspect_notebook(str(path)).values()}
    params = {**load_params_file(params_file, path.stem, declared), **(parameters or {})}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise WorkbenchError(f"{path.stem} has no parameter {unknown[0]!r}: valid parameters are "
                             f"{', '.join(declared)}")
    cwd = Path(cwd or Path.cwd()).resolve()
    output = Path(output) if output else cwd / f"{path.stem}.out.ipynb"
    kernel = kernel_name or ensure_kernel()
    t0 = time.perf_counter()
    with _env(WORKBENCH_HEADLESS="1", **KERNEL_ENV):
        pm.execute_notebook(str(path), str(output), parameters=params, kernel_name=kernel, cwd=str(cwd),
                            progress_bar=False, log_output=False, execution_timeout=timeout)
    seconds = time.perf_counter() - t0
    out_dir = params.get("out_dir", _default(declared, "out_dir"))
    run_name = params.get("run_name", _default(declared, "run_name"))
    summary_path = cwd / str(out_dir) / str(run_name) / "summary.json"
    if not summary_path.exists():
        raise WorkbenchError(f"{path.stem} ran but wrote no {summary_path}")
    summary = json.loads(summary_path.read_text())
    summary.update({"notebook_seconds": seconds, "executed_notebook": str(output), "summary_path": str(summary_path)})
    return summary


def scale_to_defaults(ci_seconds: float, work_ratio: float, fixed_seconds: float = 0.0) -> float:
    """Seconds a notebook should take under its defaults, estimated from its CI execution.

    ``fixed_seconds`` of the ``ci_seconds`` measured (kernel start, imports, chart rendering: they do
    not grow with the work) stay as they are; the rest is multiplied by ``work_ratio`` (the default
    run's work over the CI run's, e.g. updates x prompts x group size x the model's cost per sequence).
    The notebooks declare both next to their stated times (metadata ``workbench.time``).
    """
    for name, v in (("ci_seconds", ci_seconds), ("work_ratio", work_ratio), ("fixed_seconds", fixed_seconds)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise WorkbenchError(f"{name}={v!r} is invalid: expected a number >= 0")
    if fixed_seconds > ci_seconds:
        raise WorkbenchError(f"fixed_seconds={fixed_seconds!r} is invalid: it is a part of ci_seconds={ci_seconds!r}, "
                             "so at most that")
    return fixed_seconds + (ci_seconds - fixed_seconds) * work_ratio


def _default(declared: dict[str, Any], name: str) -> Any:
    if name not in declared:
        raise WorkbenchError(f"notebook declares no {name!r} parameter: cannot find its summary.json")
    import ast

    return ast.literal_eval(declared[name]["default"])


def has_frontend() -> bool:
    """Is there a frontend that renders widgets? (JupyterLab / Notebook / VS Code: yes; papermill,
    nbclient and plain Python: no.) Rules, first match wins:
    1. ``WORKBENCH_HEADLESS=1`` (set by ``workbench.notebook.run_notebook`` and the CLI) -> no;
       ``WORKBENCH_HEADLESS=0`` -> yes.
    2. Not inside an IPython kernel (plain ``python``, a terminal IPython) -> no.
    3. A kernel started by a Jupyter server (JupyterLab, Notebook 7: the server sets
       ``JPY_SESSION_NAME``), by VS Code (``VSCODE_PID``) or in Colab -> yes.
    4. Otherwise (a kernel started by papermill / nbclient directly) -> no.
    """
    flag = os.environ.get("WORKBENCH_HEADLESS", "").strip().lower()
    if flag in ("1", "true", "yes"):
        return False
    if flag in ("0", "false", "no"):
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    if "google.colab" in sys.modules:
        return True
    return any(k in os.environ for k in ("JPY_SESSION_NAME", "VSCODE_PID"))


# ------------------------------------------------------------------ what the notebooks call
def setup(tiny: bool = False, *, model_path: str = "", **config_fields: Any):
    """(config, model, tokenizer) for a notebook; model/tokenizer are None for the built-in path.

    ``tiny``: an untrained ~35 k-parameter model and ``TINY_REWARDS`` (CI); ``model_path``: a local
    Hugging Face checkpoint; otherwise the built-in warm start (``RunConfig(model="builtin")``).
    """
    if not tiny:
        if model_path:
            config_fields["model"] = model_path
        return RunConfig(**config_fields), None, None
    config_fields.setdefault("rewards", TINY_REWARDS)
    config = RunConfig(**config_fields)
    tokenizer = build_char_tokenizer()
    model = build_model(ModelConfig(**TINY_MODEL), tokenizer, seed=config.seed)
    return config, model, tokenizer


def write_summary(out_dir: str | Path, run_name: str, summary: dict[str, Any]) -> Path:
    """Write ``<out_dir>/<run_name>/summary.json`` (notebooks without a ``Run`` use this)."""
    d = Path(out_dir) / run_name
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "summary.json", dumps(summary))
    return d / "summary.json"


__all__ = ["KERNEL_NAME", "ci_params", "ensure_kernel", "find_notebook", "load_params_file", "notebooks_dir",
           "run_notebook", "scale_to_defaults", "setup", "write_summary"]
