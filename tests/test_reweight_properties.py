"""Property tests (hypothesis) for workbench.steps.reweight over every registered objective.

Batches range over log-ratios up to +-50, all-zero advantages, empty and all-masked rows,
length-1 and long (T up to 512) responses, with NaN/inf garbage at padded positions. For every
objective (and the non-default variants of its choice parameters) the loss and the gradient are
finite, padded tokens get exactly zero gradient, the garbage does not change anything, metrics are
floats with fractions in [0, 1], and no warning is raised.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.steps.reweight import AGGREGATIONS, OBJECTIVES, policy_loss

from reweight_helpers import make_context  # group ids, rewards, state, reference / expert log-probs

torch.set_num_threads(1)


def _variants() -> list[tuple[str, dict]]:
    """Every objective with its defaults, plus one run per non-default choice of string params."""
    out = []
    for name in OBJECTIVES.names():
        out.append((name, {}))
        for p in OBJECTIVES.meta(name)["params"]:
            for choice in p.choices or ():
                if choice != p.default:
                    out.append((name, {p.name: choice}))
    out += [("dual_clip", {"clip_c": 1.01}), ("cispo", {"eps_low": 0.2}), ("m2po", {"tau": 0.0}),
            ("tis", {"cap": 1.0, "level": "sequence"}), ("topr", {"neg_low": 0.5, "pos_high": 3.0})]
    return out


VARIANTS = _variants()
FRACTIONS = ("offpolicy/clipfrac", "offpolicy/masked_frac", "offpolicy/truncated_frac",
             "offpolicy/clipfrac_low", "offpolicy/clipfrac_high", "offpolicy/clipfrac_dual", "m2po/trust_frac",
             "offpolicy/ess_token", "offpolicy/ess_seq")


@st.composite
def batches(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.one_of(st.just(1), st.integers(2, 16), st.integers(17, 512)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 0.05, 1.0, 5.0, 50.0]))
    adv_kind = draw(st.sampled_from(["zero", "row", "token", "signed_rows"]))
    mask_kind = draw(st.sampled_from(["random", "full", "all_masked", "empty_rows", "prefix"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    garbage = draw(st.sampled_from([0.0, math.nan, math.inf, -math.inf]))
    g = torch.Generator().manual_seed(seed)
    beh = -torch.rand(b, t, generator=g, dtype=dtype) * 10
    lr = (torch.rand(b, t, generator=g, dtype=dtype) * 2 - 1) * scale
    lr = lr.clamp(-50, 50)
    lp = beh + lr
    if mask_kind == "full":
        mask = torch.ones(b, t, dtype=dtype)
    elif mask_kind == "all_masked":
        mask = torch.zeros(b, t, dtype=dtype)
    elif mask_kind == "prefix":  # right-padded responses of random length (maybe 0)
        lengths = torch.randint(0, t + 1, (b, 1), generator=g)
        mask = (torch.arange(t)[None, :] < lengths).to(dtype)
    else:
        mask = (torch.rand(b, t, generator=g) < 0.7).to(dtype)
        if mask_kind == "empty_rows":
            mask[::2] = 0
    if adv_kind == "zero":
        adv = torch.zeros(b, dtype=dtype)
    elif adv_kind == "row":
        adv = torch.randn(b, generator=g, dtype=dtype)
    elif adv_kind == "token":
        adv = torch.randn(b, t, generator=g, dtype=dtype) * 3
    else:
        adv = torch.tensor([(-1.0) ** i for i in range(b)], dtype=dtype)
    return lp, beh, adv, mask, garbage


def _with_garbage(x: torch.Tensor, pad: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(pad, torch.full_like(x, value), x) if x.dim() == 2 else x


def _run(name, params, lp, beh, adv, mask, agg):
    leaf = lp.clone().requires_grad_()
    ctx = make_context(name, leaf, beh, adv, mask, params)
    loss, metrics = policy_loss(name, leaf, beh, adv, mask, aggregation=agg, context=ctx, **params)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


@pytest.mark.slow  # ~19 s (50 generated batches x every objective): CI's slow line
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), agg=st.sampled_from(AGGREGATIONS))
def test_finite_loss_and_gradients_zero_on_padding_no_warnings(batch, agg):
    lp, beh, adv, mask, garbage = batch
    pad = mask == 0
    n_valid = int((~pad).sum())
    dirty = [_with_garbage(x, pad, garbage) for x in (lp, beh, adv)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, params in VARIANTS:
            loss, grad, metrics = _run(name, params, *dirty, mask, agg)
            assert torch.isfinite(loss), (name, params)
            assert torch.isfinite(grad).all(), (name, params)
            assert (grad[pad] == 0).all(), (name, params)
            assert all(type(v) is float for v in metrics.values())
            for key in FRACTIONS:
                if key in metrics and not math.isnan(metrics[key]):
                    assert -1e-6 <= metrics[key] <= 1 + 1e-6, (name, key, metrics[key])
            if n_valid == 0:
                assert float(loss) == 0.0 and (grad == 0).all()
            else:
                assert math.isfinite(metrics["offpolicy/m2"]) and math.isfinite(metrics["offpolicy/ess_token"])
                assert metrics["offpolicy/ess_token"] > 0
            # garbage at padded positions changes nothing
            clean = [torch.where(pad, torch.zeros_like(x), x) if x.dim() == 2 else x for x in (lp, beh, adv)]
            loss0, grad0, _ = _run(name, params, *clean, mask, agg)
            assert torch.equal(loss, loss0) and torch.equal(grad, grad0), (name, params)


def _scales_with_advantage(name: str, params: dict) -> bool:
    """False for objectives with a term that does not vanish with A: a regulariser (rec's k2 /
    forward_kl, r2vpo's ratio penalty, kl_cov's |log r| on its top-k tokens, which it selects even when
    every covariance is 0, as the released code does) or a learning signal other than A (tb's rewards,
    the preference objectives' reward-ranked pairs)."""
    if name in ("r2vpo", "tb", "kl_cov"):
        return False
    if name in ("online_dpo", "ipo", "wpo", "copg", "slic"):
        return False
    return not (name == "rec" and params.get("regularizer", "none") != "none")


@settings(max_examples=50, deadline=None)
@given(batch=batches())
def test_zero_advantages_give_zero_gradient(batch):
    lp, beh, _, mask, _ = batch
    adv = torch.zeros(lp.shape[0], dtype=lp.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, params in VARIANTS:
            agg = OBJECTIVES.meta(name)["default_aggregation"]
            _, grad, _ = _run(name, params, lp, beh, adv, mask, agg)
            if _scales_with_advantage(name, params):
                assert (grad == 0).all(), (name, params)
            else:
                assert torch.isfinite(grad).all() and (grad[mask == 0] == 0).all(), (name, params)
