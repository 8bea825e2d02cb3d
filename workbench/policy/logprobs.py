"""Per-token log-probs (and entropy) of a batch's responses under a model, with gradients.

One forward pass over ``[prompt_ids | response_ids]`` with attention mask
``[prompt_mask | response_mask]`` and position ids from the cumulative mask (left padding never
shifts positions, exactly as in ``TransformersSampler``). Only the logits that predict response
tokens are computed (``logits_to_keep``), divided by the temperature and log-softmaxed in fp32.

With temperature 1, top_p 1 and top_k 0 (or the same temperature as the sampler) these equal the
sampler's ``behavior_logprobs`` up to float rounding. With top-k / top-p the sampler drew from a
truncated, renormalised distribution, so its log-probs are >= these full-distribution ones: that
gap is a real off-policy mismatch, not a bug (see ``workbench.steps.generate``).

Each call is one forward over the batch it is given; ``update_step`` splits a minibatch into pieces
of ``micro_batch_size`` sequences before calling it (``workbench.steps.update``).

Sampling-mask replay: when the batch carries ``sampling_kept`` (the sampler's kept top-k / top-p set
of each position, recorded when ``replay_sampling_mask`` is on) the log-softmax is taken over that set
only, log p(y) - log p(K), which is exactly the sampler's truncated, renormalised distribution: on
the same weights the two agree to float precision (``workbench.policy.numerics``; ``replay=False``
scores the full distribution regardless). The entropy is then that of the renormalised distribution.
``numerics`` (a ``LogitNumerics``) rounds / perturbs the raw logits of this forward first: the
trainer-side numerics knobs.
"""

from __future__ import annotations

import torch

from workbench.errors import bad_value
from workbench.policy.numerics import LogitNumerics, kept_mask
from workbench.rollouts import Rollouts


def token_logprobs(
    model, rollouts: Rollouts, temperature: float = 1.0, with_entropy: bool = False, *,
    numerics: LogitNumerics | None = None, replay: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every response token (and optionally the entropy of its distribution).

    Returns ``(logprobs [B, T], entropy [B, T] or None)``, fp32, zeros at padding. Gradients flow
    to the model unless called under ``torch.no_grad``. ``numerics`` perturb the logits (None =
    exact); ``replay`` renormalises over ``rollouts.sampling_kept`` when the batch has it.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise bad_value("temperature", temperature, "a number > 0 (the sampler's temperature)")
    device = next(model.parameters()).device
    prompt_ids = rollouts.prompt_ids.to(device)  # [B, P]
    response_ids = rollouts.response_ids.to(device)  # [B, T]
    resp_mask = rollouts.response_mask.to(device)  # [B, T]
    T = response_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, P+T]
    attn = torch.cat([rollouts.prompt_mask.to(device).long(), resp_mask.long()], dim=1)  # [B, P+T]
    positions = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, P+T]
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1, :]  # [B, T, V]; position P-1+t predicts token t
    if numerics is not None:
        logits = numerics.apply(logits)  # [B, T, V] fp32, rounded / noised
    logits = logits.float() / temperature  # [B, T, V]
    keep = _replay_mask(rollouts, T, logits.shape[-1], device) if replay else None  # [B, T, V] bool or None
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))  # the sampler's truncated support
    logp_all = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    logp = logp_all.gather(-1, response_ids[..., None]).squeeze(-1)  # [B, T]
    valid = resp_mask > 0  # [B, T]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = None
    if with_entropy:
        # removed tokens: p = 0 and log p = -inf; 0 * 0 keeps both the value and its gradient finite
        safe = logp_all if keep is None else logp_all.masked_fill(~keep, 0.0)  # [B, T, V]
        ent = -(logp_all.exp() * safe).sum(-1)  # [B, T]
        entropy = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, entropy


def _replay_mask(rollouts: Rollouts, T: int, vocab: int, device) -> torch.Tensor | None:
    """The kept-set mask [B, T, V] of ``rollouts.sampling_kept`` cut or padded to the T response
    columns (a batch whose padding columns were trimmed), or None when the batch has none."""
    kept = rollouts.sampling_kept
    if kept is None:
        return None
    kept = kept.to(device)[:, :T]  # [B, T', K]
    if kept.shape[1] < T:  # columns the sampler never reached: no recorded set, full support
        pad = kept.new_full((kept.shape[0], T - kept.shape[1], kept.shape[2]), -1)
        kept = torch.cat([kept, pad], dim=1)  # [B, T, K]
    return kept_mask(kept, vocab)  # [B, T, V]


@torch.no_grad()
def frozen_logprobs(model, rollouts: Rollouts, temperature: float = 1.0, *,
                    numerics: LogitNumerics | None = None) -> torch.Tensor:
    """``token_logprobs`` with no graph and the model in eval mode (its mode restored after): the
    log-probs of a policy that is read, not trained (a proximal policy, the generating policy, a
    frozen reference). [B, T]"""
    was_training = model.training
    model.eval()
    try:
        return token_logprobs(model, rollouts, temperature=temperature, numerics=numerics)[0]
    finally:
        model.train(was_training)


__all__ = ["frozen_logprobs", "token_logprobs"]
