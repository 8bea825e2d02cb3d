"""The shared machinery of workbench/steps/reweight (core.py, aggregate.py): the registry's metadata, defaults,
presets and registration checks; the four loss aggregations by hand; the shared diagnostics by hand; what
holds for every objective (on-policy REINFORCE where the metadata says so, row advantages equal their
broadcast, half precision computed in float32), the proximal anchor, the log-ratio clamp; and bad inputs,
each a one-line WorkbenchError naming the parameter or tensor.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import (
    AGGREGATIONS,
    OBJECTIVES,
    LossOutput,
    Param,
    aggregate,
    objective_defaults,
    policy_loss,
    register_objective,
    validate_params,
)

from reweight_helpers import (
    ADV, F64, LP, LR, N, R, ROWS, VALID, error_message, example, make_context, on_policy_grads, ppo_loss,
    random_batch, run_example, seq_logr,
)

# ---------------------------------------------------------------------------------------------
# shared diagnostics
# ---------------------------------------------------------------------------------------------


def _quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    return xs[lo] + (pos - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo])


def test_shared_diagnostics_by_hand():
    _, _, m, _ = run_example("ppo_clip", {})
    r = [R[k] for k in VALID]
    lr = [LR[k] for k in VALID]
    a = [ADV[k[0]] for k in VALID]
    lp = [LP[k] for k in VALID]
    losses = [abs(ppo_loss(R[k], ADV[k[0]])) for k in VALID]
    seq_w = [math.exp(seq_logr(i, False)) for i in ROWS]
    mlp, ma = sum(lp) / N, sum(a) / N
    expected = {
        "loss/policy": sum(ppo_loss(R[k], ADV[k[0]]) for k in VALID) / N,  # PPO-clip's token-mean loss
        "offpolicy/ratio_mean": sum(r) / N, "offpolicy/ratio_min": min(r), "offpolicy/ratio_max": max(r),
        "offpolicy/m2": sum(x * x for x in lr) / N,
        "offpolicy/ess_token": sum(r) ** 2 / (N * sum(x * x for x in r)),
        "offpolicy/ess_seq": sum(seq_w) ** 2 / (2 * sum(x * x for x in seq_w)),
        "offpolicy/kl_k1": sum(-x for x in lr) / N,
        "offpolicy/kl_k3": sum(math.exp(x) - 1 - x for x in lr) / N,
        "offpolicy/chi2_token": sum(x * x for x in r) / N - 1,
        "offpolicy/pos_share": sum(losses[:3]) / sum(losses),
        "offpolicy/cov_logp_adv": sum((x - mlp) * (y - ma) for x, y in zip(lp, a)) / N,
    }
    pos, neg = r[:3], r[3:]
    for q, tag in ((0.05, "q05"), (0.5, "q50"), (0.95, "q95")):
        expected[f"offpolicy/ratio_pos_{tag}"] = _quantile(pos, q)
        expected[f"offpolicy/ratio_neg_{tag}"] = _quantile(neg, q)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-9), key
    assert all(type(v) is float for v in m.values())


def test_nan_quantiles_when_a_sign_is_missing_and_all_masked_metrics():
    lp, beh, _, mask = example()
    _, m = policy_loss("ppo_clip", lp, beh, torch.tensor([1.0, 2.0], dtype=F64), mask)
    assert math.isnan(m["offpolicy/ratio_neg_q50"]) and not math.isnan(m["offpolicy/ratio_pos_q50"])
    loss, m = policy_loss("ppo_clip", lp, beh, torch.tensor([1.0, 2.0], dtype=F64), torch.zeros_like(mask))
    assert float(loss.detach()) == 0.0 and math.isnan(m["offpolicy/ratio_mean"]) and m["offpolicy/clipfrac"] == 0.0
    _, m = policy_loss("ppo_clip", lp, beh, torch.zeros(2, dtype=F64), mask)
    assert math.isnan(m["offpolicy/pos_share"])  # every per-token loss is 0


# ---------------------------------------------------------------------------------------------
# every objective; the anchor and the clamp
# ---------------------------------------------------------------------------------------------
REDUCES = [(n, shape) for n in OBJECTIVES.names() if OBJECTIVES.meta(n)["reduces_to_reinforce"]
           for shape in ("B", "BT") if not (shape == "BT" and n in ("gspo", "geo_mean"))]


# gspo and geo_mean weight each row by its mean advantage, so they equal REINFORCE for [B] advantages only.
@pytest.mark.parametrize("name,adv_shape", REDUCES)
def test_on_policy_gradient_equals_reinforce(name, adv_shape):
    grads = on_policy_grads(name, adv_shape=adv_shape)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_row_advantages_equal_their_broadcast(name):
    out = []
    for shape in ("B", "BT"):
        lp, beh, adv, mask = random_batch(4)
        if shape == "BT":
            adv = adv[:, None].expand(4, 5).clone()
        loss, _ = policy_loss(name, lp, beh, adv, mask, context=make_context(name, lp, beh, adv, mask))
        loss.backward()
        out.append((loss.detach(), lp.grad))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-14)


def test_prox_logprobs_is_the_anchor():
    lp, beh, adv, mask = example()
    prox = beh + 0.25
    loss_a, m_a = policy_loss("ppo_clip", lp, beh, adv, mask, prox_logprobs=prox)
    lp2 = lp.detach().clone().requires_grad_()
    loss_b, m_b = policy_loss("ppo_clip", lp2, prox, adv, mask)
    assert float(loss_a.detach()) == float(loss_b.detach())
    assert m_a["offpolicy/ratio_mean"] == m_b["offpolicy/ratio_mean"]
    assert float(loss_a.detach()) != float(policy_loss("ppo_clip", lp, beh, adv, mask)[0].detach())


def test_log_ratio_is_clamped_so_nothing_overflows():
    lp = torch.tensor([[100.0, -100.0]], dtype=F64, requires_grad=True)
    beh = torch.zeros(1, 2, dtype=F64)
    loss, m = policy_loss("is", lp, beh, torch.tensor([1.0], dtype=F64), torch.ones(1, 2, dtype=F64))
    assert float(loss.detach()) == pytest.approx(-(math.exp(20) + math.exp(-20)) / 2, rel=1e-12)
    assert m["offpolicy/ratio_max"] == pytest.approx(math.exp(20), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    # exp(20) overflows float16; the loss is computed in float32, the gradient returns in the input dtype.
    lp = torch.tensor([[10.0, -10.0, 0.5]], dtype=dtype, requires_grad=True)
    beh = torch.tensor([[-15.0, 15.0, 0.0]], dtype=dtype)
    for name in OBJECTIVES.names():
        adv, mask = torch.tensor([-1.0]), torch.ones(1, 3)
        loss, m = policy_loss(name, lp, beh, adv, mask, context=make_context(name, lp, beh, adv, mask))
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        assert lp.grad.dtype == dtype and torch.isfinite(lp.grad).all(), name
        assert m["offpolicy/ratio_max"] == pytest.approx(math.exp(20), rel=1e-6), name
        lp.grad = None


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------

AGG_L = [[1.0, 2.0, math.nan], [4.0, 5.0, 6.0], [math.inf, -math.inf, 9.0]]
AGG_M = [[1, 1, 0], [1, 1, 1], [0, 0, 0]]  # last row has zero valid tokens
AGG_EXPECTED = {
    ("token-mean", None): (1 + 2 + 4 + 5 + 6) / 5,
    ("seq-mean-token-sum", None): ((1 + 2) + (4 + 5 + 6)) / 2,
    ("seq-mean-token-mean", None): ((1 + 2) / 2 + (4 + 5 + 6) / 3) / 2,
    ("seq-mean-token-sum-norm", None): 18 / 3,
    ("seq-mean-token-sum-norm", 4.0): 18 / 4,
}


@pytest.mark.parametrize("mode,factor", list(AGG_EXPECTED))
def test_aggregation_by_hand(mode, factor):
    L = torch.tensor(AGG_L, dtype=F64, requires_grad=True)
    for mask in (torch.tensor(AGG_M, dtype=F64), torch.tensor(AGG_M, dtype=torch.bool)):
        out = aggregate(L, mask, mode, factor)
        assert float(out.detach()) == pytest.approx(AGG_EXPECTED[(mode, factor)], rel=1e-12)
    out.backward()
    assert torch.isfinite(L.grad).all() and (L.grad[torch.tensor(AGG_M) == 0] == 0).all()


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_of_zero_valid_tokens_is_zero(mode):
    L = torch.full((2, 3), math.nan, dtype=F64, requires_grad=True)
    out = aggregate(L, torch.zeros(2, 3), mode)
    out.backward()
    assert float(out.detach()) == 0.0 and (L.grad == 0).all()


def test_aggregation_bad_mode_and_factor():
    with pytest.raises(WorkbenchError, match="token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")
    with pytest.raises(WorkbenchError, match="loss_scale_factor"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "seq-mean-token-sum-norm", 0.0)


# ---------------------------------------------------------------------------------------------
# metadata and params
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_metadata_is_complete(name):
    meta = OBJECTIVES.meta(name)
    assert meta["paper"].strip() and meta["summary"].strip() and "\n" not in meta["summary"]
    assert meta["default_aggregation"] in AGGREGATIONS
    assert isinstance(meta["reduces_to_reinforce"], bool)
    assert (OBJECTIVES.get(name).__doc__ or "").strip()
    for p in meta["params"]:
        assert isinstance(p, Param) and p.doc.strip() and isinstance(p.live, bool)
        if p.choices is not None:
            assert p.default in p.choices
        else:
            assert p.low is None or p.low <= p.default
            assert p.high is None or p.default <= p.high
    assert validate_params(name, {}) == objective_defaults(name)
    for preset in meta["presets"]:
        validate_params(name, objective_defaults(name, preset))


def test_defaults_and_presets():
    assert objective_defaults("ppo_clip") == {"clip_low": 0.2, "clip_high": 0.2}
    assert objective_defaults("ppo_clip", "dapo") == {"clip_low": 0.2, "clip_high": 0.28}
    assert objective_defaults("gspo") == {"clip_low": 3e-4, "clip_high": 4e-4}
    assert objective_defaults("m2po") == {"tau": 0.04, "variant": "alg1"}
    assert objective_defaults("tis") == {"cap": 2.0, "level": "token"}
    assert objective_defaults("dual_clip")["clip_c"] == 3.0
    assert validate_params("ppo_clip", {"clip_high": 1}) == {"clip_low": 0.2, "clip_high": 1.0}
    with pytest.raises(WorkbenchError, match="grpo"):
        objective_defaults("ppo_clip", "nope")


def test_registration_rejects_bad_metadata():
    with pytest.raises(WorkbenchError, match="out of range"):
        @register_objective("_bad_default", paper="p", summary="s", params=[Param("x", 5.0, low=0.0, high=1.0)])
        def _bad(inp, x):
            return LossOutput(inp.ratio)
    with pytest.raises(WorkbenchError, match="do not match"):
        @register_objective("_bad_sig", paper="p", summary="s", params=[Param("x", 0.5)])
        def _bad2(inp, y):
            return LossOutput(inp.ratio)
    with pytest.raises(WorkbenchError, match="paper"):
        register_objective("_bad_paper", paper="", summary="s")
    with pytest.raises(WorkbenchError, match="already registered"):
        register_objective("ppo_clip", paper="p", summary="s")(lambda inp: None)
    assert "_bad_default" not in OBJECTIVES and "_bad_sig" not in OBJECTIVES


# ---------------------------------------------------------------------------------------------
# bad inputs: one-line WorkbenchError naming the thing (error_message checks the one line)
# ---------------------------------------------------------------------------------------------


def test_unknown_objective_lists_valid_names():
    msg = error_message(policy_loss, "ppo", *example())
    assert "'ppo'" in msg and all(n in msg for n in OBJECTIVES.names())


def test_unknown_param_names_it_and_lists_valid_ones():
    msg = error_message(policy_loss, "ppo_clip", *example(), clip_hihg=0.3)
    assert "clip_hihg" in msg and "clip_low" in msg and "clip_high" in msg and "ppo_clip" in msg
    assert "no parameter" in error_message(policy_loss, "reinforce", *example(), tau=1.0)


@pytest.mark.parametrize("name,param,value", [
    ("ppo_clip", "clip_low", 1.5), ("ppo_clip", "clip_high", -0.1), ("m2po", "tau", -1.0),
    ("m2po", "tau", 11.0), ("tis", "cap", 0.5), ("gspo", "clip_low", 2.0),
])
def test_out_of_range_param(name, param, value):
    msg = error_message(policy_loss, name, *example(), **{param: value})
    assert name in msg and param in msg and repr(value) in msg and "[" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "0.2", None])
def test_non_numeric_param(value):
    msg = error_message(validate_params, "ppo_clip", {"clip_low": value})
    assert "clip_low" in msg


def test_choice_params():
    msg = error_message(policy_loss, "tis", *example(), level="batch")
    assert "level" in msg and "token" in msg and "sequence" in msg
    assert "alg1" in error_message(validate_params, "m2po", {"variant": "paper"})


def test_topr_and_sapo_extra_checks():
    assert "neg_low" in error_message(validate_params, "topr", {"neg_low": 2.0})
    assert "tau_pos" in error_message(validate_params, "sapo", {"tau_pos": 0.0})


@pytest.mark.parametrize("which", ["behavior_logprobs", "response_mask", "advantages", "prox_logprobs"])
def test_shape_mismatch_names_the_tensor(which):
    lp, beh, adv, mask = example()
    kw = dict(logprobs=lp, behavior_logprobs=beh, advantages=adv, response_mask=mask)
    bad = torch.zeros(2, 4, dtype=F64) if which != "advantages" else torch.zeros(3, dtype=F64)
    if which == "prox_logprobs":
        kw["prox_logprobs"] = bad
    else:
        kw[which] = bad
    msg = error_message(policy_loss, "ppo_clip", **kw)
    assert which in msg and "shape" in msg


def test_logprobs_must_be_2d_float():
    _, beh, adv, mask = example()
    assert "logprobs" in error_message(policy_loss, "ppo_clip", torch.zeros(2, 3, 1), beh, adv, mask)
    assert "logprobs" in error_message(policy_loss, "ppo_clip", torch.zeros(2, 3, dtype=torch.long), beh, adv, mask)


def test_mask_must_be_binary():
    lp, beh, adv, mask = example()
    assert "response_mask" in error_message(policy_loss, "ppo_clip", lp, beh, adv, mask * 0.5)


def test_bad_aggregation_name():
    assert "seq-mean-token-mean" in error_message(policy_loss, "ppo_clip", *example(), aggregation="sum")


@pytest.mark.parametrize("which", ["logprobs", "behavior_logprobs", "advantages", "prox_logprobs"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_at_a_valid_token_names_the_tensor(which, bad):
    lp, beh, adv, mask = example()
    prox = beh.clone()
    tensors = {"logprobs": lp.detach().clone(), "behavior_logprobs": beh, "advantages": adv, "prox_logprobs": prox}
    target = tensors[which]
    if target.dim() == 1:
        target[1] = bad
    else:
        target[1, 1] = bad
    msg = error_message(policy_loss, "ppo_clip", tensors["logprobs"], beh, adv, mask, prox_logprobs=prox)
    assert which in msg and ("nan" in msg or "inf" in msg)
    if which != "advantages":
        assert "[1, 1]" in msg

