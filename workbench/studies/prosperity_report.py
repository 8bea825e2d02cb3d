"""Figures and the Markdown report of the prosperity reproduction (``workbench.studies.prosperity``).

``curve_chart(df, column)`` draws one metric over updates, one facet per staleness, one colour per
objective (the on-policy reference repeated in every facet), the mean over seeds as a line and the
percentile-bootstrap 95% interval of that mean as a band (none where a cell has one seed).
Held-out accuracy (logged every ``eval_every`` updates) is drawn as logged; per-update metrics are
smoothed with a trailing mean over ``smooth`` updates per run first. ``write_report`` renders the
figures to PNG (offline, vl-convert) and writes the Markdown report: setup, the four checks with
their evidence and intervals, the ranking per staleness, the objective x staleness table with
intervals across seeds (``workbench.studies.prosperity_intervals``), figures, the comparison
with the paper's scale, three more statements from other papers and which statements reproduce
(``workbench.studies.prosperity_checks``), "How stale can I go?" and the compute
(``workbench.studies.prosperity_howstale``). ``python -m workbench report`` (``workbench.cli.report``) is the CLI.

Left out: HTML output, per-token histograms of the ratios.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import altair as alt
import polars as pl

from workbench.charts import ChartDisplay, save_png
from workbench.errors import WorkbenchError
from workbench.runs.rundir import atomic_write_text
from workbench.stats import RESAMPLES, bootstrap_ci, wilson_interval
from workbench.studies.prosperity import (FINAL_EVALS, ONPOLICY, PAPER_CLIPFRAC, SIZES, Check, check_claims,
                                          drift_matched_staleness, runs_table, summary_table)
from workbench.studies.prosperity_checks import all_checks, more_checks, reproduce_lines
from workbench.studies.prosperity_howstale import compute_lines, how_stale_lines
from workbench.studies.prosperity_intervals import (CONFIDENCE, IQM_MIN_SEEDS, accuracy_text, cell_intervals,
                                                    check_interval, closest_lines, with_last)
from workbench.sweeps.results import eval_problems

# (file stem, column(s) summed into the value, title, y-axis title with its unit, drawn = logged x scale)
FIGURES: list[tuple[str, tuple[str, ...], str, str, float]] = [
    ("accuracy", ("eval/accuracy",), "held-out accuracy", "held-out accuracy (%)", 100.0),
    ("zeroed", ("offpolicy/clipfrac", "offpolicy/masked_frac"), "tokens with zeroed gradient (clipped or masked)",
     "clipped + masked tokens (%)", 100.0),
    ("truncated", ("offpolicy/truncated_frac",), "tokens with a truncated weight (CISPO, TOPR)",
     "truncated tokens (%)", 100.0),
    ("m2", ("offpolicy/m2",), "M2 = mean (log r)^2 (symlog axis)", "M2 (nats^2)", 1.0),
    ("ess", ("offpolicy/ess_token",), "ESS (token, fraction)", "ESS (fraction of samples)", 1.0),
    ("entropy", ("loss/entropy",), "entropy", "entropy (nats per token)", 1.0),
    ("response_len", ("reward/response_len_mean",), "response length (tokens)", "length (tokens)", 1.0),
]
AXES = {cols: (axis, scale) for _, cols, _, axis, scale in FIGURES}
PAPER = ("Zheng et al. 2025, arXiv:2510.01161, on Qwen2.5-32B and math reasoning: at staleness 256, "
         "PPO/GRPO clipping clipped 1.22% of tokens while M2PO masked 0.06%; stale-256 M2PO matched on-policy "
         "accuracy; stale GRPO degraded and unclipped importance sampling collapsed after improving.")


def _objective_order(objectives: list[str]) -> list[str]:
    rest = [o for o in objectives if o != ONPOLICY]
    return ([ONPOLICY] if ONPOLICY in objectives else []) + rest


def curve_frame(df: pl.DataFrame, columns: tuple[str, ...], *, smooth: int = 10, every: int = 5) -> pl.DataFrame:
    """Long frame (objective, staleness, update, mean, lo, hi) of ``sum(columns)`` over seeds: ``lo`` /
    ``hi`` bound the percentile-bootstrap 95% interval of the mean (``workbench.stats.bootstrap_ci``,
    seed 0; null where one seed has a value).

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
    values = pl.col("value").drop_nulls().drop_nans().alias("values")
    agg = _band(part.group_by("objective", "staleness", "update").agg(values))
    stale = sorted(s for s in agg["staleness"].unique().to_list() if s > 0)
    ref = agg.filter(pl.col("objective") == ONPOLICY)
    rest = agg.filter(pl.col("objective") != ONPOLICY)
    if stale and ref.height:
        ref = pl.concat([ref.with_columns(pl.lit(s, dtype=ref.schema["staleness"]).alias("staleness"))
                         for s in stale])
    return pl.concat([ref, rest]).sort("objective", "staleness", "update")


def _band(groups: pl.DataFrame) -> pl.DataFrame:
    """``values`` (a list per row) -> ``mean``, ``lo``, ``hi``: the mean and its bootstrap 95% interval."""
    cis = [bootstrap_ci(v, "mean", CONFIDENCE) if len(v) else (None, None, None) for v in groups["values"].to_list()]
    real = [[None if x is None or math.isnan(x) else x for x in ci] for ci in cis]  # NaN: no interval (null)
    cols = [pl.Series(name, [r[i] for r in real], dtype=pl.Float64) for i, name in enumerate(("mean", "lo", "hi"))]
    return groups.drop("values").with_columns(*cols)


BAND_TEXT = "line: mean over seeds; band: 95% bootstrap CI of that mean (no band with one seed)"
SYMLOG = ("offpolicy/m2",)  # spans 0 (on-policy) to ~25 (collapsed IS): a symlog axis shows both


def curve_chart(df: pl.DataFrame, columns: tuple[str, ...] | str, title: str = "", *, smooth: int = 10,
                width: int = 210, height: int = 150, axis: str = "", scale: float | None = None) -> alt.TopLevelMixin:
    """One metric over updates: facets = staleness, colour = objective, line = mean over seeds, band =
    the bootstrap 95% interval of the mean (``BAND_TEXT``, the chart's subtitle). ``axis`` (the y
    title with its unit) and ``scale`` (drawn = logged x scale) default to the ``FIGURES`` entry of
    ``columns``, else the key and 1."""
    columns = (columns,) if isinstance(columns, str) else tuple(columns)
    default_axis, default_scale = AXES.get(columns, (" + ".join(columns), 1.0))
    axis, scale = axis or default_axis, default_scale if scale is None else scale
    data = curve_frame(df, columns, smooth=smooth)
    if not data.height:
        raise WorkbenchError(f"columns {', '.join(columns)} are not in the sweep's metrics: nothing to draw")
    if scale != 1.0:
        data = data.with_columns(pl.col(c) * scale for c in ("mean", "lo", "hi"))
    order = _objective_order(df["objective"].unique(maintain_order=True).to_list())  # grid order, reference first
    order = [o for o in order if o in set(data["objective"].to_list())]
    colour = alt.Color("objective:N", sort=order, scale=alt.Scale(domain=order))
    scale_type = "symlog" if columns[0] in SYMLOG else "linear"
    base = alt.Chart().encode(x=alt.X("update:Q", title="update"), color=colour)
    band = base.mark_area(opacity=0.18).encode(y=alt.Y("lo:Q", title=axis,
                                                       scale=alt.Scale(zero=False, type=scale_type),
                                                       axis=alt.Axis(format=".3~g")),
                                            y2="hi:Q")
    line = base.mark_line(strokeWidth=1.6).encode(
        y="mean:Q", strokeDash=alt.condition(f"datum.objective == '{ONPOLICY}'", alt.value([4, 2]), alt.value([1, 0])),
        tooltip=["objective:N", "staleness:Q", "update:Q", alt.Tooltip("mean:Q", format=".4g"),
                 alt.Tooltip("lo:Q", title="95% CI lo", format=".4g"),
                 alt.Tooltip("hi:Q", title="95% CI hi", format=".4g")])
    chart = alt.layer(band, line, data=alt.Data(values=data.to_dicts())).properties(width=width, height=height)
    return chart.facet(column=alt.Column("staleness:O", title="staleness")).properties(
        title=alt.TitleParams(text=title or columns[0], subtitle=BAND_TEXT))


def figures(df: pl.DataFrame, *, smooth: int = 10) -> dict[str, alt.TopLevelMixin]:
    """Every chart of ``FIGURES`` whose columns the sweep logged, by file stem."""
    out = {}
    for stem, cols, title, axis, scale in FIGURES:
        if any(c in df.columns for c in cols):
            out[stem] = curve_chart(df, cols, title, smooth=smooth, axis=axis, scale=scale)
    return out


def show_chart(chart: alt.TopLevelMixin, path: str | Path) -> ChartDisplay:
    """Save ``chart`` as PNG at ``path``; return what a notebook cell displays: a ``ChartDisplay``
    (the chart compiled to Vega, which JupyterLab renders with its own Vega, plus that PNG for
    headless runs; nothing is loaded from a CDN, ``workbench.charts.network_refs`` of it is empty)."""
    png = save_png(chart, path)
    return ChartDisplay(chart, png.read_bytes())


# ----------------------------------------------------------------------------- the Markdown
def _mean(row: dict[str, Any], stat: str, scale: float = 100.0, digits: int = 1) -> str:
    v = row[stat]
    return "-" if v is None or math.isnan(v) else f"{scale * v:.{digits}f}"


def markdown_table(table: pl.DataFrame, runs: pl.DataFrame | None = None, *, eval_n: int | None = None) -> str:
    """The objective x staleness table of ``summary_table`` as Markdown (accuracies in points).

    With ``runs`` (``runs_table``, or ``prosperity_intervals.with_last`` of it for the Wilson
    intervals, which also need ``eval_n``) the accuracies carry their intervals (``accuracy_text``)
    and an IQM column is filled from ``IQM_MIN_SEEDS`` seeds; without, they are means over seeds.
    The token fractions, M2 and ESS are means over seeds."""
    cells = {}
    if runs is not None:
        cells = {(r["objective"], r["staleness"]): r for r in cell_intervals(runs, eval_n).iter_rows(named=True)}
    head = ("| staleness | objective | seeds | final acc. (%) | best acc. (%) | IQM final (%) | collapse: seeds, mean "
            "update | zeroed tokens (%) | truncated tokens (%) | M2 | ESS |")
    lines = [head, "|" + "---|" * 11]
    for r in table.iter_rows(named=True):
        c = cells.get((r["objective"], r["staleness"]))
        final, best = ((accuracy_text(c, "final"), accuracy_text(c, "best")) if c
                       else (_mean(r, "final"), _mean(r, "best")))
        iqm = accuracy_text(c, "iqm") if c and r["seeds"] >= IQM_MIN_SEEDS else "-"
        collapse = f"{r['collapsed']} of {r['seeds']}" + (f", {r['collapse']:.0f}" if r["collapsed"] else "")
        lines.append(f"| {r['staleness']} | {r['objective']} | {r['seeds']} | {final} | {best} | {iqm} "
                     f"| {collapse} | {_mean(r, 'zeroed', digits=3)} | {_mean(r, 'truncated', digits=3)} "
                     f"| {_mean(r, 'm2', 1.0, 4)} | {_mean(r, 'ess', 1.0, 3)} |")
    return "\n".join(lines)


def drift_table(table: pl.DataFrame) -> str:
    """Staleness -> ppo_clip's clipped fraction and the mean M2 of its batches (Markdown)."""
    rows = table.filter(pl.col("objective") == "ppo_clip").sort("staleness")
    lines = ["| staleness | ppo_clip clipped tokens (%) | M2 of its batches |", "|---|---|---|"]
    lines += [f"| {r['staleness']} | {100 * r['zeroed']:.2f} | {r['m2']:.4f} |" for r in rows.iter_rows(named=True)]
    lines.append(f"| 256 in the paper | {100 * PAPER_CLIPFRAC:.2f} | |")
    return "\n".join(lines)


def check_lines(checks: list[Check], runs: pl.DataFrame | None = None, staleness: int | None = None,
                eval_n: int | None = None) -> list[str]:
    """One line per statement: holds / does not hold, its evidence, and with ``runs`` (``runs_table``)
    the intervals behind it at ``staleness`` (``check_interval``: whether each difference is resolved)."""
    mark = {True: "holds", False: "**does not hold**", None: "not measured"}
    out = []
    for c in checks:
        why = c.intervals or (check_interval(c.name, runs, staleness, eval_n)
                              if runs is not None and c.holds is not None else "")
        out.append(f"- ({c.name}) {c.statement}: {mark[c.holds]}. {c.evidence}."
                   + (f" Intervals: {why}." if why else "") + (f" Source: {c.source}." if c.source else ""))
    return out


def _describe_base(base: dict[str, Any], steps: int) -> str:
    model = "the built-in model (1.7 M-parameter Llama, warm-started by SFT)" if base.get("model") == "builtin" \
        else f"model `{base.get('model')}`"
    task = base.get("task", "?") + (f" {base['task_params']}" if base.get("task_params") else "")
    return (f"{model} on the `{task}` task, {steps} updates per run, lr {base.get('lr', '?')}, "
            f"{base.get('prompts_per_step', '?')} prompts x {base.get('group_size', '?')} samples per update, "
            f"`{base.get('advantage', '?')}` advantages, temperature {base.get('temperature', '?')}")


def render_markdown(df: pl.DataFrame, *, command: str, base: dict[str, Any] | None = None, figure_dir: str = "",
                    figure_stems: tuple[str, ...] = (), size: str = "", seconds: float | None = None,
                    wall: float | None = None) -> str:
    """The report's text. ``base``: the sweeps' base config (``RunConfig.to_dict()``, as in their
    ``sweep.json``); ``figure_stems`` (of ``FIGURES``) are linked from ``figure_dir``, relative to the report;
    ``wall``: the sweeps' wall time in seconds (``prosperity_sweeps.wall_seconds``; None: not recorded)."""
    runs = with_last(runs_table(df), df)
    table = summary_table(runs)
    matched = drift_matched_staleness(table)
    stale = sorted(s for s in table["staleness"].unique().to_list() if s > 0)
    steps = int(runs["updates"].max())
    eval_n = eval_problems(base)
    seeds = int(runs.group_by("objective", "staleness").len()["len"].max())
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
        f"seeds per cell: {seeds}.",
        f"- Final accuracy is the mean of the last {FINAL_EVALS} held-out evaluations ({_noise_text(eval_n)}). "
        "A run *collapses* when, after its best evaluation, it falls below its starting accuracy.",
        f"- {_interval_text(seeds)}",
    ]
    if seconds is not None:
        out.append(f"- Compute: {seconds / 60:.0f} run-minutes in total.")
    if size in SIZES and SIZES[size].seeds != seeds:  # e.g. a 2-seed sweep read under the 3-seed size
        out.append(f"- These runs have {seeds} seed(s) per cell; size `{size}` now runs {SIZES[size].seeds}: "
                   f"`{command}` adds the missing seeds (complete runs with unchanged configs are reused).")
    counts = runs.group_by("objective", "staleness").len()
    short = counts.filter(pl.col("len") < seeds).sort("staleness", "objective")
    if short.height:  # a stopped or partly failed sweep: say which cells have fewer seeds than the rest
        out.append(f"- Cells with fewer than {seeds} seeds: " + ", ".join(
            f"{r['objective']} at {r['staleness']} ({r['len']})" for r in short.iter_rows(named=True)) + ".")
    if failed:
        out.append(f"- Failed runs (excluded): {', '.join(failed)}.")
    highest = max(stale) if stale else None
    out += ["", results_markdown(runs, eval_n), ""]
    if figure_stems:
        out += ["## Figures", "", "Lines are the mean over seeds, bands the 95% bootstrap interval of that mean "
                "(no band where a cell has one seed); the dashed line is the on-policy reference, repeated in every "
                "panel. Per-update metrics are smoothed over 10 updates.", ""]
        for stem, _, title, _, _ in FIGURES:
            if stem in figure_stems:
                out += [f"### {title}", "", f"![{title}]({figure_dir}/{stem}.png)", ""]
    out += ["## Scale, and what does not reproduce", "", f"The paper: {PAPER}", ""]
    for st in dict.fromkeys(x for x in (highest, matched) if x is not None):
        misses = [c for c in check_claims(table, staleness=st) if c.holds is False]
        if misses:
            out.append(f"- At staleness {st}: " + "; ".join(
                f"({c.name}) does not hold" + (f" ({why})" if (why := check_interval(c.name, runs, st, eval_n)) else "")
                for c in misses) + ".")
        else:
            out.append(f"- At staleness {st}: every statement measured holds (intervals: see the statements above).")
    out += ["", "## What reproduces and what does not", ""]
    for st in dict.fromkeys(x for x in (highest, matched) if x is not None):
        out += reproduce_lines(all_checks(table, runs, st), st) + [""]
    out += ["## Compute", ""] + compute_lines(df, wall)
    return "\n".join(out) + "\n"


def results_markdown(runs: pl.DataFrame, eval_n: int | None, level: str = "##") -> str:
    """The results as Markdown, with their intervals: the four statements at the highest staleness, the
    drift gauge and the statements at the drift-matched staleness, the ranking per staleness, and the
    objective x staleness table. ``runs``: ``with_last(runs_table(df), df)``; ``eval_n``: problems per
    evaluation (``sweeps.results.eval_problems``); ``level``: the headings' Markdown level. The
    report and notebook 05 show the same text."""
    table = summary_table(runs)
    matched = drift_matched_staleness(table)
    stale = sorted(s for s in table["staleness"].unique().to_list() if s > 0)
    highest = max(stale) if stale else None
    out = [f"{level} The four statements at the highest staleness ({highest})", ""]
    out += check_lines(check_claims(table), runs, highest, eval_n)
    out += ["", f"{level} Three more statements at the highest staleness ({highest})", ""]
    out += check_lines(more_checks(runs, highest))
    out += ["", f"{level} How stale is stale: a drift gauge", "",
            "Staleness counts updates, and how far a policy moves in one update depends on the model, the task "
            "and the learning rate. PPO's clipped-token fraction (eps 0.2) measures that distance in the same "
            f"units here and in the paper, where GRPO clipped {100 * PAPER_CLIPFRAC:.2f}% of tokens at staleness "
            "256:", "", drift_table(table), ""]
    if matched is not None and matched != highest:
        out += [f"So this setup's staleness-{matched} data is about as far from the policy as the paper's "
                f"staleness-256 data. The four statements at staleness {matched}:", ""]
        out += check_lines(check_claims(table, staleness=matched), runs, matched, eval_n)
        out += check_lines(more_checks(runs, matched))
    elif matched is not None:
        out.append(f"The highest staleness ({highest}) is also the drift-matched one.")
    out += ["", f"{level} Closest to on-policy", ""] + closest_lines(runs)
    out += ["", f"{level} How stale can I go?", ""] + how_stale_lines(runs)
    out += ["", f"{level} Objective x staleness", "", markdown_table(table, runs, eval_n=eval_n)]
    return "\n".join(out)


def _noise_text(eval_n: int | None) -> str:
    """How noisy one evaluation is: the Wilson 95% interval at 50% accuracy on ``eval_n`` problems."""
    if not eval_n:
        return "problems per evaluation unknown: the sweeps' base config was not given"
    lo, hi = wilson_interval(eval_n / 2, eval_n, CONFIDENCE)
    return (f"{eval_n} problems each; one evaluation at 50% accuracy has a {100 * CONFIDENCE:g}% Wilson interval of "
            f"±{50 * (hi - lo):.1f} points")


def _interval_text(seeds: int) -> str:
    """What the brackets in the table and the statements mean."""
    iqm = ("the IQM column is the interquartile mean over seeds (Agarwal et al. 2021, arXiv:2108.13264) with its "
           "interval" if seeds >= IQM_MIN_SEEDS else
           f"no IQM: it needs at least {IQM_MIN_SEEDS} seeds (below that the 25% trim drops no run and it is the mean)")
    return (f"Brackets are {100 * CONFIDENCE:g}% percentile-bootstrap intervals across seeds ({RESAMPLES:,} "
            "resamples, seed 0): of the mean in the table, of a difference in the statements and the ranking, where a "
            "difference is "
            "*resolved* when its interval excludes 0 (or the statement's threshold). With two seeds the interval of "
            "a mean is the two seeds' range, and with two or three it covers less than 95%. A cell with one seed has "
            "no across-seed interval: `W [lo, hi]` is the Wilson interval of its last evaluation, the binomial "
            f"noise alone. {iqm[0].upper() + iqm[1:]}. In the statements' evidence, +- is half the seeds' range "
            "(max - min) / 2.")


def write_report(df: pl.DataFrame, path: str | Path = "reports/prosperity.md", *, command: str,
                 base: dict[str, Any] | None = None, size: str = "", seconds: float | None = None,
                 wall: float | None = None, log: Callable[[str], None] = print) -> Path:
    """Render the figures next to ``path`` (``<stem>/<figure>.png``) and write the Markdown."""
    path = Path(path)
    fig_dir = path.parent / path.stem
    fig_dir.mkdir(parents=True, exist_ok=True)
    charts = figures(df)
    for stem, chart in charts.items():
        save_png(chart, fig_dir / f"{stem}.png")
    text = render_markdown(df, command=command, base=base, figure_dir=path.stem, figure_stems=tuple(charts), size=size,
                           seconds=seconds, wall=wall)
    atomic_write_text(path, text)
    log(f"report: {path} (figures in {fig_dir})")
    return path


__all__ = ["AXES", "BAND_TEXT", "FIGURES", "results_markdown", "check_lines", "curve_chart", "curve_frame", "figures", "closest_lines", "drift_table",
           "markdown_table", "render_markdown", "show_chart", "write_report"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m workbench report")
