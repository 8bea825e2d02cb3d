"""Tracking sinks (workbench/runs/tracking.py): TensorBoard event files and trackio's local store hold
exactly the values of metrics.parquet at each update, and knob changes at the update they took
effect; tracking leaves the metrics bit-identical; a resumed run appends without duplicate steps;
trackio never opens a socket; bad sink names and missing packages are one-line errors that write nothing."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

pytest.importorskip("tensorboard", reason="the tracking extra is not installed: pip install 'workbench[tracking]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from workbench.config import RunConfig  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.loop import Run  # noqa: E402
from workbench.policy.model import build_model  # noqa: E402
from workbench.runs.metrics import read_metrics  # noqa: E402
from workbench.runs.tracking import TrackingSink  # noqa: E402

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=2, eval_size=16, lr=1e-3, seed=3, steps=4)
SCHEDULE = [{"update": 2, "changes": {"staleness": 1, "lr": 5e-4}}]


def tracked_run(tokenizer, tiny_model_config, out_dir, tracking, name="r", schedule=SCHEDULE, **overrides):
    cfg = RunConfig(**{**SMALL, "out_dir": str(out_dir), "run_name": name, **overrides})
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer,
              knob_schedule=schedule, log=lambda s: None)
    return attach(run, tracking)


def attach(run: Run, tracking: str) -> Run:
    """The sink of ``tracking`` on ``run``, unless the loop already attached one from the config."""
    if tracking and not any(isinstance(h, TrackingSink) for h in run.hooks):
        run.hooks.append(TrackingSink(tracking, run.dir.path, log=lambda s: None))
    return run


def finish(run: Run) -> None:
    for hook in run.hooks:
        if isinstance(hook, TrackingSink):
            hook.close()
    run.close()


def expected_series(df: pl.DataFrame) -> dict[str, list[tuple[int, float]]]:
    """column -> [(update, value)] of every numeric column, NaN and null skipped (from the parquet)."""
    out = {}
    for col in df.columns:
        if col == "update" or not (df[col].dtype.is_numeric() or df[col].dtype == pl.Boolean):
            continue
        pairs = [(int(u), float(v)) for u, v in zip(df["update"], df[col]) if v is not None and not math.isnan(float(v))]
        if pairs:
            out[col] = pairs
    return out


def tensorboard_events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def text_events(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_tensorboard_scalars_equal_the_parquet_and_knob_changes_are_text(tokenizer, tiny_model_config, tmp_path):
    run = tracked_run(tokenizer, tiny_model_config, tmp_path, "tensorboard")
    run.run()
    finish(run)
    df = read_metrics(run.dir.path)
    acc = tensorboard_events(run.dir.path)
    want = expected_series(df)
    assert {"loss/policy", "reward/accuracy", "knob/staleness", "knob/lr", "eval/accuracy"} <= set(want)
    assert set(acc.Tags()["scalars"]) == set(want)  # every numeric column, nothing else (knob/objective is text)
    for col, pairs in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(col)]
        # event files store float32: each value is the parquet's float64 rounded once
        assert got == [(u, float(np.float32(v))) for u, v in pairs], col
    assert [u for u, _ in want["eval/accuracy"]] == [1, 3]  # evaluated updates only (eval_every=2)
    assert [v for _, v in want["knob/staleness"]] == [0, 0, 1, 1]
    (step, text), = text_events(acc, "knobs")
    assert step == 2 and "`lr` = `0.0005`" in text and "`staleness` = `1`" in text
    (step, text), = text_events(acc, "config")
    assert step == 0 and '"tracking": ""' in text and '"seed": 3' in text


def test_metrics_are_bit_identical_with_and_without_tracking(tokenizer, tiny_model_config, tmp_path):
    frames = []
    for tracking in ("", "tensorboard"):
        run = tracked_run(tokenizer, tiny_model_config, tmp_path / (tracking or "none"), tracking)
        run.run()
        finish(run)
        df = read_metrics(run.dir.path)
        frames.append(df.select([c for c in df.columns if not c.startswith("perf/")]))  # wall-clock times differ
    assert frames[0].equals(frames[1]) and frames[0].shape == (4, frames[0].width)
    assert (tmp_path / "tensorboard" / "r" / "tensorboard").is_dir() and not (tmp_path / "none" / "r" / "tensorboard").exists()


def test_resume_appends_and_replaces_what_an_interrupted_process_wrote(tokenizer, tiny_model_config, tmp_path):
    run = tracked_run(tokenizer, tiny_model_config, tmp_path, "tensorboard", checkpoint_every=2)
    for _ in range(3):  # updates 0, 1, 2; checkpoint at version 2; then the process "dies"
        run.step()
    finish(run)
    resumed = attach(Run.resume(tmp_path / "r", model=build_model(tiny_model_config, tokenizer, seed=0),
                                tokenizer=tokenizer, log=lambda s: None), "tensorboard")
    resumed.run()  # updates 2, 3
    finish(resumed)
    assert len(list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    df = read_metrics(tmp_path / "r")
    assert df["update"].to_list() == [0, 1, 2, 3]
    acc = tensorboard_events(tmp_path / "r")
    for col, pairs in expected_series(df).items():  # update 2 once: the interrupted copy was purged
        assert [(e.step, e.value) for e in acc.Scalars(col)] == [(u, float(np.float32(v))) for u, v in pairs], col
    assert [s for s, _ in text_events(acc, "knobs")] == [2]  # the change at update 2 once, by the resumed process


# ------------------------------------------------------------------------------------------ trackio
@pytest.fixture(scope="module")
def trackio_store(tmp_path_factory):
    """trackio with its store in a temporary folder (trackio reads TRACKIO_DIR once, at import)."""
    if "trackio" not in sys.modules:
        patch = pytest.MonkeyPatch()
        patch.setenv("TRACKIO_DIR", str(tmp_path_factory.mktemp("trackio")))
        try:
            pytest.importorskip("trackio", reason="the tracking extra is not installed: pip install 'workbench[tracking]'")
        finally:
            patch.undo()
    trackio = sys.modules["trackio"]
    return trackio.SQLiteStorage, Path(trackio.utils.TRACKIO_DIR)


@pytest.fixture
def no_network(monkeypatch):
    """Every TCP connect or name lookup is recorded and refused; remote trackio settings and a Hub
    token are in the environment, and the Hub is not in offline mode."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/some-space")
    monkeypatch.setenv("TRACKIO_SERVER_URL", "https://trackio.example.invalid")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    return attempts


def test_trackio_logs_equal_the_parquet_locally_and_never_reach_the_network(tokenizer, tiny_model_config, tmp_path,
                                                                            trackio_store, no_network):
    storage, store = trackio_store
    run = tracked_run(tokenizer, tiny_model_config, tmp_path, "tensorboard,trackio", name="trackio-run")
    run.run()
    finish(run)
    assert no_network == []
    hub = sys.modules["huggingface_hub.constants"]
    assert hub.HF_HUB_OFFLINE is False and "TRACKIO_SPACE_ID" in os.environ  # restored after init
    assert storage.get_project_db_path("workbench").parent == store and storage.get_project_db_path("workbench").is_file()
    logs = storage.get_logs("workbench", "trackio-run")
    df = read_metrics(run.dir.path)
    assert [entry["step"] for entry in logs] == [0, 1, 2, 3]
    for col, pairs in expected_series(df).items():  # JSON float64: exactly the parquet's values
        assert [(e["step"], e[col]) for e in logs if col in e] == pairs, col
    knobs = [(e["step"], e["knobs"]["_value"]) for e in logs if "knobs" in e]
    assert len(knobs) == 1 and knobs[0][0] == 2 and "`staleness` = `1`" in knobs[0][1]
    assert storage.get_run_config("workbench", "trackio-run")["seed"] == 3


def test_a_fresh_trackio_run_never_joins_an_earlier_one_of_the_same_name(tokenizer, tiny_model_config, tmp_path,
                                                                         trackio_store):
    storage, _ = trackio_store
    for out in ("a", "b"):
        run = tracked_run(tokenizer, tiny_model_config, tmp_path / out, "trackio", name="same-name", steps=2)
        run.run()
        finish(run)
    records = [r for r in storage.get_run_records("workbench") if r["name"] == "same-name"]
    assert len(records) == 2 and records[0]["id"] != records[1]["id"]


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value, needle", [
    ("tensorbord", "tracking='tensorbord' is invalid: expected comma-separated sinks from: tensorboard, trackio"),
    ("tensorboard,wandb", "'wandb' is not one"),
    (3, "tracking=3 is invalid"),
])
def test_unknown_sink_is_a_one_line_error_and_writes_nothing(value, needle, tmp_path):
    with pytest.raises(WorkbenchError) as err:
        RunConfig(**{**SMALL, "out_dir": str(tmp_path / "runs"), "tracking": value})
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(WorkbenchError):
        TrackingSink(value if isinstance(value, str) else "x", tmp_path / "runs" / "r")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing, tracking", [("tensorboard", "tensorboard"), ("trackio", "tensorboard, trackio")])
def test_a_missing_package_names_the_extra_and_writes_nothing(missing, tracking, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(WorkbenchError) as err:
        RunConfig(**{**SMALL, "out_dir": str(tmp_path / "runs"), "tracking": tracking})
    text = str(err.value)
    assert f"needs the {missing!r} package" in text and "pip install 'workbench[tracking]'" in text and "\n" not in text
    with pytest.raises(WorkbenchError, match="workbench\\[tracking\\]"):
        TrackingSink(tracking, tmp_path / "runs" / "r")
    assert list(tmp_path.iterdir()) == []
