"""The config linter (workbench.lint) and its CLI: every warning triggered and not triggered; and the
mistakes it cannot see from the config alone, which are one-line errors instead of silent no-ops."""

from __future__ import annotations

import pytest

from workbench.cli import main
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.lint import CODES, LintWarning, Warning, is_on_policy_reference, lint, notes
from workbench.loop import MAX_NONFINITE_STREAK, Run
from workbench.notebook import TINY_REWARDS
from workbench.policy.model import build_model
from workbench.steps.buffer import BUDGET_ENV
from workbench.steps.reweight import OBJECTIVES

# A config that is off-policy (staleness 2), corrected and aggregated with a fixed scale: no warning.
CLEAN = dict(objective="ppo_clip", staleness=2)
TINY = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=4, group_size=4,
            eval_every=5, eval_size=8, seed=3, rewards=TINY_REWARDS)  # rewards that vary: the policy moves


def codes(**kw):
    return [w.code for w in lint(RunConfig(**kw))]


def fields(code, **kw):
    return [w.field for w in lint(RunConfig(**kw)) if w.code == code]


def test_clean_configs_have_no_warnings():
    assert lint(RunConfig(**CLEAN)) == []
    assert lint(RunConfig(objective="reinforce", staleness=2, correction="token_tis")) == []
    assert lint(RunConfig(objective="ppo_clip", staleness=4, proximal="loglinear", correction="areal")) == []
    assert lint(RunConfig(objective="m2po", staleness=8, objective_params={"tau": 0.04})) == []


def test_warnings_are_one_line_dataclasses_with_known_codes():
    ws = lint(RunConfig(objective="cispo"))
    assert ws and all(isinstance(w, LintWarning) and w.code in CODES and "\n" not in w.message for w in ws)
    assert Warning is LintWarning
    assert str(ws[0]).startswith(f"[{ws[0].code}] {ws[0].field}: ")


# ---- clip_inert ------------------------------------------------------------------------------------

ON_POLICY_NOTE = ("on-policy run (staleness 0): the ratio is 1, so ppo_clip trains as REINFORCE; try --staleness 16 "
                  "to see clipping act")


def test_the_on_policy_default_gets_a_note_not_a_warning():
    # the default config is the on-policy reference run: staleness 0, sync 1, one update per batch
    assert codes() == [] and is_on_policy_reference(RunConfig())
    assert notes(RunConfig()) == [ON_POLICY_NOTE]
    assert notes(RunConfig(objective="ppo_clip", objective_params={"clip_low": 0.2})) == [ON_POLICY_NOTE]  # = default
    assert notes(RunConfig(lr=1e-4, steps=10, seed=3)) == [ON_POLICY_NOTE]  # fields the clip does not depend on


@pytest.mark.parametrize("chosen", [dict(objective="cispo"), dict(objective_params={"clip_high": 0.28}),
                                    dict(correction="geo_rs"), dict(correction="token_mis",
                                                                    correction_params={"cap": 3.0})])
def test_clip_inert_when_the_user_chose_what_the_clip_needs_on_policy(chosen):
    assert "clip_inert" in codes(**chosen)
    assert notes(RunConfig(**chosen)) == [] and not is_on_policy_reference(RunConfig(**chosen))


def test_no_on_policy_note_once_anything_is_off_policy():
    assert notes(RunConfig(staleness=16)) == [] and notes(RunConfig(sync_every=2)) == []


@pytest.mark.parametrize("source", [dict(staleness=1), dict(sync_every=2), dict(updates_per_batch=2),
                                    dict(num_minibatches=2, prompts_per_step=4, group_size=4),
                                    dict(top_p=0.9, correction="geo_rs"), dict(top_k=5, correction="geo_rs"),
                                    dict(sampler="vllm")])
def test_clip_not_inert_when_anything_is_off_policy(source):
    assert "clip_inert" not in codes(**source)


def test_clip_inert_with_recompute_even_when_stale():
    assert fields("clip_inert", staleness=4, proximal="recompute", correction="areal") == ["proximal"]
    # with reuse the later minibatches move away from the batch's proximal policy: the clip acts
    assert "clip_inert" not in codes(staleness=4, proximal="recompute", correction="areal", num_minibatches=2,
                                     prompts_per_step=4, group_size=4)
    assert "clip_inert" not in codes(staleness=4, proximal="loglinear", correction="areal")


def test_clip_inert_with_reuse_train_logp_always():
    # the anchor is the update's own training forward: ratio 1 whatever the staleness
    ws = [w for w in lint(RunConfig(staleness=4, proximal="reuse_train_logp", correction="areal")) if w.code == "clip_inert"]
    assert [w.field for w in ws] == ["proximal"]
    assert ws[0].message.startswith("proximal=reuse_train_logp anchors the ratio at this update's own training forward")
    assert "clip_inert" not in codes(objective="reinforce", staleness=4, proximal="reuse_train_logp", correction="areal")


def test_clip_inert_not_for_an_objective_that_ignores_the_behaviour_policy():
    assert "clip_inert" not in codes(objective="reinforce")


# ---- double_correction ----------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["cispo", "tis", "is", "ppo_clip"])
def test_double_correction_in_bypass_mode(objective):
    assert "double_correction" in codes(objective=objective, staleness=2, correction="token_tis")


@pytest.mark.parametrize("kw", [
    dict(objective="cispo", staleness=2, correction="geo_rs"),  # rejection only
    dict(objective="reinforce", staleness=2, correction="seq_tis"),  # verl bypass_pg_is
    dict(objective="cispo", staleness=2, correction="areal", proximal="loglinear"),  # decoupled
])
def test_no_double_correction(kw):
    assert "double_correction" not in codes(**kw)


def test_double_correction_for_an_objective_that_weights_by_behaviour_itself(monkeypatch):
    monkeypatch.setitem(OBJECTIVES.meta("cispo"), "behavior_weighted", True)
    assert "double_correction" in codes(objective="cispo", staleness=2, correction="areal", proximal="loglinear")
    assert "double_correction" not in codes(objective="cispo", staleness=2, correction="geo_rs",
                                            proximal="loglinear")


# ---- stale_ignored ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [dict(staleness=3), dict(sync_every=4), dict(updates_per_batch=2)])
def test_stale_ignored_for_reinforce(source):
    assert "stale_ignored" in codes(objective="reinforce", **source)


@pytest.mark.parametrize("kw", [dict(objective="reinforce"), dict(objective="reinforce", staleness=3,
                                                                    correction="token_tis"),
                                dict(objective="ppo_clip", staleness=3)])
def test_stale_not_ignored(kw):
    assert "stale_ignored" not in codes(**kw)


def test_stale_ignored_reads_the_metadata_flag(monkeypatch):
    monkeypatch.setitem(OBJECTIVES.meta("cispo"), "ignores_behavior", True)
    assert "stale_ignored" in codes(objective="cispo", staleness=2)


# ---- batch_dependent_aggregation -----------------------------------------------------------------------

def test_sum_norm_without_a_fixed_scale():
    assert fields("batch_dependent_aggregation", staleness=2, aggregation="seq-mean-token-sum-norm") == \
        ["loss_scale_factor"]
    assert "batch_dependent_aggregation" not in codes(staleness=2, aggregation="seq-mean-token-sum-norm",
                                                      loss_scale_factor=64.0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", ""])
def test_dr_grpo_caveat(agg):
    assert fields("batch_dependent_aggregation", staleness=2, advantage="dr_grpo", aggregation=agg) == ["aggregation"]


def test_dr_grpo_with_a_constant_normaliser_is_fine():
    assert lint(RunConfig(staleness=2, advantage="dr_grpo", aggregation="seq-mean-token-sum-norm",
                          loss_scale_factor=32.0)) == []


@pytest.mark.parametrize("kw, field", [(dict(filter_zero_variance=True), "filter_zero_variance"),
                                       (dict(max_staleness=3), "max_staleness")])
def test_mean_aggregation_with_filtering(kw, field):
    assert fields("batch_dependent_aggregation", staleness=2, **kw) == [field]
    assert "batch_dependent_aggregation" not in codes(staleness=2, aggregation="seq-mean-token-sum-norm",
                                                      loss_scale_factor=16.0, **kw)


# ---- m2po_tau_range -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau, warned", [(0.01, True), (0.02, False), (0.04, False), (0.12, False), (0.5, True)])
def test_m2po_tau_range(tau, warned):
    assert ("m2po_tau_range" in codes(objective="m2po", staleness=4, objective_params={"tau": tau})) == warned


# ---- truncated_support --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [(dict(top_p=0.9), "top_p"), (dict(top_k=20), "top_k")])
def test_truncated_support_without_correction(kw, field):
    assert fields("truncated_support", **kw) == [field]
    assert "truncated_support" not in codes(correction="icepop", **kw)


# ---- decoupled_without_correction ---------------------------------------------------------------------------

@pytest.mark.parametrize("proximal", ["recompute", "loglinear", "linear", "reuse_train_logp"])
def test_decoupled_without_correction(proximal):
    assert "decoupled_without_correction" in codes(staleness=2, proximal=proximal)
    assert "decoupled_without_correction" not in codes(staleness=2, proximal=proximal, correction="areal")


def test_decoupled_without_correction_states_areals_current_default():
    # AReaL's default rejection_sampling=None applies no behaviour weight; upper=5.0 restores it (= areal)
    [w] = [w for w in lint(RunConfig(staleness=2, proximal="recompute")) if w.code == "decoupled_without_correction"]
    assert "AReaL's default rejection_sampling=None" in w.message and "always" not in w.message
    assert w.message.endswith("use correction=areal (AReaL's rejection_sampling upper=5.0: the weight, tokens "
                              "above 5 masked)")


# ---- lag_exceeds_steps ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [(dict(staleness=1_000_000), "staleness"), (dict(staleness=299), "staleness"),
                                       (dict(sync_every=400), "sync_every"),
                                       (dict(staleness=8, updates_per_batch=4, steps=12), "staleness")])
def test_lag_exceeds_steps(kw, field):
    assert fields("lag_exceeds_steps", **kw) == [field]


def test_lag_exceeds_steps_message_counts_the_batches():
    (w,) = [w for w in lint(RunConfig(staleness=1_000_000)) if w.code == "lag_exceeds_steps"]
    assert "generates 1000001 batches" in w.message and "999701 of them are never used" in w.message


@pytest.mark.parametrize("kw", [dict(staleness=298), dict(sync_every=299), dict(steps=1), dict(staleness=4, steps=9,
                                                                                            updates_per_batch=4)])
def test_lag_below_steps_is_fine(kw):
    assert "lag_exceeds_steps" not in codes(**kw)


# ---- no_group_baseline ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "lite_ppo", "reinforce_pp"])
def test_no_group_baseline_with_a_group_of_one(advantage):
    assert fields("no_group_baseline", group_size=1, advantage=advantage) == ["group_size"]
    assert "no_group_baseline" not in codes(group_size=2, advantage=advantage)


def test_raw_reward_needs_no_group():
    assert "no_group_baseline" not in codes(group_size=1, advantage="none")


# ---- eval_size_clipped ---------------------------------------------------------------------------------------

def test_eval_size_larger_than_the_heldout_set_says_the_size_used():
    (w,) = [w for w in lint(RunConfig(eval_size=100_000)) if w.code == "eval_size_clipped"]
    assert w.field == "eval_size" and "uses its 256 examples" in w.message
    assert fields("eval_size_clipped", eval_size=20, task_params={"heldout_size": 16}) == ["eval_size"]
    assert "eval_size_clipped" not in codes(eval_size=16, task_params={"heldout_size": 16})
    assert "eval_size_clipped" not in codes()  # the default evaluates all 256


# ---- what the linter cannot see: errors, never silent no-ops -------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(kl_coef=float("inf")), "kl_coef=inf is invalid: expected a finite"),
    (dict(entropy_coef=float("nan")), "entropy_coef=nan is invalid"),
    (dict(task_params={"heldout_size": 0}), "task_params.heldout_size=0 is invalid"),
])
def test_config_refuses_what_would_do_nothing(kw, match):
    with pytest.raises(WorkbenchError, match=match):
        RunConfig(**kw)


def _tiny_run(tokenizer, tiny_model_config, log=lambda s: None, **kw):
    cfg = RunConfig(**{**TINY, "out_dir": "", **kw})
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=log)


@pytest.mark.parametrize("kw, cause", [(dict(kl_coef=1e30), "kl_coef=1e+30"), (dict(entropy_coef=1e30),
                                                                                 "entropy_coef=1e+30")])
def test_every_update_skipped_stops_the_run_naming_the_cause(tokenizer, tiny_model_config, kw, cause):
    run = _tiny_run(tokenizer, tiny_model_config, **kw)
    with pytest.raises(WorkbenchError, match="were all skipped because the gradient norm was not finite") as e:
        run.run(30)
    assert cause in str(e.value) and "\n" not in str(e.value)
    assert run.version <= 6 and run.metrics["loss/skipped_nonfinite"].tail(MAX_NONFINITE_STREAK).sum() == 5


def test_a_queue_over_the_memory_budget_is_refused_with_the_numbers(tokenizer, tiny_model_config, monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "0.00001")  # 10 kB
    with pytest.raises(WorkbenchError, match=r"keeps 9 batches of ~0\.\d+ MB .* over the 1e-05 GB budget"):
        _tiny_run(tokenizer, tiny_model_config, staleness=8).run(1)
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(WorkbenchError, match="WORKBENCH_BUFFER_BUDGET_GB='lots' is invalid"):
        _tiny_run(tokenizer, tiny_model_config, staleness=8).run(1)


def test_a_long_prefill_shows_progress(tokenizer, tiny_model_config):
    lines: list[str] = []
    _tiny_run(tokenizer, tiny_model_config, log=lines.append, staleness=11).run(1)
    lines = [line for line in lines if line.startswith("buffer: ")]  # not the health lines (runs/health.py)
    assert lines[0] == "buffer: generating 12 batches before update 0 (a lag of 11 batches, 1 per sync)"
    assert lines[-1].startswith("buffer: 12/12 batches generated") and 3 <= len(lines) <= 12


def test_empty_heldout_set_is_refused_before_the_run(tokenizer, tiny_model_config, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(4)))
    with pytest.raises(WorkbenchError, match="task_params.heldout_fraction=0 is invalid"):
        RunConfig(task="jsonl", task_params={"path": str(path), "heldout_fraction": 0})


# ---- CLI ------------------------------------------------------------------------------------------------------

def test_cli_lint_prints_warnings_and_strict_exits_1(capsys):
    assert main(["lint", "--objective", "cispo", "--staleness", "2", "--correction", "token_tis"]) == 0
    out = capsys.readouterr().out
    assert "[double_correction] correction:" in out
    assert main(["lint", "--staleness", "2", "--strict"]) == 0
    assert "no lint warnings" in capsys.readouterr().out
    assert main(["lint", "--strict"]) == 0  # the default: a note, no warning
    out = capsys.readouterr().out
    assert out.splitlines() == [ON_POLICY_NOTE, "no lint warnings"]
    assert main(["lint", "--objective", "cispo", "--strict"]) == 1
    assert "lint warning [clip_inert] staleness:" in capsys.readouterr().out
    assert main(["lint", "--correction", "nope"]) == 2
    assert "unknown correction preset 'nope'" in capsys.readouterr().err


# ---- off-policy sources added by the async pipeline and the numerics knobs; the scratchpad's reward ----

def test_async_and_injected_numerics_are_off_policy_sources():
    from workbench.lint import offpolicy_sources
    assert offpolicy_sources(RunConfig()) == []
    assert [f for f, _ in offpolicy_sources(RunConfig(staleness_mode="async"))] == ["staleness_mode"]
    assert [f for f, _ in offpolicy_sources(RunConfig(sampler_logits_dtype="bf16", trainer_logit_noise=0.1))] == [
        "sampler_logits_dtype", "trainer_logit_noise"]
    assert notes(RunConfig(staleness_mode="async")) != [ON_POLICY_NOTE]  # not called an on-policy run
    assert not is_on_policy_reference(RunConfig(staleness_mode="async"))


def test_scratchpad_with_a_whole_answer_reward_is_warned_and_final_answer_is_not():
    assert "reward_stricter_than_verify" in codes(task="scratchpad")
    assert fields("reward_stricter_than_verify", task="scratchpad") == ["rewards"]
    assert "reward_stricter_than_verify" not in codes(task="scratchpad", rewards=(("final_answer", 1.0),))
    assert "reward_stricter_than_verify" not in codes()  # other tasks: exact_match is what verify grades
