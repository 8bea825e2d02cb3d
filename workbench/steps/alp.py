"""ALP: adaptive layerwise perturbation of the update's training forward (``RunConfig.alp_scale``).

The idea (the "Adaptive Layerwise Perturbation" (ALP) paper, one of the project's seed papers):
during the policy update a small perturbation delta_l is added to the input hidden states of every
transformer layer l, and the PERTURBED policy's log-probs are the numerator of the importance ratio
against the unchanged inference (behaviour) policy mu. Training the policy to do well anywhere in a
neighbourhood of its own hidden states makes it robust to the small distortions that staleness and
training-inference mismatch amount to, which shrinks the heavy tails of pi_theta / mu.

Choices made here, where the paper leaves room or its details are not recalled exactly:

- Shape: one vector delta_l of shape [hidden] per decoder layer, broadcast over batch and positions
  (added by a forward pre-hook to the layer's first input, ``hidden_states`` [B, T, H]).
- Learning rule: ADVERSARIAL, one normalised ascent step from delta = 0 (a min-max robustness
  reading, as FGSM / PGD with one step: Goodfellow et al. 2015, arXiv:1412.6572; Madry et al. 2018,
  arXiv:1706.06083; in hidden / embedding space as Miyato et al. 2017, arXiv:1605.07725). Whether
  the paper ascends or descends on delta is this implementation's choice, not a statement about it.
  One extra forward + backward at delta = 0 (gradients taken for the deltas only, none accumulate
  into the policy's ``.grad``) gives g_l = dL/ddelta_l of the objective's policy loss; then
  delta_l = bound_l * g_l / ||g_l||_2 (0 where g_l = 0), fixed (detached) for the training forward.
- Bound: ``scale`` is relative to the size of the layer's own input: ||delta_l||_2 <= bound_l =
  scale * sqrt(mean_{b,t} ||h_{l,b,t}||_2^2), the root-mean-square token-vector norm of layer l's
  input over every position of the minibatch (prompt, response and padding), measured in the
  delta = 0 pass. The one-step rule reaches the bound exactly (unless g_l = 0).
- Lifetime: re-initialised (to 0) at every update, so nothing persists and nothing is checkpointed.
  The deltas never enter the model's ``state_dict`` or the policy optimizer.
- Scope: the hooks exist only around the update's training forward (the delta = 0 pass and the
  perturbed forward); sampling, the no-grad proximal / reference forwards, CHORD's expert forward
  and evaluation see the plain model. ``perturbed`` removes them on exit, also on error.
- The adversarial loss is the objective's policy loss only (no KL / entropy terms), on the update's
  proximal log-probs when it has them (with ``proximal='loglinear'`` or ``'linear'``, computed from the perturbed
  forward, it has none yet: that pass uses the two-policy form), with a copy of the run's objective
  state so a stateful objective advances once per update.

Metric: ``alp/delta_norm_mean`` (mean over layers of ||delta_l||_2). The perturbed forward's
log-ratio statistics are the update's usual off-policy diagnostics (its log-probs are the ratio's
numerator).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from workbench.errors import WorkbenchError
from workbench.policy.logprobs import token_logprobs
from workbench.rollouts import Rollouts

DELTA_NORM_METRIC = "alp/delta_norm_mean"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of ``model``: ``model.model.layers`` of a transformers Llama, or the one
    ``layers`` ModuleList found among its submodules (a LoRA-wrapped model nests it deeper)."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner.layers
    found = [m for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] == "layers"]
    if len(found) != 1:
        raise WorkbenchError(f"alp_scale > 0 needs a model with one 'layers' ModuleList of decoder layers; "
                             f"{type(model).__name__} has {len(found)}")
    return found[0]


def _add_to_hidden(delta: torch.Tensor, hidden_rms: list[torch.Tensor] | None) -> Callable[..., Any]:
    """A forward pre-hook adding ``delta`` [H] to a layer's ``hidden_states`` [B, T, H]; optionally
    records the detached root-mean-square token norm of the unperturbed input (for the bound)."""
    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        positional = len(args) > 0
        h = args[0] if positional else kwargs["hidden_states"]  # [B, T, H]
        if hidden_rms is not None:
            wide = h.detach().to(torch.promote_types(h.dtype, torch.float32))  # [B, T, H] fp32 at least
            hidden_rms.append(wide.pow(2).sum(-1).mean().sqrt())  # [] sqrt(mean_t ||h_t||^2)
        h = h + delta.to(h.dtype)  # [B, T, H]
        if positional:
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}
    return hook


@contextmanager
def perturbed(model: torch.nn.Module, deltas: list[torch.Tensor] | None,
              hidden_rms: list[list[torch.Tensor]] | None = None) -> Iterator[None]:
    """Within the block, every decoder layer l of ``model`` adds ``deltas[l]`` [H] to its input
    hidden states; ``deltas`` None = no hooks (the plain model). ``hidden_rms`` (one list per layer)
    collects each layer's input RMS token norm per forward. The hooks are removed on exit."""
    if deltas is None:
        yield
        return
    layers = decoder_layers(model)
    if len(deltas) != len(layers):
        raise WorkbenchError(f"perturbed: got {len(deltas)} deltas for {len(layers)} decoder layers")
    handles = [layer.register_forward_pre_hook(_add_to_hidden(d, None if hidden_rms is None else hidden_rms[i]),
                                               with_kwargs=True)
               for i, (layer, d) in enumerate(zip(layers, deltas))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def zero_deltas(model: torch.nn.Module) -> list[torch.Tensor]:
    """One zero vector [H] per decoder layer, a leaf that requires grad, in the model's dtype/device."""
    param = next(model.parameters())
    hidden = model.config.hidden_size
    return [torch.zeros(hidden, dtype=param.dtype, device=param.device, requires_grad=True)
            for _ in decoder_layers(model)]


def adversarial_deltas(model: torch.nn.Module, batch: Rollouts, temperature: float, scale: float,
                       loss_of_logprobs: Callable[[torch.Tensor], torch.Tensor]
                       ) -> tuple[list[torch.Tensor], list[float]]:
    """The per-layer perturbations of one update and their bounds (module docstring): one forward at
    delta = 0 with a graph, ``loss_of_logprobs`` (the objective's policy loss of the [B, T] log-probs),
    gradients for the deltas only, then delta_l = bound_l * g_l / ||g_l||. Returns detached deltas [H]
    and the bounds bound_l = scale * RMS token norm of layer l's input."""
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < float("inf")):
        raise WorkbenchError(f"alp_scale={scale!r} is invalid: expected a finite float > 0 here (0 = off)")
    zeros = zero_deltas(model)
    rms: list[list[torch.Tensor]] = [[] for _ in zeros]
    with perturbed(model, zeros, rms):
        logprobs, _ = token_logprobs(model, batch, temperature=temperature)  # [B, T]
    loss = loss_of_logprobs(logprobs.float())
    grads = torch.autograd.grad(loss, zeros, allow_unused=True) if loss.requires_grad else [None] * len(zeros)
    deltas, bounds = [], []
    for z, g, r in zip(zeros, grads, rms):
        bound = scale * float(r[0]) if r else 0.0
        g = torch.zeros_like(z) if g is None else g.detach()  # [H]
        norm = float(torch.linalg.vector_norm(g))
        ok = norm > 0 and torch.isfinite(g).all()
        deltas.append((g * (bound / norm)) if ok else torch.zeros_like(z))  # [H] ascent direction, on the bound
        bounds.append(bound)
    return deltas, bounds


def delta_metrics(deltas: list[torch.Tensor]) -> dict[str, float]:
    """``alp/delta_norm_mean``: the mean over layers of ||delta_l||_2."""
    norms = [float(torch.linalg.vector_norm(d)) for d in deltas]
    return {DELTA_NORM_METRIC: sum(norms) / len(norms) if norms else 0.0}
