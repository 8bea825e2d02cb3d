"""The ``context`` of ``policy_loss`` (workbench/steps/reweight/context.py) and the loop that supplies it: the
context keys each objective declares it needs, one-line errors for a missing context or a bad value
(naming the key), and, through short runs of the training loop on the tiny model, R2VPO's lambda kept in
the objective state across checkpoint + resume (bit-exact) and refused when not numeric, CHORD's expert
demonstrations and update index, and the reference model TB needs.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import OBJECTIVES, policy_loss
from workbench.steps.reweight.context import CONTEXT_KEYS
from workbench.steps.reweight.core import objective_needs

from reweight_helpers import F64, ex_context, example, mu_by_hand


# ---------------------------------------------------------------------------------------------
# context API
# ---------------------------------------------------------------------------------------------
def test_needs_metadata_and_missing_context_errors():
    assert objective_needs("tb") == ("group_id", "ref_logprobs", "rewards")
    assert objective_needs("tb", {"reference": "anchor", "reward": "advantages"}) == ("group_id",)
    assert objective_needs("r2vpo") == ("state",) and objective_needs("r2vpo", {"variant": "fixed"}) == ()
    assert objective_needs("chord") == ("step", "expert_logprobs", "expert_mask")
    assert objective_needs("gbpo", {"score": "advantage"}) == ("group_id",) and objective_needs("ppo_clip") == ()
    for name in OBJECTIVES.names():
        assert set(objective_needs(name)) <= set(CONTEXT_KEYS), name
    lp, beh, adv, mask = example()
    with pytest.raises(WorkbenchError, match=r"objective 'chord' needs context\['step'\]") as err:
        policy_loss("chord", lp, beh, adv, mask)
    assert "\n" not in str(err.value)
    with pytest.raises(WorkbenchError, match="context must be a dict"):
        policy_loss("ppo_clip", lp, beh, adv, mask, context=[1])
    # objectives that need nothing ignore a context; callers without one are unaffected
    a, _ = policy_loss("ppo_clip", lp, beh, adv, mask, context=ex_context())
    b, _ = policy_loss("ppo_clip", lp, beh, adv, mask)
    assert float(a.detach()) == float(b.detach())


@pytest.mark.parametrize("key,value,match", [
    ("group_id", torch.tensor([0.0, 1.0]), "integer"),
    ("group_id", torch.tensor([0, 1, 2]), "shape"),
    ("rewards", torch.tensor([math.nan, 0.0], dtype=F64), "non-finite"),
    ("ref_logprobs", torch.zeros(2, 2, dtype=F64), "shape"),
    ("ref_logprobs", torch.tensor([[0.0, math.inf, 0.0], [0.0, 0.0, 0.0]], dtype=F64), "non-finite"),
])
def test_bad_context_values_name_the_key(key, value, match):
    lp, beh, adv, mask = example()
    ctx = dict(ex_context(), **{key: value})
    with pytest.raises(WorkbenchError, match=match) as err:
        policy_loss("tb", lp, beh, adv, mask, context=ctx)
    assert f"context['{key}']" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# the loop: R2VPO's lambda survives checkpoint + resume exactly; CHORD gets expert data, TB a reference model
# ---------------------------------------------------------------------------------------------
def _make_run(tokenizer, tiny_model_config, tmp_path=None, **overrides):
    from workbench.config import RunConfig
    from workbench.loop import Run
    from workbench.policy.model import build_model

    small = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
                 group_size=4, eval_every=3, eval_size=16, lr=1e-3, seed=3)
    cfg = RunConfig(**{**small, "out_dir": str(tmp_path) if tmp_path else "", "run_name": "r", **overrides})
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)


def test_r2vpo_lambda_survives_checkpoint_and_resume(tokenizer, tiny_model_config, tmp_path):
    from workbench.loop import Run
    from workbench.policy.model import build_model

    kw = dict(staleness=1, objective="r2vpo", objective_params={"dual_lr": 3.0, "delta": 0.0})
    full = _make_run(tokenizer, tiny_model_config, tmp_path / "a", **kw)
    df_full = full.run(6)
    lam = df_full["r2vpo/lambda"].to_list()
    assert lam[0] == 0.04 and len(set(lam)) > 1  # it moves
    first = _make_run(tokenizer, tiny_model_config, tmp_path / "b", **kw)
    first.run(3)
    saved = dict(first.objective_state)
    resumed = Run.resume(tmp_path / "b" / "r", model=build_model(tiny_model_config, tokenizer, seed=0),
                         tokenizer=tokenizer, log=lambda s: None)
    assert resumed.objective_state == saved and resumed.objective_state["r2vpo/lambda"] == lam[3]
    df = resumed.run(3)
    assert df["r2vpo/lambda"].to_list() == lam  # bit-exact, every update
    assert resumed.objective_state == full.objective_state


def test_checkpoint_refuses_a_non_numeric_objective_state(tokenizer, tiny_model_config, tmp_path):
    run = _make_run(tokenizer, tiny_model_config, tmp_path)
    run.objective_state["x"] = [1.0]
    with pytest.raises(WorkbenchError, match="objective_state"):
        run.save_checkpoint()


def test_loop_supplies_expert_demonstrations_and_the_update_index(tokenizer, tiny_model_config):
    run = _make_run(tokenizer, tiny_model_config, objective="chord",
                    objective_params={"mu_warmup": 2.0, "mu_decay": 2.0, "mu_peak": 0.8, "mu_valley": 0.1})
    df = run.run(5)
    assert df["chord/mu"].to_list() == pytest.approx([mu_by_hand(k, 2, 2, 0.8, 0.1) for k in range(5)], rel=1e-12)
    n_expert = df["chord/expert_tokens"].to_list()
    assert all(n > 0 for n in n_expert)  # one demonstration (answer + EOS) per prompt group
    assert all(math.isfinite(x) and x > 0 for x in df["chord/sft_loss"].to_list())


def test_loop_tb_gets_a_reference_model(tokenizer, tiny_model_config):
    run = _make_run(tokenizer, tiny_model_config, objective="tb")
    assert run.ref_model is not None
    df = run.run(2)
    assert df["tb/log_z_mean"].is_finite().all()
    plain = _make_run(tokenizer, tiny_model_config)
    assert plain.ref_model is None
    plain.knobs.set(objective="tb")
    with pytest.raises(WorkbenchError, match="reference model"):
        plain.step()
