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
of ``micro_batch_size`` sequences before calling it (``workbench.steps.update``). Left out:
top-k/top-p-aware recomputation.
"""

from __future__ import annotations

import torch

from workbench.errors import bad_value
from workbench.rollouts import Rollouts


def token_logprobs(
    model, rollouts: Rollouts, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every response token (and optionally the entropy of its distribution).

    Returns ``(logprobs [B, T], entropy [B, T] or None)``, fp32, zeros at padding. Gradients flow
    to the model unless called under ``torch.no_grad``.
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
    logits = out.logits[:, :-1, :].float() / temperature  # [B, T, V]; position P-1+t predicts token t
    logp_all = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    logp = logp_all.gather(-1, response_ids[..., None]).squeeze(-1)  # [B, T]
    valid = resp_mask > 0  # [B, T]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = None
    if with_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]
        entropy = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, entropy


@torch.no_grad()
def frozen_logprobs(model, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """``token_logprobs`` with no graph and the model in eval mode (its mode restored after): the
    log-probs of a policy that is read, not trained (a proximal policy, the generating policy, a
    frozen reference). [B, T]"""
    was_training = model.training
    model.eval()
    try:
        return token_logprobs(model, rollouts, temperature=temperature)[0]
    finally:
        model.train(was_training)


__all__ = ["frozen_logprobs", "token_logprobs"]
