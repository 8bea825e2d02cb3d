"""GPU check of the default loop: tokens/s, peak memory and CPU tensors in the hot path, by model size.

    python bench/gpu_check.py [--device cuda] [--steps 5] [--warmup 2] [--out runs/gpu_check.json]
    python bench/gpu_check.py --device cpu --quick      # the script itself on a CPU: ~1.5 minutes

Runs ``workbench.loop.Run`` with the default ``RunConfig`` (batch, task, objective) on untrained
models built from scratch (nothing downloaded, no warm start, so responses mostly run to the
task's answer budget): the built-in size (``ModelConfig()``, ~1.7 M parameters) and two larger
Llama-style ones (~31 M: hidden 512 x 9 layers; ~150 M: hidden 1024 x 11 layers), each in four
settings: eager fp32, eager bf16 autocast, compiled fp32, compiled bf16 (``RunConfig.autocast`` /
``RunConfig.compile``). Per setting, after ``--warmup`` untimed steps (the one-off compile is
reported apart, ``perf/compile_seconds``), the medians over ``--steps`` timed steps of
``perf/gen_tokens_per_s``, ``perf/train_tokens_per_s`` and ``perf/time_step``, and the peak of
``perf/peak_mem_mb`` (on CUDA ``torch.cuda.max_memory_allocated`` over each update, whose start
resets the counter; on a CPU the process's resident-set high-water mark).

**Hot-path check** (eager settings; a dispatch mode and compiled graphs do not mix): every model
parameter and buffer on the device, and one extra step run under a ``TorchDispatchMode`` that
counts the aten ops with a CPU tensor operand of more than one element, split into host<->device
copies (``_to_copy`` / ``copy_``: the prompt tokens going in, the sampled tokens coming back to
the CPU buffer) and compute ops (which should be 0 on a GPU). On ``--device cpu`` everything is a
CPU op by design: the counts only show the check runs.

``--budget-s`` (default 450) keeps the whole check under 8 minutes: a setting that would start
after it is recorded as skipped. A setting that raises is recorded with its one-line error and the
check goes on. Writes the JSON (``--out``) and prints a table. Asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import workbench  # noqa: E402,F401
from workbench.config import RunConfig  # noqa: E402
from workbench.loop import Run  # noqa: E402
from workbench.policy.model import ModelConfig, build_model, count_parameters  # noqa: E402
from workbench.policy.tokenizer import build_char_tokenizer  # noqa: E402
from workbench.sweeps.grid import one_line  # noqa: E402

SIZES = {
    "builtin": ModelConfig(),
    "31m": ModelConfig(hidden_size=512, num_layers=9, num_heads=8, num_kv_heads=8, intermediate_size=1536),
    "150m": ModelConfig(hidden_size=1024, num_layers=11, num_heads=16, num_kv_heads=16, intermediate_size=3072),
}
SETTINGS = {"eager fp32": {}, "eager bf16": {"autocast": "bf16"}, "compile fp32": {"compile": True},
            "compile bf16": {"compile": True, "autocast": "bf16"}}
# --quick leaves out bf16 at 150m: on a CPU without native bf16 (AVX2) it measured 77 s per step
QUICK_SKIP = {("150m", "eager bf16")}
COPY_OPS = ("aten._to_copy", "aten.copy_", "aten.to", "aten._copy_from", "aten._copy_from_and_resize")


class CpuOperands(TorchDispatchMode):
    """Counts aten ops that take or make a CPU tensor of more than one element (0-d scalars pass)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs or {}, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.numel() > 1 for t in tensors):
            self.ops[str(func.overloadpacket)] += 1
        return out


def hot_path(run: Run, device: str) -> dict:
    """Params/buffers on ``device``, and the CPU-operand ops of one more step (see the docstring)."""
    want = torch.device(device).type
    off = [n for n, t in list(run.model.named_parameters()) + list(run.model.named_buffers())
           if t.device.type != want]
    mode = CpuOperands()
    with mode:
        run.step()
    copies = sum(n for op, n in mode.ops.items() if op in COPY_OPS)
    compute = {op: n for op, n in mode.ops.most_common() if op not in COPY_OPS}
    return {"params_off_device": off[:5], "n_params_off_device": len(off), "cpu_copy_ops": copies,
            "cpu_compute_ops": sum(compute.values()), "top_cpu_compute_ops": dict(list(compute.items())[:5]),
            "ok": (not off and not compute) if want != "cpu" else None}


def measure(size: str, mcfg: ModelConfig, setting: str, kw: dict, args) -> dict:
    """One (size, setting): build, warm up, time, check; the row of the JSON."""
    tok = build_char_tokenizer()
    model = build_model(mcfg, tok, seed=0).to(args.device)
    out = {"size": size, "params": count_parameters(model), "setting": setting, **kw}
    batch = dict(prompts_per_step=4, group_size=4) if args.quick else {}
    cfg = RunConfig(out_dir="", seed=0, device=args.device, threads=args.threads, steps=10_000,
                    eval_every=10_000, **batch, **kw)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = Run(cfg, model=model, tokenizer=tok, log=lambda s: None)
    run.initial_accuracy = 0.0  # the held-out evaluation is not part of a step
    rows = [run.step() for _ in range(args.warmup + args.steps)]
    timed = rows[args.warmup:]
    med = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    out.update(gen_tokens_per_s=med("perf/gen_tokens_per_s"), train_tokens_per_s=med("perf/train_tokens_per_s"),
               step_s=med("perf/time_step"), peak_mem_mb=max(r["perf/peak_mem_mb"] for r in rows),
               compile_s=next((r["perf/compile_seconds"] for r in rows if "perf/compile_seconds" in r), None),
               sequences=cfg.prompts_per_step * cfg.group_size)
    if not kw.get("compile"):
        out["hot_path"] = hot_path(run, args.device)
    out["wall_s"] = time.perf_counter() - t0
    return out


def table(rows: list[dict]) -> str:
    head = (f"{'size':<8} {'params':>11} {'setting':<13} {'gen tok/s':>10} {'train tok/s':>11} {'step s':>7} "
            f"{'peak MB':>8} {'compile s':>9} {'hot path':<28}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['size']:<8} {'':>11} {r['setting']:<13} {r.get('error') or r['skipped']}")
            continue
        hp = r.get("hot_path")
        check = ("-" if hp is None else f"{'ok' if hp['ok'] else 'n/a' if hp['ok'] is None else 'CPU OPS'} "
                 f"copies={hp['cpu_copy_ops']} compute={hp['cpu_compute_ops']}")
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        lines.append(f"{r['size']:<8} {r['params']:>11,} {r['setting']:<13} {r['gen_tokens_per_s']:>10,.0f} "
                     f"{r['train_tokens_per_s']:>11,.0f} {r['step_s']:>7.3f} {r['peak_mem_mb']:>8.0f} {comp:>9} "
                     f"{check:<28}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps per setting (compile happens here)")
    ap.add_argument("--sizes", default=None, help=f"comma-separated, of {', '.join(SIZES)} (default: all)")
    ap.add_argument("--settings", default=None, help=f"comma-separated, of {', '.join(SETTINGS)} (default: all; "
                                                     "--quick: the eager ones)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="no setting starts after this many seconds")
    ap.add_argument("--quick", action="store_true",
                    help="eager settings (no bf16 at 150m), a 4 x 4 batch, 1 warm-up + 2 timed steps (a CPU run of the script)")
    ap.add_argument("--out", default="runs/gpu_check.json")
    args = ap.parse_args()
    sizes = args.sizes.split(",") if args.sizes else list(SIZES)
    settings = (args.settings.split(",") if args.settings else
                ["eager fp32", "eager bf16"] if args.quick else list(SETTINGS))
    if args.quick:
        args.steps, args.warmup = 2, 1
    for name, known in (("sizes", SIZES), ("settings", SETTINGS)):
        bad = [v for v in (sizes if name == "sizes" else settings) if v not in known]
        if bad:
            sys.exit(f"--{name} {bad[0]!r} is invalid: expected a comma-separated list of {', '.join(known)}")
    t_start = time.perf_counter()
    rows = []
    for size in sizes:
        for setting in settings:
            row = {"size": size, "setting": setting}
            if args.quick and not args.settings and (size, setting) in QUICK_SKIP:
                continue
            if time.perf_counter() - t_start > args.budget_s:
                row["skipped"] = f"skipped: past --budget-s {args.budget_s:g}"
            else:
                try:
                    row = measure(size, SIZES[size], setting, SETTINGS[setting], args)
                except Exception as e:  # noqa: BLE001 - recorded, the check goes on (e.g. out of memory)
                    row["error"] = one_line(e)
            rows.append(row)
            print(f"[{time.perf_counter() - t_start:6.1f} s] {size} {setting}: "
                  f"{row.get('error') or row.get('skipped') or 'done'}", flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    dev = torch.device(args.device)
    report = {"torch": torch.__version__, "device": args.device,
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)",
              "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
              "seconds": time.perf_counter() - t_start, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{report['device_name']}, torch {torch.__version__}; medians of {args.steps} timed steps after "
          f"{args.warmup} warm-up; {report['seconds']:.0f} s in all -> {args.out}")
    print(table(rows))


if __name__ == "__main__":
    main()
