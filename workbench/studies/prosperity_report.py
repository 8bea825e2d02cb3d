"""Figures and the Markdown report of the prosperity reproduction (``workbench.studies.prosperity``).

``curve_chart(df, column)`` draws one metric over updates, one facet per staleness, one colour per
objective (the on-policy reference repeated in every facet), the mean over seeds as a line and the
seeds' min..max as a band. Held-out accuracy (logged every ``eval_every`` updates) is drawn as
logged; per-update metrics are smoothed with a trailing mean over ``smooth`` updates per run first.
``write_report`` renders the figures to PNG (offline, vl-convert) and writes the Markdown report:
setup, the four checks with their evidence, the objective x staleness table, figures, and the
comparison with the paper's scale. ``python -m workbench report`` (``workbench.cli.report``) is the CLI.

Left out: HTML output, statistical tests, per-token histograms of the ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import altair as alt
import polars as pl

from workbench.charts import save_png
from workbench.errors import WorkbenchError
from workbench.notebook import has_frontend
from workbench.runs.rundir import atomic_write_text
from workbench.studies.prosperity import (FINAL_EVALS, ONPOLICY, PAPER_CLIPFRAC, Check, check_claims, drift_matched_staleness,
                         runs_table, summary_table)

# (file stem, column(s) summed into the value, title)
FIGURES: list[tuple[str, tuple[str, ...], str]] = [
    ("accuracy", ("eval/accuracy",), "held-out accuracy"),
    ("zeroed", ("offpolicy/clipfrac", "offpolicy/masked_frac"), "tokens with zeroed gradient (clipped or masked)"),
    ("truncated", ("offpolicy/truncated_frac",), "tokens with a truncated weight (CISPO, TOPR)"),
    ("m2", ("offpolicy/m2",), "M2 = mean (log r)^2 (symlog axis)"),
    ("ess", ("offpolicy/ess_token",), "ESS (token, fraction)"),
    ("entropy", ("loss/entropy",), "entropy"),
    ("response_len", ("reward/response_len_mean",), "response length (tokens)"),
]
PAPER = ("Zheng et al. 2025, arXiv:2510.01161, on Qwen2.5-32B and math reasoning: at staleness 256, "
         "PPO/GRPO clipping clipped 1.22% of tokens while M2PO masked 0.06%; stale-256 M2PO matched on-policy "
         "accuracy; stale GRPO degraded and unclipped importance sampling collapsed after improving.")


def _objective_order(objectives: list[str]) -> list[str]:
    rest = [o for o in objectives if o != ONPOLICY]
    return ([ONPOLICY] if ONPOLICY in objectives else []) + rest


def curve_frame(df: pl.DataFrame, columns: tuple[str, ...], *, smooth: int = 10, every: int = 5) -> pl.DataFrame:
    """Long frame (objective, staleness, update, mean, lo, hi) of ``sum(columns)`` over seeds.

    Sparse columns (``eval/``) keep their logged rows; dense ones are smoothed per run (trailing
    mean over ``smooth`` updates) and thinned to every ``every``-th update (and each run's last). The on-policy reference
    is repeated under every staleness of the grid.
    """
    present = [c for c in columns if c in df.columns]
    if not present:
        return pl.DataFrame()
    ok = df.filter(pl.col("status") == "ok")
    value = pl.sum_horizontal([pl.col(c).cast(pl.Float64) for c in present]).alias("value")
    if columns[0].startswith("eval/"):
        part = ok.filter(pl.col(present[0]).is_not_null()).select("run", "objective", "staleness", "seed",
                                                                  (pl.col("update") + 1).alias("update"), value)
    else:
        part = ok.sort("run", "update").select("run", "objective", "staleness", "seed",
                                               (pl.col("update") + 1).alias("update"), value)
        part = part.with_columns(pl.col("value").fill_nan(None).rolling_mean(smooth, min_samples=1).over("run"))
        part = part.filter((pl.col("update") % every == 0) | (pl.col("update") == pl.col("update").max().over("run")))
    agg = part.group_by("objective", "staleness", "update").agg(
        pl.col("value").mean().alias("mean"), pl.col("value").min().alias("lo"), pl.col("value").max().alias("hi"))
    stale = sorted(s for s in agg["staleness"].unique().to_list() if s > 0)
    ref = agg.filter(pl.col("objective") == ONPOLICY)
    rest = agg.filter(pl.col("objective") != ONPOLICY)
    if stale and ref.height:
        ref = pl.concat([ref.with_columns(pl.lit(s, dtype=ref.schema["staleness"]).alias("staleness"))
                         for s in stale])
    return pl.concat([ref, rest]).sort("objective", "staleness", "update")


SYMLOG = ("offpolicy/m2",)  # spans 0 (on-policy) to ~25 (collapsed IS): a symlog axis shows both


def curve_chart(df: pl.DataFrame, columns: tuple[str, ...] | str, title: str = "", *, smooth: int = 10,
                width: int = 210, height: int = 150) -> alt.TopLevelMixin:
    """One metric over updates: facets = staleness, colour = objective, line = mean, band = seeds."""
    columns = (columns,) if isinstance(columns, str) else tuple(columns)
    data = curve_frame(df, columns, smooth=smooth)
    if not data.height:
        raise WorkbenchError(f"columns {', '.join(columns)} are not in the sweep's metrics: nothing to draw")
    order = _objective_order(df["objective"].unique(maintain_order=True).to_list())  # grid order, reference first
    order = [o for o in order if o in set(data["objective"].to_list())]
    colour = alt.Color("objective:N", sort=order, scale=alt.Scale(domain=order))
    scale_type = "symlog" if columns[0] in SYMLOG else "linear"
    base = alt.Chart().encode(x=alt.X("update:Q", title="update"), color=colour)
    band = base.mark_area(opacity=0.18).encode(y=alt.Y("lo:Q", title=" + ".join(columns),
                                                       scale=alt.Scale(zero=False, type=scale_type),
                                                       axis=alt.Axis(format=".3~g")),
                                            y2="hi:Q")
    line = base.mark_line(strokeWidth=1.6).encode(
        y="mean:Q", strokeDash=alt.condition(f"datum.objective == '{ONPOLICY}'", alt.value([4, 2]), alt.value([1, 0])),
        tooltip=["objective:N", "staleness:Q", "update:Q", alt.Tooltip("mean:Q", format=".4g")])
    chart = alt.layer(band, line, data=alt.Data(values=data.to_dicts())).properties(width=width, height=height)
    return chart.facet(column=alt.Column("staleness:O", title="staleness")).properties(title=title or columns[0])


def figures(df: pl.DataFrame, *, smooth: int = 10) -> dict[str, alt.TopLevelMixin]:
    """Every chart of ``FIGURES`` whose columns the sweep logged, by file stem."""
    out = {}
    for stem, cols, title in FIGURES:
        if any(c in df.columns for c in cols):
            out[stem] = curve_chart(df, cols, title, smooth=smooth)
    return out


def show_chart(chart: alt.TopLevelMixin, path: str | Path):
    """Save ``chart`` as PNG at ``path``; return what a notebook cell should display: the live Altair
    chart when a front end renders it, else the PNG (headless papermill runs)."""
    png = save_png(chart, path)
    if has_frontend():
        return chart
    from IPython.display import Image  # IPython comes with the notebooks extra; only notebooks call this

    return Image(filename=str(png))


# ----------------------------------------------------------------------------- the Markdown
def _pm(row: dict[str, Any], stat: str, scale: float = 100.0, digits: int = 1) -> str:
    v, s = row[stat], row[f"{stat}_spread"]
    if v is None:
        return "-"
    return f"{scale * v:.{digits}f} ± {scale * s:.{digits}f}" if row["seeds"] > 1 else f"{scale * v:.{digits}f}"


def markdown_table(table: pl.DataFrame) -> str:
    """The objective x staleness table of ``summary_table`` as Markdown (accuracies in points)."""
    head = ("| staleness | objective | seeds | final acc. (%) | best acc. (%) | collapse: seeds, mean update "
            "| zeroed tokens (%) | truncated tokens (%) | M2 | ESS |")
    lines = [head, "|" + "---|" * 10]
    for r in table.iter_rows(named=True):
        collapse = f"{r['collapsed']} of {r['seeds']}" + (f", {r['collapse']:.0f}" if r["collapsed"] else "")
        lines.append(f"| {r['staleness']} | {r['objective']} | {r['seeds']} | {_pm(r, 'final')} | {_pm(r, 'best')} "
                     f"| {collapse} | {_pm(r, 'zeroed', digits=3)} | {_pm(r, 'truncated', digits=3)} "
                     f"| {_pm(r, 'm2', 1.0, 4)} | {_pm(r, 'ess', 1.0, 3)} |")
    return "\n".join(lines)


def drift_table(table: pl.DataFrame) -> str:
    """Staleness -> ppo_clip's clipped fraction and the mean M2 of its batches (Markdown)."""
    rows = table.filter(pl.col("objective") == "ppo_clip").sort("staleness")
    lines = ["| staleness | ppo_clip clipped tokens (%) | M2 of its batches |", "|---|---|---|"]
    lines += [f"| {r['staleness']} | {100 * r['zeroed']:.2f} | {r['m2']:.4f} |" for r in rows.iter_rows(named=True)]
    lines.append(f"| 256 in the paper | {100 * PAPER_CLIPFRAC:.2f} | |")
    return "\n".join(lines)


def closest_lines(table: pl.DataFrame) -> list[str]:
    """Per staleness: the objectives by final accuracy, best first, with their gap to on-policy."""
    ref = table.filter(pl.col("objective") == ONPOLICY)
    base = ref["final"][0] if ref.height else None
    lines = []
    for s in sorted(x for x in table["staleness"].unique().to_list() if x > 0):
        rows = table.filter(pl.col("staleness") == s).sort("final", descending=True).iter_rows(named=True)
        parts = [f"{r['objective']} {100 * r['final']:.1f}%"
                 + (f" ({100 * (r['final'] - base):+.1f})" if base is not None else "") for r in rows]
        lines.append(f"- staleness {s}: " + ", ".join(parts))
    if base is not None:
        lines.append(f"- (final accuracy, points against on-policy {100 * base:.1f}%)")
    return lines


def check_lines(checks: list[Check]) -> list[str]:
    mark = {True: "holds", False: "**does not hold**", None: "not measured"}
    return [f"- ({c.name}) {c.statement}: {mark[c.holds]}. {c.evidence}." for c in checks]


def _describe_base(base: dict[str, Any], steps: int) -> str:
    model = "the built-in model (1.7 M-parameter Llama, warm-started by SFT)" if base.get("model") == "builtin" \
        else f"model `{base.get('model')}`"
    task = base.get("task", "?") + (f" {base['task_params']}" if base.get("task_params") else "")
    return (f"{model} on the `{task}` task, {steps} updates per run, lr {base.get('lr', '?')}, "
            f"{base.get('prompts_per_step', '?')} prompts x {base.get('group_size', '?')} samples per update, "
            f"`{base.get('advantage', '?')}` advantages, temperature {base.get('temperature', '?')}")


def render_markdown(df: pl.DataFrame, *, command: str, base: dict[str, Any] | None = None, figure_dir: str = "",
                    figure_stems: tuple[str, ...] = (), size: str = "", seconds: float | None = None) -> str:
    """The report's text. ``base``: the sweeps' base config (``RunConfig.to_dict()``, as in their
    ``sweep.json``); ``figure_stems`` (of ``FIGURES``) are linked from ``figure_dir``, relative to the report."""
    runs = runs_table(df)
    table = summary_table(runs)
    checks = check_claims(table)
    matched = drift_matched_staleness(table)
    stale = sorted(s for s in table["staleness"].unique().to_list() if s > 0)
    steps = int(runs["updates"].max())
    failed = df.filter(pl.col("status") != "ok")["run"].unique().to_list() if "status" in df.columns else []
    out = [
        "# Prosperity before collapse, at CPU scale",
        "",
        f"Generated by `{command}`" + (f" (size `{size}`)" if size else "") + ". Do not edit: rerun the command.",
        "",
        "## What ran",
        "",
        f"- Setup: {_describe_base(base or {}, steps)}.",
        f"- Staleness (fixed lag): {', '.join(map(str, stale))}, plus the on-policy reference (staleness 0). Update "
        "k trains on the batch generated by the policy of update k - s; before the queue is full the batches "
        "come from the initial policy, so at staleness s >= the run length every update trains on data "
        "from the starting policy.",
        f"- Objectives: {', '.join(df['objective'].unique(maintain_order=True).to_list())}; "
        f"seeds per cell: {int(runs.group_by('objective', 'staleness').len()['len'].max())}.",
        f"- Final accuracy is the mean of the last {FINAL_EVALS} held-out evaluations (256 problems each, "
        "about ±3 points of binomial noise per evaluation); ± is the spread over seeds (half the max - min "
        "range). A run *collapses* when, after its best evaluation, it falls below its starting accuracy.",
    ]
    if seconds is not None:
        out.append(f"- Compute: {seconds / 60:.0f} run-minutes in total.")
    if failed:
        out.append(f"- Failed runs (excluded): {', '.join(failed)}.")
    highest = max(stale) if stale else None
    out += ["", f"## The four statements at the highest staleness ({highest})", ""] + check_lines(checks)
    out += ["", "## How stale is stale: a drift gauge", "",
            "Staleness counts updates, and how far a policy moves in one update depends on the model, the task "
            "and the learning rate. PPO's clipped-token fraction (eps 0.2) measures that distance in the same "
            f"units here and in the paper, where GRPO clipped {100 * PAPER_CLIPFRAC:.2f}% of tokens at staleness "
            "256:", "", drift_table(table), ""]
    if matched is not None and matched != highest:
        out += [f"So this setup's staleness-{matched} data is about as far from the policy as the paper's "
                f"staleness-256 data. The four statements at staleness {matched}:", ""]
        out += check_lines(check_claims(table, staleness=matched))
    elif matched is not None:
        out.append(f"The highest staleness ({highest}) is also the drift-matched one.")
    out += ["", "## Closest to on-policy", ""] + closest_lines(table)
    out += ["", "## Objective x staleness", "", markdown_table(table), ""]
    if figure_stems:
        out += ["## Figures", "", "Lines are the mean over seeds, bands the seeds' range; the dashed line is the "
                "on-policy reference, repeated in every panel. Per-update metrics are smoothed over 10 updates.", ""]
        for stem, _, title in FIGURES:
            if stem in figure_stems:
                out += [f"### {title}", "", f"![{title}]({figure_dir}/{stem}.png)", ""]
    out += ["## Scale, and what does not reproduce", "", f"The paper: {PAPER}", ""]
    for st in dict.fromkeys(x for x in (highest, matched) if x is not None):
        misses = [c for c in check_claims(table, staleness=st) if c.holds is False]
        if misses:
            out.append(f"- At staleness {st}: " + "; ".join(f"({c.name}) does not hold" for c in misses) + ".")
        else:
            out.append(f"- At staleness {st}: every statement measured holds.")
    return "\n".join(out) + "\n"


def write_report(df: pl.DataFrame, path: str | Path = "reports/prosperity.md", *, command: str,
                 base: dict[str, Any] | None = None, size: str = "", seconds: float | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Render the figures next to ``path`` (``<stem>/<figure>.png``) and write the Markdown."""
    path = Path(path)
    fig_dir = path.parent / path.stem
    fig_dir.mkdir(parents=True, exist_ok=True)
    charts = figures(df)
    for stem, chart in charts.items():
        save_png(chart, fig_dir / f"{stem}.png")
    text = render_markdown(df, command=command, base=base, figure_dir=path.stem, figure_stems=tuple(charts), size=size,
                           seconds=seconds)
    atomic_write_text(path, text)
    log(f"report: {path} (figures in {fig_dir})")
    return path


__all__ = ["FIGURES", "check_lines", "curve_chart", "curve_frame", "figures", "closest_lines", "drift_table", "markdown_table", "render_markdown", "show_chart", "write_report"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m workbench report")
