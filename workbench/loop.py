"""The loop: generate -> score -> buffer -> reweight -> update, one optimizer update per step.

Read top to bottom: ``Run.step`` is the whole algorithm. One step = one optimizer update;
``policy_version`` = updates applied so far. The buffer decides which (stale) batch an update
sees (docs/design.md, "Staleness and the behaviour policy"); ``update_step`` reweights it with
the live objective and steps AdamW.

    run = Run(RunConfig(objective="m2po", staleness=64))
    run.run(100)            # or run.step() in a notebook; run.knobs.staleness = 4 changes it live
    run.metrics             # polars DataFrame, one row per update
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import polars as pl
import torch

from workbench.config import RunConfig
from workbench.knobs import NUMERICS_FIELDS, Knobs
from workbench.errors import WorkbenchError
from workbench.lint import nonfinite_message
from workbench.ope import OPEMonitor
from workbench.policy.build import build_policy, build_task, reference_policy
from workbench.policy.fast_path import check_fast_path
from workbench.policy.chat import render_examples, resolve_template
from workbench.rollouts import Rollouts
from workbench.runs import checkpoint as ckpt
from workbench.runs.health import HealthMonitor
from workbench.runs.progress import progress_postfix, update_bar
from workbench.runs.rundir import RunDir, keep_previous
from workbench.runs.tracking import TrackingSink
from workbench.stats import wilson_interval
from workbench.steps.async_pipeline import make_buffer
from workbench.steps.buffer import SyncStopped
from workbench.steps.generate import greedy_accuracy, make_sampler
from workbench.steps.prefill import sample_batches, sampling_params
from workbench.steps.reweight.core import Objective, resolve_objective
from workbench.steps.score import score
from workbench.steps.reweight.mismatch import attach_trainer_logprobs
from workbench.steps.update import build_optimizer, expert_batch, lr_multiplier, proximal_logprobs, update_step

Hook = Callable[["Run", dict[str, Any]], None]
MAX_NONFINITE_STREAK = 5  # consecutive skipped (non-finite) updates before the run stops with an error


class Run:
    """A live experiment: ``step()``, ``run(n)``, ``metrics``, ``knobs``, ``hooks``.

    Public attributes (read by the notebooks, the UI and the studies; the rest is private):

    - ``config`` (``RunConfig``), ``knobs`` (``Knobs``: set live, applied at the next update),
      ``objective`` (the ``Objective`` the latest update used, resolved once per knob change)
    - ``task``, ``model``, ``tokenizer``, ``ref_model`` (frozen initial policy, or None), ``sampler``,
      ``optimizer``, ``buffer`` (``StalenessBuffer``; ``AsyncPipeline`` if async), ``chat_template`` (None = raw prompts)
    - ``version`` (updates applied), ``rows`` (one metrics dict per update; ``metrics`` as a
      DataFrame), ``knob_events`` (applied changes), ``initial_accuracy``, ``last_batch`` (the
      minibatch of the latest update, None before the first), ``last_update_tokens`` (that update's
      per-token record before its optimizer step, ``steps.update.token_record``; read by ``ui.tokens``)
    - ``prompt_rng`` / ``generator`` (prompt and token sampling), ``objective_state`` (per-run
      numbers of stateful objectives), ``minibatches`` (pending minibatches of the current batch)
    - ``dir`` (``RunDir`` or None), ``hooks`` (``hook(run, row)`` after every update), ``log``
    """

    def __init__(self, config: RunConfig, *, model=None, tokenizer=None, sampler=None,
                 knob_schedule: list[dict[str, Any]] | None = None, log: Callable[[str], None] = print,
                 _resuming: bool = False):
        self.config = config
        check_fast_path(config.compile, config.autocast, config.device)  # before anything is built or written
        if config.threads:
            torch.set_num_threads(config.threads)
        self.log = log
        self.task = build_task(config)
        if not self.task.heldout:  # evaluated at the start, every eval_every updates and at the end
            raise WorkbenchError(f"task={config.task!r} has an empty held-out set: the run evaluates on it; "
                                 f"give it at least one example (task_params)")
        model, tokenizer = build_policy(config, self.task, log, model=model, tokenizer=tokenizer)  # + LoRA adapters
        self.model, self.tokenizer = model, tokenizer
        self.objective: Objective = resolve_objective(config.objective, config.objective_params)
        # a frozen reference when a KL penalty or the objective (e.g. tb) needs one
        needs_ref = "ref_logprobs" in self.objective.needs
        self.ref_model = reference_policy(model) if (config.kl_coef or needs_ref) else None  # LoRA: adapters off
        self.chat_template = resolve_template(tokenizer, config.chat_template)  # None = raw prompts
        # config.sampler (transformers | vllm); a failed engine start raises before the run dir is touched
        self.sampler = sampler or make_sampler(config.sampler, config.sampler_params, model, tokenizer,
                                                 seed=config.seed, log=log)
        self.optimizer = build_optimizer(model, config.lr, config.weight_decay, config.adam_betas)
        self.knobs = Knobs(config)
        self.buffer = make_buffer(config, log=log, run=self)  # fixed lag (fifo or a replay source) | async pipeline
        self.prompt_rng = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.version = 0
        # per-run objective state (JSON-able numbers, e.g. R2VPO's dual variable); checkpointed
        self.objective_state: dict[str, Any] = {}
        self.minibatches: list[Rollouts] = []  # pending minibatches of the current batch
        self.rows: list[dict[str, Any]] = []
        self.knob_events: list[dict[str, Any]] = []
        self.last_batch: Rollouts | None = None
        self.last_update_tokens: dict[str, Any] | None = None
        self._schedule = {int(e["update"]): e["changes"] for e in (knob_schedule or [])}
        self.hooks: list[Hook] = [OPEMonitor(config.ope_every)] if config.ope_every else []
        self._stop = threading.Event()  # request_stop(): run() stops between updates
        self._stop_honoured = False
        self._nonfinite_streak = 0  # consecutive updates skipped for a non-finite gradient
        self.final_accuracy: tuple[int, float] | None = None  # (version, acc) of run()'s final evaluation
        path = Path(config.out_dir) / (config.run_name or _run_name(config)) if config.out_dir else None
        if path is not None and not _resuming:
            keep_previous(path, log)  # a rerun with the same name never overwrites an earlier run
        # one writer per folder: a live run of another process is a one-line error (runs/lock.py)
        self.dir = RunDir.open(path, log, config=None if _resuming else config.to_dict()) if path is not None else None
        if config.tracking and self.dir is not None:  # mirrors of metrics.parquet (runs/tracking.py)
            self.hooks.append(TrackingSink(config.tracking, self.dir.path, log=log))
        self._timing: dict[str, float] = {}
        self.initial_accuracy: float | None = None
        # warnings from the rows (collapse, truncation, ...): logged, journalled, the panel's banner
        self.health = HealthMonitor(min(config.eval_size, len(self.task.heldout)), log=log, journal=self.dir)

    # ---------------------------------------------------------------- the algorithm
    def step(self) -> dict[str, Any]:
        """One optimizer update. Knob changes made since the last step apply here."""
        t_start = time.perf_counter()
        self._timing = dict.fromkeys(("perf/time_generate", "perf/time_score", "perf/time_sync", "perf/time_trainer_logprobs"), 0.0)
        self._apply_knob_changes()
        if self.initial_accuracy is None:
            self.initial_accuracy = self.evaluate()
        k, knobs, cfg = self.version, self.knobs.applied, self.config

        # buffer: the batch this update trains on (generate + score run inside, when due)
        buffer_stats: dict[str, float] = {}
        score_stats: dict[str, float] = {}
        if not self.minibatches:
            units = cfg.updates_per_batch * cfg.num_minibatches  # updates fed by one batch
            batch, score_stats, buffer_stats = self.buffer.pop(
                k, staleness=knobs.staleness // units, sync_every=max(1, knobs.sync_every // units),
                max_staleness=knobs.max_staleness, produce=self._generate_and_score,
                produce_batches=lambda n: [self._generate_and_score(made) for made in sample_batches(self, n)],
                prefill_batches=cfg.prefill_batches, should_stop=self._stop.is_set,  # a stop mid-prefill: SyncStopped, the queue kept (run())
                horizon=-(-(cfg.steps - k) // units) if cfg.prefill_to_steps and k < cfg.steps else None)
            if cfg.proximal == "recompute":  # AReaL: pi_prox = the policy when the batch's first update starts
                batch = batch.with_(prox_logprobs=proximal_logprobs(self.model, batch, knobs.temperature, cfg.autocast, knobs.trainer_numerics(cfg.seed)))
            self.minibatches = self._split(batch)
        minibatch = self.minibatches.pop(0)
        self.last_batch = minibatch  # the batch of the latest update (the notebooks' per-token view)

        # reweight + update
        for group in self.optimizer.param_groups:
            group["lr"] = knobs.lr * lr_multiplier(k, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
        expert = expert_batch(minibatch, self.tokenizer, self.task) if "expert_logprobs" in self.objective.needs else None
        tokens: dict[str, Any] = {}  # filled before the optimizer step (the per-token view)
        metrics = update_step(
            self.model, self.optimizer, minibatch.to(next(self.model.parameters()).device),
            objective=self.objective, aggregation=cfg.aggregation, temperature=knobs.temperature, grad_clip=cfg.grad_clip, kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator, kl_is_corrected=cfg.kl_is_corrected, entropy_coef=cfg.entropy_coef,
            ref_model=self.ref_model,
            correction=cfg.correction_spec(), proximal=cfg.proximal, policy_version=k, numerics=knobs.trainer_numerics(cfg.seed),
            loss_scale_factor=cfg.loss_scale_factor or None, micro_batch_size=cfg.micro_batch_size, autocast=cfg.autocast, compile=cfg.compile,
            context={"step": k, "state": self.objective_state}, expert_batch=expert, keep_tokens=tokens, alp_scale=cfg.alp_scale)
        self.last_update_tokens = tokens
        self.version += 1

        # metrics row
        stale = (k - minibatch.policy_version).float()  # [B] staleness at the start of this update
        row: dict[str, Any] = {"update": k, "policy_version": self.version}
        row.update({**self._knob_columns(), **score_stats, **buffer_stats, **metrics})  # later keys win, as before
        row.update({"offpolicy/staleness_mean": float(stale.mean()), "offpolicy/staleness_max": float(stale.max()),
                    "offpolicy/staleness_min": float(stale.min()), "batch/sequences": float(len(minibatch))})
        if self.version % cfg.eval_every == 0 or self.version == cfg.steps:  # and always at the run's end
            t = time.perf_counter()
            row["eval/accuracy"] = acc = self.evaluate()
            # its 95% Wilson interval over the eval_n problems: a chart's error bar, a table's interval
            row["eval/accuracy_lo"], row["eval/accuracy_hi"] = wilson_interval(acc * self.health.eval_n, self.health.eval_n)
            self._timing["perf/time_eval"] = time.perf_counter() - t
        row.update(self._timing)
        row["perf/time_step"] = time.perf_counter() - t_start
        row["perf/gen_tokens_per_s"] = self._timing.get("perf/gen_tokens", 0.0) / max(
            self._timing["perf/time_generate"], 1e-9)
        row["perf/train_tokens_per_s"] = metrics["perf/train_tokens"] / max(
            metrics["perf/time_forward"] + metrics["perf/time_loss"] + metrics["perf/time_backward"], 1e-9)
        self.rows.append(row)
        if self.dir:
            self.dir.append_metrics(row)
            if cfg.checkpoint_every and self.version % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        self.health.watch(row, self.initial_accuracy, self.rows)
        for hook in self.hooks:
            hook(self, row)
        self._nonfinite_streak = self._nonfinite_streak + 1 if metrics.get("loss/skipped_nonfinite") else 0
        if self._nonfinite_streak >= MAX_NONFINITE_STREAK:  # every update a no-op: stop, say why
            raise WorkbenchError(nonfinite_message(cfg, knobs, row, self._nonfinite_streak))
        return row

    def sample(self, prompts: int | None = None, *, filter_zero_variance: bool | None = None) -> tuple[Rollouts, dict[str, float]]:
        """generate + score one fresh batch with the current weights: ``prompts`` prompts (default
        ``config.prompts_per_step``) x ``group_size`` samples from the run's generators, rewards and
        advantages as configured (``filter_zero_variance`` defaults to the config's). The loop's
        batches and the studies' fresh batches come from here."""
        self._sync_sampler()
        cfg, kn, t0 = self.config, self.knobs.applied, time.perf_counter()
        examples = render_examples(self.tokenizer, self.task.sample(self.prompt_rng, prompts or cfg.prompts_per_step),
                                   self.chat_template)
        params = sampling_params(cfg, kn, self.task)
        self.model.eval()
        rollouts = self.sampler.generate(examples, cfg.group_size, params, generator=self.generator,
                                         policy_version=self.version)
        t1 = time.perf_counter()
        fzv = cfg.filter_zero_variance if filter_zero_variance is None else filter_zero_variance
        rollouts, stats = score(rollouts, list(cfg.rewards), advantage=cfg.advantage, filter_zero_variance=fzv,
                                advantage_params=cfg.advantage_params)
        self._timing["perf/time_generate"] = self._timing.get("perf/time_generate", 0.0) + t1 - t0
        self._timing["perf/time_score"] = self._timing.get("perf/time_score", 0.0) + time.perf_counter() - t1
        self._timing["perf/gen_tokens"] = self._timing.get("perf/gen_tokens", 0.0) + float(rollouts.response_mask.sum())
        return rollouts, stats

    def _generate_and_score(self, made: tuple[Rollouts, dict[str, float]] | None = None) -> tuple[Rollouts, dict[str, float]]:
        """The buffer's producer: ``sample()`` (or ``made``, one batch of a batched prefill: steps/prefill.py), plus log pi_gen of ``mismatch_sample`` groups when the batch is consumed later."""
        cfg, kn = self.config, self.knobs.applied
        rollouts, stats = self.sample() if made is None else made
        # log pi_gen, stored while the trainer holds the generating weights; a batch consumed at once
        # needs no forward (the update's own log-probs are pi_gen then: steps/reweight/mismatch.py)
        later = (cfg.updates_per_batch * cfg.num_minibatches > 1 or kn.staleness > 0 or kn.sync_every > 1
                 or self.buffer.source.capacity_sequences(1) > 0)  # a replay store keeps batches for later
        if cfg.measure_mismatch and later and len(rollouts):
            t2 = time.perf_counter()
            rollouts = attach_trainer_logprobs(self.model, rollouts, kn.temperature, groups=cfg.mismatch_sample,
                                               seed=cfg.seed, autocast=cfg.autocast, numerics=kn.trainer_numerics(cfg.seed))  # a sampled subset (mismatch.py)
            self._timing["perf/time_trainer_logprobs"] += time.perf_counter() - t2
        return rollouts, stats

    def _sync_sampler(self) -> None:
        """Bring an engine that holds its own weights (vllm) to the current version before it
        generates; its ``sync`` returns False (a no-op) when it already holds them, and the time of
        real syncs is ``perf/time_sync``. The transformers sampler shares ``self.model``: nothing to sync."""
        sync = getattr(self.sampler, "sync", None)
        if sync is not None:
            t = time.perf_counter()
            if sync(self.model, self.version):
                self._timing["perf/time_sync"] = self._timing.get("perf/time_sync", 0.0) + time.perf_counter() - t

    def _split(self, batch: Rollouts) -> list[Rollouts]:
        """Epochs x minibatches of whole groups, shuffled per epoch with the run's generator."""
        cfg = self.config
        if cfg.updates_per_batch == 1 and cfg.num_minibatches == 1:
            return [batch]
        groups = torch.unique(batch.group_id)  # [G]
        out = []
        for _ in range(cfg.updates_per_batch):
            order = groups[torch.randperm(len(groups), generator=self.generator)]
            for chunk in order.chunk(cfg.num_minibatches):
                out.append(batch.select(torch.isin(batch.group_id, chunk)))
        return out

    # ---------------------------------------------------------------- driving
    def run(self, n: int | None = None, progress: bool = False) -> pl.DataFrame:
        """Run ``n`` updates (default: up to ``config.steps``); returns the metrics."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise WorkbenchError(f"run(n={n!r}) is invalid: expected an integer >= 0 (updates to run) or None")
        n = self.config.steps - self.version if n is None else n
        if self._stop_honoured:  # an earlier run() already stopped for that request
            self._stop.clear()
            self._stop_honoured = False
        bar = update_bar(n) if progress else None
        done = 0
        for _ in range(n):
            if self._stop.is_set():
                self._stop_honoured = True
                break
            try:
                row = self.step()
            except SyncStopped:  # stopped while generating (a long prefill): no update, batches kept
                self._stop_honoured, done = True, 0  # the state changed: checkpoint it
                break
            done += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(progress_postfix(row), refresh=False)
        if bar is not None:
            bar.close()
        cfg = self.config
        if not self._stop_honoured and self.version >= cfg.steps and self.rows and "eval/accuracy" not in self.rows[-1]:
            self.final_accuracy = (self.version, self.evaluate())  # past the run's end: the final weights
        if self.dir:
            if not (done and cfg.checkpoint_every and self.version % cfg.checkpoint_every == 0):
                self.save_checkpoint(final=True)  # (unless the last update just wrote this one)
            else:
                self.dir.mark_final(self.version, keep=cfg.keep_checkpoints)
            self.write_summary()
            self._close_sinks()  # a later run() reopens them
        return self.metrics

    def request_stop(self) -> None:
        """Ask ``run()`` to stop after the update in progress (any thread, or a signal handler: it only
        sets a flag), or during a long buffer sync after the batch being generated (``SyncStopped``,
        batches kept). ``run()`` then writes its checkpoint and summary and returns;
        ``stop_requested`` stays True until the next ``run()``."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def evaluate(self) -> float:
        """Held-out greedy accuracy of the current weights."""
        self.model.eval()
        examples = render_examples(self.tokenizer, self.task.heldout[: self.config.eval_size], self.chat_template)
        return greedy_accuracy(self.model, self.tokenizer, self.task, examples)

    @property
    def metrics(self) -> pl.DataFrame:
        return pl.from_dicts(self.rows, infer_schema_length=None) if self.rows else pl.DataFrame()

    def summary(self) -> dict[str, Any]:
        df = self.metrics
        acc = df["eval/accuracy"].drop_nulls() if "eval/accuracy" in df.columns else pl.Series([])
        out = {"updates": self.version, "eval/initial_accuracy": self.initial_accuracy,
               "eval/final_accuracy": float(acc[-1]) if len(acc) else None,
               "eval/best_accuracy": float(acc.max()) if len(acc) else None}
        if self.final_accuracy is not None and self.final_accuracy[0] == self.version:  # run() past the end
            final = self.final_accuracy[1]
            out["eval/final_accuracy"] = final
            out["eval/best_accuracy"] = final if out["eval/best_accuracy"] is None else max(out["eval/best_accuracy"], final)
        if out["eval/final_accuracy"] is not None:  # and its 95% Wilson interval (one evaluation)
            n = self.health.eval_n
            out["eval/final_accuracy_lo"], out["eval/final_accuracy_hi"] = wilson_interval(out["eval/final_accuracy"] * n, n)
            out["eval/problems"] = n
        for col in ("reward/accuracy", "offpolicy/clipfrac", "offpolicy/masked_frac", "offpolicy/m2",
                    "offpolicy/ess_token", "loss/entropy"):
            if col in df.columns:
                out[f"mean:{col}"] = float(df[col].mean())
        out["perf/seconds"] = float(df["perf/time_step"].sum()) if "perf/time_step" in df.columns else 0.0
        return out

    def write_summary(self) -> dict[str, Any]:
        s = self.summary()
        if self.dir:
            self.dir.write_summary(s)
        return s

    # ---------------------------------------------------------------- knobs, checkpoints
    def _apply_knob_changes(self) -> None:
        if self.version in self._schedule:
            self.knobs.set(**self._schedule[self.version])
        changes = self.knobs.take_pending()
        if "objective" in changes or "objective_params" in changes:
            kn = self.knobs.applied
            self.objective = resolve_objective(kn.objective, kn.objective_params)
        if "ref_logprobs" in self.objective.needs and self.ref_model is None:
            raise WorkbenchError(
                f"objective={self.objective.name!r} needs a reference model: start the run with it or set "
                f"kl_coef > 0 (a frozen copy of the initial policy is built then)")
        if changes:
            event = {"update": self.version, "changes": changes}
            self.knob_events.append(event)
            if self.dir:
                self.dir.append_jsonl("knob_events.jsonl", event)

    def _knob_columns(self) -> dict[str, Any]:
        kn = self.knobs.applied
        cols = {"knob/objective": kn.objective, "knob/staleness": kn.staleness, "knob/sync_every": kn.sync_every,
                "knob/lr": self.optimizer.param_groups[0]["lr"], "knob/temperature": kn.temperature}
        cols.update({f"knob/{p}": v for p, v in kn.objective_params.items() if isinstance(v, (int, float))})
        cols.update({f"knob/{k}": getattr(kn, k) for k in NUMERICS_FIELDS})  # top-p/k, dtypes, noise, replay
        return cols

    def save_checkpoint(self, final: bool = False) -> Path:
        """``final``: the end of ``run()``; retention (``keep_checkpoints``) always keeps the latest such."""
        return ckpt.save(self, final=final)

    def close(self) -> None:
        """Release the run directory's lock (also at exit and garbage collection): this object writes
        nothing afterwards; another process, or a new ``Run``/``Run.resume`` here, may take the folder."""
        self._close_sinks()
        if self.dir is not None:
            self.dir.close()

    def _close_sinks(self) -> None:
        for hook in self.hooks:
            if isinstance(hook, TrackingSink):
                hook.close()

    @classmethod
    def resume(cls, run_dir: str | Path, checkpoint: str | Path | None = None, **kw: Any) -> "Run":
        """Reopen a run directory at its latest intact (or a given) checkpoint; continues exactly.
        A folder another live process writes is refused before anything is built."""
        config, checkpoints = ckpt.load(run_dir, checkpoint)
        run = cls(config, _resuming=True, **kw)
        ckpt.restore(run, checkpoints)  # on failure it closes the run (the folder is free again)
        kn = run.knobs.applied
        run.objective = resolve_objective(kn.objective, kn.objective_params)
        return run


def _run_name(config: RunConfig) -> str:
    lag = "async" if config.staleness_mode == "async" else f"s{config.staleness}"  # an async run's lag is simulated
    return f"{config.task}-{config.objective}-{lag}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
