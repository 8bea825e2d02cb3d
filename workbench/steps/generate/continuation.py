"""continuation: extend rows of prompt + partial response by up to k tokens with the current weights.

In context: docs/design.md, "Staleness and the behaviour policy" (the asynchronous pipeline,
``workbench.steps.async_pipeline``). An interrupted rollout continues after a weight update from its
prompt and the tokens it already has, with the new weights: the prefix is prefilled again (AReaL
recomputes the KV cache of in-flight requests after each update: Fu et al. 2025, "AReaL: A
Large-Scale Asynchronous Reinforcement Learning System for Language Reasoning", arXiv:2505.24298),
then decoded one token per step through a KV cache, each row stopping at a stop id or at its own
budget. Token sampling is the sampler's: ``process_logits`` (temperature, top-k, top-p) and the
entropy-adaptive temperature when asked, so a behaviour log-prob is the log-prob under the
distribution actually sampled from, as ``TransformersSampler`` records it.
"""

from __future__ import annotations

import torch

from workbench.steps.generate.sampler import SamplingParams, adaptive_temperatures, process_logits
from workbench.steps.generate.transformers_sampler import CACHE_ARG


def continue_rows(model, rows: list[list[int]], budgets: list[int], params: SamplingParams, *,
                  generator: torch.Generator, stop_ids: torch.Tensor, pad_id: int
                  ) -> list[tuple[list[int], list[float], bool]]:
    """Extend each of ``rows`` (prompt ids followed by the response so far) by up to ``budgets[i]``
    sampled tokens. Returns per row (new token ids, their behaviour log-probs, stopped at a stop id).
    Rows with a budget of 0 return ``([], [], False)`` and cost nothing. CPU generator, CPU results."""
    # imported here: transformers is ~2 s of importing workbench.config
    from transformers import DynamicCache

    out: list[tuple[list[int], list[float], bool]] = [([], [], False) for _ in rows]
    live = [i for i, b in enumerate(budgets) if b > 0]
    if not live:
        return out
    device = next(model.parameters()).device
    width = max(len(rows[i]) for i in live)
    ids = torch.full((len(live), width), pad_id, dtype=torch.long)  # [b, S] left-padded
    mask = torch.zeros((len(live), width), dtype=torch.long)  # [b, S]
    for j, i in enumerate(live):
        ids[j, width - len(rows[i]):] = torch.tensor(rows[i], dtype=torch.long)
        mask[j, width - len(rows[i]):] = 1
    ids, mask = ids.to(device), mask.to(device)
    budget = torch.tensor([budgets[i] for i in live], device=device)  # [b]
    index = torch.arange(len(live), device=device)  # [b] position of each active row in ``live``
    tokens = torch.zeros((len(live), int(budget.max())), dtype=torch.long)  # [b, K]
    logps = torch.zeros((len(live), int(budget.max())), dtype=torch.float32)  # [b, K]
    count = torch.zeros(len(live), dtype=torch.long)  # [b] tokens made per row
    stopped = torch.zeros(len(live), dtype=torch.bool)  # [b]
    stops = stop_ids.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, S]
            res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{CACHE_ARG: DynamicCache(config=model.config)})
            cache, logits = getattr(res, CACHE_ARG), res.logits[:, -1, :]  # [b, V]
            attn, next_pos = mask, mask.sum(-1, keepdim=True)  # [b, S], [b, 1]
            for step in range(int(budget.max())):
                if params.temperature == 0:
                    tok = logits.argmax(-1)  # [b]
                    lp = torch.zeros(tok.shape, dtype=torch.float32, device=device)  # [b]
                else:
                    temps = adaptive_temperatures(logits, params) if params.adaptive_temperature > 0 else None
                    logprobs = torch.log_softmax(process_logits(logits, params, temps), dim=-1)  # [b, V]
                    tok = torch.multinomial(logprobs.exp().cpu(), 1, generator=generator).squeeze(-1).to(device)  # [b]
                    lp = logprobs.gather(-1, tok[:, None]).squeeze(-1)  # [b]
                where = index.cpu()
                tokens[where, step] = tok.cpu()
                logps[where, step] = lp.float().cpu()
                count[where] += 1
                hit = torch.isin(tok, stops)  # [b]
                stopped[where] = hit.cpu()
                keep = ~hit & (budget > step + 1)  # [b] rows that go on
                if not bool(keep.any()):
                    break
                if not bool(keep.all()):
                    idx = keep.nonzero(as_tuple=True)[0]  # [b']
                    index, tok, attn, next_pos, budget = index[idx], tok[idx], attn[idx], next_pos[idx], budget[idx]
                    cache.reorder_cache(idx)
                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)  # [b, S + t + 1]
                res = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True,
                            **{CACHE_ARG: cache})
                logits, next_pos = res.logits[:, -1, :], next_pos + 1  # [b, V], [b, 1]
    finally:
        model.train(was_training)
    for j, i in enumerate(live):
        n = int(count[j])
        out[i] = (tokens[j, :n].tolist(), logps[j, :n].tolist(), bool(stopped[j]))
    return out


__all__ = ["continue_rows"]
