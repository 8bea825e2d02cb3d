"""Steps/s of the default loop config: eager fp32 vs bf16 autocast vs torch.compile vs both.

    python bench/fast_path.py [--steps 12] [--threads 0] [--quick]

Builds one ``Run`` per setting on the same default model (``RunConfig()``: warm-started built-in
model, default batch; nothing written), then interleaves them step by step so all four see the
same machine load. The first ``--warmup`` steps of each are left out of the medians (the initial
evaluation, the one-off compile); the compile time is reported on its own (``perf/compile_seconds``).
Prints, per setting, the median step time and update time (forward + loss + backward + AdamW), steps/s,
and their ratios to the eager fp32 baseline measured in this same run. Asserts nothing.
``--quick``: 3 timed steps after 1 warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import workbench  # noqa: E402,F401
from workbench.config import RunConfig  # noqa: E402
from workbench.loop import Run  # noqa: E402

SETTINGS = {"eager fp32": {}, "bf16 autocast": {"autocast": "bf16"}, "compile": {"compile": True},
            "compile + bf16": {"compile": True, "autocast": "bf16"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps per setting")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up")
    args = ap.parse_args()
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    runs = {name: Run(RunConfig(out_dir="", seed=0, threads=args.threads, steps=10_000, eval_every=10_000, **kw),
                      log=lambda s: None) for name, kw in SETTINGS.items()}
    step_s = {name: [] for name in runs}
    update_s = {name: [] for name in runs}
    compile_s: dict[str, float] = {}
    for i in range(warmup + steps):
        for name, run in runs.items():  # interleaved: every setting sees the same load
            row = run.step()
            if "perf/compile_seconds" in row:
                compile_s[name] = row["perf/compile_seconds"]
            if i >= warmup:
                step_s[name].append(row["perf/time_step"])
                update_s[name].append(row["perf/time_forward"] + row["perf/time_loss"] + row["perf/time_backward"])
    base_step, base_update = statistics.median(step_s["eager fp32"]), statistics.median(update_s["eager fp32"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {steps} timed steps after {warmup} warm-up, medians")
    print(f"{'setting':<16} {'step s':>8} {'steps/s':>8} {'speed-up':>9} {'update s':>9} {'update speed-up':>16}")
    for name in runs:
        st, up = statistics.median(step_s[name]), statistics.median(update_s[name])
        print(f"{name:<16} {st:8.3f} {1 / st:8.2f} {base_step / st:8.2f}x {up:9.3f} {base_update / up:15.2f}x")
    for name, s in compile_s.items():
        print(f"one-off compile ({name}): {s:.1f} s (its first update's forward + backward)")


if __name__ == "__main__":
    main()
