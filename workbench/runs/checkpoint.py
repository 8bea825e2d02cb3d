"""Checkpoint and resume a ``Run`` exactly: weights, optimizer, buffer, RNG states, knobs, metrics,
the objective state (``Run.objective_state``, e.g. R2VPO's dual variable).

A run resumed from the checkpoint written after N updates produces the same metrics for updates
N.. as the uninterrupted run (tested). Files are safetensors and JSON only (see ``rundir``).

Resuming verifies a checkpoint before anything of the run changes: every file present, safetensors
headers that cover their files, ``state.json`` fields (and knob events) of the right types, the
model's tensor names, shapes and dtypes equal to the freshly built run's, an optimizer state with
every AdamW tensor of the right size and hyperparameters of the right kinds, buffered batches (and a
batch source's stored groups, of the config's source and params) with the tensors and lengths of the
``Rollouts`` contract, RNG and knob states that parse, and as many metrics rows on disk as the
checkpoint expects. A kill during a write never leaves a damaged
``update_*`` (they are renamed into place), but a disk fault, a copy cut short or a checkpoint of
another model can: then the newest intact one is used, with a one-line notice naming what was
wrong, so one bad file costs the updates since the checkpoint before it instead of the run.

What no checkpoint can make up for is a one-line error before anything is written: an unreadable or
invalid ``config.json`` (naming the file), metrics that do not read as one row per update in order.
The knob journal ``knob_events.jsonl`` is rewritten from the checkpoint on every resume; when it was
damaged (a torn or invalid line, missing, events unlike the checkpoint's) a one-line notice says so.
Not detected: flipped bits inside tensor data (no checksums are stored).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load_file

from workbench.config import RunConfig
from workbench.knobs import Knobs
from workbench.errors import WorkbenchError, bad_value, one_line
from workbench.rollouts import Rollouts
from workbench.runs.lock import check_free
from workbench.runs.metrics import BASE, PARTS, TAIL, rows_problem
from workbench.runs.rundir import load_optimizer_state, optimizer_state
from workbench.steps.buffer import StalenessBuffer

# ``run`` below is a ``workbench.loop.Run``: this module reads and restores its public attributes
# (``Run``'s docstring lists them) and never imports the loop, which imports this module.

FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "buffer.safetensors", "buffer.json",
         "rng.safetensors", "state.json")
# state.json field -> accepted types (bool is excluded from the ints separately)
STATE_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,), "knobs": (dict,), "prompt_rng": (list,), "rows": (int,), "knob_events": (list,),
    "initial_accuracy": (float, int, type(None)), "objective_state": (dict,), "final": (bool,)}
OPTIONAL_STATE = ("objective_state", "final", "initial_accuracy")  # absent in older checkpoints
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW state tensors shaped like their parameter


def save(run: Any, final: bool = False) -> Path:
    """Write a checkpoint of ``run`` after its latest update; returns the checkpoint folder.
    ``final``: the end of ``run()``, kept by the retention of ``keep_checkpoints``."""
    if run.dir is None:
        raise WorkbenchError("out_dir='' is invalid for checkpointing: expected a run directory")
    buf_tensors, buf_meta = run.buffer.state()
    mb_meta = []
    for i, mb in enumerate(run.minibatches):
        t, m = mb.to_state(prefix=f"minibatch{i}.")
        buf_tensors.update(t)
        mb_meta.append(m)
    opt_tensors, opt_meta = optimizer_state(run.optimizer)
    state = {
        "version": run.version,
        "knobs": run.knobs.applied.as_dict(),
        "prompt_rng": _encode_random_state(run.prompt_rng.getstate()),
        "rows": len(run.rows),
        "knob_events": run.knob_events,
        "initial_accuracy": run.initial_accuracy,
        "objective_state": _objective_state(run.objective_state),
        "torch_version": torch.__version__,
        "final": final,
    }
    files = {
        # clone: tied embeddings share storage, which safetensors refuses to write twice
        "model.safetensors": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "optimizer.safetensors": opt_tensors,
        "optimizer.json": opt_meta,
        "buffer.safetensors": buf_tensors,
        "buffer.json": {**buf_meta, "minibatches": mb_meta},
        "rng.safetensors": {"generator": run.generator.get_state()},
        "state.json": state,
    }
    return run.dir.write_checkpoint(run.version, files, keep=run.config.keep_checkpoints)


def load(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[RunConfig, list[Path]]:
    """The run's config (pointing at ``run_dir``) and the checkpoints to try, newest first (or only
    the given one: a folder, or a name under ``run_dir/checkpoints``). Refuses at once a folder that
    another live process writes (``lock.py``): nothing is built or read further."""
    run_dir = Path(run_dir)
    if run_dir.name in ("", ".", ".."):
        run_dir = run_dir.resolve()
    if not (run_dir / "config.json").is_file():
        raise WorkbenchError(f"run_dir={str(run_dir)!r} is invalid: expected a run folder holding config.json")
    check_free(run_dir)
    where = str(run_dir / "config.json")
    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WorkbenchError(f"config={where!r} is unreadable ({_one_line(e)}): expected the run's JSON "
                             f"config") from None
    if not isinstance(saved, dict):
        raise WorkbenchError(f"config={where!r} is invalid: holds a JSON {type(saved).__name__}, expected an object "
                             f"of RunConfig fields")
    try:
        config = RunConfig.from_dict(saved)
    except (TypeError, ValueError) as e:  # WorkbenchError included: say which file holds the bad field
        raise WorkbenchError(f"config={where!r} is invalid: {one_line(e)}") from None
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_dir() and (run_dir / "checkpoints" / path).is_dir():
            path = run_dir / "checkpoints" / path
        if not path.is_dir():
            raise bad_value("checkpoint", str(checkpoint), f"a checkpoint folder such as "
                                                          f"{run_dir / 'checkpoints' / 'update_000040'}")
        paths = [path]
    else:
        paths = sorted((p for p in (run_dir / "checkpoints").glob("update_*") if p.is_dir()), reverse=True)
    if not paths:
        raise WorkbenchError(f"run_dir={str(run_dir)!r} has no checkpoint: expected checkpoints/update_*")
    return config.replace(out_dir=str(run_dir.parent), run_name=run_dir.name), paths


def restore(run: Any, paths: list[Path]) -> Path:
    """Put a freshly built ``run`` (same config, ``_resuming=True``) into the state of the first intact
    checkpoint of ``paths`` (``load``'s order); a damaged one is skipped with a one-line notice via
    ``run.log``. None intact: a one-line error listing what was wrong with each. On any failure the
    run is closed: its folder's lock is released."""
    try:
        return _restore_first_intact(run, paths)
    except BaseException:
        run.close()
        raise


def _restore_first_intact(run: Any, paths: list[Path]) -> Path:
    rows = run.dir.read_metrics()
    problem = rows_problem(rows)
    if problem:  # every checkpoint needs the rows before it: no fallback helps
        files = ", ".join(name for name in (BASE, PARTS, TAIL) if (run.dir.path / name).exists())
        raise WorkbenchError(f"metrics of run_dir={str(run.dir.path)!r} ({files}) are damaged: {problem}")
    damaged: list[tuple[Path, str]] = []
    for path in paths:
        checked = _verified(run, path, rows)
        if isinstance(checked, str):
            damaged.append((path, checked))
            continue
        if damaged:
            run.log("; ".join(f"checkpoint {p.name} is damaged ({why})" for p, why in damaged)
                    + f"; resuming from {path.name}")
        _apply(run, checked, path)
        return path
    if len(paths) == 1:
        raise WorkbenchError(f"checkpoint={str(paths[0])!r} is damaged: {damaged[0][1]}")
    raise WorkbenchError(f"run_dir={str(run.dir.path)!r} has no intact checkpoint: "
                         + "; ".join(f"{p.name} ({why})" for p, why in damaged))


def _verified(run: Any, path: Path, rows: pl.DataFrame) -> dict[str, Any] | str:
    """Everything ``_apply`` needs, parsed and checked against ``run``; or what is wrong (one line)."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    files: dict[str, Any] = {}
    for name in FILES:
        try:
            if name.endswith(".safetensors"):
                problem = _header_problem(path / name)
                if problem:
                    return f"{name}: {problem}"
                files[name] = load_file(str(path / name))
            else:
                files[name] = json.loads((path / name).read_text())
        except Exception as e:  # noqa: BLE001 - safetensors, JSON and OS errors alike
            return f"{name}: {_one_line(e)}"
    state = files["state.json"]
    problem = _state_problem(state, path) or _model_problem(run, files["model.safetensors"]) or _optimizer_problem(
        run, files["optimizer.safetensors"], files["optimizer.json"])
    if problem:
        return problem
    out: dict[str, Any] = {"files": files}
    name = "buffer.json"
    try:  # parse into fresh objects: the run is untouched until every file has parsed
        buf = files["buffer.json"]
        buffer = StalenessBuffer()
        buffer.load_state(files["buffer.safetensors"], buf)
        out["minibatches"] = [Rollouts.from_state(files["buffer.safetensors"], m, prefix=f"minibatch{i}.")
                              for i, m in enumerate(buf["minibatches"])]
        source, cfg = buffer.source, run.config
        if source.name != cfg.batch_source or source.params != cfg.batch_source_params:
            return (f"buffer.json: batch source {source.name} {source.params} is not the config's "
                    f"{cfg.batch_source} {cfg.batch_source_params}")
        batches = [(f"queued batch {i}", b) for i, (b, _) in enumerate(buffer.queue)]
        batches += [(f"stored group {i} of the {source.name} source", b) for i, b in enumerate(source.groups)]
        batches += [(f"minibatch {i}", b) for i, b in enumerate(out["minibatches"])]
        for what, batch in batches:
            problem = _batch_problem(batch)
            if problem:
                return f"buffer.json: {what} {problem}"
        name = "rng.safetensors"
        torch.Generator().set_state(files["rng.safetensors"]["generator"])
        name = "state.json"
        out["prompt_rng"] = _decode_random_state(state["prompt_rng"])
        random.Random().setstate(out["prompt_rng"])
        _objective_state(state.get("objective_state", {}))
        Knobs(run.config).set(**state["knobs"])
    except Exception as e:  # noqa: BLE001 - any malformed entry
        return f"{name}: {_one_line(e)}"
    version = state["version"]
    out["rows"] = rows.filter(pl.col("update") < version).to_dicts() if len(rows) else []
    if len(out["rows"]) != state["rows"]:
        return (f"metrics on disk hold {len(out['rows'])} rows before update {version}, state.json expects "
                f"{state['rows']}")
    return out


def _apply(run: Any, checked: dict[str, Any], path: Path) -> None:
    files = checked["files"]
    state = files["state.json"]
    rd = run.dir
    run.model.load_state_dict(files["model.safetensors"])
    load_optimizer_state(run.optimizer, files["optimizer.safetensors"], files["optimizer.json"])
    run.buffer.load_state(files["buffer.safetensors"], files["buffer.json"])
    run.minibatches = checked["minibatches"]
    run.generator.set_state(files["rng.safetensors"]["generator"])
    run.prompt_rng.setstate(checked["prompt_rng"])
    run.version = int(state["version"])
    run.initial_accuracy = state.get("initial_accuracy")
    run.objective_state.clear()
    run.objective_state.update(state.get("objective_state", {}))
    run.knobs.set(**state["knobs"])
    run.knobs.take_pending()  # restoring is not a live change
    run.knob_events = list(state["knob_events"])
    run.rows = checked["rows"]
    rd.keep_metrics(len(run.rows))  # rows of updates after the checkpoint are re-recorded live
    # the journal keeps only what happened up to the checkpoint: later events are re-recorded live
    journal, problem = rd.read_jsonl("knob_events.jsonl")
    n = len(run.knob_events)
    if problem is None and journal[:n] != run.knob_events:  # a damaged journal: say so, the checkpoint decides
        exists = (rd.path / "knob_events.jsonl").exists()
        problem = f"does not start with the checkpoint's {n} events" if exists else "is missing"
    if problem:
        run.log(f"knob_events.jsonl {problem}: rewritten from checkpoint {path.name} ({n} event{'s' * (n != 1)})")
    rd.rewrite_jsonl("knob_events.jsonl", run.knob_events)


def _header_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the data it describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, no header)"
        n = int.from_bytes(head, "little")
        if n > size - 8:  # a cut inside the header, or bytes that were never a safetensors file
            return f"truncated or not safetensors ({size} bytes, the header alone would be {n + 8})"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "unreadable header"
    if end != size - 8 - n:
        return f"truncated ({size} bytes, the header describes {end + 8 + n})"
    return None


def _state_problem(state: Any, path: Path) -> str | None:
    if not isinstance(state, dict):
        return f"state.json: {type(state).__name__}, expected an object"
    for key, types in STATE_TYPES.items():
        if key not in state:
            if key in OPTIONAL_STATE:
                continue
            return f"state.json: no {key!r}"
        v = state[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            return f"state.json: {key}={v!r} is not {' or '.join(t.__name__ for t in types)}"
    if state["version"] < 0 or state["rows"] < 0:
        return f"state.json: version={state['version']}, rows={state['rows']}: expected >= 0"
    for event in state["knob_events"]:
        if not (isinstance(event, dict) and isinstance(event.get("changes"), dict)
                and type(event.get("update")) is int and 0 <= event["update"] <= state["version"]):
            return (f"state.json: knob_events entry {str(event)[:80]} is not "
                    f"{{'update': 0..version, 'changes': {{...}}}}")
    if path.name.startswith("update_") and path.name != f"update_{state['version']:06d}":
        return f"state.json: version={state['version']} does not match the folder name {path.name}"
    return None


def _model_problem(run: Any, tensors: dict[str, torch.Tensor]) -> str | None:
    expected = run.model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model does not"
        return f"model.safetensors: {what} ({len(missing)} missing, {len(extra)} unexpected tensors)"
    for k, want in expected.items():
        got = tensors[k]
        if got.shape != want.shape or got.dtype != want.dtype:
            return (f"model.safetensors: {k} is {list(got.shape)} {str(got.dtype).removeprefix('torch.')}, the model's "
                    f"is {list(want.shape)} {str(want.dtype).removeprefix('torch.')} (a checkpoint of another model?)")
    return None


def _batch_problem(batch: Rollouts) -> str | None:
    """What makes a restored batch unusable (the Rollouts contract's tensors and lengths), or None."""
    rows = None
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "behavior_logprobs", "policy_version",
              "group_id", "rewards", "advantages", "prox_logprobs", "ref_logprobs", "trainer_logprobs"):
        t = getattr(batch, f)
        if t is None:
            if f in ("rewards", "advantages", "prox_logprobs", "ref_logprobs", "trainer_logprobs"):
                continue
            return f"lacks {f} in buffer.safetensors"
        rows = t.shape[0] if rows is None and t.dim() else rows
        wide = f in ("prompt_ids", "prompt_mask") or f.startswith("response") or f.endswith("logprobs")
        if t.dim() == 0 or t.shape[0] != rows or (wide and t.dim() != 2):
            return f"has {f} of shape {list(t.shape)} for {rows} rows"
    per_token = (batch.response_mask, batch.behavior_logprobs, batch.prox_logprobs, batch.ref_logprobs,
                 batch.trainer_logprobs)
    if batch.prompt_mask.shape != batch.prompt_ids.shape or any(
            t is not None and t.shape != batch.response_ids.shape for t in per_token):
        return "has masks or log-probs of another shape than its token ids"
    for f in ("prompts", "completions", "answers", "extras"):
        if getattr(batch, f) and len(getattr(batch, f)) != rows:
            return f"has {len(getattr(batch, f))} {f} for {rows} rows"
    return None


def _optimizer_problem(run: Any, tensors: dict[str, torch.Tensor], meta: Any) -> str | None:
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not isinstance(meta.get("scalars"), dict) or \
            [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups] != \
            [len(g["params"]) for g in run.optimizer.param_groups]:
        return f"optimizer.json: param_groups do not match the optimizer's {len(params)} parameters"
    for i, (want, got) in enumerate(zip(run.optimizer.param_groups, groups)):
        for key, value in want.items():  # each hyperparameter of the kind the optimizer uses
            if key != "params" and not _same_kind(value, got.get(key, KeyError)):
                return (f"optimizer.json: param_groups[{i}].{key}={str(got.get(key, '(absent)'))[:40]}, expected "
                        f"like {value!r}")
    names: dict[int, set[str]] = {}
    for key, t in list(tensors.items()) + list(meta["scalars"].items()):
        idx, _, name = key.partition(".")
        if not idx.isdigit() or int(idx) >= len(params):
            return f"optimizer state {key} names no parameter (the optimizer has {len(params)})"
        names.setdefault(int(idx), set()).add(name)
        if name in MOMENTS and (not isinstance(t, torch.Tensor) or t.shape != params[int(idx)].shape):
            return (f"optimizer.safetensors: {key} is {list(getattr(t, 'shape', ()))}, its parameter is "
                    f"{list(params[int(idx)].shape)}")
    amsgrad = any(g.get("amsgrad") for g in run.optimizer.param_groups)
    need = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    for idx, have in sorted(names.items()):  # AdamW reads all of them for a parameter that has state
        if not need <= have:
            return f"optimizer.safetensors: parameter {idx} lacks {', '.join(sorted(need - have))}"
    return None


def _same_kind(want: Any, got: Any) -> bool:
    """``got`` (from JSON) can stand for ``want`` (the fresh optimizer's value): bool, number, sequence."""
    if isinstance(want, bool) or want is None:  # a flag: absent in older checkpoints, torch defaults it
        return got is None or got is KeyError or isinstance(got, bool)
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool)
    if isinstance(want, (tuple, list)):
        return isinstance(got, list) and len(got) == len(want) and all(_same_kind(w, g) for w, g in zip(want, got))
    return True  # a kind this check does not know: torch's load_state_dict decides


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _objective_state(state: dict[str, Any]) -> dict[str, Any]:
    """``Run.objective_state`` for state.json: str keys, JSON numbers only (floats round-trip exactly)."""
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise WorkbenchError(f"objective_state[{k!r}]={v!r} is invalid for a checkpoint: expected a number "
                                 f"under a str key")
        out[k] = v
    return out


def _encode_random_state(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _decode_random_state(st: list) -> tuple:
    return (st[0], tuple(st[1]), st[2])
