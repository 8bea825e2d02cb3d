"""Per-token view of the latest update: which tokens its objective silenced, and why.

For a few sequences of the minibatch the latest update trained on, each response token gets

- its importance ratio r = pi_theta / pi_anchor, where pi_theta is the policy *the update used*
  (its own forward pass, before its optimizer step) and pi_anchor the ratio's anchor: the
  proximal policy when the batch carries one (AReaL's decoupled PPO), else the behaviour policy mu
  recorded at sampling time. On-policy at staleness 0 that is r = 1 up to float rounding;
- its gradient weight w: dL/dlogp of the update's policy loss divided by dL/dlogp of plain
  REINFORCE with the same aggregation, so w = 1 is the on-policy policy gradient, w = r plain
  importance sampling, w = 0 a token the objective silenced (clipped or masked);
- its advantage.

``update_view(run)`` reads those from ``run.last_update_tokens``, which ``update_step`` fills
before ``optimizer.step()`` (``steps.update.token_record``: the update's log-probs and, by autograd
on its own graph, dL/dlogp of its policy loss), so the view shows what the gradient actually was;
it needs no forward pass. ``token_weights(run, batch, objective, ...)`` is the what-if: any
objective's weights on the first rows of any batch under the run's *current* weights (one no-grad
forward).

Rows of ``update_view`` (``choose_rows``): contrast rather than the first n samples. The group
whose completions carry both signs of advantage (and the most silenced tokens) first, one row of
each sign, then rows with silenced tokens, then the rest; never the same completion of the same
prompt twice.

``token_html`` draws a view: background colour = log r (blue below 1, red above), struck through =
silenced (w = 0 while A != 0), and under every token its r and w as numbers (no hover needed;
w is a dash where A = 0, since such a token has no gradient to weigh).
"""

from __future__ import annotations

import html
import math
from typing import Any

import torch

from workbench.policy.logprobs import frozen_logprobs
from workbench.rollouts import Rollouts
from workbench.steps.reweight.core import resolve_objective
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP
from workbench.steps.reweight.loss import logprob_gradient
from workbench.studies.replay import replay_context


def choose_rows(group_id: torch.Tensor, seq_adv: torch.Tensor, silenced_count: torch.Tensor,
                keys: list[tuple], n: int) -> list[int]:
    """Up to ``n`` row indices of a batch, chosen for contrast (module doc), in display order.

    ``group_id`` [B], ``seq_adv`` [B] (mean advantage of each sequence), ``silenced_count`` [B],
    ``keys`` one hashable per row (equal keys = the same completion of the same prompt).
    """
    first: dict[tuple, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    unique = sorted(first.values())
    groups: dict[int, list[int]] = {}
    for i in unique:
        groups.setdefault(int(group_id[i]), []).append(i)

    def group_score(rows: list[int]) -> tuple:
        signs = {int(torch.sign(seq_adv[i])) for i in rows}
        return (1 in signs and -1 in signs, int(sum(int(silenced_count[i]) for i in rows)), len(rows))

    best = max(groups, key=lambda g: group_score(groups[g])) if groups else None

    def order(i: int) -> tuple:  # the best group, then rows with silenced tokens, then A != 0
        return (int(group_id[i]) != best, -int(silenced_count[i]), float(seq_adv[i]) == 0.0, i)

    ranked = sorted(unique, key=order)
    chosen: list[int] = []
    for sign in (1, -1):  # one row of each sign of advantage when the batch has both
        row = next((i for i in ranked if int(torch.sign(seq_adv[i])) == sign), None)
        if row is not None and len(chosen) < n:
            chosen.append(row)
    chosen += [i for i in ranked if i not in chosen][: max(0, n - len(chosen))]
    return sorted(chosen, key=order)


def build_view(batch: Rollouts, logprobs: torch.Tensor, logprob_grad: torch.Tensor, *, objective: str,
               aggregation: str, loss_scale_factor: float | None = None,
               prox_logprobs: torch.Tensor | None = None, n: int = 6, rows: list[int] | None = None,
               source: str = "") -> dict[str, Any]:
    """r, w, A and silenced for ``n`` rows of ``batch`` (``choose_rows``; or the given ``rows``), from
    the policy's ``logprobs`` [B, T] and dL/dlogp of its policy loss ``logprob_grad`` [B, T]."""
    batch = batch.to("cpu")
    lp, g = logprobs.detach().cpu(), logprob_grad.detach().cpu()  # [B, T]
    prox = None if prox_logprobs is None else prox_logprobs.detach().cpu()  # [B, T]
    mask = batch.response_mask  # [B, T]
    valid = mask > 0  # [B, T]
    adv = batch.advantages if batch.advantages is not None else torch.zeros(len(batch))  # [B] or [B, T]
    g_ref = logprob_gradient(resolve_objective("reinforce"), lp, batch.behavior_logprobs, adv, mask,
                             aggregation=aggregation, loss_scale_factor=loss_scale_factor)  # [B, T] = -A * coefficient
    nonzero = valid & (g_ref != 0)  # [B, T]
    weight = torch.where(nonzero, g / torch.where(nonzero, g_ref, torch.ones_like(g_ref)), torch.zeros_like(g))  # [B, T]
    anchor = prox if prox is not None else batch.behavior_logprobs  # [B, T]
    log_r = (lp - anchor).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.where(valid, log_r.exp(), torch.ones_like(lp))  # [B, T]
    adv_t = (adv if adv.dim() == 2 else adv[:, None]).expand_as(lp).to(lp.dtype)  # [B, T]
    signal = valid & (adv_t != 0)  # [B, T]
    silenced = signal & (g == 0)  # [B, T]
    seq_adv = (adv_t * valid).sum(1) / valid.sum(1).clamp_min(1)  # [B]
    keys = [(batch.prompts[i] if batch.prompts else int(batch.group_id[i]),
             tuple(batch.response_ids[i][valid[i]].tolist())) for i in range(len(batch))]
    rows = choose_rows(batch.group_id, seq_adv, silenced.sum(1), keys, n) if rows is None else list(rows)
    idx = torch.tensor(rows, dtype=torch.long)
    return {"ratio": ratio[idx], "weight": weight[idx], "advantage": adv_t[idx], "mask": valid[idx],
            "silenced": silenced[idx], "response_ids": batch.response_ids[idx], "rows": rows,
            "prompts": [batch.prompts[i] for i in rows] if batch.prompts else [],
            "objective": objective, "anchor": "pi_prox" if prox is not None else "mu", "source": source,
            "silenced_frac": float(silenced.sum()) / max(1, int(signal.sum()))}


def update_view(run, n: int = 6) -> dict[str, Any] | None:
    """The view of the latest update as it happened (``run.last_update_tokens``); None before one."""
    rec = getattr(run, "last_update_tokens", None)
    if not rec:
        return None
    return build_view(rec["batch"], rec["logprobs"], rec["logprob_grad"], objective=rec["objective"],
                      aggregation=rec["aggregation"], loss_scale_factor=rec["loss_scale_factor"],
                      prox_logprobs=rec["prox_logprobs"], n=n, source="the update's weights, before its step")


def token_weights(run, batch: Rollouts, objective: str, objective_params: dict[str, Any], temperature: float = 1.0,
                  aggregation: str | None = None, n: int = 6) -> dict[str, Any]:
    """What-if: the view of ``objective`` on ``batch`` under the run's *current* weights (one
    no-grad forward of the whole batch; the loss context as the loop builds it,
    ``workbench.studies.replay.replay_context``). Rows: the first ``n`` of the batch, so views of
    different objectives line up row for row. For the latest update as it happened use
    ``update_view``: after ``run.step()`` the current weights are the ones after its step."""
    lp = frozen_logprobs(run.model, batch, temperature)  # [B, T]
    obj = resolve_objective(objective, objective_params)
    aggregation = aggregation or obj.default_aggregation
    adv = batch.advantages if batch.advantages is not None else torch.zeros(len(batch))
    g = logprob_gradient(obj, lp, batch.behavior_logprobs, adv, batch.response_mask, aggregation=aggregation,
                         prox_logprobs=batch.prox_logprobs, context=replay_context(run, batch, obj))  # [B, T]
    return build_view(batch, lp, g, objective=objective, aggregation=aggregation,
                      prox_logprobs=batch.prox_logprobs, rows=list(range(min(n, len(batch)))),
                      source="the run's current weights")


def _colour(log_r: float) -> str:
    """White at r = 1; red for r > 1, blue for r < 1, saturating at |log r| = 1."""
    x = max(-1.0, min(1.0, log_r))
    a = abs(x)
    if x >= 0:
        return f"rgba(214, 39, 40, {0.08 + 0.7 * a:.2f})"
    return f"rgba(31, 119, 180, {0.08 + 0.7 * a:.2f})"


def compact(x: float) -> str:
    """A number in at most ~5 characters: 2 decimals below 100, else 1e+03 style."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2f}" if abs(x) < 99.995 else f"{x:.0e}"


_CELL = "display:inline-block;text-align:center;vertical-align:top;margin:0 1px;padding:0 2px;min-width:2.4em"
_NUM = "display:block;font-size:9px;line-height:1.2;color:#555"


def token_html(view: dict[str, Any] | None, tokenizer, title: str = "") -> str:
    """HTML of a view: one line per sequence, one box per response token with r and w under it."""
    if view is None:
        return "<div style='color:#777'>per-token view: no update yet</div>"
    anchor = "&pi;<sub>prox</sub>" if view.get("anchor") == "pi_prox" else "&mu;"
    lines = [f"<div style='font-family:monospace;font-size:12px;line-height:1.4'>"
             f"<div><b>{html.escape(title or 'latest batch')}</b> &middot; objective <b>{html.escape(view['objective'])}</b>"
             f" &middot; {html.escape(view.get('source') or '')}"
             f" &middot; under each token: r = &pi;<sub>&theta;</sub>/{anchor} and w = gradient weight"
             f" (1 = REINFORCE, 0 = silenced) &middot; colour = log r (blue r&lt;1, red r&gt;1)"
             f" &middot; <s>struck</s> = silenced &middot; {100 * view['silenced_frac']:.1f}% of the batch's"
             f" tokens with A&ne;0 silenced</div>"]
    ratio, weight, adv, mask, sil = view["ratio"], view["weight"], view["advantage"], view["mask"], view["silenced"]
    for i in range(ratio.shape[0]):
        a = float(adv[i][mask[i]].mean()) if bool(mask[i].any()) else 0.0
        prompt = html.escape(view["prompts"][i]) if view["prompts"] else ""
        cells = [f"<span style='{_CELL};color:#888'>{prompt}<span style='{_NUM}'>r</span><span style='{_NUM}'>w</span></span>"
                 f"<span style='{_CELL};color:{'#2a7' if a > 0 else '#c33' if a < 0 else '#888'}'>A={a:+.2f}</span> "]
        for t in range(ratio.shape[1]):
            if not bool(mask[i, t]):
                continue
            r, w = float(ratio[i, t]), float(weight[i, t])
            w_text = compact(w) if float(adv[i, t]) != 0 else "&ndash;"  # A = 0: no gradient to weigh
            text = tokenizer.decode([int(view["response_ids"][i, t])]) or "\u2423"
            style = f"background:{_colour(math.log(max(r, 1e-30)))};padding:1px 2px;border-radius:2px"
            if bool(sil[i, t]):
                style += ";text-decoration:line-through;outline:1px solid #c33"
            tip = f"r={r:.4f} w={w:.4f} A={float(adv[i, t]):+.3f}"
            cells.append(f"<span class='wb-tok' title='{tip}' style='{_CELL}'><span style='{style}'>"
                         f"{html.escape(text)}</span><span class='wb-r' style='{_NUM}'>{compact(r)}</span>"
                         f"<span class='wb-w' style='{_NUM}'>{w_text}</span></span>")
        lines.append("<div style='margin:4px 0'>" + "".join(cells) + "</div>")
    lines.append("</div>")
    return "".join(lines)


__all__ = ["build_view", "choose_rows", "compact", "token_html", "token_weights", "update_view"]
