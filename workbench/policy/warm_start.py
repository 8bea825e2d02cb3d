"""Warm start: a short deterministic SFT from scratch that makes the built-in model a good RL start.

A fresh model (``build_model``) is trained with teacher forcing on prompt + answer + EOS (loss on
the answer and EOS tokens only, AdamW), and its held-out greedy accuracy is checked every
``eval_every`` steps. Training stops as soon as accuracy is inside ``target_band`` (default
0.2-0.5: right often enough to get reward, wrong often enough to learn from; docs/design.md,
"The built-in default"). If accuracy jumps past the band, the evaluated checkpoint closest to the
band is kept and the log says so; the same happens when the step cap is reached first.

The result is cached: ``<cache root>/warm_start/<key>/`` holds the checkpoint (``save_policy``
format, loadable with ``load_policy``) and ``warm_start.json``. The key hashes the task
(name, params, file content for JSONL), the model and SFT configs (seed included) and the workbench
version. Cache root: ``$WORKBENCH_CACHE``, else ``$XDG_CACHE_HOME/workbench``, else
``~/.cache/workbench``. The folder is built under a temporary name and renamed into place, so an
interrupted run never leaves a folder that looks valid.

SFT batches use the same tokenization and layout as the sampler (prompt tokenized with the
tokenizer's defaults and left-padded, answer + EOS right-padded) and the same ``token_logprobs``
forward pass, so the model is trained on exactly what it will later be asked to continue.

The SFT targets are ``task.expert(example)`` (the reference answer for the built-in tasks).

Left out: learning-rate schedules beyond a linear warm-up, gradient accumulation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from workbench import __version__
from workbench.cache import cache_root
from workbench.errors import bad_value
from workbench.steps.generate.sampler import encode_prompts
from workbench.steps.generate.transformers_sampler import greedy_accuracy
from workbench.policy.logprobs import token_logprobs
from workbench.policy.model import ModelConfig, build_model, save_policy
from workbench.rollouts import Rollouts
from workbench.tasks import Example, Task
from workbench.policy.tokenizer import build_char_tokenizer, tokenizer_alphabet

SFT_FORMAT = 2  # bump when the SFT procedure changes, to invalidate old cache entries
META_FILE = "warm_start.json"


@dataclass(frozen=True)
class SFTConfig:
    """Warm-start SFT settings."""

    max_steps: int = 3000
    """Cap on optimizer steps (stops earlier as soon as accuracy is inside target_band)."""
    batch_size: int = 64
    """Training examples per step."""
    lr: float = 1e-3
    """AdamW learning rate (after a linear warm-up of ``warmup_steps``)."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up length."""
    eval_every: int = 25
    """Steps between held-out greedy-accuracy evaluations."""
    target_band: tuple[float, float] = (0.2, 0.5)
    """Stop when held-out greedy accuracy is in [low, high]."""
    seed: int = 0
    """Seeds the model initialisation and the training data order."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_value(f"SFTConfig.{name}", v, "a positive int")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise bad_value("SFTConfig.warmup_steps", self.warmup_steps, "an int >= 0")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise bad_value("SFTConfig.lr", self.lr, "a number in (0, 1)")
        band = self.target_band
        ok = (isinstance(band, (tuple, list)) and len(band) == 2
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in band)
              and 0 <= band[0] <= band[1] <= 1)
        if not ok:
            raise bad_value("SFTConfig.target_band", band, "(low, high) with 0 <= low <= high <= 1")
        object.__setattr__(self, "target_band", (float(band[0]), float(band[1])))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad_value("SFTConfig.seed", self.seed, "an int")


def cache_key(task: Task, model_cfg: ModelConfig, sft_cfg: SFTConfig) -> str:
    """Hex digest identifying a warm start (same inputs -> same key -> same folder)."""
    blob = json.dumps(
        {"task": task.fingerprint, "model": asdict(model_cfg), "sft": asdict(sft_cfg),
         "version": __version__, "format": SFT_FORMAT},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sft_batch(tokenizer, examples: list[Example], task: Task) -> Rollouts:
    """Teacher-forcing batch in the sampler's layout: prompts left-padded, expert answer + EOS."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [ex.prompt for ex in examples])  # [B, P]
    answers = [tokenizer(task.expert(ex), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for ex in examples]
    T = max(len(a) for a in answers)
    response_ids = torch.full((len(examples), T), tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
    response_mask = torch.zeros((len(examples), T), dtype=torch.float32)  # [B, T]
    for i, a in enumerate(answers):
        response_ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        response_mask[i, : len(a)] = 1.0
    B = len(examples)
    return Rollouts(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                    response_mask=response_mask, behavior_logprobs=torch.zeros(B, T),
                    policy_version=torch.zeros(B, dtype=torch.long),
                    group_id=torch.arange(B, dtype=torch.long))


def _band_distance(acc: float, band: tuple[float, float]) -> float:
    return max(band[0] - acc, acc - band[1], 0.0)


def _check_lengths(task: Task, tokenizer, model_cfg: ModelConfig) -> None:
    probe = task.heldout[:64] or task.sample(random.Random(0), 64)
    longest = max(len(tokenizer(ex.prompt)["input_ids"]) for ex in probe) + task.max_answer_tokens
    if longest > model_cfg.max_position_embeddings:
        raise bad_value("ModelConfig.max_position_embeddings", model_cfg.max_position_embeddings,
                        f">= {longest} (longest prompt + answer budget of task {task.name!r})")


def _train(task, model_cfg, sft_cfg, log) -> tuple[torch.nn.Module, object, dict]:
    tokenizer = build_char_tokenizer(tokenizer_alphabet(task.alphabet))
    _check_lengths(task, tokenizer, model_cfg)
    model = build_model(model_cfg, tokenizer, seed=sft_cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=sft_cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(sft_cfg.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    rng = random.Random(sft_cfg.seed)
    band = sft_cfg.target_band
    best = {"distance": float("inf"), "accuracy": float("nan"), "step": 0, "state": None}
    history: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    reason = "step cap"

    def evaluate(step: int) -> float:
        acc = greedy_accuracy(model, tokenizer, task, task.heldout)
        history.append((step, acc))
        d = _band_distance(acc, band)
        if d < best["distance"]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best.update(distance=d, accuracy=acc, step=step, state=state)
        return acc

    loss_ema = None
    for step in range(1, sft_cfg.max_steps + 1):
        batch = sft_batch(tokenizer, task.sample(rng, sft_cfg.batch_size), task)
        logp, _ = token_logprobs(model, batch)
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % sft_cfg.eval_every == 0 or step == sft_cfg.max_steps:
            acc = evaluate(step)
            log(f"warm start: step {step} loss {loss_ema:.3f} heldout greedy acc {acc:.3f} "
                f"({time.perf_counter() - t0:.1f}s)")
            if band[0] <= acc <= band[1]:
                reason = "in band"
                break
            if acc > band[1]:
                reason = "jumped past band"
                break
    seconds = time.perf_counter() - t0
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    if reason == "jumped past band":
        log(f"warm start: accuracy jumped past the band {band} at step {history[-1][0]} "
            f"(acc {history[-1][1]:.3f}); keeping the closest checkpoint: step {best['step']} "
            f"acc {best['accuracy']:.3f}")
    elif reason == "step cap":
        log(f"warm start: reached max_steps={sft_cfg.max_steps} without entering the band {band}; "
            f"keeping the closest checkpoint: step {best['step']} acc {best['accuracy']:.3f}")
    model.eval()
    meta = {
        "accuracy": best["accuracy"], "steps": best["step"], "steps_trained": history[-1][0],
        "seconds": round(seconds, 3), "stop_reason": reason, "in_band": reason == "in band",
        "history": history, "task": task.spec(), "model_config": asdict(model_cfg),
        "sft_config": asdict(sft_cfg), "workbench_version": __version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, tokenizer, meta


def warm_start(task: Task, model_cfg: ModelConfig | None = None, sft_cfg: SFTConfig | None = None,
               cache_dir: str | os.PathLike | None = None,
               log: Callable[[str], None] = print) -> Path:
    """Path of a cached warm-started checkpoint for (task, model_cfg, sft_cfg); trains on a miss.

    ``cache_dir`` overrides the cache root. Open the result with ``load_policy(path)``.
    """
    model_cfg = ModelConfig() if model_cfg is None else model_cfg
    sft_cfg = SFTConfig() if sft_cfg is None else sft_cfg
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    key = cache_key(task, model_cfg, sft_cfg)
    final = root / "warm_start" / key
    if (final / META_FILE).is_file():
        log(f"warm start: cache hit {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    log(f"warm start: training {task!r} into {final}")
    model, tokenizer, meta = _train(task, model_cfg, sft_cfg, log)
    meta["key"] = key
    staging = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    try:
        save_policy(model, tokenizer, staging)
        with tempfile.NamedTemporaryFile("w", dir=staging, delete=False, suffix=".json") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(fh.name, staging / META_FILE)  # the marker that makes the folder valid
        if final.exists() and not (final / META_FILE).is_file():
            shutil.rmtree(final, ignore_errors=True)  # leftover without a marker: not a result
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / META_FILE).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"warm start: saved {final} (acc {meta['accuracy']:.3f} at step {meta['steps']}, "
        f"{meta['seconds']:.1f}s)")
    return final


__all__ = ["SFTConfig", "warm_start", "cache_key", "sft_batch"]
