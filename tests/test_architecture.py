"""The package's shape: no import cycles, no hidden imports, no module longer than ``MAX_LINES``.

Imports: the graph of ``workbench`` modules (every import statement, read with ``ast`` without
executing anything; imports under ``TYPE_CHECKING`` count too) has no cycle, so every module can be
read and tested on top of the ones below it; and no function imports a workbench module, because
such imports hide dependencies and usually exist only to dodge a cycle.

Size: no module of ``workbench/`` is longer than ``MAX_LINES`` (400) lines.

A module should be a file a reader can hold in their head: one concern, read top to bottom in one
sitting. Past a few hundred lines a file has usually grown a second concern that wants its own
module (and its own docstring saying why it exists). The limit is checked here, so a file that
outgrows it is split when it happens rather than when someone finally has to read it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MAX_LINES = 400
PACKAGE = Path(__file__).resolve().parents[1] / "workbench"


def test_no_module_over_the_line_limit():
    lengths = {p.relative_to(PACKAGE.parent).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
               for p in sorted(PACKAGE.rglob("*.py"))}
    assert lengths, f"no modules found under {PACKAGE}"
    over = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert not over, (f"modules over {MAX_LINES} lines (split them by concern): "
                      + ", ".join(f"{path} ({n} lines)" for path, n in sorted(over.items(), key=lambda kv: -kv[1])))


# ---------------------------------------------------------------------------------------- imports
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the workbench modules it imports (module level, in functions, under TYPE_CHECKING:
    every import statement counts), and the imports of workbench modules made inside functions."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    in_functions: list[str] = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if not target or target == mod:
                    continue
                graph[mod].add(target)
                # importing a.b.c first runs the package a.b's __init__ (unless mod lives in a.b,
                # whose __init__ is then already running): that is an import of a.b too
                parent = target.rpartition(".")[0]
                while parent and not (package + ".").startswith(parent + "."):
                    graph[mod].add(parent)
                    parent = parent.rpartition(".")[0]
                if id(node) in nested:
                    in_functions.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    return graph, in_functions


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph, _ = _import_graph()
    assert len(graph) > 50 and graph["workbench.loop"] >= {"workbench.config", "workbench.steps.update"}
    assert _cycles(graph) == [], "import cycles (type-only imports included): " + "; ".join(
        " <-> ".join(c) for c in _cycles(graph))


# Where a workbench import inside a function has a reason other than a cycle (the reason is the value).
LAZY_ALLOWED = {
    "workbench/sweeps/": "a spawned worker sets its thread limits before torch and polars load",
    "workbench/cli/": "a command loads only what it runs: list, lint and --help start without transformers",
}


def test_no_workbench_import_inside_a_function():
    """An import of a workbench module inside a function hides a dependency and most often dodges a
    cycle; only the front ends in ``LAZY_ALLOWED`` import lazily, for the reason given there (heavy
    optional third-party packages such as vllm, ray, papermill and ipywidgets may be imported
    lazily anywhere)."""
    _, in_functions = _import_graph()
    hidden = [line for line in in_functions if not line.startswith(tuple(LAZY_ALLOWED))]
    assert hidden == [], "\n".join(hidden)


def test_every_module_imports_on_its_own():
    """Each module imports as the first workbench module of a process (no hidden order dependence)."""
    names = sorted(m for m in _import_graph()[0] if m != "workbench.__main__")
    codes = [_import_each(names[i::2]) for i in range(2)]  # two processes at once: half the wall time on 2 cores
    procs = [subprocess.Popen([sys.executable, "-c", c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in codes]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err[-2000:]


def _import_each(names: list[str]) -> str:
    """A program importing each of ``names`` as the first workbench module of its process."""
    return (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m == 'workbench' or m.startswith('workbench.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
