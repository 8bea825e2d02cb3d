"""Health warnings from metrics rows: each rule starts and ends at the right update, says what it
saw, and the collapse rule ignores a rise inside the noise of one evaluation."""

from __future__ import annotations

import math

import pytest

from workbench.runs.health import HealthMonitor, log_line, scan

Z = 1.959963984540054


def wilson_half_width(p: float, n: int) -> float:  # closed form, written out here
    return Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))


def rows(n: int, **series) -> list[dict]:
    """n rows; each keyword is a list of values (None = absent) for that key."""
    out = []
    for k in range(n):
        row = {"update": k}
        for key, values in series.items():
            if values[k] is not None:
                row[key.replace("__", "/")] = values[k]
        out.append(row)
    return out


def starts_ends(events):
    return [(e["code"], e["event"], e["update"]) for e in events]


def test_collapse_after_a_real_rise_starts_below_the_start_and_ends_when_back():
    acc = [None, 0.30, None, 0.50, None, 0.18, None, 0.22, None, 0.26]
    events = scan(rows(10, eval__accuracy=acc), initial_accuracy=0.25, eval_n=256)
    assert starts_ends(events) == [("collapse", "start", 5), ("collapse", "end", 9)]
    msg = events[0]["message"]
    half = wilson_half_width(0.5, 256)  # the best: 128 of 256
    assert "18.0% is below its start 25.0% after a best of 50.0% at update 3" in msg
    assert f"about ±{round(100 * half)} points" in msg and round(100 * half) == 6


def test_a_rise_within_one_evaluations_noise_is_no_collapse():
    # best 0.30 vs start 0.25 on 64 problems: the Wilson half-width at 0.30 is ~0.11 > 0.05
    assert wilson_half_width(0.296875, 64) > 0.05
    events = scan(rows(4, eval__accuracy=[0.30, None, 0.10, 0.05]), initial_accuracy=0.25, eval_n=64)
    assert events == []
    # the same numbers on 4096 problems: the rise is real (half-width ~0.014), so the fall is a collapse
    events = scan(rows(4, eval__accuracy=[0.30, None, 0.10, 0.05]), initial_accuracy=0.25, eval_n=4096)
    assert starts_ends(events) == [("collapse", "start", 2)]


@pytest.mark.parametrize("key,word", [("offpolicy__clipfrac", "clipped"), ("offpolicy__masked_frac", "masked"),
                                      ("offpolicy__truncated_frac", "truncated")])
def test_truncation_of_most_of_the_batch(key, word):
    events = scan(rows(6, **{key: [0.1, 0.5, 0.6, 0.9, 0.45, 0.3]}), None, 8)
    # 0.5 is not "most"; once started, 0.45 keeps it (it ends below 0.4: no flapping near one half)
    assert starts_ends(events) == [("truncation", "start", 2), ("truncation", "end", 5)]
    assert events[0]["message"].startswith(f"60% of the batch's tokens are {word}")


def test_zero_variance_groups_and_nonfinite_updates():
    events = scan(rows(4, reward__zero_var_group_frac=[0.5, 0.75, 1.0, 0.35],
                       loss__skipped_nonfinite=[0.0, 0.0, 1.0, 0.0]), None, 8)
    assert starts_ends(events) == [("zero_variance", "start", 1), ("nonfinite", "start", 2),
                                   ("zero_variance", "end", 3), ("nonfinite", "end", 3)]
    assert events[0]["message"].startswith("75% of the groups have all-equal rewards")


def test_training_on_the_initial_policy_while_the_lag_is_longer_than_the_run():
    # staleness 3: updates 1 and 2 train on version-0 batches (staleness == update), update 3 on version 0 too
    # (staleness 3 = lag: the lag is no longer longer than the updates done), update 4 on version 1
    events = scan(rows(5, knob__staleness=[3] * 5, offpolicy__staleness_min=[0, 1, 2, 3, 3]), None, 8)
    assert starts_ends(events) == [("initial_policy", "start", 1), ("initial_policy", "end", 3)]
    assert "staleness 3 is longer than the 1 updates done" in events[0]["message"]
    assert scan(rows(3, knob__staleness=[0] * 3, offpolicy__staleness_min=[0] * 3), None, 8) == []


def test_collapse_is_held_between_evaluations_and_replay_restores_the_state():
    data = rows(8, eval__accuracy=[0.6, None, 0.1, None, None, None, 0.5, None])
    seen = []
    m = HealthMonitor(1024, 0.3, emit=seen.append)
    for row in data[:4]:
        m.observe(row)
    assert [e["event"] for e in seen] == ["start"] and m.banner()[0].startswith("update 2: collapse")
    resumed = HealthMonitor(1024, 0.3, emit=seen.append)
    resumed.replay(data[:4])  # no events emitted again
    assert len(seen) == 1 and resumed.active.keys() == {"collapse"}
    for row in data[4:]:
        resumed.observe(row)
    assert starts_ends(seen) == [("collapse", "start", 2), ("collapse", "end", 6)]
    assert log_line(seen[1]) == "health: collapse ended (it started at update 2) (update 6)"


def test_nan_and_missing_values_are_no_warning():
    events = scan(rows(3, offpolicy__clipfrac=[float("nan"), None, 0.1], eval__accuracy=[float("nan"), None, None]),
                  0.5, 8)
    assert events == []


# ------------------------------------------------------------------------------------------- in a Run
def test_a_run_logs_journals_and_resumes_its_health_events(tmp_path):
    import json

    from test_stop import FIELDS
    from workbench.config import RunConfig
    from workbench.loop import Run
    from workbench.policy.model import TINY_MODEL, ModelConfig, build_model, save_policy
    from workbench.policy.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = save_policy(build_model(ModelConfig(**TINY_MODEL), tok, seed=0), tok, tmp_path / "model")
    cfg = lambda d, **kw: RunConfig(**{**FIELDS, "model": str(model), "steps": 8, "out_dir": str(tmp_path / d),
                                       "run_name": "h", "staleness": 3, "checkpoint_every": 2, **kw})  # noqa: E731
    logged = []
    full = Run(cfg("a"), log=logged.append)
    full.run()
    journal = lambda d: [json.loads(x) for x in (tmp_path / d / "h" / "health.jsonl").read_text().splitlines()]  # noqa: E731
    events = journal("a")
    # an untrained model answers almost nothing right: most groups are all-zero reward from update 0; the lag
    # of 3 trains updates 1 and 2 on the initial policy's batches
    assert ("zero_variance", "start", 0) in starts_ends(events)
    assert starts_ends([e for e in events if e["code"] == "initial_policy"]) == [
        ("initial_policy", "start", 1), ("initial_policy", "end", 3)]
    assert events == scan(full.rows, full.initial_accuracy, 8)  # the journal is the rows' scan
    assert [line for line in logged if line.startswith("health: ")] == [log_line(e) for e in events]
    active = {}
    for e in events:
        active[e["code"]] = e if e["event"] == "start" else active.pop(e["code"]) and None
    shown = sorted((e for e in active.values() if e), key=lambda e: e["update"])
    assert full.health.banner() == [f"update {e['update']}: {e['message']}" for e in shown]

    part = Run(cfg("b"), log=lambda s: None)
    part.run(5)  # checkpoints at 2 and 4; rows 0..4 and their events on disk
    (tmp_path / "b" / "h" / "checkpoints" / "update_000005").rename(tmp_path / "gone")  # as if killed before it
    resumed = Run.resume(tmp_path / "b" / "h", log=lambda s: None)
    assert resumed.version == 4
    resumed.run()
    assert journal("b") == events  # the events of updates past the checkpoint were not kept twice
