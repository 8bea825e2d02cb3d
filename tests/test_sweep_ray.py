"""Sweeps on Ray: GPU requests (``gpus_per_run`` / ``--gpus-per-run``) and the same grid as the pool.

The refusals that need no Ray (bad values, no ``ray``, a CPU device, a grid over ``device``, the
CLI) run in the default suite. The tests marked ``slow`` share one local Ray instance started with
two fake GPUs (``ray.init(num_gpus=2)`` on a machine without them: Ray schedules them, torch sees no
CUDA) and have their own command (README, "More test commands"; ``.ci/run``): each cell's
``ray_task.json`` records what Ray assigned it, read inside the task from its runtime context.

Every run is tiny (an untrained ~35 k-parameter local checkpoint, 4 prompts x 4 samples, 3 updates).
"""

from __future__ import annotations

import json
import os

import polars as pl
import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model, save_policy
from workbench.policy.tokenizer import build_char_tokenizer
from workbench.sweeps import sweep

GRID = {"staleness": [0, 1]}
REWARDS = (("exact_match", 1.0), ("overlong", 1.0, {"max_len": 4, "cache_len": 3}))
QUIET = dict(progress=False, log=lambda s: None)
NO_CUDA = "device='cuda' is invalid here: torch sees no CUDA device"


def metric_columns(df: pl.DataFrame) -> pl.DataFrame:
    """Everything but wall-clock timings."""
    return df.select([c for c in df.columns if not c.startswith("perf/")])


def placement(root: str, cell: str) -> dict:
    with open(os.path.join(root, "runs", cell, "ray_task.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep_ray")
    tok = build_char_tokenizer()
    ckpt = save_policy(build_model(ModelConfig(**TINY_MODEL), tok, seed=0), tok, d / "ckpt")
    return RunConfig(model=str(ckpt), task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=4,
                     group_size=4, steps=3, eval_every=3, eval_size=8, lr=1e-2, rewards=REWARDS,
                     out_dir=str(d / "runs"))


@pytest.fixture(scope="module")
def fake_gpu_ray():
    """A local Ray instance with 2 CPUs and 2 fake GPUs, shared by the slow tests of this module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------ refusals before anything runs
@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), float("inf"), True, "1", 0.00005])
def test_gpus_per_run_must_be_a_number_ray_accepts(base, value):
    with pytest.raises(WorkbenchError) as e:
        sweep(base, GRID, name="bad", ray="local", gpus_per_run=value, **QUIET)
    msg = str(e.value)
    assert msg.startswith(f"gpus_per_run={value!r} is invalid: expected a number > 0") and "\n" not in msg
    assert not os.path.exists(os.path.join(base.out_dir, "bad"))


def test_gpus_per_run_is_refused_on_the_local_pool(base):
    for workers in (None, 0, 2):
        with pytest.raises(WorkbenchError) as e:
            sweep(base, GRID, name="pool-gpu", workers=workers, gpus_per_run=0.5, **QUIET)
        msg = str(e.value)
        assert msg.startswith("gpus_per_run=0.5 is invalid without ray: the local pool schedules no GPUs")
        assert "\n" not in msg
    assert not os.path.exists(os.path.join(base.out_dir, "pool-gpu"))


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_a_device_other_than_cuda_is_refused_with_gpus(base, device):
    with pytest.raises(WorkbenchError) as e:  # raised before Ray is started
        sweep(base.replace(device=device), GRID, name="dev", ray="local", gpus_per_run=1, **QUIET)
    assert str(e.value) == (f"device={device!r} is invalid with gpus_per_run=1: a run trains on the GPU Ray "
                            "assigned it; expected auto or cuda")
    with pytest.raises(WorkbenchError) as e:  # a grid over device: the cell is named
        sweep(base, {"device": ["cuda", "cpu"]}, name="dev", ray="local", gpus_per_run=1, **QUIET)
    assert str(e.value) == ("sweep cell device=cpu, seed=0: device='cpu' is invalid with gpus_per_run: "
                            "expected cuda (the GPU Ray assigned the run)")
    assert not os.path.exists(os.path.join(base.out_dir, "dev"))


def test_cli_gpus_per_run_without_ray_is_one_line(base, tmp_path, capsys):
    from workbench.cli import main

    argv = ["sweep", "--grid", "staleness=0,1", "--gpus-per-run", "0.5", "--model", base.model,
            "--out-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "gpus_per_run=0.5 is invalid without ray" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ on a local Ray instance
@pytest.mark.slow
def test_each_cell_is_a_task_with_its_share_of_a_gpu(base, fake_gpu_ray):
    df = sweep(base, GRID, name="half-gpu", ray="local", gpus_per_run=0.5, threads_per_run=1, **QUIET)
    root = os.path.join(base.out_dir, "half-gpu")
    with open(os.path.join(root, "sweep.json")) as f:
        spec = json.load(f)
    assert spec["gpus_per_run"] == 0.5 and spec["base"]["device"] == "cuda"  # auto became cuda
    runs = pl.read_parquet(os.path.join(root, "sweep_runs.parquet"))
    assert runs.height == 2
    for cell in ("staleness=0__seed=0", "staleness=1__seed=0"):
        p = placement(root, cell)
        assert p["assigned_resources"] == {"CPU": 1.0, "GPU": 0.5}
        assert len(p["gpu_ids"]) == 1 and p["gpu_ids"][0] in ("0", "1")
        assert p["cuda_visible_devices"] == p["gpu_ids"][0]  # the run's cuda is the GPU Ray assigned
        assert p["node_id"] == fake_gpu_ray.get_runtime_context().get_node_id()
    if not torch.cuda.is_available():  # fake GPUs: the run's explicit cuda fails in one line
        assert set(df["status"]) == {"failed"}
        assert all(NO_CUDA in e for e in df["error"]) and all("\n" not in e for e in df["error"])


@pytest.mark.slow
def test_more_gpus_than_a_node_has_is_refused_before_anything_is_written(base, fake_gpu_ray):
    with pytest.raises(WorkbenchError) as e:
        sweep(base, GRID, name="three-gpus", ray="local", gpus_per_run=3, **QUIET)
    assert str(e.value) == ("gpus_per_run=3 is invalid on this Ray cluster: it has 2 GPUs, at most 2 on one "
                            "node; ask for at most 2 per run, or start the cluster with GPU nodes "
                            "(ray start --num-gpus N)")
    assert not os.path.exists(os.path.join(base.out_dir, "three-gpus"))
    assert fake_gpu_ray.is_initialized()  # a Ray the sweep did not start is left running


@pytest.mark.slow
def test_ray_sweep_matches_the_process_pool(base, fake_gpu_ray):
    on_pool = sweep(base, GRID, seeds=2, name="pool", workers=2, threads_per_run=1, **QUIET)
    on_ray = sweep(base, GRID, seeds=2, name="ray", ray="local", threads_per_run=1, **QUIET)
    assert set(on_ray["status"]) == {"ok"} and on_ray.height == 4 * 3  # 4 runs x 3 updates
    assert metric_columns(on_ray).equals(metric_columns(on_pool))
    assert pl.read_parquet(os.path.join(base.out_dir, "ray", "sweep.parquet")).height == on_pool.height
    p = placement(os.path.join(base.out_dir, "ray"), "staleness=0__seed=0")
    assert p["assigned_resources"] == {"CPU": 1.0} and p["gpu_ids"] == []  # no GPU asked for, none given
