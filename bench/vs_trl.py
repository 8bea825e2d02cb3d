"""workbench vs TRL's GRPOTrainer: seconds per update and final held-out accuracy, same everything.

    bash scripts/setup_trl.sh                       # once: .venv-trl with trl==1.16.0 + workbench
    .venv-trl/bin/python bench/vs_trl.py [--steps 30] [--block 5] [--threads 2] [--fast off,on] [--quick]

Both libraries run in one process of ``.venv-trl`` (workbench is installed there too), on the same
2 threads. For each fast-path setting (``off``: eager fp32; ``on``: workbench ``compile=True``, TRL
``torch_compile=True``) it builds two copies of the same starting policy (the cached warm start of the
built-in model, ``workbench.policy.warm_start``), one for ``Run`` and one for ``GRPOTrainer``, and
trains both with the same settings:

- task prompts: the default ``addition`` task; TRL's dataset is the exact prompt sequence workbench
  draws (``task.sample`` with ``random.Random(seed)``, one draw of ``prompts_per_step`` per update),
  with ``shuffle_dataset=False``, so update k of both sees the same prompts;
- reward: workbench's ``exact_match`` (the reward the default run trains on), wrapped for TRL;
- G = ``group_size`` samples per prompt, ``prompts_per_step * G`` sequences per update, one optimizer
  update per batch (``num_iterations=1``, no minibatches), AdamW with the same lr / betas / no weight
  decay, constant lr, gradient clip 1.0, temperature 1, no top-k / top-p, the task's answer budget as
  ``max_new_tokens``, no KL (TRL ``beta=0``), no vLLM;
- loss: workbench ``ppo_clip`` (eps 0.2 / 0.2) with ``token-mean`` aggregation vs TRL
  ``loss_type="dapo"`` (PPO-clip, epsilon 0.2, token losses summed and divided by the batch's token
  count: the same estimator on one process). Both anchor the ratio at log-probs of the weights that
  generated the batch without an extra forward (workbench: the sampler's log-probs, ``proximal="none"``;
  TRL: the detached current log-probs when ``num_iterations=1``), so the ratio is 1 and the gradient is
  the policy gradient. Advantages: workbench ``grpo`` (unbiased group std + 1e-6) vs TRL
  ``scale_rewards="group"`` (unbiased group std + 1e-4): the same up to the epsilon.

Interleaved: a ``TrainerCallback`` runs ``--block`` workbench updates after every ``--block`` TRL
updates, so both see the same machine load (the cores are shared). Per update: wall time of
``Run.step()`` (generate + score + update) and of one TRL optimizer step (``on_step_begin`` to
``on_step_end``: its generation, reward, loss, backward and AdamW step). The first ``--warmup`` updates of
each (the initial evaluation, one-off compiles) are left out; medians are reported. Held-out accuracy
of both final policies is measured by the same function (workbench's greedy decoding over
``eval_size`` held-out problems) with 95% Wilson intervals (``workbench.stats``). Asserts nothing.

GRPO: Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300. DAPO token-level loss: Yu et al. 2025,
"DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476. PPO: Schulman et
al. 2017, arXiv:1707.06347.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads starve on shared cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import workbench  # noqa: E402,F401
from workbench.config import RunConfig  # noqa: E402
from workbench.loop import Run  # noqa: E402
from workbench.policy.build import build_policy, build_task  # noqa: E402
from workbench.stats import wilson_interval  # noqa: E402
from workbench.steps.generate import greedy_accuracy  # noqa: E402
from workbench.steps.rewards import REWARDS  # noqa: E402

try:
    import trl  # noqa: E402
    from datasets import Dataset  # noqa: E402
    from transformers import PrinterCallback, TrainerCallback  # noqa: E402
    from trl import GRPOConfig, GRPOTrainer  # noqa: E402
except ImportError as exc:  # the bench needs .venv-trl
    raise SystemExit(f"bench/vs_trl.py needs trl: run `bash scripts/setup_trl.sh` and use .venv-trl/bin/python ({exc})")

FAST = {"off": False, "on": True}


def workbench_config(args: argparse.Namespace, fast: bool) -> RunConfig:
    """The workbench side: the default run with the settings TRL is given below."""
    return RunConfig(out_dir="", seed=args.seed, threads=args.threads, steps=10_000, eval_every=10_000,
                     objective="ppo_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2},
                     aggregation="token-mean", advantage="grpo", proximal="none", kl_coef=0.0,
                     lr_schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=1.0,
                     compile=fast)


def prompt_dataset(cfg: RunConfig, task, updates: int) -> Dataset:
    """The prompts workbench's ``Run`` draws, in its order: ``updates`` draws of ``prompts_per_step``."""
    rng = random.Random(cfg.seed)  # Run.prompt_rng
    examples = [ex for _ in range(updates) for ex in task.sample(rng, cfg.prompts_per_step)]
    return Dataset.from_dict({"prompt": [ex.prompt for ex in examples], "answer": [ex.answer for ex in examples]})


def trl_reward(cfg: RunConfig):
    """workbench's configured reward terms as one TRL reward function (TRL passes dataset columns by name)."""
    terms = [(REWARDS.get(entry[0]), float(entry[1]), dict(entry[2]) if len(entry) == 3 else {}) for entry in cfg.rewards]

    def reward(prompts, completions, answer, **kwargs):
        totals = [0.0] * len(completions)
        for fn, weight, params in terms:
            values = fn(list(prompts), list(completions), answers=list(answer), **params)
            totals = [t + weight * float(v) for t, v in zip(totals, values)]
        return totals

    reward.__name__ = "workbench_" + "_".join(entry[0] for entry in cfg.rewards)
    return reward


def trl_config(cfg: RunConfig, task, args: argparse.Namespace, fast: bool, out_dir: str) -> GRPOConfig:
    return GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0,
        max_steps=args.warmup + args.steps, per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
        gradient_accumulation_steps=1, num_generations=cfg.group_size, num_iterations=1, shuffle_dataset=False,
        max_completion_length=cfg.max_new_tokens or task.max_answer_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1],
        max_grad_norm=cfg.grad_clip, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        use_vllm=False, torch_compile=fast, log_completions=False,
    )


class Interleave(TrainerCallback):
    """Times each TRL optimizer step and runs ``block`` workbench updates after every ``block`` of them."""

    def __init__(self, run: Run, block: int):
        self.run, self.block = run, block
        self.trl_s: list[float] = []
        self.wb_s: list[float] = []
        self._t0 = 0.0

    def workbench_steps(self, n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            self.run.step()
            self.wb_s.append(time.perf_counter() - t)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.trl_s.append(time.perf_counter() - self._t0)  # before workbench's turn: not part of TRL's time
        if state.global_step % self.block == 0:
            self.workbench_steps(self.block)


def accuracy(model, tokenizer, task, cfg: RunConfig) -> tuple[float, float, float]:
    """Held-out greedy accuracy with its 95% Wilson interval: the same measurement for both sides."""
    model.eval()
    examples = task.heldout[: cfg.eval_size]
    acc = greedy_accuracy(model, tokenizer, task, examples)
    lo, hi = wilson_interval(acc * len(examples), len(examples))
    return acc, float(lo), float(hi)


def compare(args: argparse.Namespace, fast_name: str) -> dict:
    fast = FAST[fast_name]
    cfg = workbench_config(args, fast)
    run = Run(cfg, log=lambda s: None)  # builds its own copy of the warm start
    task = build_task(cfg)
    trl_model, tokenizer = build_policy(cfg, task, log=lambda s: None)  # a second, independent copy
    initial = accuracy(trl_model, tokenizer, task, cfg)
    updates = args.warmup + args.steps
    timer = Interleave(run, args.block)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(model=trl_model, reward_funcs=trl_reward(cfg), args=trl_config(cfg, task, args, fast, out_dir),
                              train_dataset=prompt_dataset(cfg, task, updates), processing_class=tokenizer,
                              callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict would break up the table
        torch.set_num_threads(args.threads)  # Run set it; make sure nothing in TRL's set-up changed it
        trl_error = ""
        try:
            trainer.train()
        except Exception as exc:  # noqa: BLE001 -- reported in the table, the workbench side still finishes
            trl_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        timer.workbench_steps(updates - len(timer.wb_s))  # the last partial block (or all, if TRL failed)
        trl_trained = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "fast": fast_name, "initial": initial, "trl_error": trl_error,
        "wb_s": statistics.median(timer.wb_s[args.warmup:]),
        "trl_s": statistics.median(timer.trl_s[args.warmup:]) if len(timer.trl_s) > args.warmup else float("nan"),
        "wb_acc": accuracy(run.model, run.tokenizer, task, cfg),
        "trl_acc": accuracy(trl_trained, tokenizer, task, cfg) if not trl_error else (float("nan"),) * 3,
        "wb_all": timer.wb_s, "trl_all": timer.trl_s,
        "sequences": cfg.prompts_per_step * cfg.group_size, "eval_n": len(task.heldout[: cfg.eval_size]),
    }


def fmt_acc(a: tuple[float, float, float]) -> str:
    return f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed updates per side and setting")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first updates per side (initial eval, compiles)")
    ap.add_argument("--block", type=int, default=5, help="updates per interleaved block")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both sides, one process)")
    ap.add_argument("--fast", default="off,on", help="fast-path settings to run: off, on or off,on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 timed updates after 1 warm-up, blocks of 2")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.block = 3, 1, 2
    for name, value, lo in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--block", args.block, 1),
                            ("--threads", args.threads, 1)):
        if value < lo:
            raise SystemExit(f"error: {name}={value} is invalid: expected an integer >= {lo}")
    settings = [s.strip() for s in args.fast.split(",") if s.strip()]
    if not settings or any(s not in FAST for s in settings):
        raise SystemExit(f"error: --fast={args.fast!r} is invalid: expected off, on or off,on")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    rows = [compare(args, s) for s in settings]
    r0 = rows[0]
    print(f"torch {torch.__version__}, trl {trl.__version__}, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}; {r0['sequences']} sequences/update, {args.steps} timed updates "
          f"after {args.warmup} warm-up per side, interleaved in blocks of {args.block}; medians")
    print(f"initial held-out accuracy (both start here): {fmt_acc(r0['initial'])} over {r0['eval_n']} problems")
    print(f"{'fast path':<10} {'workbench s/update':>19} {'TRL s/update':>13} {'TRL / workbench':>16} "
          f"{'workbench final acc [95% CI]':>29} {'TRL final acc [95% CI]':>25}")
    for r in rows:
        print(f"{r['fast']:<10} {r['wb_s']:19.3f} {r['trl_s']:13.3f} {r['trl_s'] / r['wb_s']:15.2f}x "
              f"{fmt_acc(r['wb_acc']):>29} {fmt_acc(r['trl_acc']):>25}")
    for r in rows:  # every update, warm-up included: shows one-off compiles and recompiles
        print(f"fast path {r['fast']}, s per update, workbench: {' '.join(f'{t:.2f}' for t in r['wb_all'])}")
        print(f"fast path {r['fast']}, s per update, TRL:       {' '.join(f'{t:.2f}' for t in r['trl_all'])}")
        if r["trl_error"]:
            print(f"  TRL with fast path {r['fast']} failed: {r['trl_error']}")


if __name__ == "__main__":
    main()
