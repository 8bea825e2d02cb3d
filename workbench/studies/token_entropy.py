"""Per-token entropy of a policy's sampled responses, beside the published shape of LLM reasoning.

    from workbench.studies import token_entropy as te
    h = te.sample_entropies(model, tokenizer, task)          # [N] nats, one per response token
    table = te.entropy_table({"scratchpad": h})              # shares below 0.01 / 0.1 / 0.5, quantiles
    print(te.format_table(table)); te.histogram_spec({"scratchpad": h})   # Vega-Lite dict

A batch of held-out prompts is sampled at temperature 1 (``group_size`` samples each) and every
response token's entropy H_t = -sum_v p_t(v) log p_t(v) of the *full* softmax (temperature 1, every
vocabulary entry) is taken from the trainer's forward pass (``token_logprobs(with_entropy=True)``).
EOS counts as a token (it is a decision: when to stop); padding does not.

The reference (``PUBLISHED``): Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority
Tokens Drive Effective Reinforcement Learning for LLM Reasoning", arXiv:2506.01939, section 3 and
its Figure 2(a): over 50% of the chain-of-thought tokens of Qwen3-8B on math problems have entropy
below 0.01, and only 20% have entropy above 0.672 (the 80th percentile). Only those two numbers are
published, so the reference column holds a bound (``> 0.50`` below 0.01, hence a median ``< 0.01``)
and one quantile (0.672 at 80%); the other cells are ``n/a``. The paper's entropies are over a
~150 k-token vocabulary, these over a few dozen characters: a token here can be at most
ln(vocabulary) nats uncertain, so the low-entropy side (the shares below 0.01 and the median) is
the comparable part of the shape; the high quantiles are bounded differently.

Left out: entropy per token position or token class (``per_token`` returns the raw values with
their positions for that), other temperatures than the one sampled at.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import polars as pl
import torch

from workbench.charts import HEIGHT, WIDTH
from workbench.errors import WorkbenchError, bad_value
from workbench.policy.logprobs import token_logprobs
from workbench.rollouts import Rollouts
from workbench.steps.generate.sampler import SamplingParams
from workbench.steps.generate.transformers_sampler import TransformersSampler
from workbench.tasks import Task

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
THRESHOLDS = (0.01, 0.1, 0.5)
"""Entropy thresholds (nats) of the ``share < x`` rows."""
QUANTILES = (0.5, 0.8, 0.95, 0.99)
"""Quantiles of the ``q`` rows."""
PAPER = ("Wang et al. 2025, Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective "
         "Reinforcement Learning for LLM Reasoning, arXiv:2506.01939")
PAPER_SENTENCE = ("over 50% of tokens have entropy below 0.01, and only 20% of tokens have entropy "
                  "above 0.672 (Qwen3-8B chain-of-thought tokens, section 3, Figure 2(a))")
REFERENCE = "Wang et al. 2025 (Qwen3-8B CoT)"
"""Column name of the published shape in ``entropy_table``."""
PUBLISHED: dict[str, str] = {"share < 0.01": "> 0.50", "q50": "< 0.01", "q80": "0.672"}
"""The published cells (strings: the first two are bounds); every other row is ``n/a``."""
PAPER_Q80 = 0.672
FLOOR = 1e-6
"""Histogram floor (nats): smaller entropies (round-off of a certain token) are drawn in the first bin."""


def _row_names() -> list[str]:
    return [f"share < {x:g}" for x in THRESHOLDS] + [f"q{round(100 * q)}" for q in QUANTILES]


@torch.no_grad()
def per_token(model, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy [N], position [N]) of every real response token of ``rollouts`` under ``model`` at
    temperature 1, row-major; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        _, ent = token_logprobs(model, rollouts, temperature=1.0, with_entropy=True)  # [B, T]
    finally:
        model.train(was_training)
    valid = rollouts.response_mask > 0  # [B, T]
    pos = torch.arange(valid.shape[1]).expand_as(valid)  # [B, T]
    return ent.cpu()[valid].double(), pos[valid]  # [N], [N]


def sample_entropies(model, tokenizer, task: Task, *, prompts: int = 64, group_size: int = 4, seed: int = 0,
                     max_new_tokens: int | None = None) -> torch.Tensor:
    """Entropies [N] (nats) of the response tokens of ``group_size`` temperature-1 samples of each of
    the first ``prompts`` held-out prompts of ``task`` (module docstring)."""
    for name, v in (("prompts", prompts), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad_value(name, v, "an int >= 1")
    examples = task.heldout[:prompts]
    if not examples:
        raise WorkbenchError(f"task {task.name!r} has an empty held-out set: nothing to sample the entropies on")
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens or task.max_answer_tokens)
    gen = torch.Generator().manual_seed(seed)
    batch = TransformersSampler(model, tokenizer).generate(examples, group_size, params, generator=gen,
                                                           policy_version=0)
    return per_token(model, batch)[0]


def run_entropies(run, **kwargs: Any) -> torch.Tensor:
    """``sample_entropies`` of a ``workbench.loop.Run``'s current policy on its task (raw prompts:
    a run with a chat template is refused, its prompts would differ from what it trains on)."""
    if getattr(run, "chat_template", None) is not None:
        raise WorkbenchError("run.chat_template is set: the entropy study samples raw task prompts; "
                             "use a run without a chat template")
    return sample_entropies(run.model, run.tokenizer, run.task, **kwargs)


def summarize(entropies: torch.Tensor) -> dict[str, float]:
    """``{"share < 0.01": ..., ..., "q50": ..., ...}`` of a 1-D tensor of entropies (nats). Quantiles
    interpolate linearly between order statistics (``torch.quantile``'s default)."""
    h = torch.as_tensor(entropies, dtype=torch.float64).flatten()  # [N]
    if h.numel() == 0 or not bool(torch.isfinite(h).all()) or bool((h < -1e-9).any()):
        raise bad_value("entropies", f"tensor of {h.numel()} values", "a non-empty tensor of finite entropies >= 0")
    out = {f"share < {x:g}": float((h < x).double().mean()) for x in THRESHOLDS}
    qs = torch.quantile(h, torch.tensor(QUANTILES, dtype=torch.float64))
    out.update({f"q{round(100 * q)}": float(v) for q, v in zip(QUANTILES, qs)})
    return out


def entropy_table(samples: Mapping[str, torch.Tensor]) -> pl.DataFrame:
    """One row per statistic (``share < x`` then ``qNN``), one float column per named sample, and the
    published shape as the string column ``REFERENCE``; ``tokens`` is the last row."""
    if not samples:
        raise WorkbenchError("samples is empty: expected {name: entropies tensor}")
    rows = _row_names()
    cols: dict[str, list] = {"statistic": rows + ["tokens"]}
    for name, h in samples.items():
        s = summarize(h)
        cols[name] = [s[r] for r in rows] + [float(torch.as_tensor(h).numel())]
    cols[REFERENCE] = [PUBLISHED.get(r, "n/a") for r in rows] + [">1 M"]
    return pl.DataFrame(cols)


def format_table(table: pl.DataFrame) -> str:
    """Markdown of an ``entropy_table``, with the reference's source sentence under it."""
    names = [c for c in table.columns if c not in ("statistic", REFERENCE)]
    lines = ["| statistic | " + " | ".join(names) + f" | {REFERENCE} |", "|---" * (len(names) + 2) + "|"]
    for r in table.iter_rows(named=True):
        fmt = (lambda v: f"{int(v)}") if r["statistic"] == "tokens" else (lambda v: f"{v:.4f}")
        lines.append(f"| {r['statistic']} | " + " | ".join(fmt(r[n]) for n in names) + f" | {r[REFERENCE]} |")
    lines.append(f"\nReference: {PAPER}: {PAPER_SENTENCE}. Entropies in nats, full softmax at temperature 1.")
    return "\n".join(lines)


def histogram_frame(samples: Mapping[str, torch.Tensor], bins_per_decade: int = 4) -> pl.DataFrame:
    """Log-binned histogram: ``sample``, bin edges ``lo`` / ``hi`` (nats) and ``share`` (the fraction of
    that sample's tokens in the bin; entropies below ``FLOOR`` fall in the first bin)."""
    if isinstance(bins_per_decade, bool) or not isinstance(bins_per_decade, int) or bins_per_decade < 1:
        raise bad_value("bins_per_decade", bins_per_decade, "an int >= 1")
    top = max(float(torch.as_tensor(h).max()) for h in samples.values()) if samples else 1.0
    first = round(math.log10(FLOOR) * bins_per_decade)  # edges at 10 ** (i / bins_per_decade)
    last = max(math.ceil(math.log10(max(top, PAPER_Q80)) * bins_per_decade), first + 1)
    edges = [10 ** (i / bins_per_decade) for i in range(first, last + 1)]
    edges_t = torch.tensor(edges, dtype=torch.float64)  # [K+1]
    rows = []
    for name, h in samples.items():
        h = torch.as_tensor(h, dtype=torch.float64).clamp(min=FLOOR)  # [N]
        idx = (torch.bucketize(h, edges_t, right=True) - 1).clamp(0, len(edges) - 2)  # [N] bin of each token
        counts = torch.bincount(idx, minlength=len(edges) - 1).double() / max(h.numel(), 1)  # [K]
        rows += [{"sample": name, "lo": edges[i], "hi": edges[i + 1], "share": float(counts[i])}
                 for i in range(len(edges) - 1)]
    return pl.DataFrame(rows, schema={"sample": pl.Utf8, "lo": pl.Float64, "hi": pl.Float64, "share": pl.Float64})


def histogram_spec(samples: Mapping[str, torch.Tensor], *, width: int = 2 * WIDTH, height: int = 2 * HEIGHT,
                   title: str = "per-token entropy of sampled responses (temperature 1)") -> dict[str, Any]:
    """Vega-Lite dict: one panel per sample, log-x bars of the token share per entropy bin, with the
    published reference marked (dotted rules at 0.01 and 0.672 nats, the paper's numbers)."""
    frame = histogram_frame(samples)
    stats = {name: summarize(h) for name, h in samples.items()}
    data = [{**r, "panel": f"{r['sample']}: {100 * stats[r['sample']]['share < 0.01']:.1f}% of tokens < 0.01 nats"}
            for r in frame.iter_rows(named=True)]
    panels = list(dict.fromkeys(d["panel"] for d in data))
    refs = [{"panel": p, "x": x, "label": label, "ypix": ypix} for p in panels  # ypix: label row, pixels from the top
            for x, label, ypix in ((0.01, "paper: >50% below 0.01", 2),
                                   (PAPER_Q80, "paper: 80th percentile 0.672", 14))]
    used = frame.filter(pl.col("share") > 0)["lo"]
    left = min(float(used.min()) if len(used) else FLOOR, 1e-3)  # empty decades left of the data are not drawn
    x = {"field": "lo", "type": "quantitative", "scale": {"type": "log", "domain": [left, frame["hi"].max()]},
         "title": "token entropy (nats, log scale; first bin includes everything below it)"}
    bars = {"data": {"values": data}, "mark": {"type": "bar", "opacity": 0.85},
            "encoding": {"x": x, "x2": {"field": "hi"},
                         "y": {"field": "share", "type": "quantitative", "title": "share of tokens",
                               "scale": {"domainMin": 0}},
                         "y2": {"datum": 0},
                         "tooltip": [{"field": "sample"}, {"field": "lo", "format": ".2e", "title": "from"},
                                     {"field": "hi", "format": ".2e", "title": "to"},
                                     {"field": "share", "format": ".3f"}]}}
    rules = {"data": {"values": refs}, "mark": {"type": "rule", "strokeDash": [2, 2], "color": "#9b1c1c"},
             "encoding": {"x": {"field": "x", "type": "quantitative"}, "tooltip": [{"field": "label"}]}}
    labels = {"data": {"values": refs}, "mark": {"type": "text", "align": "left", "dx": 3, "dy": -4, "angle": 0,
                                                 "color": "#9b1c1c", "fontSize": 9, "baseline": "top"},
              "encoding": {"x": {"field": "x", "type": "quantitative"},
                           "y": {"field": "ypix", "type": "quantitative", "scale": None},
                           "text": {"field": "label"}}}
    return {"$schema": SCHEMA, "title": {"text": title, "subtitle": f"reference: {PAPER}"},
            "facet": {"field": "panel", "type": "nominal", "sort": panels, "title": None},
            "data": {"values": data + refs}, "columns": 1,
            "spec": {"width": width, "height": height, "layer": [_strip(bars), _strip(rules), _strip(labels)]}}


def _strip(layer: dict[str, Any]) -> dict[str, Any]:
    """A facet's layers read the facet's data: drop a layer's own and filter to its rows instead."""
    out = {k: v for k, v in layer.items() if k != "data"}
    is_ref = "label" in layer["data"]["values"][0] if layer["data"]["values"] else False
    out["transform"] = [{"filter": "isValid(datum.label)" if is_ref else "!isValid(datum.label)"}]
    return out


__all__ = ["FLOOR", "PAPER", "PAPER_Q80", "PAPER_SENTENCE", "PUBLISHED", "QUANTILES", "REFERENCE", "THRESHOLDS",
           "entropy_table", "format_table", "histogram_frame", "histogram_spec", "per_token", "run_entropies",
           "sample_entropies", "summarize"]
