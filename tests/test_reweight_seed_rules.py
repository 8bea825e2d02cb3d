"""The seed papers' ratio rules of workbench/steps/reweight/seed_rules.py: bpo (arXiv:2604.18578), humanline
(arXiv:2509.24207) and hapo (arXiv:2509.16591). This file holds their hand-computed rows on the 2x3 example (CASES,
EXTRA_CASES, METRICS) and per-token gradients on random batches (WEIGHTS, GRADIENTS), which
test_reweight_objectives.py runs; here, every rule's loss and gradient is compared with an independent float64
reference written in plain Python from the formulas of the module docstring (hard batches with masked rows, NaN
padding and log-ratios up to +-50, every aggregation), plus the weight curves, float32 finiteness at the parameter
extremes and the parameter errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.steps.reweight import AGGREGATIONS, policy_loss
from workbench.steps.reweight.curves import weight_curve

from reweight_helpers import ADV, F64, LP, R, REF, ROWS, VALID, clip, error_message, token_case, token_grad
from test_reweight_peer_rules import assert_float32_safe, hard_batch, reference_coefficients


# ---------------------------------------------------------------------------------------------
# the formulas, in plain Python (floats): shared by the hand rows and the references
# ---------------------------------------------------------------------------------------------
def bpo_term(r, dr, a, el=0.2, eh=0.2):
    """(L, dL/dlogp) of BPO: |A| (r - r*)^2 / (2 eps), r* = 1 + eh (A > 0) or 1 - el (A < 0); dr = dr/dlogp."""
    if a == 0:
        return 0.0, 0.0
    target, eps = (1 + eh, eh) if a > 0 else (1 - el, el)
    return abs(a) * (r - target) ** 2 / (2 * eps), abs(a) * (r - target) * dr / eps


def humanline_term(r, dr, a, lo=0.2, hi=0.28):
    """(L, dL/dlogp) of humanline clipping: -clip(r, 1 - lo, 1 + hi) A, no gradient outside the band."""
    return -clip(r, 1 - lo, 1 + hi) * a, (-dr * a if 1 - lo < r < 1 + hi else 0.0)


def hapo_row(lps, rs, drs, advs, elmin=0.2, elmax=0.3, ehmin=0.2, ehmax=0.28, beta=1.0):
    """[(L_t, dL_t/dlogp_t)] of one row of HAPO from its valid tokens' log-probs, ratios, dr/dlogp and A."""
    h = [1 - math.exp(min(lp, 0.0)) for lp in lps]
    spread = [math.exp(beta * x) for x in h]
    mean = sum(spread) / len(spread)
    out = []
    for x, e, r, dr, a in zip(h, spread, rs, drs, advs):
        a2 = a * e / mean
        lo, hi = 1 - (elmax - (elmax - elmin) * x), 1 + ehmin + (ehmax - ehmin) * x
        clipped = (a2 > 0 and r > hi) or (a2 < 0 and r < lo)
        out.append((-min(r * a2, clip(r, lo, hi) * a2), 0.0 if clipped else -dr * a2))
    return out


# ---------------------------------------------------------------------------------------------
# hand rows on the 2x3 example (reweight_helpers: row 0 A = +1, row 1 A = -0.5)
# ---------------------------------------------------------------------------------------------
def _bpo(**kw):
    return token_case(lambda k: bpo_term(R[k], R[k], ADV[k[0]], **kw)[0],
                      lambda k: bpo_term(R[k], R[k], ADV[k[0]], **kw)[1])


def _humanline(ratio=R, **kw):
    return token_case(lambda k: humanline_term(ratio[k], ratio[k], ADV[k[0]], **kw)[0],
                      lambda k: humanline_term(ratio[k], ratio[k], ADV[k[0]], **kw)[1])


def _hapo_terms(**kw):
    terms = {}
    for i, ts in ROWS.items():
        keys = [(i, t) for t in ts]
        row = hapo_row([LP[k] for k in keys], [R[k] for k in keys], [R[k] for k in keys],
                       [ADV[i]] * len(keys), **kw)
        terms.update(zip(keys, row))
    return terms


def _hapo(**kw):
    terms = _hapo_terms(**kw)
    return token_case(lambda k: terms[k][0], lambda k: terms[k][1])


# the example's reference policy (reweight_helpers.REF) as the humanline anchor
R_REF = {k: math.exp(LP[k] - REF[k[0]][k[1]]) for k in VALID}

CASES = {
    "bpo": ({}, *_bpo()),
    "humanline": ({}, *_humanline()),
    "hapo": ({}, *_hapo()),
}

EXTRA_CASES = [
    ("bpo", {"eps_low": 0.5, "eps_high": 1.0}, *_bpo(el=0.5, eh=1.0)),
    ("humanline", {"clip_low": 0.9, "clip_high": 3.0}, *_humanline(lo=0.9, hi=3.0)),
    ("humanline", {"anchor": "reference"}, *_humanline(ratio=R_REF)),
    ("hapo", {"beta": 0.0}, *_hapo(beta=0.0)),
    ("hapo", {"eps_low_min": 0.1, "eps_low_max": 0.9, "eps_high_max": 5.0, "beta": 3.0},
     *_hapo(elmin=0.1, elmax=0.9, ehmax=5.0, beta=3.0)),
]


def _hapo_clip_fracs():
    low = high = 0
    for i, ts in ROWS.items():
        for t in ts:
            x = 1 - math.exp(LP[(i, t)])
            lo, hi = 1 - (0.3 - 0.1 * x), 1.2 + 0.08 * x
            low += ADV[i] < 0 and R[(i, t)] < lo
            high += ADV[i] > 0 and R[(i, t)] > hi
    return low / 5, high / 5


_HAPO_LOW, _HAPO_HIGH = _hapo_clip_fracs()
METRICS = {
    # past r*: (0, 1) r = 1.65 > 1.2 at A > 0, (1, 0) r = 0.22 < 0.8 at A < 0
    "bpo": {"bpo/overshoot_frac": 2 / 5},
    # band [0.8, 1.28]: only (0, 0) (r = 1.105) is inside; (0, 2) and (1, 0) below, (0, 1) and (1, 1) above
    "humanline": {"offpolicy/clipfrac_low": 2 / 5, "offpolicy/clipfrac_high": 2 / 5, "offpolicy/clipfrac": 4 / 5},
    "hapo": {"offpolicy/clipfrac_low": _HAPO_LOW, "offpolicy/clipfrac_high": _HAPO_HIGH,
             "offpolicy/clipfrac": _HAPO_LOW + _HAPO_HIGH,
             "hapo/entropy_proxy_mean": sum(1 - math.exp(LP[k]) for k in VALID) / 5},
}


def _bpo_weight(lr, adv, mask, i, t):
    r, a = math.exp(lr[i][t]), adv[i]
    return r * (1.2 - r) / 0.2 if a > 0 else r * (r - 0.8) / 0.2


def _hapo_grad(d, i, t):
    ts = [u for u in range(len(d["mask"][i])) if d["mask"][i][u]]
    rs = [math.exp(d["lr"][i][u]) for u in ts]
    row = hapo_row([d["beh"][i][u] + d["lr"][i][u] for u in ts], rs, rs, [d["adv"][i]] * len(ts))
    return row[ts.index(t)][1]


WEIGHTS = {
    "bpo": ({}, _bpo_weight),
    "humanline": ({}, lambda lr, adv, mask, i, t: math.exp(lr[i][t]) if 0.8 < math.exp(lr[i][t]) < 1.28 else 0.0),
}
GRADIENTS = {"hapo": ({}, _hapo_grad)}


def test_the_example_reaches_every_branch():
    # bpo: tokens on both sides of r*; hapo: clipped tokens and a non-uniform redistribution
    assert 0 < METRICS["bpo"]["bpo/overshoot_frac"] < 1
    assert _HAPO_LOW > 0 and _HAPO_HIGH > 0
    assert len({round(_hapo_terms()[k][1] / R[k], 9) for k in ((0, 0), (0, 2))}) == 2  # w_t differs


# ---------------------------------------------------------------------------------------------
# an independent float64 reference on hard batches: value and gradient of every aggregation
# ---------------------------------------------------------------------------------------------
def _ratio(lp, anchor):
    """(r, dr/dlogp) under the workbench's +-20 clamp of log r (no gradient beyond it)."""
    lr = lp - anchor
    r = math.exp(clip(lr, -20.0, 20.0))
    return r, (r if -20.0 < lr < 20.0 else 0.0)


def reference_terms(name, params, lp, beh, adv, mask, ref=None):
    """{(i, t): (L_t, dL_t/dlogp_t)} over the valid tokens (lists in, floats out)."""
    out = {}
    for i in range(len(mask)):
        ts = [t for t in range(len(mask[i])) if mask[i][t]]
        if name == "hapo" and ts:
            ratios = [_ratio(lp[i][t], beh[i][t]) for t in ts]
            row = hapo_row([lp[i][t] for t in ts], [r for r, _ in ratios], [d for _, d in ratios],
                           [adv[i][t] for t in ts], params["eps_low_min"], params["eps_low_max"],
                           params["eps_high_min"], params["eps_high_max"], params["beta"])
            out.update(zip(((i, t) for t in ts), row))
        for t in ts if name != "hapo" else ():
            if name == "bpo":
                out[(i, t)] = bpo_term(*_ratio(lp[i][t], beh[i][t]), adv[i][t], params["eps_low"], params["eps_high"])
            else:
                anchor = ref[i][t] if params["anchor"] == "reference" else beh[i][t]
                out[(i, t)] = humanline_term(*_ratio(lp[i][t], anchor), adv[i][t], params["clip_low"],
                                             params["clip_high"])
    return out


def _close(got, expected, scale):
    """Relative error <= 1e-6 (the absolute slack covers summation order and subnormal underflow only)."""
    assert abs(got - expected) <= 1e-6 * abs(expected) + 1e-12 * scale + 1e-290, (got, expected)


REFERENCE_VARIANTS = [
    ("bpo", {"eps_low": 0.2, "eps_high": 0.2}), ("bpo", {"eps_low": 0.01, "eps_high": 10.0}),
    ("humanline", {"clip_low": 0.2, "clip_high": 0.28, "anchor": "behaviour"}),
    ("humanline", {"clip_low": 0.6, "clip_high": 4.0, "anchor": "reference"}),
    ("hapo", {"eps_low_min": 0.2, "eps_low_max": 0.3, "eps_high_min": 0.2, "eps_high_max": 0.28, "beta": 1.0}),
    ("hapo", {"eps_low_min": 0.0, "eps_low_max": 1.0, "eps_high_min": 0.05, "eps_high_max": 6.0, "beta": 10.0}),
]


@pytest.mark.parametrize("name,params", REFERENCE_VARIANTS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(REFERENCE_VARIANTS)])
@pytest.mark.parametrize("seed,scale,token_adv", [(0, 0.3, False), (1, 3.0, True), (2, 50.0, False), (3, 50.0, True)])
def test_value_and_gradient_match_an_independent_reference(name, params, seed, scale, token_adv):
    (lp_l, beh_l, adv_l, mask_l), (lp, beh, adv, mask) = hard_batch(seed, scale, token_adv)
    ref_l = [[b - 0.4 + 0.1 * t for t, b in enumerate(row)] for row in beh_l]
    ref = torch.where(mask == 0, torch.full_like(lp, math.nan), torch.tensor(ref_l, dtype=F64))
    terms = reference_terms(name, params, lp_l, beh_l, adv_l, mask_l, ref_l)
    assert any(v != 0.0 for v, _ in terms.values())  # (at +-50 humanline's narrow band may zero every gradient)
    assert scale == 50.0 or any(d != 0.0 for _, d in terms.values())
    for mode in AGGREGATIONS:
        coef = reference_coefficients(mode, mask_l)
        leaf = lp.clone().requires_grad_()
        loss, _ = policy_loss(name, leaf, beh, adv, mask, aggregation=mode, context={"ref_logprobs": ref}, **params)
        loss.backward()
        size = sum(abs(coef[k] * v[0]) for k, v in terms.items())
        _close(float(loss.detach()), sum(coef[k] * v[0] for k, v in terms.items()), size)
        assert torch.isfinite(leaf.grad).all() and (leaf.grad[mask == 0] == 0).all()
        for (i, t), (_, d) in terms.items():
            _close(float(leaf.grad[i, t]), coef[(i, t)] * d, 0.0)


def test_the_hard_batches_exercise_every_branch():
    hits = {"bpo_overshoot": 0, "humanline_low": 0, "humanline_high": 0, "hapo_clip": 0, "clamp": 0}
    for seed, scale in ((0, 0.3), (1, 3.0), (2, 50.0)):
        (lp, beh, adv, mask), _ = hard_batch(seed, scale, True)
        terms = reference_terms("hapo", dict(REFERENCE_VARIANTS[4][1]), lp, beh, adv, mask)
        for (i, t), (_, d) in terms.items():
            r, a = math.exp(clip(lp[i][t] - beh[i][t], -20, 20)), adv[i][t]
            hits["bpo_overshoot"] += (a > 0 and r > 1.2) or (a < 0 and r < 0.8)
            hits["humanline_low"] += r < 0.8
            hits["humanline_high"] += r > 1.28
            hits["hapo_clip"] += d == 0.0 and abs(lp[i][t] - beh[i][t]) < 20
            hits["clamp"] += abs(lp[i][t] - beh[i][t]) > 20
    assert all(v > 0 for v in hits.values()), hits


# ---------------------------------------------------------------------------------------------
# behaviour the formulas promise
# ---------------------------------------------------------------------------------------------
def test_bpo_pulls_the_ratio_back_past_its_optimum():
    # A > 0: r = 1.5 is past r* = 1.2, so the gradient raises the loss of increasing logp (weight < 0)
    g, _ = token_grad("bpo", [math.log(1.5)], [0.0], 1.0)
    assert g[0] == pytest.approx(1.0 * (1.5 - 1.2) * 1.5 / 0.2, rel=1e-12) and g[0] > 0
    g, _ = token_grad("bpo", [math.log(1.2)], [0.0], 1.0)  # exactly at the optimum: no push
    assert abs(g[0]) < 1e-12


def test_humanline_clips_both_signs_where_ppo_keeps_one():
    # r = 0.5 < 0.8: PPO keeps the gradient of a positive token (min picks r A), humanline gives none
    lp, beh = [math.log(0.5)], [0.0]
    assert token_grad("humanline", lp, beh, 1.0)[0] == [0.0]
    assert token_grad("ppo_clip", lp, beh, 1.0)[0] == pytest.approx([-0.5], rel=1e-12)


def test_hapo_bounds_follow_the_token_probability():
    # r = 0.75 at A < 0: a likely token (pi = 0.749, h = 0.251) has the lower bound 0.725 and keeps its
    # gradient; an unlikely one (pi = 0.01, h = 0.990) has the lower bound 0.799 and is clipped
    g_certain, _ = token_grad("hapo", [math.log(0.75 * 0.999)], [math.log(0.999)], -1.0)
    g_unsure, _ = token_grad("hapo", [math.log(0.75 * 0.0133)], [math.log(0.0133)], -1.0)
    assert g_certain[0] == pytest.approx(0.75, rel=1e-9) and g_unsure == [0.0]


@pytest.mark.parametrize("name,params", [
    ("bpo", {"eps_low": 0.01, "eps_high": 0.01}), ("bpo", {"eps_low": 1.0, "eps_high": 10.0}),
    ("humanline", {"clip_low": 0.0, "clip_high": 0.0}), ("humanline", {"clip_low": 1.0, "clip_high": 1e6}),
    ("hapo", {"eps_low_min": 0.0, "eps_low_max": 1.0, "eps_high_min": 0.0, "eps_high_max": 10.0, "beta": 10.0}),
])
def test_float32_at_the_parameter_extremes_is_finite_and_zero_on_padding(name, params):
    assert_float32_safe(name, params)


# ---------------------------------------------------------------------------------------------
# weight curves (d loss / d logp = -w A on one-token responses) from the formulas
# ---------------------------------------------------------------------------------------------
RATIOS = [0.05, 0.3, 0.55, 0.72, 0.79, 0.81, 1.0, 1.19, 1.21, 1.27, 1.29, 1.9, 2.5]
BEH_P = 0.05  # the curves' default behaviour probability (curves.DEFAULT_BEHAVIOR_LOGPROB)


def _hapo_curve(r, s):
    h = 1 - BEH_P * r  # one token: the redistribution weight is 1
    lo, hi = 1 - (0.3 - 0.1 * h), 1.2 + 0.08 * h
    return 0.0 if (s > 0 and r > hi) or (s < 0 and r < lo) else r


CURVES = {
    "bpo": lambda r, s: r * (1.2 - r) / 0.2 if s > 0 else r * (r - 0.8) / 0.2,
    "humanline": lambda r, s: r if 0.8 < r < 1.28 else 0.0,
    "hapo": _hapo_curve,
}


@pytest.mark.parametrize("name", sorted(CURVES))
@pytest.mark.parametrize("sign", [1, -1])
def test_weight_curve_matches_the_formula(name, sign):
    got = weight_curve(name, torch.tensor(RATIOS, dtype=F64), sign)
    expected = torch.tensor([CURVES[name](r, sign) for r in RATIOS], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert float(got[RATIOS.index(1.0)]) == pytest.approx(1.0, rel=1e-12)  # REINFORCE on-policy


# ---------------------------------------------------------------------------------------------
# bad parameters: one line naming the field, the value and what is valid
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params,needle", [
    ("bpo", {"eps_low": 0.0}, "bpo.eps_low=0.0 is out of range: expected a number in [0.01, 1.0]"),
    ("bpo", {"eps_high": math.inf}, "bpo.eps_high=inf is invalid: expected a finite number"),
    ("humanline", {"anchor": "initial"}, "humanline.anchor='initial' is invalid: expected one of behaviour, reference"),
    ("humanline", {"clip_low": 1.5}, "humanline.clip_low=1.5 is out of range"),
    ("hapo", {"eps_low_min": 0.5}, "hapo.eps_low_min=0.5 is invalid: expected <= eps_low_max=0.3"),
    ("hapo", {"eps_high_max": 0.1}, "hapo.eps_high_min=0.2 is invalid: expected <= eps_high_max=0.1"),
    ("hapo", {"beta": -1.0}, "hapo.beta=-1.0 is out of range: expected a number in [0.0, 10.0]"),
])
def test_bad_parameters_are_one_line_errors(name, params, needle):
    lp, beh = torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)
    msg = error_message(policy_loss, name, lp, beh, torch.ones(1, dtype=F64), torch.ones(1, 2), **params)
    assert needle in msg


def test_humanline_reference_anchor_needs_the_reference_log_probs():
    lp, beh = torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)
    msg = error_message(policy_loss, "humanline", lp, beh, torch.ones(1, dtype=F64), torch.ones(1, 2),
                        anchor="reference")
    assert "ref_logprobs" in msg
