"""Runs on disk (docs/design.md, "Runs on disk"): config, metrics, knob events, summary, checkpoints.

    runs/<run-id>/config.json         everything needed to rerun
    runs/<run-id>/metrics.parquet     one row per update; holds every row once ``run()`` ends (the
                                      end of Run.run, the CLI, ControlPanel.finish: write_summary)
    runs/<run-id>/metrics.parts/      only while a run is live (or after a crash): the rows appended
    runs/<run-id>/metrics.tail.jsonl  since, as parquet parts of 512 rows + one JSON line per newer
                                      update (O(1) per update). read_metrics(run_dir) reads all three
                                      at any moment: every complete row, none twice (``metrics``)
    runs/<run-id>/knob_events.jsonl   one line per live change, with the update it took effect at
    runs/<run-id>/health.jsonl        health warnings, when each started and ended (health.py)
    runs/<run-id>/summary.json        headline numbers, rewritten atomically
    runs/<run-id>/run.lock            only while a process writes the folder (pid, host, since: lock.py)
    runs/<run-id>/checkpoints/update_000123/
        model.safetensors             weights (shared/tied tensors handled by safetensors)
        optimizer.safetensors + .json AdamW state tensors + param-group hyperparameters
        buffer.safetensors + .json    queued batches and pending minibatches (token ids, log-probs...)
        state.json                    policy version, knobs, RNG states, counters
Everything is safetensors or JSON/JSON lines/parquet: nothing is ever unpickled. Files get the
umask's mode (``files.py``); the ``keep_checkpoints`` newest checkpoints are kept (``prune_checkpoints``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.runs.files import atomic_write, dir_mode, disk_full, file_mode, is_disk_full, remove, temp_leftovers
from workbench.runs.lock import RunLock, is_locked
from workbench.runs.metrics import PARTS, TAIL, MetricsLog, read_metrics


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file beside ``path``, fsync, umask mode, rename: all or nothing (``files.atomic_write``)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_parquet(df: pl.DataFrame, path: Path) -> None:
    atomic_write(path, df.write_parquet)


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True)


# what a sweep's notebook cell writes into its run folder before the notebook's Run opens it
SIDE_FILES = frozenset({"notebook.ipynb"})


def is_run_dir(path: Path) -> bool:
    """A workbench run directory: holds the lock file, or a ``config.json`` that parses as a workbench
    config (or names ``task``, ``objective``, ``out_dir`` and ``run_name``: another version's)."""
    if is_locked(path):
        return True
    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(d, dict):
        return False
    try:
        RunConfig.from_dict(d)
        return True
    except Exception:  # noqa: BLE001 - any invalid field: fall back to the field names
        return {"task", "objective", "out_dir", "run_name"} <= set(d)


def keep_previous(path: Path, log=print) -> Path | None:
    """Move an earlier run at ``path`` aside to ``path.1``, ``path.2``... (never overwrite it).

    Only a finished (or crashed) workbench run directory is moved, while holding its lock, so a run
    that another process is writing is never moved (one-line error naming it); any other non-empty
    folder is an error and stays untouched. A folder holding only ``SIDE_FILES`` holds no earlier run:
    nothing to move. The new name is a sibling: nothing leaves the parent."""
    path = Path(path)
    if not path.exists():
        return None
    entries = {p.name for p in path.iterdir()} if path.is_dir() else None
    if entries is not None and entries <= SIDE_FILES:
        return None
    if entries is None or not is_run_dir(path):
        raise WorkbenchError(f"{path} exists and is not a workbench run directory; choose another --run-name")
    lock = RunLock.acquire(path, log)  # refuses a live run of another process
    try:
        k = 1
        while path.with_name(f"{path.name}.{k}").exists():
            k += 1
        moved = path.with_name(f"{path.name}.{k}")
        os.rename(path, moved)
        lock.moved(moved)
    finally:
        lock.release()
    log(f"an earlier run was in {path}: moved it to {moved}")
    return moved


class RunDir:
    """A run's folder. All writes are atomic or append-only.

    ``RunDir(path)`` reads (and writes, unchecked: tools that fix up a finished folder);
    ``RunDir.open(path)`` is the writer of a live run: it holds the folder's lock (``lock.py``) until
    ``close()``, garbage collection or interpreter exit, and every write checks it still owns it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._metrics: MetricsLog | None = None  # opened on the first write: reading never recovers
        self._lock: RunLock | None = None

    @classmethod
    def open(cls, path: str | Path, log=print, config: dict[str, Any] | None = None) -> "RunDir":
        """Open for writing (a new run or a resume): create, lock (one writer; a live one is a one-line
        error), remove temp files and folders left by a killed write, write ``config`` if given."""
        rd = cls(path)
        rd._lock = RunLock.acquire(rd.path, log)
        weakref.finalize(rd, rd._lock.release)  # an unreachable writer frees its folder; also at exit
        try:
            removed = rd.clean_leftovers()
            if removed:
                log(f"run directory {rd.path}: removed {len(removed)} temp files left by an interrupted write")
            if config is not None:
                rd.write_config(config)
        except BaseException:
            rd.close()
            raise
        return rd

    def close(self) -> None:
        """Release the lock (idempotent); this object writes nothing afterwards."""
        if self._lock is not None:
            self._lock.release()

    @property
    def lock(self) -> RunLock | None:
        return self._lock

    def _writable(self) -> None:
        if self._lock is not None:
            self._lock.check()

    def clean_leftovers(self) -> list[Path]:
        """Temp files of interrupted atomic writes and ``checkpoints/.tmp_*`` folders."""
        found = temp_leftovers(self.path) + temp_leftovers(self.path / PARTS)
        found += [p for p in (self.path / "checkpoints").glob(".tmp_*")]
        found += [p for d in self.checkpoint_dirs() for p in temp_leftovers(d)]  # of mark_final
        for p in found:
            remove(p)
        return found

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.parquet"

    def write_config(self, config_dict: dict[str, Any]) -> None:
        self._writable()
        atomic_write_text(self.path / "config.json", dumps(config_dict))

    @property
    def metrics_log(self) -> MetricsLog:
        """This folder's metrics writer (one per run directory: the loop's ``RunDir``)."""
        if self._metrics is None:
            self._metrics = MetricsLog(self.path)
        return self._metrics

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One update's row, O(1) in the rows already written."""
        self._writable()
        with _disk_full_is_an_error(self.path / TAIL):
            self.metrics_log.append(row)
        if self._lock is not None:
            self._lock.refresh()

    def compact_metrics(self) -> None:
        """Fold the live parts and tail into ``metrics.parquet`` (O(rows), once at the end of a run)."""
        if self._metrics is not None or (self.path / TAIL).exists() or (self.path / PARTS).exists():
            self._writable()
            with _disk_full_is_an_error(self.metrics_path):
                self.metrics_log.compact()

    def keep_metrics(self, rows: int) -> None:
        """Keep the first ``rows`` rows on disk (a resume drops the updates after its checkpoint)."""
        self._writable()
        with _disk_full_is_an_error(self.metrics_path):
            self.metrics_log.truncate(rows)

    def read_metrics(self) -> pl.DataFrame:
        return read_metrics(self.path)

    def append_jsonl(self, name: str, event: dict[str, Any]) -> None:
        """Append one event to the journal ``name`` (``knob_events.jsonl``, ``health.jsonl``): whole
        lines only, synced."""
        self._writable()
        path = self.path / name
        data = (json.dumps(event, sort_keys=True, default=_json_default) + "\n").encode()
        with _disk_full_is_an_error(path), open(path, "ab", buffering=0) as f:
            start = f.tell()
            try:
                view = memoryview(data)
                while view:
                    view = view[f.write(view):]
                os.fsync(f.fileno())
            except BaseException:
                f.truncate(start)  # never a torn line
                raise

    def read_jsonl(self, name: str) -> tuple[list[dict[str, Any]], str | None]:
        """The journal's events up to its first damaged line, and what is wrong there (None: intact)."""
        try:
            data = (self.path / name).read_bytes()
        except FileNotFoundError:
            return [], None
        except OSError as e:
            return [], f"is unreadable ({e.strerror or type(e).__name__})"
        events: list[dict[str, Any]] = []
        lines = data.split(b"\n")
        for i, line in enumerate(lines[:-1], 1):
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                return events, f"line {i} is not JSON"
            if not isinstance(event, dict):
                return events, f"line {i} is not a JSON object"
            events.append(event)
        return events, (f"line {len(lines)} is torn (no newline at its end)" if lines[-1] else None)

    def rewrite_jsonl(self, name: str, events: list[dict[str, Any]]) -> None:
        """Replace the journal ``name`` with ``events`` atomically (a resume: the checkpoint's)."""
        self._writable()
        text = "".join(json.dumps(e, sort_keys=True, default=_json_default) + "\n" for e in events)
        atomic_write_text(self.path / name, text)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The end of a run (``Run.run``, the CLI, ``ControlPanel.finish``): the metrics are compacted
        first, so the folder then holds one ``metrics.parquet`` of every row the summary describes."""
        self._writable()
        self.compact_metrics()
        atomic_write_text(self.path / "summary.json", dumps(summary))

    # ---- checkpoints ----
    def checkpoint_dirs(self) -> list[Path]:
        return sorted(p for p in (self.path / "checkpoints").glob("update_*") if p.is_dir())

    def latest_checkpoint(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def write_checkpoint(self, update: int, files: dict[str, Any], keep: int = 0) -> Path:
        """Write ``files`` (name -> dict of tensors for ``.safetensors``, JSON-able for ``.json``),
        then keep only the ``keep`` newest checkpoints (``prune_checkpoints``; 0 = all).

        Written into a hidden temp folder and renamed into place, so a half-written checkpoint is
        never picked up by ``latest_checkpoint``; a full disk removes the temp folder and is a
        one-line error, the earlier checkpoints untouched.
        """
        self._writable()
        ckdir = self.path / "checkpoints"
        final = ckdir / f"update_{update:06d}"
        tmp = Path(tempfile.mkdtemp(dir=ckdir, prefix=".tmp_"))
        try:
            for name, content in files.items():
                if name.endswith(".safetensors"):
                    save_file({k: v.contiguous() for k, v in content.items()}, str(tmp / name))
                    os.chmod(tmp / name, file_mode())  # safetensors creates 0o600
                else:
                    atomic_write_text(tmp / name, dumps(content))
            os.chmod(tmp, dir_mode())
            old = Path(tempfile.mkdtemp(dir=ckdir, prefix=f".tmp_old_{final.name}_")) if final.exists() else None
            if old is not None:
                os.replace(final, old)  # onto the empty temp folder: the new one then takes the name
            os.replace(tmp, final)
        except BaseException as e:
            remove(tmp)
            if is_disk_full(e):
                raise disk_full(final) from None
            raise
        if old is not None:
            remove(old)
        self.prune_checkpoints(keep, final)
        return final

    def mark_final(self, update: int, keep: int = 0) -> None:
        """Mark the checkpoint of ``update`` as the end of a ``run()`` (``state.json`` ``"final"``),
        when the last update already wrote it; then prune as ``write_checkpoint`` does."""
        self._writable()
        folder = self.path / "checkpoints" / f"update_{update:06d}"
        if (folder / "state.json").is_file():
            atomic_write_text(folder / "state.json", dumps({**json.loads((folder / "state.json").read_text()),
                                                            "final": True}))
            self.prune_checkpoints(keep, folder)

    def prune_checkpoints(self, keep: int, newest: Path) -> list[Path]:
        """Delete the oldest checkpoints beyond the ``keep`` newest, counted up to ``newest`` (the one
        just written); 0 = keep all. The newest final one (``state.json`` ``"final"``: the end of a
        ``run()``) is always kept. Checkpoints after ``newest`` are of updates a resume from an older
        checkpoint dropped (their rows were cut), so they go too. Each is renamed to a temp name
        before it is deleted: an interrupted prune never leaves a half-deleted ``update_*``."""
        if keep <= 0:
            return []
        dirs = [d for d in self.checkpoint_dirs() if d.name <= newest.name]
        finals = [d for d in dirs if _is_final(d)]
        kept = set(dirs[-keep:]) | set(finals[-1:]) | {newest}
        gone = [d for d in dirs if d not in kept] + [d for d in self.checkpoint_dirs() if d.name > newest.name]
        for d in gone:
            trash = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".tmp_del_{d.name}_"))
            os.replace(d, trash)
            remove(trash)
        return gone


def _is_final(checkpoint: Path) -> bool:
    try:
        return json.loads((checkpoint / "state.json").read_text()).get("final") is True
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _disk_full_is_an_error(path: Path):
    try:
        yield
    except WorkbenchError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(path) from None
        raise


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load every file of a checkpoint folder (safetensors -> tensors, json -> objects)."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise WorkbenchError(f"checkpoint={str(path)!r} is invalid: expected a folder holding state.json")
    out: dict[str, Any] = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            out[f.name] = load_file(str(f))
        elif f.suffix == ".json":
            out[f.name] = json.loads(f.read_text())
    return out


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors and JSON (no pickle)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
