"""The knob reference: every setting a course participant turns, generated from the registries.

One row per live knob (``workbench.knobs.LIVE_FIELDS``, documented by the ``RunConfig`` field
docstrings in workbench/config.py), per objective parameter (``OBJECTIVES``: default, range,
liveness, description and paper), per advantage-estimator option (``ADVANTAGES`` metadata) and per
correction preset (``corrections.PRESETS``). The registries carry no text on what a live knob does
to the diagnostics, so ``LIVE_KNOBS`` adds it (with the accepted range, which ``RunConfig``
validates but does not describe as data); an import-time check keeps it in step with
``LIVE_FIELDS``.

``knobs_markdown()`` is ``docs/knobs.md`` (written by ``python -m workbench docs`` next to
docs/objectives.md; ``--check`` compares both); ``knob_reference(filter)`` is the same table in a
notebook: an ipywidgets HTML table with a frontend, a polars DataFrame without one.

Papers cited for the live knobs: Noukhovitch et al. 2024, Asynchronous RLHF: Faster and More
Efficient Off-Policy RL for Language Models, arXiv:2410.18252 (training on samples from an older
policy); Zheng et al. 2025, Prosperity before Collapse (M2PO), arXiv:2510.01161 (staleness up to 256);
DeepSeek-AI 2025, DeepSeek-V3.2, arXiv:2512.02556 (the kept sampling mask); Kalamkar et al. 2019, A Study
of BFLOAT16 for Deep Learning Training, arXiv:1905.12322 (bf16's 8 significant bits).
"""

from __future__ import annotations

import dataclasses
import html
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.errors import WorkbenchError, bad_value
from workbench.knobs import LIVE_FIELDS
from workbench.notebook import has_frontend
from workbench.steps.reweight import OBJECTIVES
from workbench.steps.reweight.corrections import PRESET_SOURCES, PRESETS, Correction
from workbench.steps.reweight.reference import DOCS_PATH, md_cell, param_range, write_page
from workbench.steps.score import ADVANTAGES
from workbench.validate import field_docs

KNOBS_PATH = DOCS_PATH.with_name("knobs.md")  # <repo>/docs/knobs.md, beside docs/objectives.md
KINDS = ("live knob", "objective parameter", "advantage option", "correction preset")
COLUMNS = ("name", "kind", "default", "range", "live", "effect", "paper")
ASYNC_RLHF = ("Noukhovitch et al. 2024, Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language "
              "Models, arXiv:2410.18252")
M2PO = "Zheng et al. 2025, Prosperity before Collapse (M2PO), arXiv:2510.01161"
DSV32 = "DeepSeek-AI 2025, DeepSeek-V3.2 (Keep Sampling Mask, Sec. 3.1), arXiv:2512.02556"
BF16 = "Kalamkar et al. 2019, A Study of BFLOAT16 for Deep Learning Training, arXiv:1905.12322"


@dataclass(frozen=True)
class LiveKnobInfo:
    """What the registries do not say about a live knob: the values ``RunConfig`` accepts (as text),
    what changing it does to the run's diagnostics, and the paper the idea comes from ('' = none)."""

    range: str
    effect: str
    paper: str = ""


LIVE_KNOBS: dict[str, LiveKnobInfo] = {
    "staleness": LiveKnobInfo(
        "an integer >= 0",
        "offpolicy/staleness_mean and _max rise to s; the policy ratios spread (offpolicy/ratio_* quantiles, "
        "offpolicy/kl_k1, offpolicy/m2 grow), so more tokens are clipped, masked or truncated "
        "(offpolicy/clipfrac, masked_frac, truncated_frac) and offpolicy/ess_token falls",
        f"{ASYNC_RLHF}; {M2PO}"),
    "sync_every": LiveKnobInfo(
        "an integer >= 1",
        "the sampler's weights refresh every n updates (buffer/synced): staleness cycles s..s+n-1 "
        "(offpolicy/staleness_min to _max) and the ratio diagnostics rise and fall with that period",
        ASYNC_RLHF),
    "max_staleness": LiveKnobInfo(
        "an integer >= 0, or -1 for no limit",
        "samples staler than this are dropped before the update (buffer/dropped_stale_seqs counts them), "
        "which caps offpolicy/staleness_max; -1 never drops"),
    "objective": LiveKnobInfo(
        "one of the registered objectives (docs/objectives.md)",
        "how off-policy tokens are handled: which of offpolicy/clipfrac, masked_frac or truncated_frac is "
        "non-zero and how large; an objective with a key metric gets its own chart panel"),
    "objective_params": LiveKnobInfo(
        "the chosen objective's parameters (the objective parameter rows; fixed ones cannot change live)",
        "moves the objective's thresholds, so its silenced-token fraction and its key metric move with them"),
    "lr": LiveKnobInfo(
        "a float in (0, 1)",
        "the policy moves further per update (knob/lr logs the value): at the same staleness the ratios "
        "spread more (offpolicy/kl_k1, offpolicy/m2) and loss/entropy falls faster"),
    "temperature": LiveKnobInfo(
        "a float > 0",
        "samples and trainer log-probs both use T (knob/temperature): a higher T raises loss/entropy and "
        "the reward spread within groups, so reward/zero_var_group_frac falls"),
    "top_p": LiveKnobInfo(
        "a float in (0, 1]",
        "without the replay every ratio is scaled by p(kept set) >= top_p: offpolicy/raw_ratio_* fall below 1 and, "
        "on policy too, offpolicy/clipfrac rises once that mass is below the clip band (top_p < 0.8 for "
        "ppo_clip's clip_low 0.2); with replay_sampling_mask the ratios return to 1", DSV32),
    "top_k": LiveKnobInfo(
        "an integer >= 0",
        "as top_p: a truncated sampler's ratios carry p(kept set) unless replay_sampling_mask is on", DSV32),
    "sampler_logits_dtype": LiveKnobInfo(
        "'' (exact) | bf16 | fp16",
        "the sampler's rounded logits differ from the trainer's: mismatch/engine_* grow and, at lr = 1e-9, "
        "offpolicy/clipfrac counts numerics alone", BF16),
    "trainer_logits_dtype": LiveKnobInfo(
        "'' (exact) | bf16 | fp16",
        "as sampler_logits_dtype, on the trainer's side (update, proximal and mismatch forwards)", BF16),
    "sampler_logit_noise": LiveKnobInfo(
        "a finite float >= 0 (0 = off)",
        "mismatch/engine_abs_mean grows with the std; offpolicy/clipfrac rises from 0 at lr = 1e-9"),
    "trainer_logit_noise": LiveKnobInfo(
        "a finite float >= 0 (0 = off)",
        "a fresh draw per trainer forward: the ratios spread (offpolicy/ratio_* quantiles) and offpolicy/clipfrac "
        "rises from 0 at lr = 1e-9; mismatch/engine_* measure it"),
    "replay_sampling_mask": LiveKnobInfo(
        "true or false",
        "with top_p < 1 or top_k > 0: the trainer renormalises over the sampler's kept sets, so "
        "offpolicy/raw_ratio_* return to 1 and the clipped fraction the truncation caused falls to 0", DSV32),
}
if set(LIVE_KNOBS) != set(LIVE_FIELDS):  # a knob added to LIVE_FIELDS must be described here before import works
    raise WorkbenchError(f"LIVE_KNOBS covers {sorted(LIVE_KNOBS)}, expected the live knobs {sorted(LIVE_FIELDS)}")


@dataclass(frozen=True)
class KnobRow:
    """One row of the reference; ``name`` is how the knob is set (``ppo_clip.clip_high`` is
    ``objective_params={"clip_high": ...}`` with objective ppo_clip)."""

    name: str
    kind: str
    default: str
    range: str
    live: bool
    effect: str
    paper: str


def _live_knob_rows() -> list[KnobRow]:
    docs = field_docs(RunConfig)
    defaults = RunConfig()
    rows = []
    for name in LIVE_FIELDS:
        info = LIVE_KNOBS[name]
        default = getattr(defaults, name) if name != "objective_params" else {}  # {} = the objective's defaults
        doc = docs.get(name, "").replace(" (live knob)", "").rstrip(".")
        rows.append(KnobRow(name, "live knob", repr(default), info.range, True,
                            f"{doc}. Diagnostics: {info.effect}", info.paper))
    return rows


def _objective_rows() -> list[KnobRow]:
    rows = []
    for objective in OBJECTIVES.names():
        meta = OBJECTIVES.meta(objective)
        key = meta.get("key_metric")
        for p in meta.get("params", ()):
            effect = p.doc
            if key is not None and key.reference == p.name:  # the chart draws this value as the metric's target
                effect += f" (the budget line of {key.columns[0]} in the key-metric panel)"
            rows.append(KnobRow(f"{objective}.{p.name}", "objective parameter", repr(p.default), param_range(p),
                                p.live, effect, meta["paper"]))
    return rows


def _advantage_rows() -> list[KnobRow]:
    rows = []
    for estimator in ADVANTAGES.names():
        meta = ADVANTAGES.meta(estimator)
        signature = inspect.signature(ADVANTAGES.get(estimator)).parameters
        options = {**{k: " | ".join(v) for k, v in meta.get("choices", {}).items()},
                   **{k: f"[{lo!r}, {hi!r}]" for k, (lo, hi) in meta.get("numbers", {}).items()}}
        for key, valid in sorted(options.items()):
            default = signature[key].default if key in signature else None
            rows.append(KnobRow(f"{estimator}.{key}", "advantage option", repr(default), valid, False,
                                f"advantage_params of advantage={estimator}: {meta['summary']}", meta["paper"]))
    return rows


def _correction_rows() -> list[KnobRow]:
    return [KnobRow(f"correction={preset}", "correction preset", "off (correction='')", "a preset, overridable "
                    "field by field with correction_params", False, Correction(**fields).describe(),
                    PRESET_SOURCES.get(preset, ""))
            for preset, fields in sorted(PRESETS.items())]


def knob_rows() -> list[KnobRow]:
    """Every row, in ``KINDS`` order (live knobs, objective parameters, advantage options, corrections)."""
    return _live_knob_rows() + _objective_rows() + _advantage_rows() + _correction_rows()


def _select(rows: list[KnobRow], filter: str | None) -> list[KnobRow]:
    """Rows whose name, kind or paper contains ``filter`` (case-insensitive); None keeps all."""
    if filter is None:
        return rows
    if not isinstance(filter, str) or not filter.strip():
        raise bad_value("filter", filter, "None or a non-empty string: a knob name, an objective (ppo_clip), "
                                          f"a kind ({', '.join(KINDS)}) or a word of a paper")
    needle = filter.strip().lower()
    kept = [r for r in rows if needle in r.name.lower() or needle in r.kind or needle in r.paper.lower()]
    if not kept:
        raise WorkbenchError(f"filter={filter!r} matches no knob: expected part of a knob name (staleness, "
                             f"clip_high), an objective ({', '.join(OBJECTIVES.names()[:3])}, ...), a kind "
                             f"({', '.join(KINDS)}) or a word of a paper")
    return kept


def knobs_markdown() -> str:
    """``docs/knobs.md``: the whole reference as one markdown table per kind."""
    lines = ["# Knob reference", "",
             "<!-- Generated by `python -m workbench docs` from the registries; do not edit by hand. -->", "",
             "Every knob of the course: the live knobs (they may change between updates of a running run: "
             "`run.knobs.set(...)`, the control panel, `python -m workbench fork --set`), each objective's "
             "parameters, the advantage estimators' options and the correction presets. *Live* says whether a "
             "value may change while a run trains; ranges are inclusive unless written with round brackets. "
             "Per-objective detail: docs/objectives.md. In a notebook: "
             "`from workbench.course.knob_reference import knob_reference; knob_reference(\"m2po\")`."]
    rows = knob_rows()
    for kind in KINDS:
        lines += ["", f"## {kind.capitalize()}s", "", "| name | default | range | live | effect | paper |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.kind == kind):
            lines.append(f"| `{r.name}` | `{md_cell(r.default)}` | {md_cell(r.range)} | {'yes' if r.live else 'no'} | "
                         f"{md_cell(r.effect)} | {md_cell(r.paper) or '-'} |")
    return "\n".join(lines) + "\n"


def write_knob_docs(path: Path | str = KNOBS_PATH) -> Path:
    return write_page(path, knobs_markdown())


def knob_table(filter: str | None = None):
    """The rows kept by ``filter`` as a polars DataFrame with ``COLUMNS``."""
    import polars as pl  # only the notebook function needs it; the docs command does not

    rows = _select(knob_rows(), filter)
    return pl.DataFrame([dataclasses.asdict(r) for r in rows], schema={c: (pl.Boolean if c == "live" else pl.String)
                                                                       for c in COLUMNS})


def knob_html(filter: str | None = None) -> str:
    """The rows kept by ``filter`` as an HTML table (what the widget shows)."""
    head = "".join(f"<th style='text-align:left;padding:2px 6px'>{c}</th>" for c in COLUMNS)
    body = []
    for r in _select(knob_rows(), filter):
        values: dict[str, Any] = dataclasses.asdict(r)
        values["live"] = "yes" if r.live else "no"
        body.append("<tr>" + "".join(f"<td style='vertical-align:top;padding:2px 6px'>{html.escape(str(values[c]))}"
                                     "</td>" for c in COLUMNS) + "</tr>")
    return (f"<table class='workbench-knobs' style='font-size:12px;border-collapse:collapse'><thead><tr>{head}</tr>"
            f"</thead><tbody>{''.join(body)}</tbody></table>")


def knob_reference(filter: str | None = None, *, widget: bool | None = None):
    """The knob reference for display in a notebook, narrowed by ``filter`` (part of a name, an
    objective, a kind or a paper; None = every knob): an ``ipywidgets.HTML`` table when a frontend
    renders widgets (``widget=None`` asks ``has_frontend()``), else a polars DataFrame."""
    if widget is None:
        widget = has_frontend()
    if not widget:
        return knob_table(filter)
    import ipywidgets as W  # only with a frontend (the notebooks extra)

    return W.HTML(value=knob_html(filter))


__all__ = ["COLUMNS", "KINDS", "KNOBS_PATH", "LIVE_KNOBS", "KnobRow", "LiveKnobInfo",
           "knob_html", "knob_reference", "knob_rows", "knob_table", "knobs_markdown", "write_knob_docs"]
