"""Sweep overhead: a grid of N identical runs on the local process pool vs one run in this process.

    python bench/sweep_overhead.py [--runs 4] [--threads-per-run 1] [--steps 150] [--repeats 1]

Target: wall time of the pool sweep <= 1.1 x (N / parallel slots) x one run, where one run
is the same config run here, in this process, with the same thread count (imports already paid, model
loaded from the warm-start cache). The N cells are identical computations: they differ only in
``checkpoint_every`` values larger than the run length (a grid needs distinct cells), and all use
the same seed. The single run is timed before and after the sweep and the mean is used, so a change
of machine load during the measurement shows up as a spread between the two.

The target assumes the parallel slots are otherwise idle cores. On a shared machine they are not, and
parallel runs slow each other down whatever runs them; so the same N runs are also timed as a bare
baseline: ``slots`` plain Python processes started together, each running N / slots runs back to back
(what a shell loop would do, imports included). ``sweep / bare`` is the sweep machinery's own cost
(spawn, per-worker thread limits, result collection, merging), independent of the machine's load.

Prints both ratios and their parts; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import polars as pl  # noqa: E402

import workbench  # noqa: E402,F401
from workbench.config import RunConfig  # noqa: E402
from workbench.sweeps import sweep, usable_cores, warm_locked  # noqa: E402


def one_run(cfg: RunConfig, threads: int) -> float:
    import torch

    from workbench.loop import Run

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    Run(cfg, log=lambda s: None).run()
    return time.perf_counter() - t0


def bare(n_procs: int, runs_each: int, threads: int, cfg: RunConfig) -> float:
    """Wall time of ``n_procs`` plain processes started together, each doing ``runs_each`` runs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--_bare", json.dumps(
        {"runs": runs_each, "threads": threads, "config": cfg.replace(run_name=f"bare{i}").to_dict()})], env=env)
        for i in range(n_procs)]
    codes = [p.wait() for p in procs]
    assert codes == [0] * n_procs, codes
    return time.perf_counter() - t0


def _bare_child(spec: str) -> None:
    d = json.loads(spec)
    cfg = RunConfig.from_dict(d["config"])
    for k in range(d["runs"]):
        one_run(cfg.replace(run_name=f"{cfg.run_name}-{k}"), d["threads"])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--_bare":
        return _bare_child(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=0, help="N cells (default: 2 x parallel slots)")
    ap.add_argument("--threads-per-run", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0, help="parallel slots (default: usable cores // threads)")
    ap.add_argument("--steps", type=int, default=150, help="updates per run (short runs measure start-up, not sweeps)")
    ap.add_argument("--model", default="builtin", help="builtin (cached warm start) or a local checkpoint")
    ap.add_argument("--repeats", type=int, default=1, help="sweeps measured (each between two single runs)")
    args = ap.parse_args()

    T = args.threads_per_run
    slots = args.workers or max(1, usable_cores() // T)
    n = args.runs or 2 * slots
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        base = RunConfig(model=args.model, steps=args.steps, eval_every=args.steps, eval_size=64, out_dir=tmp)
        warm_locked(base, log=print)  # trained once if missing; never inside a timed section
        grid = {"checkpoint_every": [args.steps + 1 + i for i in range(n)]}
        print(f"{n} identical runs of {args.steps} updates, {slots} parallel slots x {T} thread(s); "
              f"{usable_cores()} usable cores; load average {os.getloadavg()[0]:.1f}")
        singles = [one_run(base.replace(out_dir=os.path.join(tmp, "single"), run_name="r0"), T)]
        print(f"one run in this process: {singles[-1]:.1f} s")
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            df = sweep(base, grid, name=f"bench{rep}", workers=slots, threads_per_run=T, progress=False,
                       log=lambda s: None)
            wall = time.perf_counter() - t0
            assert set(df["status"]) == {"ok"}, df.filter(pl.col("status") != "ok")["error"].unique().to_list()
            runs = pl.read_parquet(os.path.join(tmp, f"bench{rep}", "sweep_runs.parquet"))
            bare_wall = bare(slots, -(-n // slots), T, base.replace(out_dir=os.path.join(tmp, f"bare{rep}")))
            singles.append(one_run(base.replace(out_dir=os.path.join(tmp, "single"), run_name=f"r{rep + 1}"), T))
            one = (singles[-2] + singles[-1]) / 2
            ideal = n / slots * one
            cell = float(runs["seconds"].mean())
            print(f"sweep {rep}: {wall:.1f} s for {n} runs; one run before/after {singles[-2]:.1f} / "
                  f"{singles[-1]:.1f} s; ideal (N / slots) x one run = {ideal:.1f} s")
            print(f"  mean run time inside a worker {cell:.1f} s ({cell / one:.2f}x the in-process run: "
                  f"contention of {slots} parallel runs); the rest, {wall - n / slots * cell:.1f} s, is worker "
                  f"start-up (spawn, imports), the parent's cache check and merging")
            print(f"  bare baseline ({slots} plain processes x {-(-n // slots)} runs each): {bare_wall:.1f} s")
            print(f"  ratio sweep / ideal = {wall / ideal:.3f}  (target <= 1.1; assumes idle cores)")
            print(f"  ratio sweep / bare  = {wall / bare_wall:.3f}  (the sweep machinery's own cost)")


if __name__ == "__main__":
    main()
