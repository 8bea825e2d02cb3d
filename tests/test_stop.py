"""Stopping cleanly: SIGTERM / SIGINT to the CLI, ``Run.request_stop``, the notebook trainer, a sweep
worker. A stopped run has a checkpoint at the update it stopped at, says how to resume in one line,
and resumes to exactly the metrics of an uninterrupted run; the slow campaign interrupts one run
twenty-odd times (kill -9 included) and checks the same, plus that every file is readable."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import load_file

from workbench.cli import main
from workbench.config import RunConfig
from workbench.loop import Run
from workbench.notebook import TINY_REWARDS
from workbench.policy.model import build_model, save_policy
from workbench.runs.metrics import read_metrics
from workbench.runs.stop import StopSignals
from workbench.sweeps.worker import run_cell
from workbench.ui import ControlPanel

ROOT = Path(__file__).resolve().parents[1]
FIELDS = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=4, group_size=4,
              eval_every=5, eval_size=8, seed=3, threads=1, rewards=TINY_REWARDS)
STEPS = 60
STOP_LINE = re.compile(r"^stopped at update (\d+); resume with: python -m workbench resume (\S+)$")


def deterministic(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(sorted(c for c in df.columns if not c.startswith("perf/")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from workbench.policy.model import TINY_MODEL, ModelConfig
    from workbench.policy.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    return save_policy(build_model(ModelConfig(**TINY_MODEL), tok, seed=0), tok,
                       tmp_path_factory.mktemp("model") / "ckpt")


def config(model_dir, out_dir, name, steps=STEPS, **kw) -> RunConfig:
    return RunConfig(**{**FIELDS, "model": str(model_dir), "steps": steps, "out_dir": str(out_dir),
                        "run_name": name, **kw})


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """The metrics of the uninterrupted run (what every stopped-and-resumed run must reproduce)."""
    run = Run(config(model_dir, tmp_path_factory.mktemp("ref"), "ref"), log=lambda s: None)
    return deterministic(run.run())


def cli_run(cfg: RunConfig) -> list[str]:
    """``python -m workbench run --config <cfg as JSON>``: the CLI on exactly this config."""
    path = Path(cfg.out_dir) / f"{cfg.run_name}.config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_json())
    return [sys.executable, "-m", "workbench", "run", "--config", str(path), "--no-progress"]


# ``python -m workbench`` with every update slowed by 50 ms (the metrics do not change): a signal sent
# once a run has 3 rows then always lands mid-run, however fast the machine or uneven the start-up.
SLOW_CLI = ("import runpy, time, workbench.loop as L; step = L.Run.step; "
            "L.Run.step = lambda self: (time.sleep(0.05), step(self))[1]; "
            "runpy.run_module('workbench', run_name='__main__', alter_sys=True)")


def slowed(cmd: list[str]) -> list[str]:
    assert cmd[1:3] == ["-m", "workbench"]
    return [cmd[0], "-c", SLOW_CLI, *cmd[3:]]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows(run_dir: Path) -> int:
    try:
        return read_metrics(run_dir).height
    except Exception:  # noqa: BLE001 - not there yet
        return 0


def wait_for(cond, timeout=120.0, every=0.02):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(every)


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow  # ~22 s (two CLI processes, signals, a resume): CI's slow line
def test_sigterm_and_sigint_stop_with_a_checkpoint_and_resume_exactly(model_dir, tmp_path, reference, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr("workbench.charts.save_png", lambda spec, path: path)  # the resume's charts.png: not tested here
    procs = {sig: start(slowed(cli_run(config(model_dir, tmp_path, sig.name))))
             for sig in (signal.SIGTERM, signal.SIGINT)}
    waiting = dict(procs)  # both start together (the imports dominate); each is stopped mid-run
    while waiting:
        for sig, proc in list(waiting.items()):
            if rows(tmp_path / sig.name) >= 3 or proc.poll() is not None:
                proc.send_signal(sig)
                del waiting[sig]
        time.sleep(0.02)
    for sig, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], (sig, out, err)
        assert "Traceback" not in out + err
        lines = [m for m in map(STOP_LINE.match, err.splitlines()) if m]
        assert len(lines) == 1, err
        n, d = int(lines[0].group(1)), Path(lines[0].group(2))
        assert d == tmp_path / sig.name and 3 <= n < STEPS
        state = json.loads((d / "checkpoints" / f"update_{n:06d}" / "state.json").read_text())
        assert state["version"] == n
        assert pl.read_parquet(d / "metrics.parquet").height == n  # flushed: one compacted file
        assert json.loads((d / "summary.json").read_text())["updates"] == n
        assert main(["resume", str(d)]) == 0
        assert deterministic(read_metrics(d)).equals(reference)
    capsys.readouterr()


# ``python -m workbench`` whose first ``import torch`` announces itself in a file, then takes 60 s:
# a signal sent once the file exists lands while the libraries import.
SLOW_IMPORT = ("import builtins, runpy, sys, time; real = builtins.__import__\n"
               "def slow(name, *a, **k):\n"
               "    if name == 'torch' and 'torch' not in sys.modules:\n"
               "        open(sys.argv[-1], 'w').close(); time.sleep(60)\n"
               "    return real(name, *a, **k)\n"
               "builtins.__import__ = slow\n"
               "runpy.run_module('workbench', run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_libraries_import_exits_with_one_line(tmp_path, sig):
    flag = tmp_path / "importing"
    proc = start([sys.executable, "-c", SLOW_IMPORT, "run", "--steps", "1", "--out-dir", str(tmp_path), str(flag)])
    wait_for(lambda: flag.exists() or proc.poll() is not None)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and err == "interrupted while starting: nothing was run\n", (out, err)
    assert list(tmp_path.iterdir()) == [flag]


def test_resume_refuses_steps_that_train_nothing(model_dir, tmp_path, capsys):
    Run(config(model_dir, tmp_path, "r", steps=4), log=lambda s: None).run()
    assert main(["resume", str(tmp_path / "r"), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "resume --steps 3 is not past the run's update 4" in err and "\n" not in err
    assert main(["resume", str(tmp_path / "r")]) == 2
    assert "is complete (4 of steps=4 updates)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- in process
def test_request_stop_ends_run_after_the_update_with_a_checkpoint(model_dir, tmp_path):
    run = Run(config(model_dir, tmp_path, "s"), log=lambda s: None)
    run.hooks.append(lambda r, row: r.request_stop() if row["update"] == 2 else None)
    run.run()
    assert run.version == 3 and run.stop_requested
    assert (tmp_path / "s" / "checkpoints" / "update_000003" / "state.json").exists()
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["updates"] == 3
    run.hooks.clear()
    run.run(2)  # a request is honoured once: the next run() trains again
    assert run.version == 5 and not run.stop_requested
    run.request_stop()  # before run(): it returns at once, checkpointed
    run.run(4)
    assert run.version == 5


def test_a_stop_during_a_long_prefill_keeps_the_batches_and_resumes_exactly(model_dir, tmp_path):
    full = deterministic(Run(config(model_dir, tmp_path / "a", "f", staleness=20), log=lambda s: None).run(3))
    run = Run(config(model_dir, tmp_path / "b", "f", staleness=20), log=lambda s: None)
    produce, calls = run._generate_and_score, []

    def counting():
        calls.append(1)
        if len(calls) == 6:
            run.request_stop()
        return produce()

    run._generate_and_score = counting
    run.run(3)  # stops after the sixth of the 21 prefill batches: no update, the six kept
    assert run.version == 0 and len(run.buffer) == 6
    resumed = Run.resume(tmp_path / "b" / "f", log=lambda s: None)
    assert len(resumed.buffer) == 6
    assert deterministic(resumed.run(3)).equals(full)  # buffer/generated_batches counts all 21 at update 0


def test_stop_signals_first_requests_second_exits_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    with StopSignals(seen.append) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM] and stop.exit_code == 143
        with pytest.raises(SystemExit) as e:
            signal.raise_signal(signal.SIGINT)
        assert e.value.code == 130
    assert signal.getsignal(signal.SIGTERM) is before


def test_final_evaluation_when_steps_is_not_a_multiple_of_eval_every(model_dir, tmp_path):
    run = Run(config(model_dir, tmp_path, "e", steps=7), log=lambda s: None)
    df = run.run()
    assert df["eval/accuracy"].drop_nulls().len() == 2 and df["eval/accuracy"][-1] is not None  # 5 and 7
    assert run.summary()["eval/final_accuracy"] == df["eval/accuracy"][-1]
    run.run(1)  # past the end: evaluated once more, for the summary (not a metrics column)
    assert run.final_accuracy[0] == 8 and run.summary()["eval/final_accuracy"] == run.final_accuracy[1]


# ------------------------------------------------------------------------------------------- notebook, sweep
def test_kernel_interrupt_and_close_stop_the_panel_thread_with_a_checkpoint(model_dir, tmp_path):
    cfg = config(model_dir, tmp_path, "p", steps=400)
    panel = ControlPanel(cfg, headless=False, log=lambda s: None, chart_seconds=0.05)
    try:
        panel.start()
        wait_for(lambda: panel.run.version >= 2)
        with pytest.raises(KeyboardInterrupt):  # SIGINT in the main thread, as a kernel interrupt
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)
        assert panel.wait(60) and panel.trainer.state == "paused"
        v = panel.run.version
        assert (tmp_path / "p" / "checkpoints" / f"update_{v:06d}" / "state.json").exists()
        panel.start()
        wait_for(lambda: panel.run.version >= v + 2)
    finally:
        panel.close()
    v = panel.run.version
    assert not panel.trainer.running and v < 400
    assert (tmp_path / "p" / "checkpoints" / f"update_{v:06d}" / "state.json").exists()


def test_sigterm_to_a_sweep_worker_stops_the_cell_and_the_next_sweep_continues(model_dir, tmp_path, reference):
    spec = {"mode": "run", "config": config(model_dir, tmp_path, "cell").to_dict()}
    d = tmp_path / "cell"
    killer = threading.Thread(target=lambda: (wait_for(lambda: rows(d) >= 3), os.kill(os.getpid(), signal.SIGTERM)))
    killer.start()
    out = run_cell(spec, str(d))
    killer.join()
    assert out["status"] == "failed" and "\n" not in out["error"], out
    n = int(re.match(r"stopped by SIGTERM at update (\d+) of 60; checkpoint written", out["error"]).group(1))
    assert (d / "checkpoints" / f"update_{n:06d}").is_dir() and not (d / "sweep_error.txt").exists()
    again = run_cell(spec, str(d))
    assert again["status"] == "ok" and again["continued_from"] == n
    assert deterministic(read_metrics(d)).equals(reference)


# ------------------------------------------------------------------------------------------- campaign
def _readable(run_dir: Path) -> None:
    """Every file of the run opens with its own reader, and no temp file is left behind."""
    for p in sorted(run_dir.rglob("*")):
        assert not p.name.startswith("."), f"temp file left: {p}"
        if p.is_dir():
            continue
        if p.suffix == ".parquet":
            pl.read_parquet(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        elif p.suffix == ".safetensors":
            load_file(str(p))


@pytest.mark.slow
def test_campaign_of_interruptions_ends_with_the_uninterrupted_metrics(model_dir, tmp_path):
    steps, rng = 150, random.Random(7)
    ref = deterministic(Run(config(model_dir, tmp_path / "ref", "ref", steps=steps, checkpoint_every=3),
                            log=lambda s: None).run())
    d = tmp_path / "c"
    base = [sys.executable, "-m", "workbench"]
    first = cli_run(config(model_dir, tmp_path, "c", steps=steps, checkpoint_every=3))
    interruptions, kinds = 0, []
    while interruptions < 24:
        if (d / "summary.json").exists() and json.loads((d / "summary.json").read_text())["updates"] == steps:
            break  # finished (a signal that came during the last update)
        started = (d / "checkpoints").is_dir() and any((d / "checkpoints").glob("update_*"))
        cmd = base + ["resume", str(d), "--no-progress"] if started else first
        proc = start(cmd)
        kind = rng.choice(["kill", "kill", "term", "int"])
        if kind == "kill" and rng.random() < 0.3:  # while starting up (imports, model, loading the checkpoint)
            time.sleep(rng.uniform(0.5, 6.0))
        else:
            h0, more = rows(d), rng.randint(1, 4)
            wait_for(lambda: rows(d) >= h0 + more or proc.poll() is not None, every=0.01)
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is not None:
            out, err = proc.communicate()
            assert proc.returncode == 0 and "is complete" not in err, (cmd, out, err)
            break
        proc.send_signal({"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[kind])
        out, err = proc.communicate(timeout=120)
        assert "Traceback" not in out + err, (kind, out, err)
        if kind != "kill":
            assert proc.returncode in (130, 143, 0), (kind, proc.returncode, err)
        interruptions += 1
        kinds.append(kind)
    assert interruptions >= 20, kinds
    if rows(d) < steps or not (d / "summary.json").exists():
        done = subprocess.run(base + ["resume", str(d), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert deterministic(read_metrics(d)).equals(ref)
    assert json.loads((d / "summary.json").read_text())["updates"] == steps
    _readable(d)


@pytest.mark.slow
def test_interrupting_a_real_kernel_stops_the_panel_thread_with_a_checkpoint(model_dir, tmp_path):
    """ipykernel ignores SIGINT while idle and restores that after every cell: the trainer's handler
    must still see an interrupt of the idle kernel, and of a cell blocked in ``panel.wait()``."""
    from jupyter_client.manager import start_new_kernel

    from workbench.notebook import ensure_kernel

    km, kc = start_new_kernel(kernel_name=ensure_kernel(), cwd=str(ROOT))

    def execute(code: str) -> str:
        out: list = []
        reply = kc.execute_interactive(code, timeout=120, output_hook=out.append)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")

    try:
        cfg = config(model_dir, tmp_path, "k", steps=100_000)
        execute(f"from workbench.config import RunConfig\nfrom workbench.ui import ControlPanel\nimport os, time\n"
                f"panel = ControlPanel(RunConfig.from_dict({cfg.to_dict()!r}), headless=False, log=lambda s: None)\n"
                f"panel.start()\ntime.sleep(2)")
        checkpoints = tmp_path / "k" / "checkpoints"
        time.sleep(1)  # the reply comes before the kernel restores its idle handler
        km.interrupt_kernel()  # idle kernel, training in the background thread
        wait_for(lambda: any(checkpoints.glob("update_*")), timeout=60)
        assert execute("print(panel.trainer.state, panel.run.version)").split()[0] == "paused"
        msg_id = kc.execute("panel.start(); print('waiting', flush=True); panel.wait()")
        wait_for(lambda: (lambda m: m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "stream")(
            kc.get_iopub_msg(timeout=60)), timeout=60, every=0)
        time.sleep(1)
        km.interrupt_kernel()  # a cell waiting on the panel
        wait_for(lambda: len(list(checkpoints.glob("update_*"))) >= 2, timeout=60)
    finally:
        km.shutdown_kernel(now=True)
