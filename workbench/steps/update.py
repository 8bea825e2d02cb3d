"""update: one optimizer step on one minibatch (reweight happens inside, via ``policy_loss``).

What it does: recomputes the current policy's log-probs of the sampled tokens (at the sampling
temperature, so the ratio compares like with like), builds the policy loss with the chosen
objective (``workbench.steps.reweight``), optionally adds a KL penalty to a frozen reference policy
(``reweight.kl``: Schulman's k1/k2/k3 and verl's k3+, optionally IS-corrected) and an entropy bonus,
both reduced with the run's loss aggregation (as verl's ``agg_loss`` with ``loss_agg_mode``), clips
the gradient norm and takes an AdamW step. The learning-rate schedule is a plain function of the
update index so that it survives checkpoints without extra state.

``micro_batch_size`` > 0 splits the minibatch's forward/backward into pieces of at most that many
sequences with the gradient accumulated (``chunk_logprobs`` / ``backward_chunks``; docs/design.md,
"The loop"): the loss itself is always built once over the whole minibatch, so every objective,
aggregation, KL and entropy term, diagnostic and the gradient clip see exactly the unchunked batch.

``autocast`` ('' | bf16 | fp16) runs this update's forwards under ``torch.autocast`` and builds the
loss in fp32 outside it; ``compile`` calls the policy's cached ``torch.compile`` module for the
training forward/backward, its first update logging ``perf/compile_seconds``
(``workbench.policy.fast_path``, which says why bf16 is an engine-mismatch source). ``numerics`` rounds /
noises every trainer forward's logits, one draw per forward (``policy.numerics``; None = exact).

Leaves out: value heads/GAE (critic-free methods only), fp16 loss scaling.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

try:  # the process high-water mark on CPU (POSIX only)
    import resource
except ImportError:  # pragma: no cover  (Windows)
    resource = None

import torch

from workbench.errors import WorkbenchError
from workbench.policy.fast_path import autocast_context, training_model
from workbench.policy.logprobs import frozen_logprobs, token_logprobs
from workbench.policy.numerics import FORWARD_PROXIMAL, FORWARD_REFERENCE, FORWARD_TRAIN, LogitNumerics, forward_numerics
from workbench.policy.warm_start import sft_batch
from workbench.rollouts import Rollouts
from workbench.steps.alp import adversarial_deltas, delta_metrics, perturbed
from workbench.steps.reweight.core import Objective, resolve_objective
from workbench.steps.reweight.proximal import resolve_proximal
from workbench.steps.reweight.aggregate import aggregate
from workbench.steps.reweight.kl import kl_penalty, kl_term  # noqa: F401  (kl_penalty: re-exported)
from workbench.steps.reweight.loss import policy_loss
from workbench.steps.reweight.mismatch import metrics as mismatch_metrics
from workbench.tasks import Example, Task


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: the single-tensor path is bitwise reproducible across resume on CPU.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, foreach=False)


def lr_multiplier(update: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier on the base lr at ``update`` (0-based): linear warm-up, then the schedule."""
    if warmup and update < warmup:
        return (update + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def proximal_logprobs(model: torch.nn.Module, batch: Rollouts, temperature: float, autocast: str = "",
                      numerics: LogitNumerics | None = None, index: int = 0) -> torch.Tensor:
    """log pi_prox of the sampled tokens: the trainer's current weights and precision, no graph. [B, T]

    AReaL's decoupled PPO (arXiv:2505.24298) recomputes them once per batch, at the start of its
    first update, so with reuse (epochs x minibatches) the clip acts on the later minibatches while
    the behaviour weight pi_prox / mu corrects for staleness.
    """
    with autocast_context(autocast, model):
        return frozen_logprobs(model, batch, temperature, numerics=forward_numerics(
            numerics, FORWARD_PROXIMAL, batch.policy_version, index)).float()  # [B, T]


def expert_batch(batch: Rollouts, tokenizer, task: Task) -> Rollouts:
    """Expert demonstrations for ``batch`` (CHORD): one per prompt group, prompt + ``task.expert``
    answer + EOS in the sampler's layout (``warm_start.sft_batch``)."""
    first: dict[int, int] = {}
    for i, g in enumerate(batch.group_id.tolist()):
        first.setdefault(g, i)
    examples = [Example(batch.prompts[i], batch.answers[i], dict(batch.extras[i]) if batch.extras else {})
                for i in first.values()]
    return sft_batch(tokenizer, examples, task)


def loss_context(objective: Objective, batch: Rollouts, model: torch.nn.Module, *, temperature: float,
                 extra: dict[str, Any] | None = None, ref_model: torch.nn.Module | None = None,
                 ref_logprobs: torch.Tensor | None = None, expert: Rollouts | None = None,
                 with_ref: bool = False, numerics: LogitNumerics | None = None) -> dict[str, Any]:
    """The ``policy_loss`` context for ``batch`` (``reweight.context.CONTEXT_KEYS``), built one way
    for the loop, the replay study and the per-token view.

    Always ``group_id`` and ``rewards`` from the batch, then ``extra`` (the loop's ``step`` and
    ``state``). ``ref_logprobs``, when the objective needs them or ``with_ref`` (a KL penalty): given,
    or one no-grad forward of ``ref_model``; missing both raises. ``expert`` (``expert_batch``) is
    scored by ``model`` with gradients as ``expert_logprobs`` / ``expert_mask`` when the objective
    needs them (CHORD's SFT term).
    """
    ctx: dict[str, Any] = {"group_id": batch.group_id, "rewards": batch.rewards, **(extra or {})}
    if with_ref or "ref_logprobs" in objective.needs:
        if ref_logprobs is None:
            if ref_model is None:
                raise WorkbenchError(
                    f"objective={objective.name!r} needs a reference model: start the run with it or set "
                    f"kl_coef > 0 (a frozen copy of the initial policy is built then)")
            ref_logprobs = frozen_logprobs(ref_model, batch, temperature, numerics=forward_numerics(
                numerics, FORWARD_REFERENCE, batch.policy_version))  # [B, T]
        ctx["ref_logprobs"] = ref_logprobs
    if "expert_logprobs" in objective.needs:
        if expert is None:
            raise WorkbenchError(f"objective={objective.name!r} needs expert demonstrations: pass expert=expert_batch(...)")
        ctx["expert_logprobs"], _ = token_logprobs(model, expert, temperature=temperature)  # [Be, Te]
        ctx["expert_mask"] = expert.response_mask
    return ctx


def token_record(objective: Objective, batch: Rollouts, logprobs: torch.Tensor, loss: torch.Tensor,
                 prox: torch.Tensor | None, aggregation: str, loss_scale_factor: float | None) -> dict[str, Any]:
    """What the per-token view (``workbench.ui.tokens``) reads of one update, taken before its
    optimizer step: the batch, its log-probs under the weights the update used, and dL/dlogp of the
    policy loss at every token (autograd on the update's own graph, which is kept for its backward)."""
    grad = None
    if loss.requires_grad:
        (grad,) = torch.autograd.grad(loss, logprobs, retain_graph=True, allow_unused=True)
    return {"batch": batch, "objective": objective.name, "aggregation": aggregation,
            "loss_scale_factor": loss_scale_factor, "logprobs": logprobs.detach(),  # [B, T]
            "prox_logprobs": None if prox is None else prox.detach(),  # [B, T]
            "logprob_grad": torch.zeros_like(logprobs) if grad is None else grad.detach()}  # [B, T]


def row_chunks(n: int, size: int) -> list[list[int]]:
    """Row indices ``0..n-1`` in consecutive pieces of at most ``size`` rows (0 or >= n: one piece)."""
    if size <= 0 or size >= n:
        return [list(range(n))]
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def chunk_logprobs(model: torch.nn.Module, batch: Rollouts, chunks: list[list[int]], temperature: float,
                   numerics: LogitNumerics | None = None, version: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """Pass 1 of micro-batching: the log-probs and entropies of ``batch``, one no-graph forward per
    chunk, as leaf tensors that require grad, so the loss can be built once over the whole batch
    (every objective and aggregation stays exact: nothing about the loss is decomposed). Also the
    RNG state before each chunk, so pass 2 replays the same dropout masks. [B, T] x2
    """
    device = next(model.parameters()).device
    states, lps, ents = [], [], []
    with torch.no_grad():
        for i, rows in enumerate(chunks):
            states.append(_rng_state(device))
            lp, ent = token_logprobs(model, batch.select(rows), temperature=temperature, with_entropy=True,
                                     numerics=forward_numerics(numerics, FORWARD_TRAIN, version, i))
            lps.append(lp)  # [b, T]
            ents.append(ent)  # [b, T]
    return torch.cat(lps).requires_grad_(True), torch.cat(ents).requires_grad_(True), states  # [B, T] x2


def backward_chunks(model: torch.nn.Module, batch: Rollouts, chunks: list[list[int]], temperature: float,
                    logprobs: torch.Tensor, entropy: torch.Tensor, states: list[Any],
                    numerics: LogitNumerics | None = None, version: int = 0) -> None:
    """Pass 2 of micro-batching: after ``total.backward()`` filled ``logprobs.grad`` / ``entropy.grad``
    (dL/dlogp, dL/dH at every token), re-run each chunk's forward with a graph and backpropagate
    sum_t g_t * logp_t (+ sum_t h_t * H_t): by the chain rule its parameter gradient is exactly that
    chunk's share of dL/dtheta, accumulated into ``.grad``. Only one chunk's activations are alive."""
    device = next(model.parameters()).device
    g_lp, g_ent = logprobs.grad, entropy.grad  # [B, T] or None (a term the loss does not use)
    if g_lp is None and g_ent is None:
        return
    for i, (rows, state) in enumerate(zip(chunks, states)):
        _set_rng_state(device, state)
        sl = slice(rows[0], rows[-1] + 1)
        lp, ent = token_logprobs(model, batch.select(rows), temperature=temperature, with_entropy=g_ent is not None,
                                 numerics=forward_numerics(numerics, FORWARD_TRAIN, version, i))  # [b, T], [b, T] | None
        surrogate = lp.new_zeros(())
        if g_lp is not None:
            surrogate = surrogate + (lp * g_lp[sl]).sum()
        if g_ent is not None:
            surrogate = surrogate + (ent * g_ent[sl]).sum()
        if surrogate.requires_grad:
            surrogate.backward()


def peak_memory_mb(device: torch.device) -> float:
    """``perf/peak_mem_mb``: on CUDA the peak allocated by torch during this update (the counter is
    reset at its start); elsewhere the process's peak resident set size so far (``ru_maxrss``, a
    high-water mark over the whole process, not this update alone; NaN where unavailable)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resource is None:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _check_alp(alp_scale: Any, chunked: bool, compile: bool) -> bool:
    """Whether ALP is on; bad values and the unsupported combinations raise one-line errors."""
    if isinstance(alp_scale, bool) or not isinstance(alp_scale, (int, float)) or not 0 <= alp_scale < float("inf"):
        raise WorkbenchError(f"alp_scale={alp_scale!r} is invalid: expected a finite float >= 0 (0 = off)")
    if alp_scale and (chunked or compile):
        raise WorkbenchError(f"alp_scale={alp_scale!r} needs micro_batch_size=0 and compile=False "
                             f"(got micro-batching={chunked}, compile={compile})")
    return bool(alp_scale)


def _isolated(ctx: dict[str, Any]) -> dict[str, Any]:
    """``ctx`` with a copy of its objective state: ALP's extra loss must not advance R2VPO's dual twice."""
    return {**ctx, "state": dict(ctx["state"])} if isinstance(ctx.get("state"), dict) else ctx


def update_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Rollouts,
    *,
    objective: str | Objective,
    objective_params: dict[str, Any] | None = None,
    aggregation: str = "",
    temperature: float,
    grad_clip: float,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3", kl_is_corrected: bool = False,
    entropy_coef: float = 0.0,
    ref_model: torch.nn.Module | None = None,
    correction: Any = None,
    proximal: str = "none",
    policy_version: int | None = None,
    loss_scale_factor: float | None = None,
    context: dict[str, Any] | None = None,
    expert_batch: Rollouts | None = None,
    keep_tokens: dict[str, Any] | None = None,
    micro_batch_size: int = 0,
    autocast: str = "",
    compile: bool = False,
    alp_scale: float = 0.0,
    numerics: LogitNumerics | None = None,
) -> dict[str, float]:
    """One optimizer update on ``batch`` (needs ``advantages``). Returns its metrics.

    ``correction`` (a ``reweight.corrections.Correction``, preset name, dict or None) is passed to
    ``policy_loss``. ``proximal``: ``none`` uses ``batch.prox_logprobs`` if the batch carries them
    (else two-policy bypass); ``recompute`` runs a no-grad forward at the start of this update, so
    the proximal policy is the policy at the start of this update unless the batch already carries
    ``prox_logprobs`` (the loop attaches them once per batch, AReaL-style; with reuse, i.e.
    updates_per_batch or num_minibatches > 1, that is not the policy at the start of the batch) and
    the ratio pi_theta / pi_prox is 1 in value at this single optimizer step; ``loglinear``
    approximates it without a forward pass from the versions (needs ``policy_version``, the
    version at the start of this update); ``reuse_train_logp`` (AReaL) takes this update's own
    training forward, detached (``reweight.proximal.resolve_proximal``).
    ``loss_scale_factor`` is the fixed normaliser of seq-mean-token-sum-norm (None = mask width).
    The entropy bonus and the KL penalty (``kl_estimator``; ``kl_is_corrected`` weights each token
    by pi_theta / mu, ``reweight.kl``) are reduced like the policy loss: the same aggregation and
    ``loss_scale_factor``, over the response mask.

    ``objective`` is an ``Objective`` (``reweight.resolve_objective``; the loop resolves it once per
    knob change) or a registry name with ``objective_params``. ``aggregation`` empty = the
    objective's default. The loss context is ``loss_context``: ``context`` (e.g. ``{"step": k,
    "state": run.objective_state}``) plus the batch's ``group_id`` / ``rewards``, ``ref_logprobs``
    from ``ref_model`` when the objective or the KL penalty needs them (one forward, shared), and
    ``expert_batch`` (CHORD: prompts + expert answers + EOS) scored by ``model`` in the same graph.
    ``keep_tokens`` (a dict) is filled with ``token_record`` before the optimizer step.

    ``micro_batch_size`` > 0 (and < B): the policy forwards (and the no-grad proximal / reference
    forwards) run in pieces of at most that many sequences and the gradient is accumulated
    (``chunk_logprobs``, ``backward_chunks``): one extra no-graph forward per piece buys a loss built
    once over the whole minibatch, so the gradient, metrics and token record equal the unchunked
    ones up to float rounding for every objective. CHORD's expert batch stays one piece.

    ``autocast`` / ``compile``: the module docstring; every forward here runs under the autocast,
    the policy's own (with a graph, and micro-batching's no-graph pass) through the compiled module.

    ``alp_scale`` > 0: ALP (``workbench.steps.alp``): the loss context is built first, one delta = 0
    forward/backward gives each layer's adversarial delta and the training forward runs perturbed
    (the proximal / reference / expert forwards do not); needs one piece and no compile. 0 = off.
    """
    obj = objective if isinstance(objective, Objective) else resolve_objective(objective, objective_params)
    if isinstance(objective, Objective) and objective_params:
        raise WorkbenchError(f"update_step: objective {obj.name!r} is resolved with its parameters; "
                             f"got objective_params {sorted(objective_params)}")
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 0:
        raise WorkbenchError(f"micro_batch_size={micro_batch_size!r} is invalid: expected an integer >= 0 "
                             "(0 = the whole minibatch in one piece)")
    alp_on = _check_alp(alp_scale, len(row_chunks(len(batch), micro_batch_size)) > 1, compile)
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    policy, first_compile = training_model(model, compile)  # the module the training forward calls
    mask = batch.response_mask  # [B, T]
    prox = batch.prox_logprobs  # [B, T] or None
    extra: dict[str, float] = {}
    chunks = row_chunks(len(batch), micro_batch_size)
    chunked = len(chunks) > 1
    version = int(batch.policy_version.max()) if policy_version is None and len(batch) else int(policy_version or 0)
    with autocast_context(autocast, model):  # forwards only: the loss below is built in fp32, outside it
        if proximal == "recompute" and prox is None:  # the loop attaches them once per batch
            prox = torch.cat([proximal_logprobs(model, batch.select(rows), temperature, numerics=numerics, index=i)
                              for i, rows in enumerate(chunks)]) if chunked else proximal_logprobs(
                model, batch, temperature, numerics=numerics)  # [B, T] (autocast: already on)
        ref_lp = None  # [B, T]: the reference forward, in pieces when chunked (else loss_context runs it)
        if chunked and ref_model is not None and (bool(kl_coef) or "ref_logprobs" in obj.needs):
            ref_lp = torch.cat([frozen_logprobs(ref_model, batch.select(rows), temperature, numerics=forward_numerics(
                numerics, FORWARD_REFERENCE, batch.policy_version, i)) for i, rows in enumerate(chunks)])
        ctx, deltas = None, None
        if alp_on:  # the adversarial pass needs the loss context, so it is built before the forward
            ctx = loss_context(obj, batch, model, temperature=temperature, extra=context, ref_model=ref_model,
                               expert=expert_batch, with_ref=bool(kl_coef) and ref_model is not None, numerics=numerics)
            deltas, _ = adversarial_deltas(model, batch, temperature, alp_scale, lambda lp: policy_loss(
                obj, lp, batch.behavior_logprobs, batch.advantages, mask, aggregation=obj.aggregation(aggregation),
                loss_scale_factor=loss_scale_factor, prox_logprobs=prox, correction=correction,
                context=_isolated(ctx))[0])
            extra.update(delta_metrics(deltas))
        if chunked:
            logprobs, entropy, rng_states = chunk_logprobs(policy, batch, chunks, temperature, numerics, version)  # leaves
        else:
            with perturbed(model, deltas):  # no hooks when ALP is off
                logprobs, entropy = token_logprobs(policy, batch, temperature=temperature, with_entropy=True, numerics=
                                                   forward_numerics(numerics, FORWARD_TRAIN, version))  # [B, T] x2
        prox, prox_metrics = resolve_proximal(proximal, logprobs, prox, batch.behavior_logprobs,  # versions per token when async
                                              batch.policy_version if batch.token_version is None else batch.token_version,
                                              policy_version, mask)  # [B, T] or None (reweight/proximal.py)
        extra.update(prox_metrics)
        if ctx is None:
            ctx = loss_context(obj, batch, model, temperature=temperature, extra=context, ref_model=ref_model,
                               ref_logprobs=ref_lp, expert=expert_batch, with_ref=bool(kl_coef) and ref_model is not None,
                               numerics=numerics)
    logprobs, entropy = logprobs.float(), entropy.float()  # [B, T] x2: the objective sees fp32
    ref_lp = ctx.get("ref_logprobs")  # [B, T] or None
    t1 = time.perf_counter()
    loss, metrics = policy_loss(
        obj, logprobs, batch.behavior_logprobs, batch.advantages, mask,
        aggregation=obj.aggregation(aggregation), loss_scale_factor=loss_scale_factor, prox_logprobs=prox,
        correction=correction, context=ctx,
    )
    if keep_tokens is not None:  # the per-token view's data: this update's own forward, before its step
        keep_tokens.update(token_record(obj, batch, logprobs, loss, prox, obj.aggregation(aggregation), loss_scale_factor))
    metrics.update(extra)
    metrics.update(mismatch_metrics(logprobs, batch, policy_version))  # drift / engine split (mismatch.py)
    total = loss
    agg = obj.aggregation(aggregation)
    ent = aggregate(entropy, mask, agg, loss_scale_factor)
    if entropy_coef:
        total = total - entropy_coef * ent
    if kl_coef and ref_model is not None:
        kl = kl_term(logprobs, ref_lp, mask, kl_estimator, agg, loss_scale_factor,
                     behavior_logprobs=batch.behavior_logprobs if kl_is_corrected else None)
        total = total + kl_coef * kl
        metrics["loss/kl_ref"] = float(kl.detach())
    t2 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    total.backward()  # chunked: into the leaves (and the expert graph), then one chunk at a time
    if chunked:
        with autocast_context(autocast, model):
            backward_chunks(policy, batch, chunks, temperature, logprobs, entropy, rng_states, numerics, version)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)  # never apply a non-finite step
        metrics["loss/skipped_nonfinite"] = 1.0
    else:
        optimizer.step()
        metrics["loss/skipped_nonfinite"] = 0.0
    t3 = time.perf_counter()
    metrics.update({
        "loss/total": float(total.detach()),
        "loss/entropy": float(ent.detach()),
        "loss/grad_norm": float(grad_norm),
        "perf/time_forward": t1 - t0,
        "perf/time_loss": t2 - t1,
        "perf/time_backward": t3 - t2,
        "perf/train_tokens": float(mask.sum()),
        "perf/peak_mem_mb": peak_memory_mb(device),
    })
    if first_compile:  # this update's forward + backward compiled the module (and ran it once)
        metrics["perf/compile_seconds"] = t3 - t0
    return metrics
