"""The main job: the smallest honest version of the question workbench answers.

    python -m workbench compare          # what ``bash scripts/demo.sh`` runs (the CLI: workbench.cli.compare)

    from workbench.studies import mission
    result = mission.run_mission(mission.base_config(out_dir="runs"))
    print(mission.markdown_table(result.table)); print("\\n".join(result.sentences))

**The question.** Asynchronous RL trains on rollouts from an older policy. Does that hurt, and does
reweighting the stale samples help? The arms (``ARMS``, data): the on-policy run; the same
training on data ``STALENESS`` updates old, uncorrected (``reinforce``: the gradient ignores that
the samples come from another policy; ``workbench.lint`` warns ``stale_ignored`` about exactly this
arm, which is its point); and the same stale data with reweighting rules (``RULES``). At staleness
0 every one of these objectives sees ratios of 1 and computes REINFORCE's gradient, so the on-policy
arm is ``reinforce`` too: it differs from the uncorrected arm in the staleness alone.

**What runs.** The arms are run by ``workbench.sweeps.sweep`` on the local pool (one thread per run,
as many runs side by side as there are cores). A sweep is a cross product, so ``sweep_grids``
covers the arms with the fewest rectangles of staleness x objective: ``reinforce`` at staleness 0
and S, then the rules at S (on 2 cores: two rounds for 4 arms, three for 5, the fewest possible).
``<out_dir>/<name>/`` then holds one sweep folder per grid (each run's own directory under its
``runs/``), ``mission.png`` (``figure_spec``), ``mission.md``, ``mission.csv`` and ``mission.parquet``
(``mission_table``). Re-running the same command skips the finished runs.

**Statistics.** Final accuracy is the run's last held-out evaluation (``eval_size`` problems, at
update ``steps``). One seed per arm: its Wilson 95% interval (``workbench.stats.wilson_interval``),
and a difference of two arms gets Newcombe's hybrid score interval built from the two Wilson
intervals (``workbench.stats.wilson_difference``): evaluation noise only, not how far another seed would land. Two
or more seeds: the percentile bootstrap across seeds (``bootstrap_ci``, ``difference_interval``).
Each printed comparison says whether its interval excludes 0 (``describe_difference``). The figure's
bands are the Wilson interval of each evaluation (with several seeds: of their pooled problems).
Clipped / masked / truncated fractions (tokens whose gradient a rule zeroed by clipping or masking,
or whose weight it capped), M2 = mean (log r)^2 and the token ESS are means over updates (and
seeds); an objective that does not report a fraction never does that operation, and counts 0.

**Scale** (``base_config``): the built-in default (model, task, 32 prompts x 8, lr 2e-4) with
``STEPS`` updates instead of 300, to fit the 5-minute budget on 2 cores, and ``measure_mismatch``
off (a diagnostic forward of every stale batch, about a quarter of an update, that no panel here
uses). The numbers, the time and why these values are in README.md, "The main job".

Left out: staleness grids, several tasks, paired per-problem intervals (the loop logs the accuracy of
an evaluation, not which problems it got right; Newcombe's interval treats the two evaluations as
independent, which is conservative when the same problems are easy for both arms).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from workbench.charts import HEIGHT, WIDTH, save_png
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.runs.rundir import atomic_write_parquet, atomic_write_text
from workbench.stats import (Interval, bootstrap_ci, describe_difference, difference_interval, wilson_difference,
                             wilson_interval)
from workbench.steps.reweight import OBJECTIVES
from workbench.sweeps import RUNS_FILE, read_sweep, sweep

STALENESS = 16  # the fixed lag of the stale arms (README.md, "The main job": why 16)
UNCORRECTED = "reinforce"  # the gradient that ignores the behaviour policy
RULES = ("ppo_clip", "m2po")  # the reweighting rules compared (README.md, "The main job": why these)
STEPS = 60  # updates per arm (300 is the single run's default; README.md, "The main job": why 60)
EVAL_EVERY = 10
CONFIDENCE = 0.95
FINAL = "summary/eval/final_accuracy"
INITIAL = "summary/eval/initial_accuracy"
# (panel, metric columns summed, title); the accuracy panel comes first and carries the bands
PANELS = (("accuracy", ("eval/accuracy",), "held-out accuracy (95% Wilson band of each evaluation)"),
          ("acted", ("offpolicy/clipfrac", "offpolicy/masked_frac", "offpolicy/truncated_frac"),
           "tokens clipped, masked or truncated"),
          ("m2", ("offpolicy/m2",), "M2 = mean (log r)^2 (symlog axis)"),
          ("ess", ("offpolicy/ess_token",), "ESS (token, fraction)"))
FRACTIONS = {"clipped": "offpolicy/clipfrac", "masked": "offpolicy/masked_frac",
             "truncated": "offpolicy/truncated_frac"}


@dataclass(frozen=True)
class Arm:
    """One arm: the staleness its data has and the objective that trains on it."""

    label: str
    staleness: int
    objective: str


def arms(staleness: int = STALENESS, rules: tuple[str, ...] = RULES) -> tuple[Arm, ...]:
    """On-policy, stale uncorrected, and stale with each rule (validated: one-line errors)."""
    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 1:
        raise WorkbenchError(f"staleness={staleness!r} is invalid: expected an int >= 1 (the stale arms' lag; "
                             "the on-policy arm is staleness 0)")
    if not rules or len(set(rules)) != len(rules) or UNCORRECTED in rules:
        raise WorkbenchError(f"rules={list(rules)!r} is invalid: expected distinct objectives other than "
                             f"{UNCORRECTED} (the uncorrected arm runs anyway)")
    for r in rules:
        OBJECTIVES.entry(r)  # an unknown name: the registry's one line with the valid names
    return (Arm("on-policy", 0, UNCORRECTED), Arm("stale uncorrected", staleness, UNCORRECTED),
            *(Arm(f"stale + {r}", staleness, r) for r in rules))


ARMS = arms()


def base_config(**fields: Any) -> RunConfig:
    """The built-in default at the mission's scale (module docstring); ``fields`` override it."""
    return RunConfig(**{"steps": STEPS, "eval_every": EVAL_EVERY, "measure_mismatch": False,
                        "prefill_to_steps": True, **fields})  # the same updates, no batch generated in vain


def sweep_grids(arm_list: tuple[Arm, ...]) -> list[dict[str, list[Any]]]:
    """Staleness x objective grids whose cells are exactly the arms: greedily, the larger of the
    arms sharing the first left arm's objective or its staleness (every arm is in one grid)."""
    left, grids = list(arm_list), []
    while left:
        first = left[0]
        same_obj = [a for a in left if a.objective == first.objective]
        same_lag = [a for a in left if a.staleness == first.staleness]
        block = same_obj if len(same_obj) >= len(same_lag) else same_lag
        grids.append({"staleness": list(dict.fromkeys(a.staleness for a in block)),
                      "objective": list(dict.fromkeys(a.objective for a in block))})
        left = [a for a in left if a not in block]
    return grids


def grid_folder(grid: dict[str, list[Any]]) -> str:
    """``reinforce-by-staleness`` or ``staleness16-by-objective``: what the grid varies."""
    if len(grid["objective"]) == 1 and len(grid["staleness"]) > 1:
        return f"{grid['objective'][0]}-by-staleness"
    return f"staleness{'-'.join(map(str, grid['staleness']))}-by-objective"


@dataclass
class Mission:
    """What ``run_mission`` produced: the per-arm table, the comparison sentences, the files written
    (empty when a run failed) and the runs that failed (``cell: error``)."""

    table: pl.DataFrame | None
    sentences: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_mission(base: RunConfig | None = None, arm_list: tuple[Arm, ...] = ARMS, seeds: int = 1, *,
                name: str = "mission", workers: int | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> Mission:
    """Run (or resume) every arm x seed under ``<base.out_dir>/<name>/``, then write the figure and the table."""
    t0 = time.perf_counter()
    base = base if base is not None else base_config()
    if not base.out_dir:
        raise WorkbenchError("out_dir='' is invalid here: the comparison writes its runs, figure and table")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise WorkbenchError(f"seeds={seeds!r} is invalid: expected an int >= 1")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._=+\-]+", name) or name in (".", ".."):
        raise WorkbenchError(f"name={name!r} is invalid: expected one folder name of letters, digits and ._=+-")
    study = Path(base.out_dir) / name
    frames, runs = [], []
    for grid in sweep_grids(arm_list):
        folder = study / grid_folder(grid)
        sweep(base, grid, seeds, workers=workers, threads_per_run=1, name=name, sweep_dir=folder,
              progress=progress, log=log)
        frames.append(read_sweep(folder))
        runs.append(pl.read_parquet(folder / RUNS_FILE))
    metrics, cells = (pl.concat(frames, how="diagonal_relaxed"), pl.concat(runs, how="diagonal_relaxed"))
    bad = cells.filter(pl.col("status") != "ok")
    failed = [f"{r}: {e}" for r, e in zip(bad["run"].to_list(), bad["error"].to_list())]
    if failed:
        return Mission(None, [], failed=failed, seconds=time.perf_counter() - t0)
    cells, metrics = with_arms(cells, arm_list), with_arms(metrics, arm_list)
    table = mission_table(cells, metrics, arm_list)
    sentences = comparisons(cells, arm_list)
    files = {"figure": study / "mission.png", "markdown": study / "mission.md", "csv": study / "mission.csv",
             "parquet": study / "mission.parquet"}
    save_png(figure_spec(curves(cells, metrics), arm_list, title=figure_title(base, arm_list, seeds)),
             files["figure"], scale=2.0)
    atomic_write_parquet(table, files["parquet"])
    atomic_write_text(files["csv"], table.write_csv())
    atomic_write_text(files["markdown"], f"# {figure_title(base, arm_list, seeds)}\n\n{markdown_table(table)}\n\n"
                      + "\n".join(f"- {s}" for s in sentences) + f"\n\n![figure]({files['figure'].name})\n")
    return Mission(table, sentences, files, seconds=time.perf_counter() - t0)


def with_arms(df: pl.DataFrame, arm_list: tuple[Arm, ...]) -> pl.DataFrame:
    """``df`` (sweep rows with ``staleness`` and ``objective``) with the ``arm`` label of each row."""
    key = {(a.staleness, a.objective): a.label for a in arm_list}
    labels = [key.get((int(s), o)) for s, o in zip(df["staleness"].to_list(), df["objective"].to_list())]
    return df.with_columns(pl.Series("arm", labels, dtype=pl.String))


def figure_title(base: RunConfig, arm_list: tuple[Arm, ...], seeds: int) -> str:
    lag = max(a.staleness for a in arm_list)
    return (f"on-policy vs staleness {lag}: {base.steps} updates, {seeds} seed(s) per arm, "
            f"{base.prompts_per_step} prompts x {base.group_size}, held-out n = {base.eval_size}")


# ----------------------------------------------------------------------------- the table
def final_interval(finals: list[float], n: int, confidence: float = CONFIDENCE) -> tuple[Interval, str]:
    """The final accuracy of an arm with its interval: Wilson for one seed, bootstrap across seeds."""
    if len(finals) == 1:
        lo, hi = wilson_interval(finals[0] * n, n, confidence)
        return Interval(finals[0], lo, hi), "wilson"
    return bootstrap_ci(finals, "mean", confidence), "bootstrap"


def _mean(df: pl.DataFrame, col: str) -> float:
    """Mean of a per-update column over the rows; 0.0 when absent or never reported (module docstring)."""
    if col not in df.columns:
        return 0.0
    v = df[col].cast(pl.Float64).drop_nulls().drop_nans()
    return float(v.mean()) if len(v) else 0.0


def _arm_cells(cells: pl.DataFrame, arm: Arm) -> pl.DataFrame:
    return cells.filter(pl.col("arm") == arm.label).sort("seed")


def mission_table(cells: pl.DataFrame, metrics: pl.DataFrame, arm_list: tuple[Arm, ...]) -> pl.DataFrame:
    """One row per arm: final held-out accuracy with its interval, the fractions, mean M2 and ESS."""
    rows = []
    for arm in arm_list:
        mine = _arm_cells(cells, arm)
        finals, n = [float(f) for f in mine[FINAL].to_list()], int(mine["eval_n"][0])
        est, kind = final_interval(finals, n)
        per_run = [metrics.filter(pl.col("run") == r) for r in mine["run"].to_list()]

        def over_runs(col: str) -> float:
            return sum(_mean(m, col) for m in per_run) / len(per_run)

        rows.append({"arm": arm.label, "staleness": arm.staleness, "objective": arm.objective,
                     "seeds": len(finals), "eval_n": n, "initial_accuracy": float(mine[INITIAL].mean()),
                     "final_accuracy": est.estimate, "final_lo": est.lo, "final_hi": est.hi, "interval": kind,
                     **{f"{k}_frac": over_runs(c) for k, c in FRACTIONS.items()},
                     "mean_m2": over_runs("offpolicy/m2"), "mean_ess": over_runs("offpolicy/ess_token"),
                     "run_dirs": ";".join(mine["run_dir"].to_list())})
    return pl.from_dicts(rows, infer_schema_length=None)


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def markdown_table(table: pl.DataFrame) -> str:
    """The table as Markdown: fractions in percent of tokens, M2 and ESS as numbers."""
    lines = ["| arm | staleness | objective | final held-out accuracy [95% CI] | clipped | masked | truncated "
             "| mean M2 | mean ESS |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.iter_rows(named=True):
        ci = f"[{_pct(r['final_lo'])}, {_pct(r['final_hi'])}]" if math.isfinite(r["final_lo"]) else "[no interval]"
        lines.append(f"| {r['arm']} | {r['staleness']} | `{r['objective']}` | **{_pct(r['final_accuracy'])}** {ci} "
                     f"| {_pct(r['clipped_frac'], 2)} | {_pct(r['masked_frac'], 2)} | {_pct(r['truncated_frac'], 2)} "
                     f"| {r['mean_m2']:.3g} | {r['mean_ess']:.3f} |")
    return "\n".join(lines)


def interval_note(table: pl.DataFrame) -> str:
    """What the table's intervals and the comparisons' intervals are."""
    n = int(table["eval_n"][0])
    if int(table["seeds"].min()) == 1:
        return (f"intervals: 95% Wilson interval of one evaluation on n = {n} held-out problems; a difference gets "
                "Newcombe's interval from the two Wilson intervals. Evaluation noise only: another seed would "
                "land elsewhere (--seeds 3 adds the bootstrap across seeds)")
    return "intervals: 95% percentile bootstrap across seeds (of the mean; of the difference of the means)"


# ----------------------------------------------------------------------------- the comparisons
def comparison_pairs(arm_list: tuple[Arm, ...]) -> list[tuple[Arm, Arm]]:
    """(A, B) pairs compared as A - B: the uncorrected arm vs on-policy, then every rule vs the
    uncorrected arm and vs on-policy."""
    onpolicy, uncorrected, rules = arm_list[0], arm_list[1], arm_list[2:]
    return ([(uncorrected, onpolicy)] + [(r, uncorrected) for r in rules] + [(r, onpolicy) for r in rules])


def difference(cells: pl.DataFrame, a: Arm, b: Arm, confidence: float = CONFIDENCE) -> Interval:
    """Final accuracy of A minus B: Newcombe's interval for one seed each, else the bootstrap across seeds."""
    ca, cb = _arm_cells(cells, a), _arm_cells(cells, b)
    fa, fb = [float(x) for x in ca[FINAL].to_list()], [float(x) for x in cb[FINAL].to_list()]
    if len(fa) == 1 and len(fb) == 1:
        return wilson_difference(fa[0], int(ca["eval_n"][0]), fb[0], int(cb["eval_n"][0]), confidence)
    return difference_interval(fa, fb, confidence)


def comparisons(cells: pl.DataFrame, arm_list: tuple[Arm, ...]) -> list[str]:
    """One sentence per pair: the difference in points and whether its interval excludes 0."""
    out = []
    for a, b in comparison_pairs(arm_list):
        d = difference(cells, a, b)
        out.append(f"{a.label} - {b.label}: {100 * d.estimate:+.1f} points; "
                   + describe_difference(a.label, b.label, d, confidence=CONFIDENCE, scale=100, digits=1,
                                         unit=" points"))
    return out


# ----------------------------------------------------------------------------- the figure
def curves(cells: pl.DataFrame, metrics: pl.DataFrame) -> pl.DataFrame:
    """Long frame (arm, panel, update, value, lo, hi): per ``PANELS`` entry, the mean over seeds at each
    update (1-based: the updates done); accuracy with the initial evaluation at 0 and Wilson bounds."""
    ok = metrics.filter(pl.col("status") == "ok").with_columns((pl.col("update") + 1).alias("x"))
    parts = []
    for panel, cols, _ in PANELS:
        present = [c for c in cols if c in ok.columns]
        if not present:
            continue
        value = pl.sum_horizontal([pl.col(c).cast(pl.Float64).fill_nan(None).fill_null(0.0) for c in present])
        rows = ok
        if panel == "accuracy":
            rows = ok.filter(pl.col("eval/accuracy").is_not_null())
            start = cells.select("arm", "run", pl.lit(0).cast(ok["x"].dtype).alias("x"),
                                 pl.col(INITIAL).cast(pl.Float64).alias("eval/accuracy"))
            rows = pl.concat([rows.select(start.columns), start], how="vertical_relaxed")
        long = rows.group_by("arm", "x").agg(value.mean().alias("value"), pl.len().alias("seeds"))
        parts.append(long.with_columns(pl.lit(panel).alias("panel")))
    out = pl.concat(parts, how="diagonal_relaxed").sort("panel", "arm", "x")
    n = cells.group_by("arm").agg(pl.col("eval_n").first())
    out = out.join(n, on="arm", how="left")
    acc = out.filter(pl.col("panel") == "accuracy")
    trials = (acc["eval_n"] * acc["seeds"]).to_numpy().astype(float)  # pooled problems of the seeds
    lo, hi = wilson_interval(acc["value"].to_numpy() * trials, trials, CONFIDENCE)
    bands = acc.select("panel", "arm", "x").with_columns(pl.Series("lo", lo), pl.Series("hi", hi))
    return out.join(bands, on=["panel", "arm", "x"], how="left").drop("eval_n")


def figure_spec(frame: pl.DataFrame, arm_list: tuple[Arm, ...], title: str = "") -> dict[str, Any]:
    """One figure as a Vega-Lite dict: accuracy with its bands on top, the three diagnostics below."""
    order = [a.label for a in arm_list]
    color = {"field": "arm", "type": "nominal", "sort": order, "scale": {"domain": order},
             "legend": {"title": None, "orient": "top", "direction": "horizontal", "symbolType": "stroke",
                        "symbolOpacity": 1, "symbolStrokeWidth": 3, "labelFontSize": 12}}  # not the bands' opacity
    x = {"field": "update", "type": "quantitative", "title": "updates", "axis": {"format": "d", "tickCount": 8}}
    rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in frame.rename({"x": "update"}).to_dicts()]

    def panel(name: str, ttl: str, width: int, height: int) -> dict[str, Any]:
        scale = {"type": "symlog", "constant": 0.1} if name == "m2" else {"zero": False}  # M2 spans 1e-13 to 10+
        axis = {"format": ".0%" if name in ("accuracy", "acted") else ".3~g"}
        if name == "m2":
            axis["values"] = [0, 0.1, 0.3, 1, 3, 10, 30]
        y = {"field": "value", "type": "quantitative", "title": None, "scale": scale, "axis": axis}
        line = {"mark": {"type": "line", "strokeWidth": 1.5, "point": name == "accuracy"},
                "encoding": {"x": x, "y": y, "color": color}}
        layers = [line]
        if name == "accuracy":
            band = {"mark": {"type": "area", "opacity": 0.15},
                    "encoding": {"x": x, "y": {"field": "lo", "type": "quantitative"}, "y2": {"field": "hi"},
                                 "color": color}}
            layers = [band, line]
        return {"title": ttl, "width": width, "height": height,
                "transform": [{"filter": {"field": "panel", "equal": name}}], "layer": layers}

    titles = {p: t for p, _, t in PANELS}
    small = [panel(p, titles[p], WIDTH, HEIGHT) for p in ("acted", "m2", "ess")]
    top = panel("accuracy", titles["accuracy"], 3 * WIDTH + 80, 2 * HEIGHT)
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": title,
            "data": {"values": rows}, "vconcat": [top, {"hconcat": small}],
            "config": {"view": {"continuousWidth": WIDTH, "continuousHeight": HEIGHT}}}


__all__ = ["ARMS", "Arm", "CONFIDENCE", "EVAL_EVERY", "Mission", "PANELS", "RULES", "STALENESS", "STEPS",
           "UNCORRECTED", "arms", "base_config", "comparison_pairs", "comparisons", "curves", "difference",
           "figure_spec", "final_interval", "grid_folder", "interval_note", "markdown_table", "mission_table",
           "run_mission", "sweep_grids", "wilson_difference", "with_arms"]
