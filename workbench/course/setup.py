"""Room-proof set-up for the workshop course: build the warm starts, check a machine, copy the cache.

``prepare(size)`` builds (or finds) the warm starts the course needs (``COURSE_RUNS``, through
``workbench.policy.warm_start``, into ``cache_root()``: ``$WORKBENCH_CACHE`` or the user cache) and
then runs ``check(size)``, which returns one line per missing or failed thing (an empty list means
ready): Python 3.11-3.13, torch running under the process defaults (``OMP_WAIT_POLICY=PASSIVE``),
offline mode (``HF_HUB_OFFLINE=1``: nothing is downloaded in the room), the warm starts in the
cache, and each course step, a notebook of notebooks/course/ executed headless under its CI
parameters file ``notebooks/params/ci/course/<stem>.yaml`` (as ``workbench.notebook`` does for the
main notebooks).

``size="full"`` is what the course trains on; ``"tiny"`` is the tiny model (``TINY_MODEL``) with a
two-step SFT (``TINY_WARM_START``), seconds to build, for tests and a quick dry run.

Offline copying: ``export_cache(DIR)`` writes each course warm start (safetensors and JSON files
only) and a manifest ``workbench-cache.json`` with every file's SHA-256 and size;
``import_cache(DIR)`` verifies every file against it before writing anything, then moves each
entry into the cache under a temporary name and renames it into place; entries already in the
cache are kept as they are. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from workbench import __version__
from workbench.cache import cache_root
from workbench.config import RunConfig
from workbench.errors import WorkbenchError, bad_value, one_line, parse_json
from workbench.notebook import notebooks_dir, run_notebook
from workbench.policy.build import build_task
from workbench.policy.model import TINY_MODEL, ModelConfig
from workbench.policy.warm_start import META_FILE, SFTConfig, cache_key, warm_start
from workbench.tasks import Task

SIZES = ("full", "tiny")
PYTHONS = ((3, 11), (3, 13))  # the oldest and newest Python the course is run on (inclusive)
COURSE_RUNS: tuple[dict[str, Any], ...] = ({},)
"""RunConfig fields of each course run that starts from a built-in warm start ({} = the default run)."""
TINY_WARM_START: dict[str, Any] = {"model_params": dict(TINY_MODEL),
                                   "sft_params": {"max_steps": 2, "batch_size": 8, "eval_every": 1, "warmup_steps": 0},
                                   "task_params": {"heldout_size": 8}}
"""Overrides that make each course run's warm start a seconds-long build (``size="tiny"``)."""
MANIFEST = "workbench-cache.json"
MANIFEST_FORMAT = 1
CACHE_SUFFIXES = (".safetensors", ".json")  # the only files a warm start holds, and the only ones copied
_KEY = re.compile(r"^[0-9a-f]{20}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------ the warm starts the course needs
def _check_size(size: str) -> None:
    if size not in SIZES:
        raise bad_value("size", size, " | ".join(SIZES))


def course_warm_starts(size: str = "full") -> list[tuple[Task, ModelConfig, SFTConfig]]:
    """(task, model config, SFT config) of each warm start the course loads, as ``build_policy`` builds them."""
    _check_size(size)
    out = []
    for fields in COURSE_RUNS:
        if size == "tiny":
            fields = {**fields, **{k: {**fields.get(k, {}), **v} for k, v in TINY_WARM_START.items()}}
        config = RunConfig(**fields)
        out.append((build_task(config), ModelConfig(**config.model_params), SFTConfig(**config.sft_params)))
    return out


def warm_start_dir(spec: tuple[Task, ModelConfig, SFTConfig], root: Path) -> Path:
    return root / "warm_start" / cache_key(*spec)


def prepare(size: str = "full", *, root: str | os.PathLike | None = None, course_dir: Path | None = None,
            params_dir: Path | None = None, run_steps: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Build every course warm start missing from the cache, then ``check``; returns its problems."""
    root = Path(root) if root is not None else cache_root()
    for spec in course_warm_starts(size):
        warm_start(*spec, cache_dir=root, log=log)
    return check(size, root=root, course_dir=course_dir, params_dir=params_dir, run_steps=run_steps, log=log)


# ------------------------------------------------------------------ the self-check
def check(size: str = "full", *, root: str | os.PathLike | None = None, course_dir: Path | None = None,
          params_dir: Path | None = None, run_steps: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """One line per missing or failed thing ([] = ready); ``log`` gets a line per passed check."""
    _check_size(size)
    root = Path(root) if root is not None else cache_root()
    problems = _python_problems() + _torch_problems(log) + _offline_problems()
    problems += _cache_problems(size, root, log)
    problems += _step_problems(course_dir or notebooks_dir() / "course",
                               params_dir or notebooks_dir() / "params" / "ci" / "course", run_steps, log)
    return problems


def _python_problems() -> list[str]:
    (lo, hi), v = PYTHONS, sys.version_info
    if lo <= (v.major, v.minor) <= hi:
        return []
    return [f"python {v.major}.{v.minor}.{v.micro}: the course needs Python {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"]


def _torch_problems(log: Callable[[str], None]) -> list[str]:
    problems = []
    wait = os.environ.get("OMP_WAIT_POLICY", "")
    if wait.upper() != "PASSIVE":  # spinning OpenMP threads slow torch down whenever another program holds a core
        problems.append(f"OMP_WAIT_POLICY={wait!r}: expected PASSIVE (unset it: importing workbench sets it)")
    try:
        a = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 4096  # [64, 64]
        ok = bool(torch.isfinite(a @ a).all())
    except Exception as e:  # noqa: BLE001 - a broken torch install is a line of the report
        return problems + [f"torch {torch.__version__}: a matrix product failed ({type(e).__name__}: {one_line(e)})"]
    if not ok:
        problems.append(f"torch {torch.__version__}: a matrix product gave non-finite values")
    else:
        log(f"ok: torch {torch.__version__} with {torch.get_num_threads()} threads")
    return problems


def _offline_problems() -> list[str]:
    return [f"{var}={os.environ.get(var)!r}: expected '1' so nothing is downloaded (unset it: importing "
            "workbench sets it)" for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(var) != "1"]


def _cache_problems(size: str, root: Path, log: Callable[[str], None]) -> list[str]:
    problems = []
    flag = "" if size == "full" else f" --size {size}"
    for spec in course_warm_starts(size):
        d = warm_start_dir(spec, root)
        if (d / META_FILE).is_file() and (d / "model.safetensors").is_file():
            log(f"ok: warm start {spec[0].name} ({size}) in {d}")
        else:
            problems.append(f"warm start {spec[0].name} ({size}) missing from the cache {d}: run python -m "
                            f"workbench course prepare{flag}, or import-cache DIR from a prepared machine")
    return problems


def _step_problems(course_dir: Path, params_dir: Path, run_steps: bool, log: Callable[[str], None]) -> list[str]:
    # the steps are the numbered notebooks (c1_..., c2_...); solutions.ipynb calls every step's answers
    books = sorted(nb for nb in course_dir.glob("*.ipynb") if re.fullmatch(r"c\d+_\w+", nb.stem))
    if not books:
        return [f"no course notebooks in {course_dir}"]
    problems = [f"course step {nb.stem}: no CI parameters file {params_dir / (nb.stem + '.yaml')}"
                for nb in books if not (params_dir / f"{nb.stem}.yaml").is_file()]
    if not run_steps or problems:
        return problems
    if importlib.util.find_spec("papermill") is None:
        return ["papermill is not installed: python -m pip install -e \".[notebooks]\""]
    with tempfile.TemporaryDirectory(prefix="workbench-course-check-") as tmp:
        for nb in books:
            t0 = time.perf_counter()
            try:
                run_notebook(nb, params_file=params_dir / f"{nb.stem}.yaml", output=Path(tmp) / f"{nb.stem}.out.ipynb",
                             cwd=tmp)
            except Exception as e:  # noqa: BLE001 - any failure of a step is one line of the report
                problems.append(f"course step {nb.stem}: failed ({_step_error(e)})")
                continue
            log(f"ok: course step {nb.stem} ({time.perf_counter() - t0:.1f} s)")
    return problems


def _step_error(e: Exception) -> str:
    """``ValueError: boom (cell 3)`` for an error raised in a notebook cell (papermill's exception
    carries the cell's own error; its message is the whole traceback), else ``Type: message``."""
    if hasattr(e, "ename") and hasattr(e, "evalue"):
        return f"{e.ename}: {one_line(e.evalue)[:300]} (cell {getattr(e, 'exec_count', '?')})"
    return f"{type(e).__name__}: {one_line(e)[:300]}"


# ------------------------------------------------------------------ offline copies of the cache
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry_files(d: Path) -> dict[str, dict[str, Any]]:
    """name -> {sha256, bytes} of a warm-start folder; anything but safetensors / JSON files is refused."""
    files = {}
    for p in sorted(d.iterdir()):
        if not p.is_file() or p.suffix not in CACHE_SUFFIXES:
            raise WorkbenchError(f"{p} is not a safetensors or JSON file: a warm start holds only those, so "
                                 "this folder is not one workbench wrote; remove it and run course prepare")
        files[p.name] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
    return files


def export_cache(dest: str | os.PathLike, size: str = "full", *, root: str | os.PathLike | None = None) -> Path:
    """Copy the course warm starts and a checksum manifest into ``dest`` (a new or empty folder)."""
    root = Path(root) if root is not None else cache_root()
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise WorkbenchError(f"export-cache {str(dest)!r} is invalid: expected a new or empty folder")
    entries = {}
    for spec in course_warm_starts(size):
        src = warm_start_dir(spec, root)
        if not (src / META_FILE).is_file():
            flag = "" if size == "full" else f" --size {size}"
            raise WorkbenchError(f"warm start {spec[0].name} ({size}) is not in the cache {src}: run python -m "
                                 f"workbench course prepare{flag} first")
        entries[src.name] = {"task": spec[0].name, "files": _entry_files(src)}
    for key, entry in entries.items():
        (dest / "warm_start" / key).mkdir(parents=True, exist_ok=True)
        for name in entry["files"]:
            shutil.copyfile(root / "warm_start" / key / name, dest / "warm_start" / key / name)
    manifest = {"format": MANIFEST_FORMAT, "workbench_version": __version__, "size": size, "entries": entries}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))  # last: a partial export has none
    return dest / MANIFEST


def _read_manifest(src: Path) -> dict[str, Any]:
    """The manifest of an export, every field checked (one-line errors naming the file)."""
    path = src / MANIFEST
    where = f"import-cache {str(src)!r}"
    if not path.is_file():
        raise WorkbenchError(f"{where}: no {MANIFEST} in it: expected a folder written by course export-cache")
    data = parse_json(path.read_text(encoding="utf-8", errors="replace"), f"{where}: {MANIFEST}")
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("entries"), dict):
        raise WorkbenchError(f"{where}: {MANIFEST} is not a format-{MANIFEST_FORMAT} manifest with entries")
    if data.get("workbench_version") != __version__:
        raise WorkbenchError(f"{where}: exported by workbench {data.get('workbench_version')!r}, this is "
                             f"{__version__}: warm starts are keyed by version, export again with this one")
    for key, entry in data["entries"].items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not _KEY.match(str(key)) or not isinstance(files, dict) or META_FILE not in files:
            raise WorkbenchError(f"{where}: {MANIFEST} entry {str(key)[:40]!r} is invalid: expected a 20-hex "
                                 f"cache key with a files mapping that includes {META_FILE}")
        for name, info in files.items():
            safe = isinstance(name, str) and Path(name).name == name and not name.startswith(".") \
                and Path(name).suffix in CACHE_SUFFIXES and "\\" not in name
            if not safe or not isinstance(info, dict) or not _SHA256.match(str(info.get("sha256"))) \
                    or isinstance(info.get("bytes"), bool) or not isinstance(info.get("bytes"), int):
                raise WorkbenchError(f"{where}: {MANIFEST} file {str(name)[:60]!r} of {key} is invalid: expected a "
                                     "plain .safetensors or .json name with sha256 and bytes")
    return data


def _verify(folder: Path, files: dict[str, dict[str, Any]], where: str, outcome: str = "nothing was imported") -> None:
    for name, info in files.items():
        p = folder / name
        if not p.is_file():
            raise WorkbenchError(f"{where}: {p} is missing; {outcome}")
        size, digest = p.stat().st_size, _sha256(p)
        if size != info["bytes"] or digest != info["sha256"]:
            raise WorkbenchError(f"{where}: {p} does not match its checksum (sha256 {digest[:12]}..., {size} bytes; "
                                 f"manifest {info['sha256'][:12]}..., {info['bytes']} bytes): the copy is "
                                 f"corrupt; {outcome}")


def import_cache(src: str | os.PathLike, *, root: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """Verify an export against its manifest, then add its warm starts to the cache.

    Returns (imported keys, keys already in the cache, left as they were). Any missing or corrupt
    file is a one-line WorkbenchError raised before anything is written.
    """
    src = Path(src).expanduser()
    root = Path(root) if root is not None else cache_root()
    where = f"import-cache {str(src)!r}"
    entries = _read_manifest(src)["entries"]
    for key, entry in entries.items():
        _verify(src / "warm_start" / key, entry["files"], where)
    imported, kept = [], []
    for key, entry in sorted(entries.items()):
        final = root / "warm_start" / key
        if (final / META_FILE).is_file():
            kept.append(key)
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".tmp-import-{key}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            for name in sorted(entry["files"], key=lambda n: n == META_FILE):  # the marker file last
                shutil.copyfile(src / "warm_start" / key / name, staging / name)
            _verify(staging, entry["files"], where, f"{key} was not imported")  # what landed on this disk
            if final.exists():
                shutil.rmtree(final)  # a leftover without its marker file: never a valid warm start
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        imported.append(key)
    return imported, kept


__all__ = ["COURSE_RUNS", "MANIFEST", "SIZES", "TINY_WARM_START", "check", "course_warm_starts", "export_cache",
           "import_cache", "prepare", "warm_start_dir"]
