"""The intervals and sentences of a same-batch replay (workbench.studies.replay_report) on synthetic
replay tables: every verdict from hand-computed intervals, sentences that claim a direction only
when the interval shows one, the JSON summary, the chart's layers and bad input.

With two repeats the percentile bootstrap of a mean has the two values themselves as its bounds
(each resample's mean is one of them with probability 1/4, far above the 2.5% tail), and the
unpaired difference of two such means has [min a - max b, max a - min b]: the tests compare with
those closed forms."""

from __future__ import annotations

import json
import math
import random

import polars as pl
import pytest

from workbench.errors import WorkbenchError
from workbench.studies.replay import REPEATS, same_batch_replay
from workbench.studies.replay_report import (FRESH_ROW, replay_chart, replay_findings, replay_intervals,
                                             replay_summary, replay_verdict)

FLOOR = [0.30, 0.40]


def make_table(cosines: dict[str, list[float]], floor: list[float] = FLOOR, norms: dict[str, float] | None = None):
    """A long replay table: one row per repeat and objective, the floor rows last in each repeat."""
    norms = norms or {}
    rows = []
    for r, f in enumerate(floor):
        for name, values in {**cosines, FRESH_ROW: floor}.items():
            c = values[r]
            norm = norms.get(name, 0.0 if math.isnan(c) else 0.5 + r)
            rows.append({"repeat": r, "objective": name, "grad_norm": norm, "cosine_to_onpolicy": c,
                         "silenced_frac": 1.0 if norm == 0 else 0.25 * r, "clipfrac": 0.1, "masked_frac": 0.0,
                         "ess_token": 0.8 + 0.1 * r, "staleness": 3, "sequences": 32, "onpolicy_sequences": 128,
                         "signal_tokens": 10 + r})
    return pl.DataFrame(rows)


CASES = {  # objective: (its two cosines, the verdict the closed-form intervals give against FLOOR)
    "against": ([-0.30, -0.20], "against"),
    "unresolved": ([-0.10, 0.10], "unresolved"),
    "below": ([0.10, 0.15], "below_floor"),
    "level": ([0.30, 0.38], "level_with_floor"),
    "above": ([0.60, 0.70], "above_floor"),
    "silent": ([math.nan, math.nan], "no_gradient"),
}


def by_name(frame: pl.DataFrame) -> dict[str, dict]:
    return {r["objective"]: r for r in frame.iter_rows(named=True)}


def test_two_repeat_intervals_are_the_closed_forms():
    iv = by_name(replay_intervals(make_table({k: v for k, (v, _) in CASES.items()})))
    assert list(iv) == list(CASES) + [FRESH_ROW]
    for name, (values, _) in CASES.items():
        row = iv[name]
        if math.isnan(values[0]):
            assert row["directed"] == 0 and math.isnan(row["cosine"]) and math.isnan(row["minus_floor_lo"])
            continue
        assert row["repeats"] == 2 and row["directed"] == 2
        assert row["cosine"] == pytest.approx(sum(values) / 2, rel=1e-12)
        assert (row["cosine_lo"], row["cosine_hi"]) == pytest.approx((min(values), max(values)), rel=1e-12)
        assert row["minus_floor"] == pytest.approx(sum(values) / 2 - sum(FLOOR) / 2, rel=1e-12)
        assert row["minus_floor_lo"] == pytest.approx(min(values) - max(FLOOR), rel=1e-9)
        assert row["minus_floor_hi"] == pytest.approx(max(values) - min(FLOOR), rel=1e-9)
    floor = iv[FRESH_ROW]
    assert (floor["cosine"], floor["cosine_lo"], floor["cosine_hi"]) == pytest.approx((0.35, 0.30, 0.40), rel=1e-12)
    assert math.isnan(floor["minus_floor"])
    assert iv["level"]["grad_norm"] == pytest.approx(1.0) and iv["level"]["ess_token"] == pytest.approx(0.85)
    assert iv["level"]["silenced_frac"] == pytest.approx(0.125)


@pytest.mark.parametrize("name", list(CASES))
def test_each_verdict_and_its_sentence(name):
    values, verdict = CASES[name]
    iv = replay_intervals(make_table({name: values}))
    row = by_name(iv)[name]
    assert replay_verdict(row) == verdict
    floor_line, sentence = replay_findings(iv)
    assert floor_line.startswith("noise floor: a fresh on-policy batch of the stale batch's size reaches cosine "
                                 "0.35 [0.30, 0.40]") and "lower bound" in floor_line  # two repeats: too narrow
    expected = {
        "against": "cosine of against to the on-policy gradient: -0.25 [-0.30, -0.20], fresh-batch noise floor "
                   "0.35 [0.30, 0.40]: the interval lies below 0: points against the on-policy gradient",
        "unresolved": "cosine of unresolved to the on-policy gradient: 0.00 [-0.10, 0.10], fresh-batch noise floor "
                      "0.35 [0.30, 0.40]: the interval includes 0: no direction resolved",
        "below": "cosine of below to the on-policy gradient: 0.12 [0.10, 0.15], fresh-batch noise floor 0.35 "
                 "[0.30, 0.40]: above 0 but below the floor: keeps part of the direction, less than a fresh batch",
        "level": "cosine of level to the on-policy gradient: 0.34 [0.30, 0.38], fresh-batch noise floor 0.35 "
                 "[0.30, 0.40]: above 0, its difference to the floor not resolved: keeps the direction",
        "above": "cosine of above to the on-policy gradient: 0.65 [0.60, 0.70], fresh-batch noise floor 0.35 "
                 "[0.30, 0.40]: above 0 and above the floor: keeps the direction, more than a fresh batch",
        "silent": "silent: zero gradient on every batch (everything silenced): no direction to compare",
    }
    assert sentence == expected[name]


def test_one_repeat_has_no_interval_and_claims_no_direction():
    iv = replay_intervals(make_table({"m2po": [0.9]}, floor=[0.4]))
    row = by_name(iv)["m2po"]
    assert row["cosine"] == pytest.approx(0.9) and math.isnan(row["cosine_lo"]) and math.isnan(row["cosine_hi"])
    assert replay_verdict(row) == "no_interval"
    lines = replay_findings(iv)
    assert "not resolved above 0" in lines[1]  # nor is the floor
    assert lines[-1].endswith("0.90, fresh-batch noise floor 0.40: one repeat, no interval: no direction resolved")


def test_a_floor_without_interval_and_an_unresolved_floor():
    iv = replay_intervals(make_table({"is": [0.5, 0.6]}, floor=[0.4, math.nan]))
    assert replay_verdict(by_name(iv)["is"]) == "above_zero"  # above 0; nothing to compare with
    assert replay_findings(iv)[-1].endswith("above 0 (the floor has no interval): keeps the direction")
    lines = replay_findings(replay_intervals(make_table({"is": [0.5, 0.6]}, floor=[-0.05, 0.10])))
    assert lines[1].startswith("the floor itself is not resolved above 0")


def test_sentences_claim_a_direction_only_where_the_interval_shows_one():
    """Random tables of 2-7 repeats: 'keeps' needs lo > 0, 'against' needs hi < 0, 'no direction
    resolved' needs an interval including 0 (or none), and 'below / above the floor' needs the
    difference interval to exclude 0 on that side."""
    rng = random.Random(7)
    for trial in range(40):
        r = rng.randint(2, 7)
        centres = {f"o{i}": rng.uniform(-0.6, 0.9) for i in range(5)}
        cos = {k: [c + rng.gauss(0, rng.choice([0.02, 0.2])) for _ in range(r)] for k, c in centres.items()}
        floor = [0.35 + rng.gauss(0, 0.05) for _ in range(r)]
        iv = by_name(replay_intervals(make_table(cos, floor=floor), seed=trial))
        lines = replay_findings(replay_intervals(make_table(cos, floor=floor), seed=trial))
        assert ("lower bound" in lines[0]) == (r < 5)
        for name, sentence in zip(cos, lines[-len(cos):]):
            row = iv[name]
            assert sentence.startswith(f"cosine of {name} ")
            eps = 1e-12  # a mean of equal values may round one ulp past them
            assert min(cos[name]) - eps <= row["cosine_lo"] <= row["cosine"] <= row["cosine_hi"] <= max(cos[name]) + eps
            if "keeps" in sentence:
                assert row["cosine_lo"] > 0, sentence
            if "against" in sentence:
                assert row["cosine_hi"] < 0, sentence
            if "no direction resolved" in sentence:
                assert row["cosine_lo"] <= 0 <= row["cosine_hi"], sentence
            if "below the floor" in sentence:
                assert row["minus_floor_hi"] < 0, sentence
            if "above the floor" in sentence:
                assert row["minus_floor_lo"] > 0, sentence
            if row["cosine_lo"] <= 0 <= row["cosine_hi"]:
                assert "no direction resolved" in sentence and "keeps" not in sentence


def test_summary_is_json_and_matches_the_intervals():
    table = make_table({k: v for k, (v, _) in CASES.items()})
    s = json.loads(json.dumps(replay_summary(table)))
    iv = by_name(replay_intervals(table))
    assert s["objectives"] == list(CASES) and s["repeats"] == 2 and s["staleness"] == 3
    assert s["signal_tokens"] == 10 + 11  # over both stale batches
    assert s["verdicts"] == {k: v for k, (_, v) in CASES.items()}
    assert s["cosine_to_onpolicy"]["level"] == pytest.approx(0.34) and s["cosine_interval"]["level"] == [0.30, 0.38]
    assert math.isnan(s["cosine_to_onpolicy"]["silent"]) and s["grad_norm"]["silent"] == 0.0
    assert s["fresh_batch_cosine"] == pytest.approx(0.35) and s["fresh_batch_interval"] == pytest.approx([0.30, 0.40])
    assert s["findings"] == replay_findings(replay_intervals(table))
    assert s["ess_token"] == pytest.approx(0.85) and iv["above"]["cosine"] == pytest.approx(0.65)


def _values(spec, layer, panel=None):
    """The rows a layer draws: its own data or, when every layer shares them, its panel's (Altair
    lifts shared data up, and may move inline data to the spec's named datasets)."""
    data = layer.get("data") or (panel or {}).get("data")
    return data["values"] if "values" in data else spec["datasets"][data["name"]]


def _layers(spec):
    for panel in spec["hconcat"]:
        yield from ((layer, panel) for layer in panel.get("layer", [panel]))


def test_chart_draws_every_objective_the_floor_band_and_a_log_norm_axis():
    table = make_table({"tb": [0.1, 0.2], "m2po": [0.0, 0.1], "silent": [math.nan, math.nan]},
                       norms={"tb": 692.0, "m2po": 0.2, "silent": 0.0})
    spec = replay_chart(table).to_dict(validate=False)
    cosine, norm = spec["hconcat"][:2]
    rect = [layer for layer in cosine["layer"] if layer["mark"]["type"] == "rect"]
    assert len(rect) == 1 and _values(spec, rect[0])[0]["cosine_lo"] == pytest.approx(0.30)
    assert _values(spec, rect[0])[0]["cosine_hi"] == pytest.approx(0.40)
    assert norm["layer"][0]["encoding"]["x"]["scale"]["type"] == "log"
    points = [(layer, panel) for layer, panel in _layers(spec) if layer["mark"]["type"] == "point"]
    values = _values(spec, *points[1])  # the gradient-norm points
    assert [v["objective"] for v in values] == ["tb", "m2po", "silent"]
    assert [v["grad_norm_log"] for v in values] == [692.0, 0.2, None]  # zero: no point on a log axis...
    assert [v["norm_label"] for v in values] == ["692", "0.2", "0 (no gradient)"]  # ...but a label
    for layer, _ in _layers(spec):
        if "y" in layer.get("encoding", {}):
            assert layer["encoding"]["y"]["scale"]["domain"] == ["tb", "m2po", "silent"]


def test_bad_input_is_one_clear_error():
    with pytest.raises(WorkbenchError, match="repeats=0"):
        same_batch_replay(None, 3, repeats=0)  # checked before the run is touched
    with pytest.raises(WorkbenchError, match="repeats"):
        same_batch_replay(None, 3, repeats=2.0)
    with pytest.raises(WorkbenchError, match="noise floor is missing"):
        replay_intervals(make_table({"is": [0.1, 0.2]}).filter(pl.col("objective") != FRESH_ROW))
    with pytest.raises(WorkbenchError, match="cosine_to_onpolicy"):
        replay_intervals(make_table({"is": [0.1, 0.2]}).drop("cosine_to_onpolicy"))
    with pytest.raises(WorkbenchError, match="intervals=.*column .repeats. too"):
        replay_findings(make_table({"is": [0.1, 0.2]}))  # the long table, not its intervals
    with pytest.raises(WorkbenchError, match="table"):
        replay_intervals([1, 2])
    assert REPEATS >= 5  # the default gives intervals the bootstrap can honour
