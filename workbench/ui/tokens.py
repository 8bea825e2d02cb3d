"""Per-token view of the latest batch: which tokens an objective silences.

For a few sequences of the batch the latest update trained on (``run.last_batch``), each response
token gets

- its importance ratio r = pi_theta / mu (current weights, i.e. just after that update, over the
  behaviour log-prob recorded at sampling time),
- its gradient weight w: dL/dlogp of the live objective divided by dL/dlogp of plain REINFORCE with
  the same aggregation, so w = 1 is the on-policy policy gradient, w = r plain importance sampling,
  w = 0 a token the objective silenced (clipped or masked); computed with autograd, so it is exact
  for every registered objective,
- its advantage sign.

``token_weights`` returns those tensors; ``token_html`` draws them: background colour = log r
(blue below 1, red above), struck-through = silenced (w = 0 while A != 0), tooltip = r, w, A.
Cost: one no-grad forward of ``n`` sequences (a few ms); the panel computes it only when the
charts refresh.
"""

from __future__ import annotations

import html
import math
from typing import Any

import torch

from workbench.policy.logprobs import frozen_logprobs
from workbench.steps.reweight.core import resolve_objective
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP
from workbench.steps.reweight.loss import logprob_gradient
from workbench.studies.replay import replay_context


def token_weights(run, batch, objective: str, objective_params: dict[str, Any], temperature: float = 1.0,
                  aggregation: str | None = None, n: int = 6) -> dict[str, Any]:
    """r, w and A for the first ``n`` sequences of ``batch`` under ``objective`` (see module doc).

    ``run`` supplies the weights and the loss context (``workbench.studies.replay.replay_context``).
    """
    model = run.model
    sub = batch.select(list(range(min(n, len(batch)))))
    lp = frozen_logprobs(model, sub, temperature)  # [n, T]
    mask = sub.response_mask  # [n, T]
    obj = resolve_objective(objective, objective_params)
    aggregation = aggregation or obj.default_aggregation
    adv = sub.advantages if sub.advantages is not None else torch.zeros(len(sub))

    def grad_of(o) -> torch.Tensor:
        return logprob_gradient(o, lp, sub.behavior_logprobs, adv, mask, aggregation=aggregation,
                                prox_logprobs=sub.prox_logprobs, context=replay_context(run, sub, o))  # [n, T]

    g = grad_of(obj)  # [n, T]
    g_ref = grad_of(resolve_objective("reinforce"))  # [n, T] = -A * (aggregation coefficient)
    valid = mask > 0
    weight = torch.where(valid & (g_ref != 0), g / torch.where(g_ref != 0, g_ref, torch.ones_like(g_ref)),
                         torch.zeros_like(g))  # [n, T]
    ratio = torch.where(valid, (lp - sub.behavior_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp(), torch.ones_like(lp))  # [n, T]
    adv_t = adv if adv.dim() == 2 else adv[:, None].expand_as(lp)  # [n, T]
    silenced = valid & (adv_t != 0) & (g == 0)  # [n, T]
    return {"ratio": ratio, "weight": weight, "advantage": adv_t, "mask": valid, "silenced": silenced,
            "response_ids": sub.response_ids, "prompts": list(sub.prompts),
            "objective": objective, "silenced_frac": float(silenced.sum()) / max(1, int((valid & (adv_t != 0)).sum()))}


def _colour(log_r: float) -> str:
    """White at r = 1; red for r > 1, blue for r < 1, saturating at |log r| = 1."""
    x = max(-1.0, min(1.0, log_r))
    a = abs(x)
    if x >= 0:
        return f"rgba(214, 39, 40, {0.08 + 0.7 * a:.2f})"
    return f"rgba(31, 119, 180, {0.08 + 0.7 * a:.2f})"


def token_html(view: dict[str, Any] | None, tokenizer, title: str = "") -> str:
    """HTML of ``token_weights``: one line per sequence, one coloured box per response token."""
    if view is None:
        return "<div style='color:#777'>per-token view: no update yet</div>"
    lines = [f"<div style='font-family:monospace;font-size:12px;line-height:1.9'>"
             f"<div><b>{html.escape(title or 'latest batch')}</b> &middot; objective <b>{html.escape(view['objective'])}</b>"
             f" &middot; colour = log ratio (blue r&lt;1, red r&gt;1) &middot; <s>struck</s> = silenced (zero gradient)"
             f" &middot; {100 * view['silenced_frac']:.1f}% of tokens with A&ne;0 silenced here</div>"]
    ratio, weight, adv, mask, sil = view["ratio"], view["weight"], view["advantage"], view["mask"], view["silenced"]
    for i in range(ratio.shape[0]):
        a = float(adv[i][mask[i]].mean()) if bool(mask[i].any()) else 0.0
        cells = [f"<span style='color:#888'>{html.escape(view['prompts'][i]) if view['prompts'] else ''}</span>"
                 f" <span style='color:{'#2a7' if a > 0 else '#c33' if a < 0 else '#888'}'>A={a:+.2f}</span> "]
        for t in range(ratio.shape[1]):
            if not bool(mask[i, t]):
                continue
            r, w = float(ratio[i, t]), float(weight[i, t])
            text = tokenizer.decode([int(view["response_ids"][i, t])]) or "\u2423"
            style = f"background:{_colour(math.log(max(r, 1e-30)))};padding:1px 2px;margin:0 1px;border-radius:2px"
            if bool(sil[i, t]):
                style += ";text-decoration:line-through;outline:1px solid #c33"
            tip = f"r={r:.3f} w={w:.3f} A={float(adv[i, t]):+.2f}"
            cells.append(f"<span class='wb-tok' title='{tip}' style='{style}'>{html.escape(text)}</span>")
        lines.append("<div>" + "".join(cells) + "</div>")
    lines.append("</div>")
    return "".join(lines)


__all__ = ["token_html", "token_weights"]
