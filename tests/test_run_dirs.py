"""Run directories on disk: one writer (the lock), checked run names, what ``keep_previous`` may move,
checkpoint retention, verification with fallback on resume, temp leftovers, a full disk, file modes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import save_file

from workbench.cli import main as cli_main
from workbench.cli.run import _finish
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run, _run_name
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model
from workbench.policy.tokenizer import build_char_tokenizer
from workbench.runs import files as run_files
from workbench.runs.lock import LOCK_FILE, read_holder
from workbench.runs.metrics import MetricsLog
from workbench.runs.rundir import RunDir, keep_previous

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=3, eval_size=16, lr=1e-3, seed=3)
HOLD = ("import sys, time; from workbench.runs.lock import RunLock; RunLock.acquire(sys.argv[1]); "
        "print('ready', flush=True); time.sleep(120)")


def make_run(tokenizer, tiny_model_config, out_dir, log=None, **overrides):
    cfg = RunConfig(**{**SMALL, "out_dir": str(out_dir), "run_name": "r", **overrides})
    model = build_model(tiny_model_config, tokenizer, seed=0)
    return Run(cfg, model=model, tokenizer=tokenizer, log=log or (lambda s: None))


def resume(tokenizer, tiny_model_config, run_dir, checkpoint=None, log=None):
    return Run.resume(run_dir, checkpoint, model=build_model(tiny_model_config, tokenizer, seed=0),
                      tokenizer=tokenizer, log=log or (lambda s: None))


def deterministic(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([c for c in df.columns if not c.startswith("perf/")])


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def finished_run(tokenizer, tiny_model_config, out_dir, steps=2, **kw) -> Path:
    run = make_run(tokenizer, tiny_model_config, out_dir, **kw)
    run.run(steps)
    run.close()
    return run.dir.path


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of a folder; yields (start(folder) -> pid)."""
    procs = []

    def start(folder: Path) -> int:
        folder.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        procs.append(p)
        assert p.stdout.readline().strip() == "ready"
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def write_lock(folder: Path, pid: int, host: str | None = None) -> None:
    info = {"pid": pid, "host": host or socket.gethostname(), "since": time.time() - 60, "token": "t"}
    (folder / LOCK_FILE).write_text(json.dumps(info))


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


# ------------------------------------------------------------------------------ the lock
def test_a_second_writer_and_a_resume_of_a_live_run_stop_at_once(tokenizer, tiny_model_config, tmp_path, holder):
    d = finished_run(tokenizer, tiny_model_config, tmp_path)
    before = sorted(p.name for p in d.rglob("*"))
    pid = holder(d)
    with pytest.raises(WorkbenchError) as e:  # same --run-name: never moved aside while live
        make_run(tokenizer, tiny_model_config, tmp_path)
    msg = one_line(e)
    assert f"pid {pid} on {socket.gethostname()} since " in msg and str(d) in msg
    t0 = time.perf_counter()
    with pytest.raises(WorkbenchError) as e:
        Run.resume(d)  # refused before a model is built (none is passed: building one would warm-start)
    assert f"pid {pid}" in one_line(e) and time.perf_counter() - t0 < 2
    assert not (tmp_path / "r.1").exists()
    assert sorted(p.name for p in d.rglob("*")) == sorted(before + [LOCK_FILE])  # + the holder's lock
    assert read_holder(d)["pid"] == pid


def test_two_new_runs_on_one_folder(tokenizer, tiny_model_config, tmp_path, holder):
    pid = holder(tmp_path / "r")  # another process just created the folder: only its lock is there
    with pytest.raises(WorkbenchError) as e:
        make_run(tokenizer, tiny_model_config, tmp_path)
    assert f"pid {pid}" in one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"] and os.listdir(tmp_path / "r") == [LOCK_FILE]


def test_a_stale_lock_is_taken_over_with_a_notice(tokenizer, tiny_model_config, tmp_path):
    d = finished_run(tokenizer, tiny_model_config, tmp_path, checkpoint_every=1)
    pid = dead_pid()
    write_lock(d, pid)
    logs: list[str] = []
    run = resume(tokenizer, tiny_model_config, d, log=logs.append)
    assert run.version == 2 and any(f"took over the lock of pid {pid}" in s and "not running" in s for s in logs)
    assert read_holder(d)["pid"] == os.getpid()
    run.close()
    assert not (d / LOCK_FILE).exists()
    write_lock(d, dead_pid())  # a crashed run is moved aside by a rerun with the same name
    make_run(tokenizer, tiny_model_config, tmp_path).close()
    assert (tmp_path / "r.1" / "config.json").exists() and not (tmp_path / "r.1" / LOCK_FILE).exists()


def test_another_hosts_lock_is_refused_until_it_is_old(tokenizer, tiny_model_config, tmp_path):
    d = finished_run(tokenizer, tiny_model_config, tmp_path)
    write_lock(d, 1, host="elsewhere.example")
    with pytest.raises(WorkbenchError) as e:
        resume(tokenizer, tiny_model_config, d)
    assert "on elsewhere.example" in one_line(e) and "another host" in str(e.value) and LOCK_FILE in str(e.value)
    old = time.time() - 3 * 24 * 3600
    os.utime(d / LOCK_FILE, (old, old))
    logs: list[str] = []
    resume(tokenizer, tiny_model_config, d, log=logs.append).close()
    assert any("took over the lock" in s and "not refreshed" in s for s in logs)


def test_close_and_a_newer_run_of_the_same_process(tokenizer, tiny_model_config, tmp_path):
    first = make_run(tokenizer, tiny_model_config, tmp_path, checkpoint_every=1)
    first.run(2)
    assert read_holder(tmp_path / "r")["pid"] == os.getpid()
    second = resume(tokenizer, tiny_model_config, tmp_path / "r")  # in one process: the newer Run owns it
    with pytest.raises(WorkbenchError) as e:
        first.step()
    assert "newer Run of this process" in one_line(e)
    second.step()
    second.close()
    assert not (tmp_path / "r" / LOCK_FILE).exists()
    with pytest.raises(WorkbenchError) as e:
        second.step()
    assert "was closed" in one_line(e)
    third = resume(tokenizer, tiny_model_config, tmp_path / "r")  # after close(): again, same process
    assert third.version == 3
    third.close()


# ------------------------------------------------------------------------------ names and keep_previous
@pytest.mark.parametrize("name", ["/abs", ".", "..", "../x", "a/b", "a\\b", "x\0"])
def test_run_names_that_leave_out_dir_are_refused(name):
    with pytest.raises(WorkbenchError) as e:
        RunConfig(run_name=name)
    assert one_line(e).startswith(f"run_name={name!r} is invalid: expected ")


def test_keep_previous_moves_only_run_directories(tokenizer, tiny_model_config, tmp_path):
    other = tmp_path / "r"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for config_json in (None, '{"a": 1}', "not json"):
        if config_json is not None:
            (other / "config.json").write_text(config_json)
        with pytest.raises(WorkbenchError) as e:
            make_run(tokenizer, tiny_model_config, tmp_path)
        assert one_line(e) == f"{other} exists and is not a workbench run directory; choose another --run-name"
    assert (other / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    shutil.rmtree(other)
    d = finished_run(tokenizer, tiny_model_config, tmp_path)
    logs: list[str] = []
    assert keep_previous(d, logs.append) == tmp_path / "r.1" and not d.exists()
    assert (tmp_path / "r.1" / "summary.json").exists() and logs == [f"an earlier run was in {d}: moved it to {tmp_path / 'r.1'}"]
    assert keep_previous(tmp_path / "absent") is None


# ------------------------------------------------------------------------------ checkpoints
def names(d: Path) -> list[str]:
    return [p.name for p in RunDir(d).checkpoint_dirs()]


def test_retention_keeps_the_newest_and_the_final_one(tokenizer, tiny_model_config, tmp_path):
    run = make_run(tokenizer, tiny_model_config, tmp_path, checkpoint_every=1, keep_checkpoints=2)
    d = run.dir.path
    run.run(4)  # the last update wrote update_000004; run() marks it final
    assert names(d) == ["update_000003", "update_000004"]
    for _ in range(3):  # a later run() interrupted: its final checkpoint not yet written
        run.step()
    assert names(d) == ["update_000004", "update_000006", "update_000007"]
    run.run(1)
    assert names(d) == ["update_000007", "update_000008"]
    run.close()
    every = make_run(tokenizer, tiny_model_config, tmp_path / "all", checkpoint_every=1, keep_checkpoints=0)
    every.run(4)
    every.close()
    assert len(names(every.dir.path)) == 4
    for bad in (-1, True, 1.5):
        with pytest.raises(WorkbenchError) as e:
            RunConfig(keep_checkpoints=bad)
        assert one_line(e).startswith("keep_checkpoints=")


@pytest.fixture(scope="module")
def four_updates(tmp_path_factory) -> Path:
    """A closed run directory with checkpoints after updates 2 and 4 (the final one)."""
    tokenizer, cfg = build_char_tokenizer(), ModelConfig(**TINY_MODEL)
    return finished_run(tokenizer, cfg, tmp_path_factory.mktemp("base"), steps=4, checkpoint_every=2)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def other_model(path: Path) -> None:
    big = build_model(ModelConfig(**{**TINY_MODEL, "hidden_size": 64}), build_char_tokenizer(), seed=0)
    save_file({k: v.detach().clone() for k, v in big.state_dict().items()}, str(path))


DAMAGE = {
    "truncated model": ("model.safetensors", truncate, "model.safetensors: truncated"),
    "invalid state.json": ("state.json", lambda p: p.write_text('{"version": "four"'), "state.json: "),
    "state.json of wrong types": ("state.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "rows": "4"})), "state.json: rows='4' is not int"),
    "missing buffer.json": ("buffer.json", lambda p: p.unlink(), "missing buffer.json"),
    "another model size": ("model.safetensors", other_model, "(a checkpoint of another model?)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tokenizer, tiny_model_config, tmp_path,
                                                                four_updates, case):
    name, damage, needle = DAMAGE[case]
    a = copy_of(four_updates, tmp_path / "a" / "r")
    b = copy_of(four_updates, tmp_path / "b" / "r")
    damage(a / "checkpoints" / "update_000004" / name)
    logs: list[str] = []
    fell_back = resume(tokenizer, tiny_model_config, a, log=logs.append)
    assert fell_back.version == 2
    notice = [s for s in logs if "damaged" in s]
    assert len(notice) == 1 and notice[0].startswith("checkpoint update_000004 is damaged (")
    assert needle in notice[0] and notice[0].endswith("); resuming from update_000002")
    older = resume(tokenizer, tiny_model_config, b, checkpoint="update_000002")
    assert deterministic(fell_back.run(2)).equals(deterministic(older.run(2)))
    fell_back.close()
    older.close()


def test_no_intact_checkpoint_is_one_line_listing_each(tokenizer, tiny_model_config, tmp_path, four_updates):
    d = copy_of(four_updates, tmp_path / "r")
    truncate(d / "checkpoints" / "update_000004" / "optimizer.safetensors")
    (d / "checkpoints" / "update_000002" / "rng.safetensors").unlink()
    with pytest.raises(WorkbenchError) as e:
        resume(tokenizer, tiny_model_config, d)
    msg = one_line(e)
    assert "has no intact checkpoint: update_000004 (optimizer.safetensors: truncated" in msg
    assert "update_000002 (missing rng.safetensors)" in msg
    assert not (d / LOCK_FILE).exists()  # the failed resume released the folder
    with pytest.raises(WorkbenchError) as e:  # an explicit damaged checkpoint: no fallback
        resume(tokenizer, tiny_model_config, d, checkpoint=d / "checkpoints" / "update_000002")
    assert "is damaged: missing rng.safetensors" in one_line(e)


def test_cli_resume_checkpoint_flag(tmp_path, four_updates, capsys):
    d = copy_of(four_updates, tmp_path / "r")
    assert cli_main(["resume", str(d), "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint=") and "is invalid: expected a checkpoint folder" in err
    assert len(err.splitlines()) == 1


def test_temp_leftovers_are_cleaned_when_the_folder_is_opened(tokenizer, tiny_model_config, tmp_path, four_updates):
    d = copy_of(four_updates, tmp_path / "r")
    (d / "checkpoints" / ".tmp_k1ll3d").mkdir()
    (d / "checkpoints" / ".tmp_k1ll3d" / "model.safetensors").write_bytes(b"half")
    leftovers = [d / ".config.json.ab12cd34", d / ".summary.json.x_y9z8w7", d / ".metrics.parquet.abcdefgh",
                 d / "checkpoints" / "update_000004" / ".state.json.k2j3h4g5"]
    for p in leftovers:
        p.write_text("half")
    (d / ".keep").write_text("not a temp file")
    resume(tokenizer, tiny_model_config, d).close()
    assert not any(p.exists() for p in leftovers) and not (d / "checkpoints" / ".tmp_k1ll3d").exists()
    assert (d / ".keep").exists()


def test_a_full_disk_is_one_line_and_keeps_the_previous_files(tokenizer, tiny_model_config, tmp_path, monkeypatch):
    run = make_run(tokenizer, tiny_model_config, tmp_path, checkpoint_every=1)
    run.run(1)
    d = run.dir.path
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("workbench.runs.rundir.save_file", full)
        with pytest.raises(WorkbenchError) as e:
            run.save_checkpoint()
        assert one_line(e) == f"disk full while writing {d / 'checkpoints' / 'update_000001'}: the previous " \
                              f"complete files are kept"
        m.setattr(run_files.os, "fsync", full)
        with pytest.raises(WorkbenchError) as e:
            run.write_summary()
        assert one_line(e).startswith(f"disk full while writing {d / 'summary.json'}")
        m.setattr(MetricsLog, "append", full)
        with pytest.raises(WorkbenchError) as e:
            run.step()
        assert one_line(e).startswith(f"disk full while writing {d / 'metrics.tail.jsonl'}")
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == before  # no temp file left, every earlier file as it was
    run.close()
    assert resume(tokenizer, tiny_model_config, d).version == 1


def test_every_file_a_run_writes_has_the_umask_mode(tokenizer, tiny_model_config, tmp_path):
    old = os.umask(0o027)
    try:
        run = make_run(tokenizer, tiny_model_config, tmp_path, checkpoint_every=1)
        run.run(1)
        run.knobs.staleness = 1
        run.run(1)
        _finish(run)  # the CLI's end: summary, compacted metrics, charts.png
        run.close()
    finally:
        os.umask(old)
    d = run.dir.path
    files = {p.relative_to(d).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in d.rglob("*") if p.is_file()}
    dirs = {p.relative_to(d).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in d.rglob("*") if p.is_dir()}
    for name in ("config.json", "summary.json", "metrics.parquet", "knob_events.jsonl", "charts.png",
                 "checkpoints/update_000002/model.safetensors", "checkpoints/update_000002/state.json"):
        assert name in files, name
    assert set(files.values()) == {0o640}, files
    assert set(dirs.values()) == {0o750}, dirs


def test_resume_with_an_unreadable_config_is_one_line(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.json").write_text("{oops")
    with pytest.raises(WorkbenchError, match="config=.*is unreadable") as err:
        Run.resume(d)
    assert "\n" not in str(err.value)


def test_a_lock_released_from_a_finalizer_inside_acquire_does_not_deadlock(tmp_path):
    """The GC can collect an old Run (its weakref finalizer releases its lock) while this thread is inside
    ``RunLock.acquire``, holding the guard: the release must re-enter, not wait for itself."""
    import threading

    from workbench.runs import lock as lock_module

    (tmp_path / "old").mkdir()
    old = lock_module.RunLock.acquire(tmp_path / "old", log=lambda s: None)
    done = threading.Event()

    def inside_acquire():
        with lock_module._GUARD:  # as acquire holds it when a collection runs the finalizer
            old.release()
        done.set()

    worker = threading.Thread(target=inside_acquire, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set(), "release deadlocked on the guard its own thread holds"
    assert not (tmp_path / "old" / "run.lock").exists()


def test_generated_run_names_say_the_lag_or_that_it_is_simulated():
    fixed = _run_name(RunConfig(staleness=16, objective="m2po", seed=3))
    assert fixed.startswith("addition-m2po-s16-seed3-")
    simulated = _run_name(RunConfig(staleness_mode="async", seed=1))
    assert simulated.startswith("addition-ppo_clip-async-seed1-"), simulated
