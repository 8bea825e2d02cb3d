"""Run configuration: a frozen, validated ``RunConfig``.

``RunConfig`` holds everything needed to rerun an experiment (it is written to
``runs/<id>/config.json``). The few settings that may change between updates while a run is live
are its ``Knobs`` (``workbench/knobs.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError, bad_value
from workbench.policy.lora import validate_lora
from workbench.policy.model import DEVICES, DTYPES
from workbench.policy.fast_path import AUTOCAST_MODES
from workbench.policy.numerics import LOGITS_DTYPES, trainer_numerics
from workbench.runs.tracking import validate_tracking
from workbench.steps.generate.engines import validate_sampler
from workbench.steps.async_state import check_async_config
from workbench.steps.replay import check_source
from workbench.steps.reweight.aggregate import AGGREGATIONS
from workbench.steps.reweight.core import OBJECTIVES, validate_params
from workbench.steps.reweight.corrections import PROXIMAL_MODES, make_correction
from workbench.steps.reweight.proximal import check_reuse_train_logp
from workbench.steps.reweight.kl import KL_ESTIMATORS
from workbench.steps.score import ADVANTAGES, REWARDS, validate_advantage_params
from workbench.tasks import TASKS
from workbench.validate import check_known, check_types

LR_SCHEDULES = ("constant", "linear", "cosine")


def _check(cond: bool, fld: str, value: object, expected: str) -> None:
    if not cond:
        raise bad_value(fld, value, expected)


def _valid_run_name(name: object) -> bool:
    """A run directory is exactly one folder inside ``out_dir``: a name can never reach outside it."""
    return isinstance(name, str) and (name == "" or (
        name not in (".", "..") and not any(c in name for c in "/\\\0") and not os.path.isabs(name)))


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs. Frozen; validated on construction (one-line errors)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "RunConfig":
        check_known(cls, args, kwargs)  # RunConfig(foo=1): the valid names, not __init__'s TypeError
        return super().__new__(cls)

    # --- task and model ---
    task: str = "addition"
    """Task registry name (``addition``, ``reverse``; from files: ``jsonl``, ``parquet``, ``hf_dataset``)."""
    task_params: dict[str, Any] = field(default_factory=dict)
    """Difficulty parameters of the task (e.g. ``{"max_digits": 3}``, ``{"path": "x.jsonl"}``)."""
    model: str = "builtin"
    """``builtin`` (tiny model, SFT warm start, cached) or a local Hugging Face checkpoint folder."""
    model_params: dict[str, Any] = field(default_factory=dict)
    """Overrides of the built-in ``ModelConfig`` (hidden_size, num_layers, ...)."""
    sft_params: dict[str, Any] = field(default_factory=dict)
    """Overrides of the warm start's ``SFTConfig`` (target_band, steps, lr, ...)."""
    lora: dict[str, Any] = field(default_factory=dict)
    """LoRA adapters, only they train ({} = off; needs the peft extra): r (rank, default 8), alpha (scale alpha / r, default 16), dropout (default 0), target (comma-separated module-name suffixes, default q_proj,v_proj, or all-linear); the reference policy is the model with them off (workbench.policy.lora)."""
    seed: int = 0
    """Seed for model init, prompt sampling and token sampling. Same seed, same metrics."""
    threads: int = 0
    """torch intra-op threads; 0 = leave torch's default."""
    dtype: str = "float32"
    """Trainer weights' dtype: float32 | bfloat16 | float16 (the vLLM engine follows it unless sampler_params.dtype says otherwise)."""
    device: str = "auto"
    """Trainer device: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N."""
    chat_template: str = ""
    """Prompts as one chat user turn: '' = raw prompt, 'tokenizer' = the checkpoint's template, or a Jinja template / file (workbench.policy.chat)."""
    compile: bool = False
    """torch.compile the policy's training forward/backward (inductor, dynamic shapes; no-grad forwards stay eager); one-off compile time reported as perf/compile_seconds on the first update."""
    autocast: str = ""
    """Trainer forwards under autocast: '' (exact, the model's dtype) | bf16 | fp16; the loss stays fp32 and the sampler keeps the model's dtype, so bf16/fp16 is an engine-mismatch source (mismatch/engine_*; workbench.policy.fast_path)."""

    # --- generate ---
    prompts_per_step: int = 32
    """Prompts per generated batch; the batch has prompts_per_step * group_size sequences."""
    group_size: int = 8
    """G samples per prompt (the GRPO group)."""
    temperature: float = 1.0
    """Sampling temperature (live knob)."""
    top_p: float = 1.0
    """Nucleus sampling; < 1 makes behaviour log-probs differ from the trainer's (truncated support) (live knob)."""
    top_k: int = 0
    """Top-k sampling; 0 = off (live knob)."""
    replay_sampling_mask: bool = False
    """Sampling-mask replay: the sampler records each position's kept top-k / top-p set and the trainer's log-probs (update, proximal, mismatch) renormalise over it, so truncated sampling adds no mismatch (DeepSeek-V3.2's Keep Sampling Mask; workbench.policy.numerics); sampler=transformers only (live knob)."""
    sampler_logits_dtype: str = ""
    """Numerics knob: round the sampler's raw logits to '' (exact) | bf16 | fp16 before sampling (a low-precision lm_head; workbench.policy.numerics); sampler=transformers only (live knob)."""
    trainer_logits_dtype: str = ""
    """Numerics knob: round the trainer's logits to '' (exact) | bf16 | fp16 in every log-prob forward (workbench.policy.numerics) (live knob)."""
    sampler_logit_noise: float = 0.0
    """Numerics knob: std of Gaussian noise added to the sampler's logits, fresh per decode step (0 = off); sampler=transformers only (live knob)."""
    trainer_logit_noise: float = 0.0
    """Numerics knob: std of Gaussian noise added to the trainer's logits, a fresh draw per forward and per micro-batch piece (the chunking noise of a non-batch-invariant engine; 0 = off) (live knob)."""
    max_new_tokens: int = 0
    """Generation budget; 0 = the task's own answer budget."""
    adaptive_temperature: float = 0.0
    """HAPO's entropy-adaptive sampling temperature, alpha: T_t = clip(T (1 + alpha (H_t / log V - 0.5)), min, max) per token; 0 = off; sampler=transformers only (workbench.steps.generate.sampler)."""
    adaptive_temperature_min: float = 0.1
    """Lowest per-token temperature when adaptive_temperature > 0."""
    adaptive_temperature_max: float = 2.0
    """Highest per-token temperature when adaptive_temperature > 0."""
    sampler: str = "transformers"
    """Generation engine: transformers (shares the trainer's model) | vllm (own weights, synced in place; needs the vllm extra)."""
    sampler_params: dict[str, Any] = field(default_factory=dict)
    """Engine options for sampler=vllm, e.g. ``{"dtype": "bfloat16", "gpu_memory_utilization": 0.3}`` (workbench.steps.generate.vllm_sampler.OPTIONS)."""
    measure_mismatch: bool = True
    """Store the trainer's log-probs of each batch that is consumed after an update (staleness, sync_every, reuse): one no-grad forward at generation over mismatch_sample groups, for the mismatch/ metrics (engine vs trainer, drift / engine split); batches consumed at once need none."""
    mismatch_sample: int = 4
    """Groups per generated batch whose trainer log-probs measure_mismatch stores (a seeded uniform draw; the mismatch/ split is exact on them, mismatch/sequences counts them); 0 = every group. 4 keeps staleness 256 within 1.05x of staleness 0 on the default batch (bench/step_throughput.py; the whole batch cost 1.24-1.28x)."""

    # --- score ---
    rewards: tuple[tuple, ...] = (("exact_match", 1.0),)
    """Weighted reward functions: ``(name, weight)`` or ``(name, weight, {params})`` entries."""
    advantage: str = "grpo"
    """Advantage estimator registry name (grpo, dr_grpo, rloo, lite_ppo, reinforce_pp, none)."""
    advantage_params: dict[str, Any] = field(default_factory=dict)
    """Options of the advantage estimator: lite_ppo ``{"std": "batch_rewards" | "batch_centred"}``
    (TRL's std of the raw rewards, or AReaL's std of the group-centred ones), reinforce_pp
    ``{"whiten": "sequences" | "tokens"}`` (one value per sequence, or verl's per token)."""
    filter_zero_variance: bool = False
    """Drop groups whose rewards are all equal before the update (DAPO dynamic sampling)."""

    # --- buffer (docs/design.md, "Staleness and the behaviour policy") ---
    staleness: int = 0
    """Fixed lag s: update k trains on the batch generated by theta_{k-s} (live knob)."""
    sync_every: int = 1
    """Sampler weights are refreshed every n updates; staleness cycles s..s+n-1 (live knob)."""
    max_staleness: int = -1
    """Samples staler than this are dropped before the update and counted; -1 = never drop."""
    staleness_mode: str = "fixed"
    """fixed (the lag of staleness / sync_every) | async (a simulated asynchronous system: slots decoding while the learner trains, heavy-tailed durations, interrupted rollouts; workbench.steps.async_pipeline)."""
    async_workers: int = 0
    """Async: W generation slots (sequences decoded concurrently); 0 = prompts_per_step * group_size."""
    async_decode_step_s: float = 0.02
    """Async: simulated seconds per engine decode step (every active slot advances one token)."""
    async_update_s: float = 1.0
    """Async: simulated seconds per learner update."""
    async_length_sigma: float = 0.0
    """Async: > 0 scales each rollout's time per token by a lognormal(0, sigma) factor (heavy-tailed durations); 0 = durations from the real lengths."""
    async_admission: str = "none"
    """Async: none | drop (discard groups staler than async_bound when the learner takes its batch) | wait (AReaL max_head_offpolicyness: a group starts only if its staleness at use stays <= async_bound; taken in start order) | pace (at most prompts_per_step groups start per update)."""
    async_bound: int = 4
    """Async: the staleness bound of async_admission drop / wait."""
    async_partial: bool = True
    """Async: true = in-flight rollouts continue with the new weights after each update (per-token versions, Rollouts.token_version); false = a rollout keeps its start version to the end."""
    prefill_batches: int = 1
    """Queued batches one generate call produces during a buffer sync (the theta_0 prefill of a long lag: s + 1 batches); 1 = one call per batch, as before; n > 1 draws the same prompts per batch, samples them in one wider call and scores each batch on its own rows (workbench.steps.prefill)."""
    prefill_to_steps: bool = False
    """Fixed lag: generate only the batches the run's ``steps`` updates train on. With a lag of s the queue holds s + 1 batches, so the last s batches a run generates are never used (all but ``steps`` of the theta_0 prefill when s >= steps); true skips them: the same batches reach the same updates (with several minibatches or epochs, the shuffles of the last s updates differ), and a lag longer than the run costs ``steps`` generations instead of s + steps. A run continued past ``steps`` refills from the current policy, so its next batches are fresher than the lag (logged)."""
    updates_per_batch: int = 1
    """Epochs over each generated batch (PPO reuse); later passes are more off-policy."""
    num_minibatches: int = 1
    """Minibatches per epoch; each minibatch is one optimizer update."""
    batch_source: str = "fifo"
    """What each update trains on, from the batch the queue delivers (workbench.steps.replay): fifo (that batch) | prioritized (TBA replay) | remix (ReMix off-policy mix) | d3s (D3S down-sampling)."""
    batch_source_params: dict[str, Any] = field(default_factory=dict)
    """Parameters of the batch source, e.g. ``{"capacity": 256, "fresh_fraction": 0.5}``; defaults from its registry entry; fixed for a run (not a live knob)."""

    # --- reweight ---
    objective: str = "ppo_clip"
    """Policy-loss registry name (live knob)."""
    objective_params: dict[str, Any] = field(default_factory=dict)
    """Objective parameters, e.g. ``{"clip_high": 0.28}`` (live knob); defaults from the registry."""
    aggregation: str = ""
    """Loss aggregation; empty = the objective's own default (token-mean for most)."""
    loss_scale_factor: float = 0.0
    """Fixed normaliser of seq-mean-token-sum-norm (Dr. GRPO); 0 = the batch's mask width, which
    changes with batch composition."""
    correction: str = ""
    """Behaviour correction on top of the objective: a preset (token_tis, seq_tis, token_mis, seq_mis,
    icepop, geo_rs, k3_rs, areal, areal_clamp), custom, or empty = none (reweight.corrections)."""
    correction_params: dict[str, Any] = field(default_factory=dict)
    """Overrides of the correction's fields, e.g. ``{"cap": 3.0}`` or
    ``{"reject": "seq_mean_k3", "reject_high": 0.02}``."""
    proximal: str = "none"
    """Proximal policy of decoupled PPO: none (two-policy bypass) | recompute (trainer forward at
    the start of each update) | loglinear (AReaL interpolation in log space, no forward) | linear (AReaL's
    interpolation in probability space) | reuse_train_logp (AReaL: the training forward's own log-probs,
    detached; one update per batch only)."""

    # --- update ---
    lr: float = 2e-4
    """AdamW learning rate (live knob). 2e-4 measured best for the built-in model; >= 1e-3 collapses."""
    lr_schedule: str = "constant"
    """constant | linear | cosine (decay to 0 over ``steps``), after ``warmup_steps``."""
    warmup_steps: int = 0
    """Linear warm-up updates."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clip; 0 = off. The pre-clip norm is logged."""
    micro_batch_size: int = 0
    """Sequences per forward/backward piece, gradients accumulated (exact for every objective: the loss
    is built once over the whole minibatch; update.update_step); 0 = the whole minibatch in one piece."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the frozen initial policy (0 = off; needs a reference forward)."""
    kl_estimator: str = "k3"
    """k1 | k2 | k3 | k3+ (Schulman's estimators of KL(pi_theta || pi_ref); k3 clamped to 10 per
    token as verl's low_var_kl; k3+ = k3's value with k2's gradient, verl's low_var_kl+)."""
    kl_is_corrected: bool = False
    """Weight each token's KL estimate by pi_theta / mu, the samples' importance ratio (TRL
    use_bias_correction_kl, DeepSeek-V3.2); the ratio carries the gradient, as in TRL."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0 = off)."""
    alp_scale: float = 0.0
    """ALP (steps.alp): bound on each layer's adversarial input perturbation, ||delta_l|| <= alp_scale x
    the RMS token norm of that layer's input; 0 = off. Needs micro_batch_size 0 (or >= the minibatch), no compile."""

    # --- run ---
    steps: int = 300
    """Optimizer updates to run (``run.run()`` with no argument)."""
    eval_every: int = 10
    """Held-out greedy accuracy every N updates (and at the start and the end)."""
    eval_size: int = 256
    """Held-out examples evaluated."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N updates; 0 = only at the end of ``run()``."""
    ope_every: int = 0
    """Off-policy evaluation every N updates (``workbench.ope.OPEMonitor``: its estimators on the update's stale batch beside a fresh-sample truth, in ``ope.parquet``); 0 = off."""
    tracking: str = ""
    """Comma-separated sinks written beside metrics.parquet (which stays the source of truth): tensorboard (``<run dir>/tensorboard/``), trackio (its local store; workbench.runs.tracking); empty = none; needs the tracking extra."""
    keep_checkpoints: int = 3
    """Newest N checkpoints kept (older ones deleted after each write); 0 = keep all; the final one of run() is always kept."""
    out_dir: str = "runs"
    """Parent folder of run directories; empty string = write nothing to disk."""
    run_name: str = ""
    """Run directory name; empty = generated from objective, staleness and seed."""

    def __post_init__(self) -> None:
        check_types(self)  # every field's type first: the checks below compare and look up values
        TASKS.entry(self.task)
        ADVANTAGES.entry(self.advantage)
        validate_advantage_params(self.advantage, self.advantage_params)
        OBJECTIVES.entry(self.objective)
        for entry in self.rewards:
            _check(isinstance(entry, (tuple, list)) and len(entry) in (2, 3), "rewards", entry,
                   "(name, weight) or (name, weight, {params})")
            REWARDS.entry(entry[0])
            _check(isinstance(entry[1], (int, float)), "rewards", entry, "a numeric weight")
            _check(len(entry) == 2 or isinstance(entry[2], dict), "rewards", entry, "a dict of reward params")
        object.__setattr__(self, "objective_params", validate_params(self.objective, self.objective_params))
        validate_sampler(self.sampler, self.sampler_params)
        object.__setattr__(self, "batch_source_params", check_source(self.batch_source, self.batch_source_params))
        validate_tracking(self.tracking)  # names and installed packages, before a Run touches its folder
        object.__setattr__(self, "lora", validate_lora(self.lora))  # keys, values and peft installed
        _check(self.dtype in DTYPES, "dtype", self.dtype, " | ".join(DTYPES))
        _check(isinstance(self.device, str) and (self.device in DEVICES or self.device.startswith("cuda:")),
               "device", self.device, " | ".join(DEVICES) + " | cuda:N")
        _check(isinstance(self.chat_template, str), "chat_template", self.chat_template,
               "'' | 'tokenizer' | a Jinja template | a template file")
        _check(self.autocast in AUTOCAST_MODES, "autocast", self.autocast, "'' (exact) | bf16 | fp16")
        _check(isinstance(self.measure_mismatch, bool), "measure_mismatch", self.measure_mismatch, "true or false")
        _check(isinstance(self.mismatch_sample, int) and not isinstance(self.mismatch_sample, bool)
               and self.mismatch_sample >= 0, "mismatch_sample", self.mismatch_sample,
               "an integer >= 0 (groups per batch whose trainer log-probs are measured; 0 = every group)")
        _check(self.aggregation in ("",) + AGGREGATIONS, "aggregation", self.aggregation, " | ".join(AGGREGATIONS))
        _check(isinstance(self.loss_scale_factor, (int, float)) and not isinstance(self.loss_scale_factor, bool)
               and 0 <= self.loss_scale_factor < float("inf"), "loss_scale_factor", self.loss_scale_factor,
               "a number > 0, or 0 for the batch's mask width")
        _check(self.proximal in PROXIMAL_MODES, "proximal", self.proximal, " | ".join(PROXIMAL_MODES))
        _check(isinstance(self.correction, str), "correction", self.correction, "a preset name, custom, or empty")
        _check(isinstance(self.correction_params, dict), "correction_params", self.correction_params, "a dict")
        self.correction_spec()  # validates the preset name and the field overrides (one-line errors)
        for name in ("prompts_per_step", "group_size", "updates_per_batch", "num_minibatches", "sync_every",
                     "prefill_batches", "steps", "eval_every", "eval_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, name, v, "an integer >= 1")
        for name in ("staleness", "warmup_steps", "checkpoint_every", "threads", "top_k", "max_new_tokens", "seed",
                     "micro_batch_size", "ope_every"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, name, v, "an integer >= 0")
        _check(isinstance(self.keep_checkpoints, int) and not isinstance(self.keep_checkpoints, bool)
               and self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints,
               "an integer >= 0 (0 keeps every checkpoint)")
        _check(_valid_run_name(self.run_name), "run_name", self.run_name,
               "'' (a generated name) or one folder name inside out_dir: no '/', '\\', NUL, '.' or '..'")
        _check(isinstance(self.max_staleness, int) and self.max_staleness >= -1, "max_staleness",
               self.max_staleness, "an integer >= 0, or -1 for no limit")
        check_async_config(self)  # the async fields, and what staleness_mode=async cannot combine with
        batch = self.prompts_per_step * self.group_size
        _check(batch % self.num_minibatches == 0, "num_minibatches", self.num_minibatches,
               f"a divisor of the batch size {batch} (prompts_per_step * group_size)")
        _check(batch // self.num_minibatches % self.group_size == 0, "num_minibatches", self.num_minibatches,
               f"a value that keeps whole groups of {self.group_size} in each minibatch")
        _check(self.temperature > 0, "temperature", self.temperature, "a float > 0")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "a float in (0, 1]")
        _check(0 <= self.adaptive_temperature < float("inf"), "adaptive_temperature", self.adaptive_temperature,
               "a finite float >= 0 (0 = off)")
        _check(0 < self.adaptive_temperature_min < float("inf"), "adaptive_temperature_min",
               self.adaptive_temperature_min, "a finite float > 0")
        _check(self.adaptive_temperature_min <= self.adaptive_temperature_max < float("inf"), "adaptive_temperature_max",
               self.adaptive_temperature_max, f"a finite float >= adaptive_temperature_min={self.adaptive_temperature_min}")
        _check(self.adaptive_temperature == 0 or self.sampler == "transformers", "adaptive_temperature",
               self.adaptive_temperature, "0 with sampler=vllm (it samples each request at one temperature)")
        _check(isinstance(self.prefill_to_steps, bool), "prefill_to_steps", self.prefill_to_steps, "true or false")
        _check(isinstance(self.replay_sampling_mask, bool), "replay_sampling_mask", self.replay_sampling_mask,
               "true or false")
        for name in ("sampler_logits_dtype", "trainer_logits_dtype"):
            _check(getattr(self, name) in LOGITS_DTYPES, name, getattr(self, name), "'' (exact) | bf16 | fp16")
        for name in ("sampler_logit_noise", "trainer_logit_noise"):
            _check(0 <= getattr(self, name) < float("inf"), name, getattr(self, name), "a finite float >= 0 (0 = off)")
        for name in ("replay_sampling_mask", "sampler_logits_dtype", "sampler_logit_noise"):  # engine-side knobs
            _check(not getattr(self, name) or self.sampler == "transformers", name, getattr(self, name),
                   "off with sampler=vllm (only the transformers sampler records kept sets and perturbs its logits)")
        _check(0 < self.lr < 1, "lr", self.lr, "a float in (0, 1)")
        _check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, " | ".join(LR_SCHEDULES))
        _check(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", self.kl_estimator, " | ".join(KL_ESTIMATORS))
        _check(isinstance(self.kl_is_corrected, bool), "kl_is_corrected", self.kl_is_corrected, "true or false")
        for name in ("weight_decay", "grad_clip"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "a float >= 0")
        for name in ("kl_coef", "entropy_coef"):  # inf would make every update non-finite (and skipped)
            _check(0 <= getattr(self, name) < float("inf"), name, getattr(self, name), "a finite float >= 0")
        for key in ("heldout_size", "heldout_fraction"):  # every run evaluates on the held-out set
            _check(self.task_params.get(key) != 0, f"task_params.{key}", self.task_params.get(key),
                   "a value > 0: the run evaluates held-out accuracy at the start, every eval_every updates and at the end")
        _check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
               self.adam_betas, "two floats in [0, 1)")
        _check(0 <= self.alp_scale < float("inf"), "alp_scale", self.alp_scale, "a finite float >= 0 (0 = off)")
        chunked = 0 < self.micro_batch_size < self.batch_size // self.num_minibatches  # micro-batched minibatches
        _check(not (self.alp_scale and (chunked or self.compile)), "alp_scale", self.alp_scale,
               "0 with micro_batch_size in (0, minibatch size) or compile=true (ALP needs one piece, eager)")
        if self.proximal == "reuse_train_logp":  # one update per batch and the plain policy's forward
            check_reuse_train_logp(self.updates_per_batch, self.num_minibatches, self.alp_scale,
                                   self.lora.get("dropout", 0.0))

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    def trainer_numerics(self):
        """The trainer's injected logit numerics (``policy.numerics.LogitNumerics``), None when exact."""
        return trainer_numerics(self)

    def correction_spec(self):
        """The ``reweight.corrections.Correction`` of ``correction`` + ``correction_params`` (None if unset)."""
        return make_correction(self.correction or None, self.correction_params)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rewards"] = [list(r) for r in self.rewards]
        d["adam_betas"] = list(self.adam_betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise bad_value("config", d, "a dict of RunConfig fields")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise WorkbenchError(f"unknown config field {unknown[0]!r}: valid fields are {', '.join(sorted(names))}")
        return cls(**d)  # lists of rewards / adam_betas become tuples in check_types

    def replace(self, **changes: Any) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})
