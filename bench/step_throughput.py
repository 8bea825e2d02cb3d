"""Per-step cost of the workbench loop, and its overhead against a bare hand-written torch loop.

    python bench/step_throughput.py [--steps 20] [--threads 2] [--mismatch-sample 4]
    python bench/step_throughput.py --prefill-batches 16   # only the prefill step, prefill_batches 1 vs 16

Measures, on the built-in default (warm-started model, default batch), the median time per update
split by step (generate / score / forward+loss (reweight) / backward+optimizer (update)), tokens/s,
and three ratios measured in this same run:
  - workbench step time / bare loop step time (the framework's overhead; the bare loop samples with
    its own KV-cache loop and applies the same PPO-clip update to the same model, with nothing
    else: no diagnostics, no buffer, no metrics);
  - staleness 256 / staleness 0 steady-state step time (the queue must be nearly free), with the
    diagnostics on: staleness 256 pays the forward that stores log pi_gen for ``mismatch_sample``
    groups of each batch (``--mismatch-sample``, default the config's; 0 = the whole batch), printed
    as its own median time;
  - the first (prefill) step at staleness 256, reported separately as a one-off cost.
With ``--prefill-batches n`` it measures only the one-off prefill step at staleness 256 (257 batches of
theta_0) with ``prefill_batches`` 1 and n (workbench/steps/prefill.py) and their ratio.
Prints ratios; asserts nothing (targets are read off the output, not timed tests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import workbench  # noqa: E402,F401
from workbench.policy.build import build_policy, build_task  # noqa: E402
from workbench.config import RunConfig  # noqa: E402
from workbench.loop import Run  # noqa: E402


def bare_loop(model, tokenizer, task, steps: int, prompts: int, group: int, lr: float, seed: int):
    """The same sampling and PPO-clip update, hand-written with nothing else (the baseline).

    A generator: yields the wall time of each step, so the caller can interleave it with the
    workbench runs and all loops see the same machine load.
    """
    import random

    from transformers import DynamicCache

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for _ in range(steps):
        t0 = time.perf_counter()
        exs = task.sample(rng, prompts)
        texts = [e.prompt for e in exs for _ in range(group)]
        enc = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        P = max(map(len, enc))
        ids = torch.tensor([[pad] * (P - len(e)) + e for e in enc])
        pm = (torch.arange(P)[None] >= (P - torch.tensor([len(e) for e in enc]))[:, None]).long()
        am = pm
        with torch.inference_mode():
            cache = DynamicCache()
            pos = (am.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=cache, logits_to_keep=1)
            nxt = am.sum(-1, keepdim=True)
            toks, lps, alive = [], [], []
            done = torch.zeros(len(texts), dtype=torch.bool)
            for _t in range(task.max_answer_tokens):
                lp_all = torch.log_softmax(out.logits[:, -1].float(), -1)
                tok = torch.multinomial(lp_all.exp(), 1, generator=gen).squeeze(-1)
                live = ~done
                tok = torch.where(live, tok, torch.full_like(tok, pad))
                toks.append(tok), lps.append(lp_all.gather(-1, tok[:, None]).squeeze(-1)), alive.append(live)
                done |= tok == eos
                if done.all():
                    break
                am = torch.cat([am, live.long()[:, None]], 1)
                out = model(input_ids=tok[:, None], attention_mask=am, position_ids=nxt,
                            past_key_values=out.past_key_values)
                nxt = nxt + 1
        resp, old_lp, mask = torch.stack(toks, 1), torch.stack(lps, 1).clone(), torch.stack(alive, 1).float()
        texts_out = tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(resp, mask)], skip_special_tokens=True)
        reward = torch.tensor([float(o.strip() == e.answer) for o, e in
                               zip(texts_out, [e for e in exs for _ in range(group)])]).view(prompts, group)
        adv = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        full = torch.cat([ids, resp], 1)
        fam = torch.cat([pm, mask.long()], 1)
        T = resp.shape[1]
        logits = model(input_ids=full, attention_mask=fam, position_ids=(fam.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=T + 1).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, resp[..., None]).squeeze(-1)
        ratio = torch.exp(lp - old_lp)
        loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        loss = (loss * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        yield time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mismatch-sample", type=int, default=RunConfig.mismatch_sample,
                    help="groups per batch whose log pi_gen staleness 256 measures (0 = every group)")
    ap.add_argument("--prefill-batches", type=int, default=0,
                    help="only time the prefill step at staleness 256 with prefill_batches 1 and this n")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = RunConfig(out_dir="", eval_every=10_000, threads=args.threads, mismatch_sample=args.mismatch_sample)
    task = build_task(base)
    model, tok = build_policy(base, task, log=lambda s: None)
    import copy

    if args.prefill_batches:
        prefill_step(base, model, tok, args.prefill_batches)
        return

    def workbench_run(staleness: int) -> Run:
        run = Run(base.replace(staleness=staleness), model=copy.deepcopy(model), tokenizer=tok, log=lambda s: None)
        run.initial_accuracy = 0.0  # skip the held-out eval: it is not part of the step
        return run

    run0, run256 = workbench_run(0), workbench_run(256)
    bare = bare_loop(copy.deepcopy(model), tok, task, args.steps + 1, base.prompts_per_step, base.group_size,
                     base.lr, base.seed)
    wb0, wb256, bare_times = [], [], []
    for _ in range(args.steps + 1):  # round-robin: the three loops share the same machine load
        wb0.append(run0.step()["perf/time_step"])
        wb256.append(run256.step()["perf/time_step"])
        bare_times.append(next(bare))
    df0 = run0.metrics
    bare = bare_times

    med = lambda xs: statistics.median(xs[1:])  # noqa: E731  (first step excluded: warm-up / prefill)
    split = {c: statistics.median(df0[c].to_list()[1:]) for c in
             ("perf/time_generate", "perf/time_score", "perf/time_forward", "perf/time_loss", "perf/time_backward")}
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; batch {base.batch_size} sequences; "
          f"threads {args.threads}; {args.steps} timed steps")
    print("workbench step split (median s): " + ", ".join(f"{k.split('_', 1)[1]}={v:.4f}" for k, v in split.items()))
    print(f"generate tokens/s: {statistics.median(df0['perf/gen_tokens_per_s'].to_list()[1:]):,.0f}   "
          f"train tokens/s: {statistics.median(df0['perf/train_tokens_per_s'].to_list()[1:]):,.0f}")
    print(f"step time: workbench {med(wb0):.4f} s, bare loop {med(bare):.4f} s "
          f"-> overhead ratio {med(wb0) / med(bare):.3f}")
    print(f"staleness 256 / staleness 0 steady-state step time: {med(wb256) / med(wb0):.3f} "
          f"(one-off prefill step at 256: {wb256[0]:.1f} s)")
    lp256 = run256.metrics["perf/time_trainer_logprobs"].to_list()
    print(f"log pi_gen forward at staleness 256 (median s): {med(lp256):.4f} on mismatch_sample="
          f"{base.mismatch_sample} groups ({min(base.mismatch_sample * base.group_size or base.batch_size, base.batch_size)} sequences) "
          f"of each batch; the prefill's: {lp256[0]:.1f} s")


def prefill_step(base: RunConfig, model, tok, n: int) -> None:
    """The one-off first step at staleness 256 (its sync generates 257 batches) with prefill_batches 1 and n."""
    import copy

    times = {}
    for m in (1, n):
        run = Run(base.replace(staleness=256, prefill_batches=m), model=copy.deepcopy(model), tokenizer=tok,
                  log=lambda s: None)
        run.initial_accuracy = 0.0  # skip the held-out eval: it is not part of the step
        row = run.step()
        times[m] = row
        print(f"prefill_batches={m}: prefill step {row['perf/time_step']:.1f} s (generate {row['perf/time_generate']:.1f} s, "
              f"score {row['perf/time_score']:.1f} s, log pi_gen {row['perf/time_trainer_logprobs']:.1f} s), "
              f"{int(row['buffer/generated_batches'])} batches")
    print(f"prefill step at staleness 256: prefill_batches={n} / 1 = "
          f"{times[n]['perf/time_step'] / times[1]['perf/time_step']:.3f}")


if __name__ == "__main__":
    main()
