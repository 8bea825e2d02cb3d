"""The numerics knobs live (workbench.knobs.NUMERICS_FIELDS): a change set between updates acts from
the next update on and not before, is recorded and replays to identical metrics, bad values and a
sampler-side knob under staleness_mode=async are one-line errors, and the control panel's "Numerics"
group sets the knobs and follows them."""

from __future__ import annotations

import polars as pl
import pytest

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.knobs import LIVE_FIELDS, NUMERICS_FIELDS, Knobs
from workbench.loop import Run
from workbench.notebook import TINY_REWARDS
from workbench.policy.model import build_model
from workbench.policy.numerics import trainer_numerics
from workbench.steps.prefill import sampling_params

# lr = 1e-9: the config refuses 0, and at 1e-9 the weights move ~1e-9, so on policy every ratio is 1 to
# float precision and a clipped token is numerics alone (the null test's reading); TINY_REWARDS give the
# untrained model's groups reward variance, so advantages are non-zero and the clip can bind
SMALL = {"task": "addition", "task_params": {"max_digits": 2, "heldout_size": 16}, "prompts_per_step": 4,
         "group_size": 4, "eval_every": 100, "eval_size": 16, "lr": 1e-9, "seed": 3, "steps": 6, "rewards": TINY_REWARDS}


def _run(tokenizer, tiny_model_config, knob_schedule=None, **overrides) -> Run:
    cfg = RunConfig(**{**SMALL, **overrides})
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer,
               knob_schedule=knob_schedule, log=lambda s: None)


def _deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("perf/")}


def _frame(run: Run) -> pl.DataFrame:
    """The run's metrics without the timings (the deterministic columns)."""
    return run.metrics.select([c for c in run.metrics.columns if not c.startswith("perf/")])


def test_numerics_fields_are_live_and_start_at_the_config():
    assert set(NUMERICS_FIELDS) <= set(LIVE_FIELDS)
    cfg = RunConfig(top_p=0.9, top_k=5, trainer_logit_noise=0.1, sampler_logits_dtype="bf16", replay_sampling_mask=True)
    kn = Knobs(cfg).applied
    assert (kn.top_p, kn.top_k, kn.trainer_logit_noise, kn.sampler_logits_dtype, kn.replay_sampling_mask) == (
        0.9, 5, 0.1, "bf16", True)
    assert kn.trainer_numerics(cfg.seed) == cfg.trainer_numerics() == trainer_numerics(cfg)  # the same seed mixing


def test_sampling_params_read_the_applied_knobs_not_the_config(addition_task):
    cfg = RunConfig()
    knobs = Knobs(cfg)
    knobs.set(top_p=0.7, top_k=4, sampler_logits_dtype="fp16", sampler_logit_noise=0.02, replay_sampling_mask=True)
    before = sampling_params(cfg, knobs.applied, addition_task)  # not yet applied: the config's values
    assert (before.top_p, before.top_k, before.logits_dtype, before.logit_noise, before.record_kept) == (
        1.0, 0, "", 0.0, False)
    knobs.take_pending()
    after = sampling_params(cfg, knobs.applied, addition_task)
    assert (after.top_p, after.top_k, after.logits_dtype, after.logit_noise, after.record_kept) == (
        0.7, 4, "fp16", 0.02, True)


def test_trainer_noise_set_live_acts_from_that_update_on(tokenizer, tiny_model_config):
    """At lr = 1e-9 on policy, offpolicy/clipfrac is exactly 0 until the noise is set before update 2,
    and > 0 from update 2 on; updates 0-1 are bit for bit those of a run without the change."""
    plain = _run(tokenizer, tiny_model_config)
    plain_rows = [plain.step() for _ in range(3)]
    live = _run(tokenizer, tiny_model_config)
    rows = [live.step() for _ in range(2)]
    live.knobs.trainer_logit_noise = 0.5
    assert live.knobs.applied.trainer_logit_noise == 0.0  # set, applied at the next update
    rows += [live.step() for _ in range(2)]
    assert [_deterministic(r) for r in rows[:2]] == [_deterministic(r) for r in plain_rows[:2]]
    assert [r["offpolicy/clipfrac"] for r in rows[:2]] == [0.0, 0.0]
    assert plain_rows[2]["offpolicy/clipfrac"] == 0.0
    assert all(r["offpolicy/clipfrac"] > 0.05 for r in rows[2:]), [r["offpolicy/clipfrac"] for r in rows]
    spread = [r["offpolicy/raw_ratio_max"] - r["offpolicy/raw_ratio_min"] for r in rows]
    assert max(spread[:2]) < 1e-5 and min(spread[2:]) > 0.5, spread  # std 0.5 nats of noise: ratios ~ e^(+-1)
    assert live.knob_events == [{"update": 2, "changes": {"trainer_logit_noise": 0.5}}]


def test_a_recorded_numerics_session_replays_to_identical_metrics(tokenizer, tiny_model_config):
    """Trainer noise at update 1, top-p with the replay at 2, the noise off and sampler bf16 + noise at 3:
    a headless run given the recorded events reproduces every metric."""
    live = _run(tokenizer, tiny_model_config, steps=5)
    script = {1: {"trainer_logit_noise": 0.2}, 2: {"top_p": 0.8, "replay_sampling_mask": True},
              3: {"trainer_logit_noise": 0.0, "sampler_logits_dtype": "bf16", "sampler_logit_noise": 0.05}}
    for k in range(5):
        if k in script:
            live.knobs.set(**script[k])
        live.step()
    assert [e["update"] for e in live.knob_events] == [1, 2, 3]
    assert live.last_batch.sampling_kept is not None  # the replay reached the sampler
    replay = _run(tokenizer, tiny_model_config, steps=5, knob_schedule=live.knob_events)
    replay.run(5)
    assert replay.knob_events == live.knob_events
    assert _frame(replay).equals(_frame(live))
    clip = [r["offpolicy/clipfrac"] for r in live.rows]
    assert clip[0] == 0.0 and clip[1] > 0.0  # the noise acted from its update on
    assert replay.knobs.applied.sampler_logits_dtype == "bf16"
    # each update's row logs the numerics it ran with, as the other live knobs (knob/<field>)
    logged = {k: [r[f"knob/{k}"] for r in live.rows] for k in ("trainer_logit_noise", "top_p", "sampler_logits_dtype",
                                                                "replay_sampling_mask")}
    assert logged == {"trainer_logit_noise": [0.0, 0.2, 0.2, 0.0, 0.0], "top_p": [1.0, 1.0, 0.8, 0.8, 0.8],
                      "sampler_logits_dtype": ["", "", "", "bf16", "bf16"],
                      "replay_sampling_mask": [False, False, True, True, True]}


def test_replay_mask_set_live_brings_a_truncated_sampler_back_on_policy(tokenizer, tiny_model_config):
    """top-k 3 from the start: every ratio carries p(kept set) < 1; the replay turned on live before
    update 1 makes update 1's ratios 1 again (the batch it trains on was sampled with kept sets)."""
    run = _run(tokenizer, tiny_model_config, top_k=3)
    first = run.step()
    assert first["offpolicy/raw_ratio_max"] < 0.9
    run.knobs.replay_sampling_mask = True
    second = run.step()
    assert abs(second["offpolicy/raw_ratio_min"] - 1) < 1e-5 and abs(second["offpolicy/raw_ratio_max"] - 1) < 1e-5
    assert second["offpolicy/clipfrac"] == 0.0


@pytest.mark.parametrize("knob, value, valid", [
    ("top_p", 1.5, "a float in (0, 1]"),
    ("top_k", -1, "an integer >= 0"),
    ("sampler_logits_dtype", "int8", "'' (exact) | bf16 | fp16"),
    ("trainer_logits_dtype", "bfloat16", "'' (exact) | bf16 | fp16"),
    ("trainer_logit_noise", -1, "a finite float >= 0"),
    ("sampler_logit_noise", float("inf"), "a finite number"),  # the config's type check comes first
    ("replay_sampling_mask", "yes", "true or false"),
])
def test_invalid_live_numerics_are_one_line_errors(knob, value, valid):
    knobs = Knobs(RunConfig())
    with pytest.raises(WorkbenchError) as e:
        knobs.set(**{knob: value})
    msg = str(e.value)
    assert msg.startswith(f"{knob}={value!r} is invalid") and valid in msg and "\n" not in msg
    assert knobs.pending == [] and getattr(knobs, knob) == getattr(RunConfig(), knob)  # nothing was set


@pytest.mark.parametrize("knob, value", [("sampler_logit_noise", 0.1), ("sampler_logits_dtype", "bf16"),
                                         ("replay_sampling_mask", True)])
def test_async_refuses_live_sampler_numerics_as_its_config_does(knob, value):
    knobs = Knobs(RunConfig(staleness_mode="async"))
    with pytest.raises(WorkbenchError) as e:
        knobs.set(**{knob: value})
    assert str(e.value).startswith(f"{knob}={value!r} is invalid") and "staleness_mode=async" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(WorkbenchError, match="staleness_mode=async"):
        RunConfig(staleness_mode="async", **{knob: value})  # the same rule at config time
    assert knobs.set(trainer_logit_noise=0.1, top_p=0.9) == {"trainer_logit_noise": 0.1, "top_p": 0.9}  # these act


def test_the_panels_numerics_group_sets_and_follows_the_knobs(tokenizer, tiny_model_config, tmp_path):
    from workbench.ui import ControlPanel

    cfg = RunConfig(**{**SMALL, "out_dir": str(tmp_path), "run_name": "live"})
    panel = ControlPanel(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer,
                         headless=False, log=lambda s: None, chart_seconds=0.05)
    try:
        w = panel.widgets
        group = w["numerics"]
        assert group.selected_index is None and group.titles == ("Numerics",)  # collapsed
        assert {w[n] for n in NUMERICS_FIELDS} == set(group.children[0].children)
        w["trainer_logit_noise"].value = 0.2
        w["top_p"].value = 0.9
        w["top_k"].value = 5
        w["sampler_logits_dtype"].value = "bf16"
        w["replay_sampling_mask"].value = True
        assert panel.knobs.requested["trainer_logit_noise"] == 0.2 and panel.knobs.top_p == 0.9
        assert (panel.knobs.top_k, panel.knobs.sampler_logits_dtype, panel.knobs.replay_sampling_mask) == (
            5, "bf16", True)
        assert panel.knobs.applied.trainer_logit_noise == 0.0  # from the next update
        w["sampler_logit_noise"].value = 0.6  # past the slider's max: clamped to 0.5 by the widget
        assert panel.knobs.sampler_logit_noise == 0.5
        panel.knobs.set(trainer_logits_dtype="fp16", trainer_logit_noise=0.05)  # set from code
        panel._sync_widgets_from_knobs()
        assert w["trainer_logits_dtype"].value == "fp16" and w["trainer_logit_noise"].value == 0.05
        assert len(panel.knobs.pending) == 7  # the sync back sent nothing
        assert panel.numerics() is group and group.selected_index == 0  # the notebook's cell: the group, opened
    finally:
        panel.close()
    headless = ControlPanel(cfg.replace(run_name="headless"), model=build_model(tiny_model_config, tokenizer, seed=0),
                            tokenizer=tokenizer, headless=True, log=lambda s: None)
    headless.knobs.set(top_p=0.5)
    assert headless.numerics() == {**{k: getattr(RunConfig(), k) for k in NUMERICS_FIELDS}, "top_p": 0.5}
    headless.close()


def test_live_numerics_survive_a_checkpoint_and_resume(tokenizer, tiny_model_config, tmp_path):
    """The checkpoint stores the applied knobs: a resumed run keeps the numerics set live, and continues
    with the same metrics as the uninterrupted run."""
    def run_in(name):
        return _run(tokenizer, tiny_model_config, out_dir=str(tmp_path), run_name=name, steps=4)

    whole = run_in("whole")
    whole.knobs.set(top_k=3, replay_sampling_mask=True, trainer_logit_noise=0.1)
    whole.run(4)
    part = run_in("part")
    part.knobs.set(top_k=3, replay_sampling_mask=True, trainer_logit_noise=0.1)
    part.run(2)
    part.close()
    resumed = Run.resume(tmp_path / "part", model=build_model(tiny_model_config, tokenizer, seed=0),
                         tokenizer=tokenizer, log=lambda s: None)
    kn = resumed.knobs.applied
    assert (kn.top_k, kn.replay_sampling_mask, kn.trainer_logit_noise) == (3, True, 0.1)
    resumed.run(2)
    assert _frame(resumed).equals(_frame(whole))  # NaN-aware (a batch without A > 0 tokens has NaN quantiles)
    whole.close()
    resumed.close()
