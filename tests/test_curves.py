"""Weight curves (workbench.steps.reweight.curves): the autograd curve of every registered objective, and
the analytic weights of the simple objectives derived here in plain Python from their formulas."""

from __future__ import annotations

import math
import re

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import OBJECTIVES
from workbench.steps.reweight.curves import curve_frame, weight_curve, weight_curves

torch.set_num_threads(1)

# ratios on both sides of every default band (0.8 / 1.2, 1 -+ 3e-4, e^-+0.4, m2po's e^-+0.2, dual c = 3)
RATIOS = [0.05, 0.3, 0.7, 0.79, 0.81, 0.95, 0.9999, 1.0, 1.0001, 1.05, 1.19, 1.21, 1.4, 1.6, 2.5, 3.5, 8.0]
GRID = torch.tensor(RATIOS, dtype=torch.float64)


def ppo(lo=0.2, hi=0.2, c=None):
    def w(r, s):
        if (s > 0 and r > 1 + hi) or (s < 0 and r < 1 - lo) or (c is not None and s < 0 and r > c):
            return 0.0
        return r
    return w


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def sapo(r, s, tp=1.0, tn=1.05):
    t = tp if s > 0 else tn
    g = sigmoid(t * (r - 1))
    return 4 * g * (1 - g) * r


def m2po(tau=0.04):
    # a token alone: masked iff in the trust region (A > 0, r > 1 or A < 0, r < 1) and (log r)^2 > tau
    def w(r, s):
        trust = (s > 0 and r > 1) or (s < 0 and r < 1)
        return 0.0 if trust and math.log(r) ** 2 > tau else r
    return w


def geo(lo=0.4, hi=0.4):
    # one-token row: g = exp(pessimistic clip of log r); gradient g unless the token is clipped
    def w(r, s):
        lr = math.log(r)
        return 0.0 if (s > 0 and lr > hi) or (s < 0 and lr < -lo) else r
    return w


ANALYTIC = {
    "reinforce": ({}, lambda r, s: 1.0),
    "is": ({}, lambda r, s: r),
    "ppo_clip": ({}, ppo()),
    "ppo_clip dapo": ({"clip_high": 0.28}, ppo(0.2, 0.28)),
    "dual_clip": ({}, ppo(c=3.0)),
    "cispo": ({}, lambda r, s: min(r, 1.2)),  # clip(r, 1 - 1, 1.2): no lower bound by default
    "cispo eps_low": ({"eps_low": 0.2, "eps_high": 0.3}, lambda r, s: min(max(r, 0.8), 1.3)),
    "tis": ({}, lambda r, s: min(r, 2.0)),
    "tis seq": ({"level": "sequence", "cap": 1.5}, lambda r, s: min(r, 1.5)),  # exact for length 1
    "gspo": ({}, ppo(3e-4, 4e-4)),  # length-1 response: s = r
    "gspo_token": ({"clip_low": 0.1, "clip_high": 0.1}, ppo(0.1, 0.1)),
    "geo_mean": ({}, geo()),
    "sapo": ({}, sapo),
    "topr": ({}, lambda r, s: 1.0 if s > 0 else min(r, 1.0)),
    "m2po": ({}, m2po()),
    "m2po tau": ({"tau": 0.2}, m2po(0.2)),
}


@pytest.mark.parametrize("key", sorted(ANALYTIC))
@pytest.mark.parametrize("sign", [1, -1])
def test_curve_matches_the_analytic_weight(key, sign):
    params, fn = ANALYTIC[key]
    name = key.split()[0]
    got = weight_curve(name, GRID, sign, **params)
    expected = torch.tensor([fn(r, sign) for r in RATIOS], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_registered_objective_has_a_curve(name):
    # the generic autograd path covers every objective, including ones registered later
    curves = weight_curves(name, GRID)
    for sign, w in curves.items():
        assert w.shape == GRID.shape and w.dtype == torch.float64
        assert bool(torch.isfinite(w).all()), (name, sign)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_on_policy_weight_is_one_for_objectives_that_reduce_to_reinforce(name):
    if not OBJECTIVES.meta(name)["reduces_to_reinforce"]:
        pytest.skip("paper does not claim REINFORCE's gradient on-policy")
    for sign in (1, -1):
        assert float(weight_curve(name, torch.tensor([1.0]), sign)[0]) == pytest.approx(1.0, rel=1e-9)


def test_advantage_scale_does_not_change_the_weight_of_linear_objectives():
    a = weight_curve("ppo_clip", GRID, -1)
    b = weight_curve("ppo_clip", GRID, -1, advantage_scale=3.7)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["ppo_clip", "sapo", "gspo", "tis", "topr"])
def test_batched_equals_isolated_for_row_separable_objectives(name):
    for sign in (1, -1):
        torch.testing.assert_close(weight_curve(name, GRID, sign, batched=True), weight_curve(name, GRID, sign),
                                   rtol=1e-12, atol=1e-14)


def test_batched_m2po_is_the_weight_inside_that_batch():
    # in one batch the second-moment budget is shared: fewer tokens need masking than alone
    alone = weight_curve("m2po", GRID, 1)
    together = weight_curve("m2po", GRID, 1, batched=True)
    assert int((together == 0).sum()) <= int((alone == 0).sum())


def test_curve_frame_is_long_and_complete():
    df = curve_frame(["ppo_clip", "cispo"], GRID, params={"ppo_clip": {"clip_high": 0.28}})
    assert df.columns == ["objective", "advantage_sign", "ratio", "weight"]
    assert df.height == 2 * 2 * len(RATIOS)
    row = df.filter((df["objective"] == "ppo_clip") & (df["advantage_sign"] == 1) & (df["ratio"] == 1.21))
    assert row["weight"].to_list() == [pytest.approx(1.21)]  # inside the DAPO band 1.28


@pytest.mark.parametrize("bad, match", [
    (dict(name="nope"), "unknown objective 'nope'"),
    (dict(ratios=torch.tensor([0.5, 0.0])), "ratios must be finite and > 0"),
    (dict(ratios=torch.tensor([[1.0]])), "1-D"),
    (dict(sign=0), "advantage_sign=0"),
    (dict(params={"clip_hihg": 0.3}), "clip_hihg"),
])
def test_bad_input_is_a_one_line_error(bad, match):
    kw = dict(name="ppo_clip", ratios=GRID, sign=1, params={})
    kw.update(bad)
    with pytest.raises(WorkbenchError, match=match) as err:
        weight_curve(kw["name"], kw["ratios"], kw["sign"], **kw["params"])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the explorer's charts (notebook 03)
def _y_axis_ranges(spec) -> list[tuple[float, float]]:
    """(lo, hi) of every panel's y axis as vl-convert renders it (the aria-label Vega writes per axis)."""
    import vl_convert as vlc

    from workbench.charts import spec_and_version

    s, version = spec_and_version(spec)
    svg = vlc.vegalite_to_svg(s, vl_version=version)
    number = r"(-?[\d.e+-]+)"
    axis = "Y-axis titled 'gradient weight w' for a linear scale"
    found = re.findall(rf"{axis} with values from {number} to {number}", svg)
    return [(float(lo), float(hi)) for lo, hi in found]


def test_every_curve_panel_is_scaled_to_its_own_curve_with_one_sign_legend():
    from workbench.ui.curves import SIGNS, CurveExplorer

    names = ["ppo_clip", "tb", "wpo", "reinforce"]
    ex = CurveExplorer(names, points=31, headless=True)
    spec = ex.spec()
    assert spec["resolve"] == {"scale": {"y": "independent"}}
    frame = ex.frame()
    for (lo, hi), name, panel in zip(_y_axis_ranges(spec), names, spec["concat"]):
        enc = panel["layer"][0]["encoding"]
        assert "domain" not in enc["y"]["scale"]  # no fixed range: tb's ~167 is drawn, not clipped away
        w = frame.filter(frame["objective"] == name)["weight"]
        pad = 0.5 * (hi - lo)  # lo, hi: the first and last tick; the (nice) scale reaches a little beyond
        assert lo - pad <= w.min() and w.max() <= hi + pad, (name, lo, hi, w.min(), w.max())
        if w.max() - w.min() > 1e-3:  # a real curve fills a good part of its axis
            assert (w.max() - w.min()) >= 0.3 * (hi - lo), (name, lo, hi)
        assert enc["color"]["scale"]["domain"] == SIGNS == enc["strokeDash"]["scale"]["domain"]
        assert enc["color"]["title"] == enc["strokeDash"]["title"] == "advantage"  # one merged legend
    import vl_convert as vlc

    from workbench.charts import spec_and_version

    s, version = spec_and_version(spec)
    svg = vlc.vegalite_to_svg(s, vl_version=version)
    assert svg.count(">A &gt; 0</text>") == 1 and svg.count(">A &lt; 0</text>") == 1  # one legend for the grid


def test_explorer_starts_on_ppo_clip_with_its_curve_next_to_its_sliders():
    from workbench.ui.curves import CurveExplorer

    ex = CurveExplorer(["is", "m2po", "ppo_clip"], points=21, headless=False)
    assert ex.selected == "ppo_clip" and ex.widgets["objective"].value == "ppo_clip"
    top = ex.box.children[0]
    controls, focus = top.children
    assert focus is ex.widgets["focus"] and ex.widgets["params"] in controls.children  # side by side
    assert focus.spec["title"]["text"] == "ppo_clip"
    assert {r["o"] for r in focus.spec["datasets"]["curves"]} == {"ppo_clip"}
    ex.set_params("ppo_clip", clip_high=0.28)  # a slider move redraws the curve beside it
    assert "clip_high=0.28" in focus.spec["title"]["subtitle"]
    band = [(r["r"], r["w"]) for r in focus.spec["datasets"]["curves"] if r["s"] == "A > 0" and 1.2 < r["r"] < 1.28]
    assert band and all(w == pytest.approx(r) for r, w in band)  # inside the widened band now (0 at clip_high 0.2)
    ex.widgets["objective"].value = "m2po"  # the dropdown
    assert ex.selected == "m2po" and focus.spec["title"]["text"] == "m2po"
    assert [w.description for w in ex.widgets["params"].children][:1] == ["tau"]
    with pytest.raises(WorkbenchError, match="objective='nope'"):
        ex.select("nope")
    assert CurveExplorer(["is", "reinforce"], points=5, headless=True).selected == "is"  # ppo_clip not drawn


def test_drawn_weights_round_off_near_zero_to_zero():
    import polars as pl

    from workbench.ui.curves import _rows

    frame = pl.DataFrame({"objective": ["a"] * 3, "advantage_sign": [1, 1, -1], "ratio": [0.5, 1.0, 2.0],
                          "weight": [3e-17, 1.0, float("nan")]})
    assert [r["w"] for r in _rows(frame, ["a"])] == [0.0, 1.0, None]
