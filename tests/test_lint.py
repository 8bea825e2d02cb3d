"""The config linter (workbench.lint) and its CLI: every warning triggered and not triggered."""

from __future__ import annotations

import pytest

from workbench.cli import main
from workbench.config import RunConfig
from workbench.lint import CODES, LintWarning, Warning, is_on_policy_reference, lint, notes
from workbench.steps.reweight import OBJECTIVES

# A config that is off-policy (staleness 2), corrected and aggregated with a fixed scale: no warning.
CLEAN = dict(objective="ppo_clip", staleness=2)


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

@pytest.mark.parametrize("proximal", ["recompute", "loglinear"])
def test_decoupled_without_correction(proximal):
    assert "decoupled_without_correction" in codes(staleness=2, proximal=proximal)
    assert "decoupled_without_correction" not in codes(staleness=2, proximal=proximal, correction="areal")


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
