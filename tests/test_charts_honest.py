"""The run charts say what the data says (workbench.charts, workbench.charts.style): the numerical floor
draws on-policy round-off as the metric's exact on-policy value with a note and leaves a real spread
alone; every panel has a title, a y-axis title with its unit, human legend names (raw key in the
tooltip); knob changes are rules on every panel named in one legend, a row per change, never text
over the data; each objective's key statistic gets its panel (with its parameter as a reference
line); smoothing and log axes are options; and bench/live_charts.py still runs.

Rendered axes and legends are read off vl-convert's SVG (the renderer of charts.png), so the tests
check what a reader sees, not only the spec."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import polars as pl
import pytest
import torch
import vl_convert as vlc

from workbench.charts.style import (COUNT, LINEAR, METRICS, PANELS, QUADRATIC, Flat, Metric, apply_floor,
                                   flat_value, floor_note, key_panels, metric, smooth_frame)
from workbench.charts import chart_spec, event_label, spec_and_version
from workbench.errors import WorkbenchError
from workbench.steps.reweight import OBJECTIVES, policy_loss
from workbench.steps.reweight.core import KeyMetric, Param, register_objective

from reweight_helpers import make_context, random_batch

torch.set_num_threads(1)
SVG = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parents[1]
N = 12


def onpolicy_frame(noise: float = 1e-13) -> pl.DataFrame:
    """An on-policy run: every off-policy statistic is its nominal value plus round-off of size ``noise``."""
    wiggle = [noise * math.sin(3.0 * i + 1.0) for i in range(N)]  # deterministic, sign-changing
    return pl.DataFrame({
        "update": list(range(N)),
        "reward/mean": [0.1 + 0.02 * i for i in range(N)],
        "offpolicy/ratio_pos_q05": [1.0 + w for w in wiggle], "offpolicy/ratio_pos_q50": [1.0 - w for w in wiggle],
        "offpolicy/ratio_pos_q95": [1.0 + 2 * w for w in wiggle],
        "offpolicy/m2": [abs(w) for w in wiggle], "offpolicy/m2_after": [abs(w) for w in wiggle],
        "offpolicy/ess_token": [1.0 - abs(w) for w in wiggle], "offpolicy/ess_seq": [1.0 - abs(w) for w in wiggle],
        "offpolicy/kl_k1": [2e-8 * math.sin(i) for i in range(N)], "offpolicy/kl_k3": [abs(w) for w in wiggle],
        "offpolicy/clipfrac": [0.0] * N,
    })


def svg_of(spec: dict) -> ET.Element:
    s, version = spec_and_version(spec)
    return ET.fromstring(vlc.vegalite_to_svg(s, vl_version=version))


def group_texts(svg: ET.Element, label_prefix: str, role: str) -> list[str]:
    """The texts of the ``role`` groups inside the SVG group whose aria-label starts with ``label_prefix``."""
    for g in svg.iter(f"{SVG}g"):
        if (g.get("aria-label") or "").startswith(label_prefix):
            return [t.text or "" for sub in g.iter(f"{SVG}g") if role in (sub.get("class") or "")
                    for t in sub.iter(f"{SVG}text")]
    labels = [g.get("aria-label") for g in svg.iter(f"{SVG}g") if g.get("aria-label")]
    raise AssertionError(f"no SVG group labelled {label_prefix!r} in {labels[:40]}")


def panel_by_title(spec: dict, text: str) -> dict:
    for p in spec["concat"]:
        title = p["title"] if isinstance(p["title"], str) else p["title"]["text"]
        if title == text:
            return p
    raise AssertionError(f"no panel {text!r} in {[p['title'] for p in spec['concat']]}")


# ----------------------------------------------------------------------------- the floor
def test_floor_flattens_onpolicy_round_off_to_the_nominal_value_with_a_note():
    df = onpolicy_frame(1e-13)
    out, flats = apply_floor(df, df.columns[1:])
    expected = {"offpolicy/ratio_pos_q05": 1.0, "offpolicy/ratio_pos_q50": 1.0, "offpolicy/ratio_pos_q95": 1.0,
                "offpolicy/m2": 0.0, "offpolicy/m2_after": 0.0, "offpolicy/ess_token": 1.0, "offpolicy/ess_seq": 1.0,
                "offpolicy/kl_k1": 0.0, "offpolicy/kl_k3": 0.0, "offpolicy/clipfrac": 0.0}
    assert {c: f.value for c, f in flats.items()} == expected and all(f.nominal for f in flats.values())
    for col, value in expected.items():
        assert out[col].to_list() == [value] * N, col  # exactly the nominal value, not 1e-13
    assert out["reward/mean"].to_list() == df["reward/mean"].to_list()  # a real trend is untouched
    assert df["offpolicy/m2"].max() > 0  # pure: the input frame is unchanged
    assert floor_note(["offpolicy/ratio_pos_q05", "offpolicy/ratio_pos_q50"], flats) == \
        "on-policy: ratio = 1 (within float noise)"
    assert floor_note(["offpolicy/m2", "offpolicy/kl_k1"], flats) == "on-policy: M2 = 0, KL = 0 (within float noise)"


def test_floor_leaves_a_real_spread_alone():
    df = onpolicy_frame(1e-3)  # ratios 1 +- 1e-3, M2 up to 1e-3: real drift, far above the noise
    df = df.with_columns(pl.Series("offpolicy/kl_k1", [1e-4 * i for i in range(N)]),
                         pl.Series("offpolicy/clipfrac", [0.0] * (N - 1) + [1 / 4096]))  # one clipped token
    out, flats = apply_floor(df, df.columns[1:])
    assert flats == {} and out.equals(df)


def test_onpolicy_updates_of_an_offpolicy_run_are_drawn_at_the_nominal_value():
    # staleness 0 for 4 updates (M2 ~ 1e-14, k1 ~ 3e-8), then real drift: the round-off points are
    # exactly 0 (a log axis would otherwise show 1e-14 as data), the real ones as logged, no note
    m2 = [1.6e-14, 2.3e-14, 7.1e-15, 5.4e-14, 0.011, 0.02, 0.035]
    k1 = [3.1e-8, -3.8e-9, -8.7e-9, 7.9e-9, 0.004, -0.002, 0.01]
    df = pl.DataFrame({"update": list(range(7)), "offpolicy/m2": m2, "offpolicy/kl_k1": k1})
    out, flats = apply_floor(df, ["offpolicy/m2", "offpolicy/kl_k1"])
    assert flats == {}
    assert out["offpolicy/m2"].to_list() == [0.0] * 4 + m2[4:]
    assert out["offpolicy/kl_k1"].to_list() == [0.0] * 4 + k1[4:]
    panel = panel_by_title(chart_spec(df, log_scale="auto"), "M2 = mean (log r)^2")
    assert panel["title"] == "M2 = mean (log r)^2"  # no note: the column is not flat
    assert panel["layer"][0]["encoding"]["y"]["scale"] == {"zero": False}  # round-off spans no decades
    panel = panel_by_title(chart_spec(df, log_scale=["m2"]), "M2 = mean (log r)^2")
    assert panel["layer"][0]["encoding"]["y"]["scale"] == {"type": "symlog", "constant": 0.011}  # 0 is a value


def test_floor_rule_per_metric_at_its_boundary():
    # the documented rule: within noise * max(1, |nominal|) of the nominal value (per metric), else a
    # spread <= noise * max(1, |mean|) (1e-6 without a nominal value) draws the column as its mean
    ratio, m2, frac = METRICS["offpolicy/ratio_pos_q50"], METRICS["offpolicy/m2"], METRICS["offpolicy/clipfrac"]
    assert (ratio.nominal, ratio.noise, m2.nominal, m2.noise, frac.nominal, frac.noise) == \
        (1.0, LINEAR, 0.0, QUADRATIC, 0.0, COUNT)
    assert flat_value([1.0, 1.0 + 0.9e-6], ratio).value == 1.0
    assert flat_value([1.0, 1.0 + 1.1e-6], ratio) is None
    assert flat_value([0.0, 0.9e-12], m2).value == 0.0
    assert flat_value([0.0, 1e-8], m2) is None  # an M2 of 1e-8 is real: log r ~ 1e-4 is far above round-off
    assert flat_value([0.0, 1e-9], frac) is None  # token fractions are counts: only exact zeros are "0"
    assert flat_value([0.95, 0.95 + 1e-7], ratio) == Flat(0.95, False)  # flat away from 1: its mean, no "on-policy"
    assert flat_value([0.3, 0.3], frac) == Flat(0.3, False)
    entropy = Metric("entropy", "nats per token")
    flat = flat_value([0.5312345, 0.5312345 + 1e-8], entropy)
    assert flat.value == 0.531235 and not flat.nominal  # drawn as its mean, 6 significant digits
    assert flat_value([0.5, 0.5 + 1e-5], entropy) is None
    assert flat_value([float("nan"), None], entropy) is None


def test_onpolicy_chart_draws_exact_values_on_a_readable_axis():
    spec = chart_spec(onpolicy_frame(1e-13))
    rows = spec["datasets"]["metrics"]
    assert {r["offpolicy/m2"] for r in rows} == {0.0} and {r["offpolicy/ess_token"] for r in rows} == {1.0}
    ess = panel_by_title(spec, "effective sample size")
    assert ess["title"]["subtitle"] == "on-policy: ESS = 1 (within float noise)"
    assert ess["layer"][0]["encoding"]["y"]["scale"]["domain"] == [0.5, 1.0]  # not auto-zoomed onto 1 - 1e-14
    labels = group_texts(svg_of(spec), "Y-axis titled 'ESS (fraction of samples)'", "role-axis-label")
    assert len(labels) >= 3 and len(set(labels)) == len(labels)  # never "1, 1, 1, 1"


def test_a_real_small_spread_gets_distinct_tick_labels():
    # ESS between 0.9995 and 1: a real spread the floor keeps; the axis must still tell its ticks apart
    df = pl.DataFrame({"update": list(range(N)), "offpolicy/ess_token": [0.9995 + 4e-5 * i for i in range(N)]})
    labels = group_texts(svg_of(chart_spec(df)), "Y-axis titled 'ESS (fraction of samples)'", "role-axis-label")
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
    assert 0.9995 <= min(map(float, labels)) and max(map(float, labels)) <= 1.0


# ----------------------------------------------------------------------------- titles, units, names
def test_every_panel_has_a_title_an_axis_with_its_unit_and_human_legend_names():
    assert {c for p in PANELS for c in p.columns} <= set(METRICS)  # one table names every drawn key
    drawn = sorted({c for p in PANELS for c in p.columns})
    df = pl.DataFrame({"update": list(range(N)), **{c: [0.1 + 0.01 * i * (j + 1) for i in range(N)]
                                                    for j, c in enumerate(drawn)}})
    spec = chart_spec(df, [{"update": 3, "changes": {"lr": 0.001}}])
    assert len(spec["concat"]) == len(PANELS)
    for p, panel in zip(spec["concat"], PANELS):
        title = p["title"] if isinstance(p["title"], str) else p["title"]["text"]
        enc = p["layer"][0]["encoding"]
        assert title == panel.title and enc["y"]["title"] == panel.axis
        units = {METRICS[c].unit for c in panel.columns}
        assert len(units) == 1 and units.pop() in panel.axis  # one unit per panel, named on its axis
        names = [METRICS[c].name for c in panel.columns]
        assert enc["color"]["field"] == "name" and enc["color"]["scale"]["domain"] == names
        assert len(set(names)) == len(names) and not set(names) & set(panel.columns)  # human names, distinct
        tips = {t["field"]: t for t in enc["tooltip"]}
        assert {"name", "series", "update", "value"} <= set(tips) and tips["series"]["title"] == "key"
        assert enc["x"]["title"] == "update"
    svg = svg_of(spec)
    assert group_texts(svg, "Symbol legend for fill color and stroke color with 2 values: held-out",
                       "role-legend-label") == \
        ["held-out", "train batch"]


def test_legend_names_map_the_raw_keys_in_the_spec_expression():
    spec = chart_spec(onpolicy_frame(1e-3))
    panel = panel_by_title(spec, "KL(mu || pi) estimates")
    calc = panel["layer"][0]["transform"][2]["calculate"]
    assert calc == 'datum.series === "offpolicy/kl_k1" ? "k1 estimate" : "k3 estimate"'


# ----------------------------------------------------------------------------- knob changes
def test_knob_changes_are_rules_on_every_panel_and_one_legend_row_each():
    events = [{"update": 3, "changes": {"staleness": 8}}, {"update": 7, "changes": {"objective": "m2po"}},
              {"update": 9, "changes": {"objective_params": {"tau": 0.08}}}]
    spec = chart_spec(onpolicy_frame(1e-3), events)
    rows = ["update 3: staleness=8", "update 7: objective=m2po", "update 9: tau=0.08"]
    assert spec["datasets"]["knobs"] == [{"update": 3, "label": "staleness=8"},
                                         {"update": 7, "label": "objective=m2po"}, {"update": 9, "label": "tau=0.08"}]
    for p in spec["concat"]:
        rules = [layer for layer in p["layer"] if layer["mark"]["type"] == "rule"]
        assert len(rules) == 1 and rules[0]["data"] == {"name": "knobs"}
        assert rules[0]["encoding"]["stroke"]["scale"]["domain"] == rows
        assert not any(layer["mark"]["type"] == "text" for layer in p["layer"])
    assert "stroke" not in spec["resolve"]["scale"]  # shared: one legend for the whole grid
    # a dtype knob set back to '' (no rounding) says so, not "sampler_logits_dtype="
    assert event_label({"sampler_logits_dtype": "", "top_k": 50}) == "sampler_logits_dtype=exact top_k=50"
    assert event_label({"trainer_logits_dtype": "bf16"}) == "trainer_logits_dtype=bf16"
    svg = svg_of(spec)
    assert group_texts(svg, "Symbol legend titled 'knob changes'", "role-legend-label") == rows
    parents = {child: g for g in svg.iter() for child in g}
    for text in svg.iter(f"{SVG}text"):  # the change labels appear only as legend labels, not over the data
        if "staleness=8" in (text.text or ""):
            assert "role-legend-label" in parents[text].get("class", "")
    rule_marks = [g for g in svg.iter(f"{SVG}g") if {"role-mark", "mark-rule"} <= set((g.get("class") or "").split())]
    assert sum(len(list(g.iter(f"{SVG}line"))) for g in rule_marks) == len(events) * len(spec["concat"])


# ----------------------------------------------------------------------------- key statistics
def _logged_keys(name: str) -> set[str]:
    lp, beh, adv, mask = random_batch(0)
    _, m = policy_loss(name, lp, beh, adv, mask, context=make_context(name, lp, beh, adv, mask))
    return set(m)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_key_metric_declarations_cover_every_objective_that_logs_one(name):
    km = OBJECTIVES.meta(name).get("key_metric")
    logged = _logged_keys(name)
    named = {"offpolicy/truncated_frac": "truncated", "r2vpo/lambda": "lambda",
             "clipcov/selected_frac": "selected", "klcov/selected_frac": "selected"}
    for key in named:
        if key in logged:
            assert km is not None and km.columns[0] == key, f"{name} logs {key} but does not chart it"
    if km is not None:
        assert set(km.columns) <= logged, f"{name} declares columns it does not log: {set(km.columns) - logged}"
        assert all(c in METRICS for c in km.columns)  # named and with a unit in the chart table
        if km.reference is not None:
            assert km.reference in {p.name for p in OBJECTIVES.meta(name)["params"] if p.choices is None}


def test_the_brief_objectives_declare_their_statistic():
    want = {"cispo": ("offpolicy/truncated_frac", None), "tis": ("offpolicy/truncated_frac", None),
            "topr": ("offpolicy/truncated_frac", None), "topr_token": ("offpolicy/truncated_frac", None),
            "m2po": ("offpolicy/m2", "tau"), "bapo": ("offpolicy/pos_share", "rho0"), "r2vpo": ("r2vpo/lambda", None)}
    for name, (col, ref) in want.items():
        km = OBJECTIVES.meta(name)["key_metric"]
        assert (km.columns[0], km.reference) == (col, ref), name


def _run_frame(objective_updates: list[tuple[str, int]], extra) -> pl.DataFrame:
    rows, u = [], 0
    for name, n in objective_updates:
        for _ in range(n):
            rows.append({"update": u, "knob/objective": name, "reward/mean": 0.1 * u, **extra(name, u)})
            u += 1
    return pl.from_dicts(rows, infer_schema_length=None)


def test_m2po_panel_draws_m2_and_tau_only_where_m2po_trained():
    def extra(name, u):  # ipo also has a `tau`: it must not become M2PO's budget
        tau = {"ipo": 0.5, "m2po": 0.04 if u < 7 else 0.02}[name]
        return {"knob/tau": tau, "offpolicy/m2": 0.01 + 0.001 * u,
                **({"offpolicy/m2_after": 0.005 + 0.001 * u} if name == "m2po" else {})}
    df = _run_frame([("ipo", 3), ("m2po", 6)], extra)
    spec = chart_spec(df)
    panel = panel_by_title(spec, "m2po: M2 and its budget tau")
    assert spec["concat"][0] is not panel and spec["concat"][1] is panel  # right after accuracy/reward's first
    assert panel["layer"][0]["transform"][0]["fold"] == ["offpolicy/m2", "offpolicy/m2_after", "ref/m2po/tau"]
    assert [r["ref/m2po/tau"] for r in spec["datasets"]["metrics"]] == [None] * 3 + [0.04] * 4 + [0.02] * 2
    assert panel["layer"][0]["encoding"]["y"]["title"] == "M2 (nats^2)"
    assert panel["layer"][0]["encoding"]["color"]["scale"]["domain"] == ["M2, all tokens", "M2 after masking",
                                                                         "tau (parameter)"]
    assert panel["layer"][0]["encoding"]["strokeDash"]["condition"]["value"] == [6, 3]  # the budget is dashed
    assert not any(p["title"] == "M2 = mean (log r)^2" for p in spec["concat"])  # not drawn twice


@pytest.mark.parametrize("name, column, ref", [("bapo", "offpolicy/pos_share", "rho0"), ("r2vpo", "r2vpo/lambda", None),
                                               ("cispo", "offpolicy/truncated_frac", None),
                                               ("tis", "offpolicy/truncated_frac", None),
                                               ("topr", "offpolicy/truncated_frac", None)])
def test_each_objective_gets_its_key_statistic_panel(name, column, ref):
    default = {p.name: p.default for p in OBJECTIVES.meta(name)["params"]}
    df = _run_frame([("ppo_clip", 2), (name, 5)], lambda o, u: {
        column: (0.3 + 0.05 * u) if o == name else None,
        **({f"knob/{ref}": default[ref]} if ref and o == name else {})})
    panels, refs = key_panels(df)
    assert [p.id for p in panels] == [f"key/{name}"]
    expected = [column] + ([f"ref/{name}/{ref}"] if ref else [])
    assert list(panels[0].columns) == expected and len(refs) == (1 if ref else 0)
    spec = chart_spec(df)
    panel = panel_by_title(spec, panels[0].title)
    assert panel["layer"][0]["transform"][0]["fold"] == expected
    if ref:
        assert [r[f"ref/{name}/{ref}"] for r in spec["datasets"]["metrics"]] == [None] * 2 + [default[ref]] * 5
    assert metric(column).unit in panel["layer"][0]["encoding"]["y"]["title"]


def test_no_key_panel_without_the_statistic_and_explicit_objectives():
    df = pl.DataFrame({"update": [0, 1, 2], "offpolicy/m2": [0.1, 0.2, 0.3]})
    assert key_panels(df) == ([], [])  # no knob/objective column: nothing to key on
    panels, refs = key_panels(df, ["m2po", "ppo_clip"])  # ppo_clip declares none
    assert [p.id for p in panels] == ["key/m2po"] and len(refs) == 1
    spec = chart_spec(df, objectives=["m2po"])
    assert [r["ref/m2po/tau"] for r in spec["datasets"]["metrics"]] == [0.04] * 3  # the registered default


def test_bad_key_metric_registrations_fail_at_import():
    def fn(inp, tau):
        return None
    for km, match in ((KeyMetric(("nope",)), "key_metric.columns"),
                      (KeyMetric(("a/b",), "rho"), "key_metric.reference='rho'"),
                      ("offpolicy/m2", "expected a KeyMetric")):
        with pytest.raises(WorkbenchError, match=re.escape(match)) as err:
            register_objective("never_registered", paper="p", summary="s", params=[Param("tau", 0.1)],
                               key_metric=km)(fn)
        assert "\n" not in str(err.value)
    assert "never_registered" not in OBJECTIVES


# ----------------------------------------------------------------------------- smoothing, log scale
def test_smoothing_is_a_trailing_mean_that_keeps_gaps_and_sparse_points():
    df = pl.DataFrame({"update": [0, 1, 2, 3, 4], "reward/mean": [0.0, 3.0, None, 9.0, 12.0],
                       "eval/accuracy": [0.1, None, None, 0.4, None], "knob/staleness": [0, 0, 8, 8, 8]})
    out = smooth_frame(df, df.columns[1:], 2)
    assert out["reward/mean"].to_list() == [0.0, 1.5, None, 9.0, 10.5]  # (9 + null) / 1 valid, (9 + 12) / 2
    assert out["eval/accuracy"].to_list() == df["eval/accuracy"].to_list()
    assert out["knob/staleness"].to_list() == df["knob/staleness"].to_list()
    assert smooth_frame(df, df.columns[1:], 0).equals(df) and smooth_frame(df, df.columns[1:], 1).equals(df)
    spec = chart_spec(df, smooth=2, title="run")
    assert spec["title"] == {"text": "run", "subtitle": "lines: trailing mean over 2 updates", "anchor": "start"}
    assert [r["reward/mean"] for r in spec["datasets"]["metrics"]] == [0.0, 1.5, None, 9.0, 10.5]
    assert chart_spec(df, title="run")["title"] == "run"  # default: raw values


def test_log_scale_for_panels_spanning_decades():
    df = pl.DataFrame({"update": list(range(5)), "offpolicy/m2": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
                       "offpolicy/kl_k1": [0.0, 1e-4, 1e-3, 1e-2, -1e-1], "reward/mean": [0.1, 0.2, 0.3, 0.4, 0.5]})

    def scales(**kw):
        return {(p["title"] if isinstance(p["title"], str) else p["title"]["text"]):
                p["layer"][0]["encoding"]["y"]["scale"] for p in chart_spec(df, **kw)["concat"]}
    assert all(s == {"zero": False} for s in scales().values())  # default: linear
    auto = scales(log_scale="auto")
    assert auto["M2 = mean (log r)^2"] == {"type": "log"}
    assert auto["KL(mu || pi) estimates"] == {"type": "symlog", "constant": 1e-4}  # a 0 and a negative value
    assert auto["reward"] == {"zero": False}  # 0.1 .. 0.5 spans less than 2 decades
    chosen = scales(log_scale=["reward"])
    assert chosen["reward"] == {"type": "log"} and chosen["M2 = mean (log r)^2"] == {"zero": False}


# ----------------------------------------------------------------------------- the live charts' cost
@pytest.mark.slow  # ~20 s (a subprocess bench run): .ci/run runs it on its own line
def test_bench_live_charts_still_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "live_charts.py"), "--tiny", "--updates", "4",
                           "--block", "2", "--seconds", "0"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    renders = int(re.search(r"(\d+) renders", proc.stdout).group(1))
    ratio = float(re.search(r"ratio with / without: ([0-9.]+)", proc.stdout).group(1))
    assert renders >= 1 and math.isfinite(ratio) and ratio > 0


def test_held_out_accuracy_draws_its_interval_as_error_bars_in_percent():
    frame = pl.DataFrame({"update": [0, 1, 2, 3], "reward/accuracy": [0.2, 0.3, 0.25, 0.4],
                          "eval/accuracy": [None, 0.5, None, 0.625], "eval/accuracy_lo": [None, 0.3, None, 0.4],
                          "eval/accuracy_hi": [None, 0.7, None, 0.8]})
    spec = chart_spec(frame)
    panel = next(p for p in spec["concat"] if p["title"]["text"].startswith("accuracy"))
    bars = [layer for layer in panel["layer"] if layer["encoding"].get("y2")]
    assert len(bars) == 1 and bars[0]["mark"]["type"] == "rule"
    assert bars[0]["encoding"]["y"]["field"] == "eval/accuracy_lo" and bars[0]["encoding"]["y2"]["field"] == "eval/accuracy_hi"
    assert bars[0]["encoding"]["color"] == {"datum": "held-out"}  # the held-out series' colour
    assert "95% interval of held-out" in panel["title"]["subtitle"]
    rows = spec["datasets"]["metrics"]
    assert [(r["eval/accuracy_lo"], r["eval/accuracy_hi"]) for r in rows if r["eval/accuracy_lo"] is not None] == [
        (30.0, 70.0), (40.0, 80.0)]  # scaled like the accuracy itself (%)
    # the bounds are never lines of their own, and without them no bars are drawn
    assert all("accuracy_lo" not in json_layer for json_layer in map(str, (p["layer"][0]["transform"] for p in spec["concat"])))
    plain = chart_spec(frame.drop("eval/accuracy_lo", "eval/accuracy_hi"))
    assert not [l for p in plain["concat"] for l in p["layer"] if l["encoding"].get("y2")]
