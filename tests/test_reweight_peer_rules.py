"""The peer frameworks' rules of workbench/steps/reweight/peer_rules.py: dppo_tv, dppo_kl (DPPO, arXiv:2602.04879),
opsm (DeepSeek-V3.2's off-policy sequence masking), vespo (arXiv:2602.10693) and topr_token (token-level TOPR,
arXiv:2503.14286). This file holds their hand-computed rows on the 2x3 example (CASES, EXTRA_CASES, METRICS) and
per-token gradients on random batches (GRADIENTS, WEIGHTS), which test_reweight_objectives.py runs; here, every
rule's loss and gradient is compared with an independent float64 reference written in plain Python from the
peers' formulas (random batches with masked rows, NaN padding and log-ratios up to +-50, every aggregation), the
masks' direction, float32 finiteness at the parameter extremes, the weight curves and the parameter errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.steps.reweight import AGGREGATIONS, policy_loss
from workbench.steps.reweight.curves import weight_curve

from reweight_helpers import (
    ADV, B, BEH, F64, LP, LR, R, ROWS, T, VALID, clip, error_message, ppo_dloss, ppo_loss, row_log_ratio,
    token_case, token_grad,
)


# ---------------------------------------------------------------------------------------------
# the formulas, in plain Python (floats): shared by the hand rows and the random-batch reference
# ---------------------------------------------------------------------------------------------
def prob(logp):
    """A log-prob as a probability; log-probs above 0 count as probability 1."""
    return math.exp(min(logp, 0.0))


def binary_kl(logp, logq):
    """Bernoulli KL(q || p) of DPPO-Binary-KL with the peers' 1e-8 guard."""
    p, q = prob(logp), prob(logq)
    return q * (min(logq, 0.0) - min(logp, 0.0)) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))


def dppo_masked(kind, logp, logq, a, dl, dh):
    """True when DPPO's binary trust region drops the token (only moves in the direction A pushes)."""
    p, q = prob(logp), prob(logq)
    if kind == "tv":
        return (a > 0 and p - q > dh) or (a < 0 and q - p > dl)
    d = binary_kl(logp, logq)
    return (a > 0 and p > q and d > dh) or (a < 0 and p < q and d > dl)


def vespo_phi(log_w, a, kp=2.0, lp_=3.0, kn=3.0, ln=2.0):
    """phi(W) = W^k exp(lambda (1 - W)) in log space, W = exp(log_w) clamped to [1e-8, e^20]."""
    k, lam = (kp, lp_) if a >= 0 else (kn, ln)
    lw = clip(log_w, math.log(1e-8), 20.0)
    return math.exp(lam + k * lw - lam * math.exp(lw))


def topr_w(r, a, pos=(1.0, 1.0), neg=(0.0, 1.0)):
    return clip(r, *(pos if a >= 0 else neg))


# ---------------------------------------------------------------------------------------------
# hand rows on the 2x3 example (reweight_helpers: row 0 A = +1, row 1 A = -0.5)
# ---------------------------------------------------------------------------------------------
def _dppo(kind, dl, dh):
    def keep(k):
        return 0.0 if dppo_masked(kind, LP[k], BEH[k[0]][k[1]], ADV[k[0]], dl, dh) else 1.0
    return token_case(lambda k: -keep(k) * R[k] * ADV[k[0]], lambda k: -keep(k) * R[k] * ADV[k[0]])


def _opsm(delta, lo=0.2, hi=0.2):
    kl = {i: -sum(LR[(i, t)] for t in ROWS[i]) / len(ROWS[i]) for i in ROWS}  # mean log(mu / pi)

    def keep(k):
        return 0.0 if ADV[k[0]] < 0 and kl[k[0]] > delta else 1.0
    return token_case(lambda k: keep(k) * ppo_loss(R[k], ADV[k[0]], lo, hi),
                      lambda k: keep(k) * ppo_dloss(R[k], ADV[k[0]], lo, hi))


def _vespo(**kw):
    phi = {i: vespo_phi(sum(LR[(i, t)] for t in ROWS[i]), ADV[i], **kw) for i in ROWS}
    return token_case(lambda k: -phi[k[0]] * ADV[k[0]] * LP[k], lambda k: -phi[k[0]] * ADV[k[0]])


def _topr_token(**kw):
    return token_case(lambda k: -topr_w(R[k], ADV[k[0]], **kw) * ADV[k[0]] * LP[k],
                      lambda k: -topr_w(R[k], ADV[k[0]], **kw) * ADV[k[0]])


# The default DPPO-TV thresholds keep every example token (largest moves: +0.088 up at A > 0, -0.173 down at
# A < 0), so the main row uses thresholds that mask one token in each direction.
CASES = {
    "dppo_tv": ({"delta_low": 0.1, "delta_high": 0.05}, *_dppo("tv", 0.1, 0.05)),
    "dppo_kl": ({}, *_dppo("kl", 0.05, 0.05)),
    "opsm": ({"delta": 0.05}, *_opsm(0.05)),
    "vespo": ({}, *_vespo()),
    "topr_token": ({}, *_topr_token()),
}

EXTRA_CASES = [
    ("dppo_tv", {}, *_dppo("tv", 0.2, 0.2)),
    ("dppo_kl", {"delta_high": 0.02}, *_dppo("kl", 0.05, 0.02)),
    ("opsm", {}, *_opsm(0.5)),
    ("opsm", {"delta": 0.05, "clip_high": 0.7, "clip_low": 0.1}, *_opsm(0.05, 0.1, 0.7)),
    ("vespo", {"k_pos": 1.0, "lambda_pos": 0.5, "k_neg": 0.0, "lambda_neg": 1.0},
     *_vespo(kp=1.0, lp_=0.5, kn=0.0, ln=1.0)),
    ("topr_token", {"neg_high": 0.5, "pos_low": 0.5, "pos_high": 1.3}, *_topr_token(pos=(0.5, 1.3), neg=(0.0, 0.5))),
]

_PHI_EX = {i: vespo_phi(sum(LR[(i, t)] for t in ROWS[i]), ADV[i]) for i in ROWS}
METRICS = {
    # masked: (0, 1) rose 0.088 > 0.05 at A > 0; (1, 0) fell 0.173 > 0.1 at A < 0
    "dppo_tv": {"offpolicy/masked_frac": 2 / 5, "dppo/masked_frac_high": 1 / 5, "dppo/masked_frac_low": 1 / 5,
                "offpolicy/clipfrac": 0.0},
    # binary KL of (1, 0) is 0.178 > 0.05 (its probability fell at A < 0); (0, 1) has 0.025
    "dppo_kl": {"offpolicy/masked_frac": 1 / 5, "dppo/masked_frac_high": 0.0, "dppo/masked_frac_low": 1 / 5},
    # row 1 (A < 0) has mean log(mu / pi) = 0.1 > 0.05: both its tokens drop; (1, 0) would be clipped low but is
    # masked, so only (0, 1) counts as clipped
    "opsm": {"offpolicy/masked_frac": 2 / 5, "opsm/masked_seq_frac": 1 / 2, "offpolicy/clipfrac": 1 / 5,
             "offpolicy/clipfrac_low": 0.0, "offpolicy/clipfrac_high": 1 / 5,
             "opsm/seq_kl_mean": (-0.1 + 0.1) / 2},
    "vespo": {"vespo/weight_mean": (3 * _PHI_EX[0] + 2 * _PHI_EX[1]) / 5, "offpolicy/masked_frac": 0.0},
    "topr_token": {"offpolicy/truncated_frac": 1 / 5},  # (1, 1): r = 3.67 > 1 at A < 0
}


# per-token gradient of the summed loss on reweight_helpers.random_batch: d[...] are lists, adv is [B]
def _g_dppo(kind, dl, dh):
    def grad(d, i, t):
        lr, beh, a = d["lr"][i][t], d["beh"][i][t], d["adv"][i]
        return 0.0 if dppo_masked(kind, beh + lr, beh, a, dl, dh) else -math.exp(lr) * a
    return grad


def _g_opsm(d, i, t):
    a, kl = d["adv"][i], -row_log_ratio(d["lr"], d["mask"], i, True)
    return 0.0 if a < 0 and kl > 0.1 else ppo_dloss(math.exp(d["lr"][i][t]), a)


GRADIENTS = {
    "dppo_tv": ({"delta_low": 0.1, "delta_high": 0.1}, _g_dppo("tv", 0.1, 0.1)),
    "dppo_kl": ({"delta_low": 0.01, "delta_high": 0.01}, _g_dppo("kl", 0.01, 0.01)),
    "opsm": ({"delta": 0.1}, _g_opsm),
}

# name -> (params, weight(lr, adv, mask, i, t)) with d(sum_t L_t)/d logp_t = -weight * A
WEIGHTS = {
    "vespo": ({}, lambda lr, adv, mask, i, t: vespo_phi(row_log_ratio(lr, mask, i, False), adv[i])),
    "topr_token": ({}, lambda lr, adv, mask, i, t: topr_w(math.exp(lr[i][t]), adv[i])),
}


# ---------------------------------------------------------------------------------------------
# an independent float64 reference on hard batches: value and gradient of every aggregation
# ---------------------------------------------------------------------------------------------
def _ratio(lp, beh):
    """(r, dr/dlogp) under the workbench's +-20 clamp of log r (no gradient beyond it)."""
    lr = lp - beh
    r = math.exp(clip(lr, -20.0, 20.0))
    return r, (r if -20.0 < lr < 20.0 else 0.0)


def reference_terms(name, params, lp, beh, adv, mask):
    """{(i, t): (L_t, dL_t/dlogp_t)} over the valid tokens, from the peers' formulas (lists in, floats out)."""
    valid = {i: [t for t in range(len(mask[i])) if mask[i][t]] for i in range(len(mask))}
    out = {}
    for i, ts in valid.items():
        seq_kl = sum(beh[i][t] - lp[i][t] for t in ts) / max(len(ts), 1)
        seq_lr = sum(clip(lp[i][t] - beh[i][t], -20.0, 20.0) for t in ts)
        for t in ts:
            a, (r, dr) = adv[i][t], _ratio(lp[i][t], beh[i][t])
            if name in ("dppo_tv", "dppo_kl"):
                m = dppo_masked(name[-2:], lp[i][t], beh[i][t], a, params["delta_low"], params["delta_high"])
                out[(i, t)] = (0.0, 0.0) if m else (-r * a, -dr * a)
            elif name == "opsm":
                lo, hi = params["clip_low"], params["clip_high"]
                clipped = (a > 0 and r > 1 + hi) or (a < 0 and r < 1 - lo)
                keep = not (a < 0 and seq_kl > params["delta"])
                out[(i, t)] = (-min(r * a, clip(r, 1 - lo, 1 + hi) * a) * keep,
                               0.0 if clipped or not keep else -dr * a)
            elif name == "vespo":
                phi = vespo_phi(seq_lr, a, params["k_pos"], params["lambda_pos"], params["k_neg"],
                                params["lambda_neg"])
                out[(i, t)] = (-phi * a * lp[i][t], -phi * a)
            else:
                w = topr_w(r, a, (params["pos_low"], params["pos_high"]), (params["neg_low"], params["neg_high"]))
                out[(i, t)] = (-w * a * lp[i][t], -w * a)
    return out


def reference_coefficients(mode, mask):
    """Weight of each valid token's loss in the aggregate (docs/design.md, "Aggregation"; factor T)."""
    counts = [sum(1 for v in row if v) for row in mask]
    n, rows, width = max(sum(counts), 1), max(sum(1 for c in counts if c), 1), len(mask[0])
    coef = {"token-mean": lambda i: 1 / n, "seq-mean-token-sum": lambda i: 1 / rows,
            "seq-mean-token-mean": lambda i: 1 / (rows * counts[i]), "seq-mean-token-sum-norm": lambda i: 1 / width}
    return {(i, t): coef[mode](i) for i in range(len(mask)) for t in range(width) if mask[i][t]}


def hard_batch(seed, scale, token_adv):
    """5 x 7 float64 batch: q in (e^-8, 1], log r in +-scale plus +-50 / +-30 outliers, an all-masked row, a
    length-1 row, a row of one sign, NaN garbage at padded positions (lists for the reference, tensors)."""
    g = torch.Generator().manual_seed(seed)
    beh = -torch.rand(5, 7, generator=g, dtype=F64) * 8
    lr = (torch.rand(5, 7, generator=g, dtype=F64) * 2 - 1) * scale
    lr[0, 0], lr[0, 1], lr[2, 0], lr[4, 1] = 50.0, -50.0, 30.0, -30.0
    mask = (torch.rand(5, 7, generator=g) < 0.75).to(F64)
    mask[0, :2] = 1
    mask[1] = 0
    mask[3] = 0
    mask[3, 2] = 1
    adv = torch.randn(5, 7, generator=g, dtype=F64) * 2 if token_adv else torch.randn(5, generator=g, dtype=F64)
    adv[4] = -abs(adv[4])
    lp = beh + lr
    adv_bt = adv if token_adv else adv[:, None].expand(5, 7)
    lists = (lp.tolist(), beh.tolist(), adv_bt.tolist(), mask.tolist())
    pad = mask == 0
    dirty = [torch.where(pad, torch.full_like(lp, math.nan), x) for x in (lp, beh)]
    adv_in = torch.where(pad, torch.full_like(adv, math.nan), adv) if token_adv else adv
    return lists, (dirty[0], dirty[1], adv_in, mask)


def _close(got, expected, scale):
    """Relative error <= 1e-6 (the absolute slack covers summation order and subnormal underflow only)."""
    assert abs(got - expected) <= 1e-6 * abs(expected) + 1e-12 * scale + 1e-290, (got, expected)


REFERENCE_VARIANTS = [
    ("dppo_tv", {"delta_low": 0.2, "delta_high": 0.2}), ("dppo_tv", {"delta_low": 0.02, "delta_high": 0.05}),
    ("dppo_kl", {"delta_low": 0.05, "delta_high": 0.05}), ("dppo_kl", {"delta_low": 0.005, "delta_high": 0.3}),
    ("opsm", {"delta": 0.5, "clip_low": 0.2, "clip_high": 0.2}),
    ("opsm", {"delta": 0.0, "clip_low": 0.5, "clip_high": 3.0}),
    ("vespo", {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}),
    ("vespo", {"k_pos": 10.0, "lambda_pos": 0.01, "k_neg": 0.0, "lambda_neg": 20.0}),
    ("topr_token", {"pos_low": 1.0, "pos_high": 1.0, "neg_low": 0.0, "neg_high": 1.0}),
    ("topr_token", {"pos_low": 0.5, "pos_high": 2.0, "neg_low": 0.1, "neg_high": 0.8}),
]


@pytest.mark.parametrize("name,params", REFERENCE_VARIANTS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(REFERENCE_VARIANTS)])
@pytest.mark.parametrize("seed,scale,token_adv", [(0, 0.3, False), (1, 3.0, True), (2, 50.0, False), (3, 50.0, True)])
def test_value_and_gradient_match_an_independent_reference(name, params, seed, scale, token_adv):
    (lp_l, beh_l, adv_l, mask_l), (lp, beh, adv, mask) = hard_batch(seed, scale, token_adv)
    terms = reference_terms(name, params, lp_l, beh_l, adv_l, mask_l)
    assert any(d != 0.0 for _, d in terms.values())
    for mode in AGGREGATIONS:
        coef = reference_coefficients(mode, mask_l)
        leaf = lp.clone().requires_grad_()
        loss, _ = policy_loss(name, leaf, beh, adv, mask, aggregation=mode, **params)
        loss.backward()
        size = sum(abs(coef[k] * v[0]) for k, v in terms.items())
        _close(float(loss.detach()), sum(coef[k] * v[0] for k, v in terms.items()), size)
        assert torch.isfinite(leaf.grad).all() and (leaf.grad[mask == 0] == 0).all()
        for (i, t), (_, d) in terms.items():
            _close(float(leaf.grad[i, t]), coef[(i, t)] * d, 0.0)


# the batch really reaches the masks, clips and clamps the reference distinguishes
def test_the_hard_batches_exercise_every_branch():
    hits = {"tv": 0, "kl": 0, "opsm": 0, "clamp": 0}
    for seed, scale in ((0, 0.3), (1, 3.0), (2, 50.0)):
        (lp, beh, adv, mask), _ = hard_batch(seed, scale, True)
        for i in range(5):
            ts = [t for t in range(7) if mask[i][t]]
            kl = sum(beh[i][t] - lp[i][t] for t in ts) / max(len(ts), 1)
            for t in ts:
                hits["tv"] += dppo_masked("tv", lp[i][t], beh[i][t], adv[i][t], 0.2, 0.2)
                hits["kl"] += dppo_masked("kl", lp[i][t], beh[i][t], adv[i][t], 0.05, 0.05)
                hits["opsm"] += adv[i][t] < 0 and kl > 0.5
                hits["clamp"] += abs(lp[i][t] - beh[i][t]) > 20
    assert all(v > 0 for v in hits.values()), hits


# ---------------------------------------------------------------------------------------------
# behaviour the formulas promise
# ---------------------------------------------------------------------------------------------
def test_dppo_tv_masks_by_probability_moved_not_by_ratio():
    # token 0: mu = 1e-4, r = 100 (PPO would clip) but pi - mu = 0.0099: kept. token 1: mu = 0.5, r = 1.5, moved 0.25:
    # masked. token 2 fell by 0.25 at A > 0: not a move A pushes, kept.
    lp, beh = [math.log(1e-2), math.log(0.75), math.log(0.25)], [math.log(1e-4), math.log(0.5), math.log(0.5)]
    g, m = token_grad("dppo_tv", lp, beh, 1.0)
    assert g[0] == pytest.approx(-100.0 / 3, rel=1e-9) and g[1] == 0.0 and g[2] == pytest.approx(-0.5 / 3, rel=1e-9)
    assert m["dppo/masked_frac_high"] == pytest.approx(1 / 3) and m["dppo/masked_frac_low"] == 0.0
    g, m = token_grad("dppo_tv", lp, beh, -1.0)  # the same moves at A < 0: only the fall (token 2) is masked
    assert g[0] == pytest.approx(100.0 / 3, rel=1e-9) and g[1] == pytest.approx(1.5 / 3, rel=1e-9) and g[2] == 0.0
    assert m["dppo/masked_frac_low"] == pytest.approx(1 / 3)


def test_opsm_never_drops_positive_rows_and_drops_stale_negative_ones():
    lp, beh = [-3.0, -3.0], [-1.0, -1.0]  # mean log(mu / pi) = 2 > 0.5
    g_pos, m_pos = token_grad("opsm", lp, beh, 1.0, clip_low=1.0)
    g_neg, m_neg = token_grad("opsm", lp, beh, -1.0, clip_low=1.0)  # clip_low 1: PPO alone would keep the tokens
    assert g_pos == pytest.approx([-math.exp(-2) / 2] * 2, rel=1e-9) and m_pos["offpolicy/masked_frac"] == 0.0
    assert g_neg == [0.0, 0.0] and m_neg["opsm/masked_seq_frac"] == 1.0
    g, _ = token_grad("opsm", lp, beh, -1.0, clip_low=1.0, delta=2.5)
    assert g == pytest.approx([math.exp(-2) / 2] * 2, rel=1e-9)


def test_opsm_row_kl_uses_the_log_probs_not_the_clamped_ratio():
    # log r = -25, 5, 5, 5: mean log(mu / pi) = 2.5 from the log-probs, 1.25 from the +-20-clamped log-ratios
    lp, beh = [-25.5, -2.0, -2.0, -2.0], [-0.5, -7.0, -7.0, -7.0]
    g, m = token_grad("opsm", lp, beh, -1.0, delta=2.0, clip_high=200.0)
    assert g == [0.0] * 4 and m["opsm/seq_kl_mean"] == pytest.approx(2.5, rel=1e-12)
    g, _ = token_grad("opsm", lp, beh, -1.0, delta=3.0, clip_high=200.0)
    assert g[1] == pytest.approx(math.exp(5) / 4, rel=1e-9)


def test_dppo_kl_guard_near_probability_one():
    # q = 0.9, p = 1 - 1e-7: D = 0.9 log(0.9 / p) + 0.1 log(0.1 / (1e-7 + 1e-8)) = 1.2772 with the peers' 1e-8
    # guard (1.047 with a 1e-6 one), so delta_high = 1.2 masks the token
    lp, beh = [math.log1p(-1e-7)], [math.log(0.9)]
    assert binary_kl(lp[0], beh[0]) == pytest.approx(1.2772, abs=1e-4)
    assert token_grad("dppo_kl", lp, beh, 1.0, delta_high=1.2)[0] == [0.0]
    assert token_grad("dppo_kl", lp, beh, 1.0, delta_high=1.3)[0] == pytest.approx([-1 / 0.9], rel=1e-6)


def test_vespo_kernel_is_one_on_policy_and_peaks_at_k_over_lambda():
    w = torch.tensor([1.0, 2 / 3, 0.5, 1.0, 1.5], dtype=F64)
    pos = weight_curve("vespo", w, 1)  # k = 2, lambda = 3: peak at W = 2/3
    assert float(pos[0]) == pytest.approx(1.0, rel=1e-12)
    assert float(pos[1]) > max(float(pos[2]), float(pos[0]), float(pos[4]))
    neg = weight_curve("vespo", w, -1)  # k = 3, lambda = 2: peak at W = 1.5
    assert float(neg[4]) > float(neg[0]) > float(neg[1])


@pytest.mark.parametrize("name,params", [
    ("vespo", {"k_pos": 10.0, "lambda_pos": 0.01, "k_neg": 10.0, "lambda_neg": 0.01}),
    ("vespo", {"k_pos": 0.0, "lambda_pos": 20.0, "k_neg": 0.0, "lambda_neg": 20.0}),
    ("dppo_kl", {"delta_low": 0.0, "delta_high": 0.0}), ("dppo_tv", {"delta_low": 0.0, "delta_high": 1.0}),
    ("opsm", {"delta": 0.0, "clip_low": 1.0, "clip_high": 100.0}),
    ("topr_token", {"pos_low": 0.0, "pos_high": 1e6, "neg_low": 0.0, "neg_high": 1e6}),
])
def test_float32_at_the_parameter_extremes_is_finite_and_zero_on_padding(name, params):
    assert_float32_safe(name, params)


def assert_float32_safe(name, params):
    """float32 on the hard batches (log-ratios up to +-50, masked rows): finite loss and gradient,
    zero gradient on padding, float metrics (shared with the seed rules' tests)."""
    for seed, scale, token_adv in ((0, 50.0, True), (1, 5.0, False), (2, 50.0, False)):
        _, (lp, beh, adv, mask) = hard_batch(seed, scale, token_adv)
        leaf = lp.float().requires_grad_()
        loss, metrics = policy_loss(name, leaf, beh.float(), adv.float(), mask.float(), **params)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all(), (name, params)
        assert (leaf.grad[mask == 0] == 0).all()
        assert all(type(v) is float for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# weight curves (d loss / d logp = -w A on one-token responses) from the formulas
# ---------------------------------------------------------------------------------------------
RATIOS = [0.05, 0.3, 0.55, 0.62, 0.79, 0.81, 1.0, 1.19, 1.21, 1.39, 1.41, 1.9, 2.5]
HALF = math.log(0.5)  # mu = 0.5, so the probability moves are 0.5 (r - 1)


def _half_masked(kind, r, sign, delta):
    return dppo_masked(kind, math.log(0.5 * r), HALF, sign, delta, delta)


CURVES = {
    # TV: A > 0 masked once 0.5 (r - 1) > 0.2 (r > 1.4); A < 0 masked once 0.5 (1 - r) > 0.2 (r < 0.6)
    "dppo_tv": ({"behavior_logprob": HALF}, lambda r, s: 0.0 if _half_masked("tv", r, s, 0.2) else r),
    "dppo_kl": ({"behavior_logprob": HALF}, lambda r, s: 0.0 if _half_masked("kl", r, s, 0.05) else r),
    # one token: mean log(mu / pi) = -log r, so A < 0 drops r < e^-0.5, then PPO's clip at 0.8 / 1.2
    "opsm": ({}, lambda r, s: 0.0 if (s < 0 and -math.log(r) > 0.5) else ppo_dloss(r, s) / -s),
    "vespo": ({}, lambda r, s: vespo_phi(math.log(r), s)),
    "topr_token": ({}, lambda r, s: topr_w(r, s)),
}


@pytest.mark.parametrize("name", sorted(CURVES))
@pytest.mark.parametrize("sign", [1, -1])
def test_weight_curve_matches_the_formula(name, sign):
    kw, fn = CURVES[name]
    got = weight_curve(name, torch.tensor(RATIOS, dtype=F64), sign, **kw)
    expected = torch.tensor([fn(r, sign) for r in RATIOS], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    if name == "dppo_tv":  # the grid reaches both masks
        assert (got == 0).any() and (got != 0).any()


# ---------------------------------------------------------------------------------------------
# bad parameters: one line naming the field, the value and what is valid
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params,needle", [
    ("topr_token", {"neg_low": 0.5, "neg_high": 0.2}, "topr_token.neg_low=0.5 is invalid: expected <= neg_high=0.2"),
    ("topr_token", {"pos_low": 2.0}, "topr_token.pos_low=2.0 is invalid: expected <= pos_high=1.0"),
    ("vespo", {"lambda_pos": 0.0}, "vespo.lambda_pos=0.0 is out of range: expected a number in [0.01, 20.0]"),
    ("vespo", {"k_neg": 11.0}, "vespo.k_neg=11.0 is out of range"),
    ("dppo_tv", {"delta_high": 1.5}, "dppo_tv.delta_high=1.5 is out of range: expected a number in [0.0, 1.0]"),
    ("dppo_kl", {"delta_low": -0.1}, "dppo_kl.delta_low=-0.1 is out of range"),
    ("opsm", {"delta": math.nan}, "opsm.delta=nan is invalid: expected a finite number"),
    ("opsm", {"mask_threshold": 0.5}, "objective 'opsm' has no parameter 'mask_threshold'"),
])
def test_bad_parameters_are_one_line_errors(name, params, needle):
    lp, beh = torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)
    msg = error_message(policy_loss, name, lp, beh, torch.ones(1, dtype=F64), torch.ones(1, 2), **params)
    assert needle in msg

