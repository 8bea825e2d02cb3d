"""Stopping a sweep: SIGTERM to the driver in this process (``workers=0``) and a terminal Ctrl-C
(SIGINT to the whole process group) on the local pool. No new cell starts, the running cells stop
with a checkpoint, the results so far are written, the stop is one line with the signal's exit code,
and the same sweep run again continues every cell to the metrics of an uninterrupted run (serial here;
the pool's continuation is ``test_sweep.py``'s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
import pytest

from test_stop import FIELDS, ROOT, deterministic, rows, wait_for
from workbench.config import RunConfig
from workbench.loop import Run
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model, save_policy
from workbench.policy.tokenizer import build_char_tokenizer
from workbench.runs.metrics import read_metrics
from workbench.sweeps import RUNS_FILE, SweepStopped, sweep

GRID = {"lr": [1e-4, 1e-3]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_char_tokenizer()
    return save_policy(build_model(ModelConfig(**TINY_MODEL), tok, seed=0), tok,
                       tmp_path_factory.mktemp("model") / "ckpt")


def base(model_dir, out_dir, steps) -> RunConfig:
    return RunConfig(**{**FIELDS, "model": str(model_dir), "steps": steps, "out_dir": str(out_dir)})


def cell_dirs(root: Path) -> list[Path]:
    runs = root / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def test_sigterm_to_a_serial_sweep_stops_it_and_the_rerun_matches_uninterrupted_runs(model_dir, tmp_path):
    root = tmp_path / "sw"
    cfg = base(model_dir, tmp_path, 40)

    def first_cell_has_rows():
        dirs = cell_dirs(root)
        return bool(dirs) and rows(dirs[0]) >= 3

    killer = threading.Thread(target=lambda: (wait_for(first_cell_has_rows), os.kill(os.getpid(), signal.SIGTERM)))
    killer.start()
    with pytest.raises(SweepStopped) as e:
        sweep(cfg, GRID, workers=0, name="sw", progress=False, log=lambda s: None)
    killer.join()
    assert e.value.exit_code == 143 and "\n" not in str(e.value)
    assert "stopped by SIGTERM: 0 of 2 runs complete" in str(e.value)
    (stopped,) = cell_dirs(root)  # no later cell started
    n = rows(stopped)
    assert 3 <= n < 40 and (stopped / "checkpoints" / f"update_{n:06d}").is_dir()
    runs = pl.read_parquet(root / RUNS_FILE)
    assert sorted(runs["status"].to_list()) == ["failed", "pending"]
    assert "stopped by SIGTERM at update" in runs.filter(pl.col("status") == "failed")["error"][0]

    merged = sweep(cfg, GRID, workers=0, name="sw", progress=False, log=lambda s: None)  # continues
    assert set(merged["status"].to_list()) == {"ok"}
    record = json.loads((stopped / "sweep_cell.json").read_text())
    assert record["continued_from"] == n
    for d in cell_dirs(root):
        lr = json.loads((d / "config.json").read_text())["lr"]
        ref = Run(RunConfig(**{**cfg.to_dict(), "lr": lr, "out_dir": str(tmp_path / "ref"), "run_name": d.name}),
                  log=lambda s: None).run()
        assert deterministic(read_metrics(d)).equals(deterministic(ref)), d.name


@pytest.mark.slow  # ~15 s (a pool of worker processes): CI's slow line
def test_ctrl_c_to_a_pool_sweep_stops_every_worker_with_a_checkpoint(model_dir, tmp_path):
    cfg_path = tmp_path / "base.json"
    cfg_path.write_text(base(model_dir, tmp_path, 100).to_json())
    cmd = [sys.executable, "-m", "workbench", "sweep", "--config", str(cfg_path), "--grid", "lr=1e-4,3e-4,1e-3",
           "--workers", "2", "--name", "pool", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    root = tmp_path / "pool"
    wait_for(lambda: any(rows(d) >= 3 for d in cell_dirs(root)) or proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the driver and both workers get it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err, err
    assert err.strip().splitlines()[-1].startswith(f"sweep {root.resolve()} stopped by SIGINT: 0 of 3 runs complete")
    started = cell_dirs(root)
    assert 1 <= len(started) <= 2  # the third cell never started
    for d in started:
        n = rows(d)
        assert n < 100 and (d / "checkpoints" / f"update_{n:06d}").is_dir(), d  # stopped after an update
    runs = pl.read_parquet(root / RUNS_FILE)
    assert runs["status"].to_list().count("pending") == 3 - len(started)

    assert "checkpoint written: the next sweep continues from it" in out  # each stopped cell says so (test_sweep.py: a cell continues exactly)
