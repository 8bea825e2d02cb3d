"""Corrections (workbench.steps.reweight.corrections) against hand-computed values, in bypass and decoupled
mode, the log-linear proximal approximation, numerical safety, config validation and the loop.

Expected numbers are derived in plain Python (``math``) from the formulas in the docstring of
workbench/steps/reweight/corrections.py, never by calling the implementation.
"""

from __future__ import annotations

import math
import warnings

import polars as pl
import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import build_model
from workbench.steps.reweight import policy_loss
from workbench.steps.reweight.corrections import PRESETS, Correction, loglinear_alpha, loglinear_proximal, make_correction

torch.set_num_threads(1)
F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# The 2x3 example. Row 0: A = +1, three tokens; row 1: A = -0.5, two tokens and one padded slot.
# D = log(pi_theta / mu) per token (bypass rho):
#   row 0: 0.1, 1.8 (rho = 6.05: above every cap), -0.6 (rho = 0.549: just inside [0.5, 2])
#          sum 1.3 -> product ratio 3.67 (> 2), mean 0.433 (geometric mean far from 1)
#   row 1: 0.05, -0.05: product ratio exactly 1, mean 0 (kept by every sequence criterion)
# Padding carries garbage (logprobs 7, behaviour -inf) that must not leak.
# ---------------------------------------------------------------------------------------------
BEH = [[-1.0, -2.0, -0.5], [-1.5, -2.5, -math.inf]]
D = {(0, 0): 0.1, (0, 1): 1.8, (0, 2): -0.6, (1, 0): 0.05, (1, 1): -0.05}
VALID = list(D)
ROWS = {0: [0, 1, 2], 1: [0, 1]}
ADV = {0: 1.0, 1: -0.5}
B, T, N = 2, 3, 5


def tensors(lp_of):
    lp = torch.tensor([[lp_of.get((i, t), 7.0) for t in range(T)] for i in range(B)], dtype=F64, requires_grad=True)
    beh = torch.tensor(BEH, dtype=F64)
    adv = torch.tensor([ADV[0], ADV[1]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
    return lp, beh, adv, mask


def bypass_inputs():
    return tensors({k: BEH[k[0]][k[1]] + d for k, d in D.items()})


def run(objective, correction, inputs=None, prox=None, **kw):
    lp, beh, adv, mask = inputs or bypass_inputs()
    loss, m = policy_loss(objective, lp, beh, adv, mask, correction=correction, prox_logprobs=prox, **kw)
    loss.backward()
    return float(loss.detach()), lp.grad, m


# ---- hand formulas -----------------------------------------------------------------------------


def rho(k):
    return math.exp(D[k])


def seq_sum(i):
    return sum(D[(i, t)] for t in ROWS[i])


def k3(d):
    return math.exp(d) - 1 - d


def expected_weights(preset):
    """(w, keep) per valid token for a preset name or a dict of fields, from its definition
    (``corrections.PRESETS``; the corrections module docstring)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    w, keep = {}, {}
    for (i, t) in VALID:
        level = p.get("weight", "none")
        raw = {"token": rho((i, t)), "sequence": math.exp(seq_sum(i)),
               "geo_mean": math.exp(seq_sum(i) / len(ROWS[i]))}.get(level)
        w[(i, t)] = 1.0 if raw is None else max(min(raw, p["cap"]), p.get("clip_low", 0.0))
        stat = p.get("reject", "none")
        lo, hi = p.get("reject_low", 0.0), p.get("reject_high")
        if stat == "none":
            ok = True
        elif stat == "token_k1":
            ok = (lo == 0 or rho((i, t)) >= lo) and rho((i, t)) <= hi
        elif stat == "seq_sum_k1":
            ok = lo <= math.exp(seq_sum(i)) <= hi
        elif stat == "seq_mean_k1":
            ok = lo <= math.exp(seq_sum(i) / len(ROWS[i])) <= hi
        elif stat == "seq_any_k1":
            ok = all(lo <= rho((i, s)) <= hi for s in ROWS[i])
        elif stat == "seq_mean_k3":
            ok = sum(k3(D[(i, s)]) for s in ROWS[i]) / len(ROWS[i]) <= hi
        else:
            raise AssertionError(stat)
        keep[(i, t)] = ok
    return w, keep


def reinforce_case(w, keep):
    """token-mean of keep * w * (-A logp): loss and gradient -keep w A / N."""
    lp = {k: BEH[k[0]][k[1]] + d for k, d in D.items()}
    loss = sum(-w[k] * ADV[k[0]] * lp[k] for k in VALID if keep[k]) / N
    grad = [[(-w[(i, t)] * ADV[i] / N if keep[(i, t)] else 0.0) if (i, t) in D else 0.0 for t in range(T)]
            for i in range(B)]
    return loss, grad


def ppo(u, a, lo=0.2, hi=0.2):
    """(loss, dloss/dlogp) of PPO-clip at ratio u, advantage a."""
    loss = -min(u * a, min(max(u, 1 - lo), 1 + hi) * a)
    clipped = (a > 0 and u > 1 + hi) or (a < 0 and u < 1 - lo)
    return loss, 0.0 if clipped else -u * a


def ppo_case(u_of, w, keep):
    loss = sum(w[k] * ppo(u_of[k], ADV[k[0]])[0] for k in VALID if keep[k]) / N
    grad = [[(w[(i, t)] * ppo(u_of[(i, t)], ADV[i])[1] / N if keep[(i, t)] else 0.0) if (i, t) in D else 0.0
             for t in range(T)] for i in range(B)]
    return loss, grad


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=tol, atol=1e-12)


# The example exercises every preset on both sides (guards against a degenerate fixture).
EXPECTED_REJECTED = {
    "token_tis": set(), "seq_tis": set(), "areal_clamp": set(),
    "token_mis": {(0, 1)},                     # 6.05 > 2 (0.549 >= 0.5 stays)
    "seq_mis": {(0, 0), (0, 1), (0, 2)},       # product 3.67 > 2
    "icepop": {(0, 1)},                        # 6.05 > 5
    "geo_rs": {(0, 0), (0, 1), (0, 2)},        # geometric mean 1.54 outside [0.999, 1.001]
    "k3_rs": {(0, 0), (0, 1), (0, 2)},         # mean k3 of row 0 = 0.79 > 0.01; row 1 = 0.00125
    "areal": {(0, 1)},                         # behaviour weight 6.05 > 5 -> masked
    "skyrl_outlier": set(),                    # every rho in [0.549, 6.05] is inside [1e-4, 100]
}


def test_every_preset_has_a_hand_case():
    assert set(PRESETS) == set(EXPECTED_REJECTED)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_rejects_the_expected_tokens(preset):
    _, keep = expected_weights(preset)
    assert {k for k in VALID if not keep[k]} == EXPECTED_REJECTED[preset]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_bypass_reinforce_by_hand(preset):
    w, keep = expected_weights(preset)
    loss, grad, m = run("reinforce", preset)
    exp_loss, exp_grad = reinforce_case(w, keep)
    close(loss, exp_loss)
    close(grad, exp_grad)
    assert grad[1, 2] == 0.0
    n_rej = len(EXPECTED_REJECTED[preset])
    assert m["correction/rejected_frac"] == pytest.approx(n_rej / N)
    assert m["correction/rejected_seq_frac"] == pytest.approx(len({i for i, _ in EXPECTED_REJECTED[preset]}) / 2)
    assert m["correction/decoupled"] == 0.0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_bypass_ppo_clip_by_hand(preset):
    # bypass: the objective's ratio is pi/mu too (the linter warns when a weight is applied on top)
    w, keep = expected_weights(preset)
    loss, grad, _ = run("ppo_clip", preset)
    exp_loss, exp_grad = ppo_case({k: rho(k) for k in VALID}, w, keep)
    close(loss, exp_loss)
    close(grad, exp_grad)


def test_seq_mis_metrics_by_hand():
    _, _, m = run("reinforce", "seq_mis")
    rhos = sorted(rho(k) for k in VALID)
    pos = 0.95 * (N - 1)
    q95 = rhos[int(pos)] + (pos - int(pos)) * (rhos[int(pos) + 1] - rhos[int(pos)])
    seq = [math.exp(seq_sum(0)), math.exp(seq_sum(1))]
    applied = [0.0, 0.0, 0.0, 1.0, 1.0]  # row 0 rejected; row 1 weight min(1, 2) = 1
    expected = {
        "correction/truncated_frac": 3 / 5,  # row 0's product 3.67 > C = 2 (before rejection)
        "correction/truncated_seq_frac": 1 / 2,
        "correction/rejected_frac": 3 / 5,
        "correction/rejected_seq_frac": 1 / 2,
        "correction/weight_mean": sum(applied) / N,
        "correction/ess": sum(applied) ** 2 / (N * sum(a * a for a in applied)),
        "correction/rho_mean": sum(rhos) / N, "correction/rho_max": max(rhos), "correction/rho_q95": q95,
        "correction/rho_seq_mean": sum(seq) / 2, "correction/rho_seq_max": max(seq),
        "correction/rho_seq_q95": seq[1] + 0.95 * (seq[0] - seq[1]),
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-9), key
    assert all(type(v) is float for v in m.values())


def test_token_tis_truncation_metrics_and_ess():
    _, _, m = run("reinforce", "token_tis")
    w = [min(rho(k), 2.0) for k in VALID]
    assert m["correction/truncated_frac"] == pytest.approx(1 / 5)
    assert m["correction/truncated_seq_frac"] == pytest.approx(1 / 2)
    assert m["correction/ess"] == pytest.approx(sum(w) ** 2 / (N * sum(x * x for x in w)), rel=1e-9)
    assert m["correction/rho_max"] == pytest.approx(math.exp(1.8), rel=1e-12)  # pre-truncation


def test_custom_k2_and_seq_max_statistics():
    # seq_max_k2: row 0 max 0.5 * 1.8^2 = 1.62, row 1 max 0.00125; token_k2 <= 0.01 keeps 0.1, 0.05, -0.05
    for spec, rejected in (({"reject": "seq_max_k2", "reject_high": 1.0}, {(0, 0), (0, 1), (0, 2)}),
                           ({"reject": "token_k2", "reject_high": 0.01}, {(0, 1), (0, 2)}),
                           ({"reject": "seq_sum_k3", "reject_high": 0.003}, {(0, 0), (0, 1), (0, 2)}),
                           ({"reject": "seq_sum_k1", "reject_low": 0.0, "reject_high": 4.0}, set())):
        _, grad, m = run("reinforce", {"preset": "custom", **spec})
        got = {k for k in VALID if float(grad[k]) == 0.0}
        assert got == rejected, spec
        assert m["correction/rejected_frac"] == pytest.approx(len(rejected) / N)


def test_normalised_token_weights_have_mean_one():
    _, grad, m = run("reinforce", {"preset": "token_tis", "normalize": True})
    w = [min(rho(k), 2.0) for k in VALID]
    mean = sum(w) / N
    exp = [[-w[VALID.index((i, t))] / mean * ADV[i] / N if (i, t) in D else 0.0 for t in range(T)] for i in range(B)]
    close(grad, exp)
    assert m["correction/weight_mean"] == pytest.approx(1.0)


def test_rejected_tokens_still_count_in_the_normaliser():
    # seq_mis rejects row 0: token-mean divides by all 5 tokens, seq-mean-token-mean by 2 rows
    _, grad, _ = run("reinforce", "seq_mis")
    close(grad[1, 0], 0.5 / 5)
    _, grad, _ = run("reinforce", "seq_mis", aggregation="seq-mean-token-mean")
    close(grad[1, 0], 0.5 / (2 * 2))


# ---- lower truncation, geometric-mean weight, any-token sequence rejection ------------------------
# Hand rows on the example: rho = e^0.1 = 1.105, e^1.8 = 6.05, e^-0.6 = 0.549 (row 0; A = +1) and
# e^0.05 = 1.051, e^-0.05 = 0.951 (row 1; A = -0.5). reinforce: gradient -keep w A / 5 per token.
NEW_CASES = {
    # token weight clip(rho, 0.6, 2): 0.549 is raised to 0.6, 6.05 cut to 2
    "clip_low": ({"weight": "token", "cap": 2.0, "clip_low": 0.6},
                 [[-math.exp(0.1) / 5, -2.0 / 5, -0.6 / 5], [0.5 * math.exp(0.05) / 5, 0.5 * math.exp(-0.05) / 5, 0.0]]),
    # row weight exp(mean log rho): row 0 exp(1.3 / 3) = 1.542 cut to 1.5; row 1 exp(0) = 1
    "geo_mean": ({"weight": "geo_mean", "cap": 1.5},
                 [[-1.5 / 5] * 3, [0.5 / 5, 0.5 / 5, 0.0]]),
    # geo_mean raised from below: row 1's 1 < 1.2 becomes 1.2; row 0's 1.542 stays
    "geo_mean_low": ({"weight": "geo_mean", "cap": 2.0, "clip_low": 1.2},
                     [[-math.exp(1.3 / 3) / 5] * 3, [0.5 * 1.2 / 5, 0.5 * 1.2 / 5, 0.0]]),
    # any token outside [0.5, 5]: 6.05 rejects the whole of row 0; row 1 kept with weight 1
    "seq_any_high": ({"reject": "seq_any_k1", "reject_low": 0.5, "reject_high": 5.0},
                     [[0.0, 0.0, 0.0], [0.5 / 5, 0.5 / 5, 0.0]]),
    # any token outside [0.55, 10]: 0.549 < 0.55 rejects row 0 from below
    "seq_any_low": ({"reject": "seq_any_k1", "reject_low": 0.55, "reject_high": 10.0},
                    [[0.0, 0.0, 0.0], [0.5 / 5, 0.5 / 5, 0.0]]),
    # bounds that every token meets: nothing rejected (the token-level k1 would also keep all)
    "seq_any_none": ({"reject": "seq_any_k1", "reject_low": 0.5, "reject_high": 7.0},
                     [[-1.0 / 5] * 3, [0.5 / 5, 0.5 / 5, 0.0]]),
}


@pytest.mark.parametrize("case", sorted(NEW_CASES))
def test_new_correction_hand_rows(case):
    spec, grad_by_hand = NEW_CASES[case]
    loss, grad, _ = run("reinforce", {"preset": "custom", **spec})
    close(grad, grad_by_hand)
    w, keep = expected_weights(spec)  # the same rows from the generic formula, with the loss
    exp_loss, exp_grad = reinforce_case(w, keep)
    close(loss, exp_loss)
    close(grad, exp_grad)


def test_new_corrections_in_decoupled_mode_weight_by_pi_prox_over_mu():
    # prox = mu e^D, pi = prox e^U: the weights are those of bypass mode above, the ratio e^U (PPO-clip)
    for spec, _ in NEW_CASES.values():
        inputs, prox = decoupled_inputs()  # a fresh leaf each time: gradients accumulate
        w, keep = expected_weights(spec)
        loss, grad, m = run("ppo_clip", {"preset": "custom", **spec}, inputs, prox)
        exp_loss, exp_grad = ppo_case({k: math.exp(U[k]) for k in VALID}, w, keep)
        close(loss, exp_loss)
        close(grad, exp_grad)
        assert m["correction/decoupled"] == 1.0


def test_clip_low_metrics_log_the_ratio_before_and_the_weight_after():
    _, _, m = run("reinforce", {"preset": "custom", "weight": "token", "cap": 2.0, "clip_low": 0.6})
    applied = [math.exp(0.1), 2.0, 0.6, math.exp(0.05), math.exp(-0.05)]
    assert m["correction/truncated_frac"] == pytest.approx(1 / 5)       # 6.05 -> 2
    assert m["correction/truncated_low_frac"] == pytest.approx(1 / 5)   # 0.549 -> 0.6
    assert m["correction/changed_frac"] == pytest.approx(1.0)           # no rho is exactly 1
    assert m["offpolicy/correction_changed_frac"] == m["correction/changed_frac"]
    assert m["correction/weight_mean"] == pytest.approx(sum(applied) / 5, rel=1e-12)
    assert m["correction/rho_mean"] == pytest.approx(sum(rho(k) for k in VALID) / 5, rel=1e-12)
    geo = [math.exp(seq_sum(0) / 3), math.exp(seq_sum(1) / 2)]
    assert m["correction/rho_geo_mean"] == pytest.approx(sum(geo) / 2, rel=1e-12)


def test_seq_any_rejection_metrics_and_changed_fraction():
    _, _, m = run("reinforce", {"preset": "custom", "reject": "seq_any_k1", "reject_low": 0.5, "reject_high": 5.0})
    assert m["correction/rejected_frac"] == pytest.approx(3 / 5)
    assert m["correction/rejected_seq_frac"] == pytest.approx(1 / 2)
    assert m["correction/changed_frac"] == pytest.approx(3 / 5)  # row 1 keeps weight 1: unchanged
    assert m["correction/truncated_low_frac"] == 0.0


def test_new_fields_describe_themselves():
    assert make_correction({"weight": "token", "clip_low": 0.5}).describe() == "token weight clip(rho, 0.5, 2)"
    assert "seq_any_k1 outside [0.0001, 100]" in make_correction("skyrl_outlier").describe()


# ---- decoupled mode ------------------------------------------------------------------------------

# prox = mu * exp(D) (so rho = pi_prox / mu = exp(D)); pi_theta = pi_prox * exp(U)
U = {(0, 0): 0.3, (0, 1): -0.1, (0, 2): 0.0, (1, 0): -0.3, (1, 1): 0.1}


def decoupled_inputs():
    prox = {k: BEH[k[0]][k[1]] + d for k, d in D.items()}
    lp_in = tensors({k: prox[k] + U[k] for k in VALID})
    prox_t = torch.tensor([[prox.get((i, t), 0.0) for t in range(T)] for i in range(B)], dtype=F64)
    return lp_in, prox_t


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_decoupled_clip_at_prox_and_behaviour_weight_by_hand(preset):
    inputs, prox = decoupled_inputs()
    w, keep = expected_weights(preset)  # rho = pi_prox / mu = exp(D): same weights as bypass above
    loss, grad, m = run("ppo_clip", preset, inputs, prox)
    exp_loss, exp_grad = ppo_case({k: math.exp(U[k]) for k in VALID}, w, keep)
    close(loss, exp_loss)
    close(grad, exp_grad)
    assert m["correction/decoupled"] == 1.0
    assert m["offpolicy/ratio_max"] == pytest.approx(math.exp(0.3))  # the objective's ratio is pi/pi_prox


def test_areal_decoupled_example_values():
    # AReaL: token (0, 1) has behaviour weight 6.05 > 5: masked; (0, 0): u = e^0.3 = 1.35 > 1.2 clipped
    inputs, prox = decoupled_inputs()
    loss, grad, _ = run("ppo_clip", "areal", inputs, prox)
    g = grad.tolist()
    assert g[0][0] == 0.0 and g[0][1] == 0.0
    close(g[0][2], -math.exp(-0.6) * 1.0 * 1.0 / 5)  # w = 0.549, u = 1, A = 1
    assert g[1][0] == 0.0  # u = e^-0.3 = 0.741 < 0.8 with A < 0: clipped at the proximal anchor
    close(g[1][1], -math.exp(-0.05) * math.exp(0.1) * -0.5 / 5)  # w = e^-0.05, u = e^0.1 inside the band


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("objective", ["ppo_clip", "gspo", "m2po", "cispo"])
def test_decoupled_with_prox_equal_behaviour_is_the_plain_objective(preset, objective):
    # rho = pi_prox / mu = 1 everywhere: no weight, no truncation, nothing rejected (Geo-RS keeps 1)
    lp, beh, adv, mask = bypass_inputs()
    prox = torch.where(mask > 0, beh, torch.zeros(()))
    loss_d, grad_d, m = run(objective, preset, (lp, beh, adv, mask), prox)
    loss_b, grad_b, _ = run(objective, None)
    close(loss_d, loss_b, 1e-12)
    close(grad_d, grad_b, 1e-12)
    assert m["correction/rejected_frac"] == 0.0 and m["correction/truncated_frac"] == 0.0


@pytest.mark.parametrize("preset", ["token_tis", "areal_clamp", "areal", "token_mis", "icepop"])
def test_decoupled_with_prox_equal_current_weights_by_capped_pi_over_mu(preset):
    # u = pi/pi_prox = 1: the clip is inert and the gradient weight is min(pi/mu, C) (0 if rejected)
    lp, beh, adv, mask = bypass_inputs()
    loss, grad, m = run("ppo_clip", preset, (lp, beh, adv, mask), lp.detach().clone())
    w, keep = expected_weights(preset)
    exp_grad = [[(-w[(i, t)] * ADV[i] / N if keep[(i, t)] else 0.0) if (i, t) in D else 0.0 for t in range(T)]
                for i in range(B)]
    close(grad, exp_grad)
    assert m["offpolicy/clipfrac"] == 0.0


# ---- log-linear proximal approximation ----------------------------------------------------------


def test_loglinear_alpha_by_hand():
    # AReaL numbering, update at version 5: v_theta = 5, v_prox = 4; behaviour versions 3 (stale 2),
    # 5 (on-policy: v_theta - v_b = 0 -> 0), 4 (stale 1 -> 0), 0 (stale 5)
    alpha = loglinear_alpha(torch.tensor([3, 5, 4, 0]), 5)
    close(alpha, [(4 - 3) / (5 - 3), 0.0, 0.0, 4 / 5])


def test_loglinear_proximal_by_hand():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], dtype=F64, requires_grad=True)
    beh = torch.tensor([[-1.6, -1.4], [-0.5, -math.inf]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    prox, alpha = loglinear_proximal(lp, beh, torch.tensor([3, 5]), 5, mask)
    a = 1 / 2  # (4 - 3) / (5 - 3); the on-policy row gets alpha 0 (pi_prox = mu)
    close(prox, [[-1.6 + a * (-1.0 + 1.6), -1.4 + a * (-2.0 + 1.4)], [-0.5, 0.0]])
    assert not prox.requires_grad and bool(torch.isfinite(prox).all())


def test_linear_proximal_interpolates_probabilities_by_hand():
    # AReaL prox_logp_method="linear": pi_prox = (1 - alpha) mu + alpha pi_theta, in probabilities
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7], [-0.2, -3.0]], dtype=F64, requires_grad=True)
    beh = torch.tensor([[-1.6, -1.4], [-0.5, -math.inf], [-2.5, -0.1]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    prox, alpha = loglinear_proximal(lp, beh, torch.tensor([3, 5, 0]), 5, mask, mode="linear")
    a, c = 1 / 2, 4 / 5  # rows 0 and 2: (4 - 3) / (5 - 3) and (4 - 0) / (5 - 0); row 1 on-policy: alpha 0
    want = [[math.log((1 - a) * math.exp(-1.6) + a * math.exp(-1.0)), math.log((1 - a) * math.exp(-1.4) + a * math.exp(-2.0))],
            [-0.5, 0.0],
            [math.log((1 - c) * math.exp(-2.5) + c * math.exp(-0.2)), math.log((1 - c) * math.exp(-0.1) + c * math.exp(-3.0))]]
    close(prox, want)
    close(alpha, [a, 0.0, c])
    loglin, _ = loglinear_proximal(lp, beh, torch.tensor([3, 5, 0]), 5, mask)
    assert bool((prox >= loglin - 1e-15).all())  # log is concave: the linear point is never below the log-linear one
    assert not prox.requires_grad and bool(torch.isfinite(prox).all())
    with pytest.raises(WorkbenchError, match=r"^mode='cubic' is invalid: expected loglinear or linear$"):
        loglinear_proximal(lp, beh, torch.tensor([3, 5, 0]), 5, mask, mode="cubic")


def test_loop_linear_proximal_runs_with_the_same_alpha(tokenizer, tiny_model_config):
    df = make_run(tokenizer, tiny_model_config, staleness=2, proximal="linear", correction="areal").run(4)
    assert df["correction/prox_alpha_mean"].to_list() == pytest.approx([0.0, 0.0, 1 / 2, 1 / 2])
    assert df["loss/grad_norm"].is_finite().all()
    loglin = make_run(tokenizer, tiny_model_config, staleness=2, proximal="loglinear", correction="areal").run(4)
    assert df["loss/grad_norm"][:2].to_list() == loglin["loss/grad_norm"][:2].to_list()  # alpha 0: both are mu
    assert df["loss/grad_norm"][2:].to_list() != loglin["loss/grad_norm"][2:].to_list()  # alpha 1/2: they differ


# ---- numerical safety, validation ----------------------------------------------------------------


SAFETY_SPECS = sorted(PRESETS) + sorted(NEW_CASES)


def as_spec(name):
    return name if name in PRESETS else {"preset": "custom", **NEW_CASES[name][0]}


@pytest.mark.parametrize("preset", SAFETY_SPECS)
@pytest.mark.parametrize("scale", [50.0, -50.0])
@pytest.mark.parametrize("decoupled", [False, True])
def test_extreme_ratios_never_leak_nan_or_inf(preset, scale, decoupled):
    lp, beh, adv, mask = bypass_inputs()
    lp = (lp.detach() + scale).requires_grad_()
    prox = (beh + scale / 2).where(mask > 0, torch.zeros(())) if decoupled else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, m = policy_loss("ppo_clip", lp, beh, adv, mask, correction=as_spec(preset), prox_logprobs=prox)
        loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(lp.grad).all())
    assert all(math.isfinite(v) for k, v in m.items() if k.startswith("correction/") and not math.isnan(v))
    assert m["correction/rho_max"] <= math.exp(20) * (1 + 1e-9)
    assert bool((lp.grad[mask == 0] == 0).all())


def test_all_masked_batch_gives_zero_loss_and_nan_statistics():
    lp, beh, adv, mask = bypass_inputs()
    loss, m = policy_loss("ppo_clip", lp, beh, adv, torch.zeros_like(mask), correction="seq_mis")
    assert float(loss.detach()) == 0.0
    assert m["correction/rejected_frac"] == 0.0 and math.isnan(m["correction/rho_mean"])


def test_nan_behaviour_at_a_valid_token_is_a_clear_error():
    lp, beh, adv, mask = bypass_inputs()
    beh[0, 1] = math.nan
    with pytest.raises(WorkbenchError, match="behavior_logprobs has a non-finite value"):
        policy_loss("ppo_clip", lp, beh, adv, mask, correction="token_tis")


@pytest.mark.parametrize("spec, match", [
    ({"preset": "custom", "cap": 0.5}, "correction.cap=0.5"),
    ({"preset": "custom", "weight": "row"}, "correction.weight='row'"),
    ({"preset": "custom", "reject": "seq_max_k1", "reject_high": 2.0}, "correction.reject='seq_max_k1'"),
    ({"preset": "custom", "reject": "seq_mean_k3"}, "reject_high=None"),
    ({"preset": "custom", "reject": "token_k2", "reject_high": 0.1, "reject_low": 0.05}, "reject_low=0.05"),
    ({"preset": "custom", "reject": "token_k1", "reject_high": 0.5, "reject_low": 2.0}, "reject_low=2.0"),
    ({"preset": "custom", "kap": 2.0}, "no field 'kap'"),
    ({"preset": "custom", "weight": "token", "clip_low": 3.0}, r"correction.clip_low=3.0 is invalid: expected a number in \[0, cap=2.0\]"),
    ({"preset": "custom", "clip_low": -0.1}, "correction.clip_low=-0.1"),
    ({"preset": "custom", "weight": "geo", "cap": 2.0}, "correction.weight='geo' is invalid: expected none | token | sequence | geo_mean"),
    ({"preset": "custom", "reject": "seq_any_k1"}, "reject_high=None"),
    ({"preset": "custom", "reject": "seq_any_k1", "reject_low": 3.0, "reject_high": 2.0}, "reject_low=3.0"),
    ("tis", "unknown correction preset 'tis'"),
    (3, "correction=3"),
])
def test_bad_correction_is_a_one_line_error(spec, match):
    with pytest.raises(WorkbenchError, match=match) as err:
        make_correction(spec)
    assert "\n" not in str(err.value)


def test_make_correction_forms():
    assert make_correction(None) is None and make_correction("") is None
    assert make_correction("seq_mis") == Correction(**PRESETS["seq_mis"])
    assert make_correction("token_tis", {"cap": 3}) == Correction(weight="token", cap=3.0)
    assert make_correction({"preset": "k3_rs", "reject_high": 0.02}).reject_high == 0.02
    assert make_correction(Correction(weight="token")) == Correction(weight="token")
    assert "seq_sum_k1 outside [0.5, 2]" in make_correction("seq_mis").describe()


@pytest.mark.parametrize("bad, match", [
    (dict(proximal="prox"), "proximal='prox'"),
    (dict(correction="tis"), "unknown correction preset 'tis'"),
    (dict(correction_params={"cap": 3.0}), "correction_params="),
    (dict(correction="token_tis", correction_params={"cap": -1}), "correction.cap=-1"),
    (dict(loss_scale_factor=-1.0), "loss_scale_factor=-1.0"),
])
def test_config_validation(bad, match):
    with pytest.raises(WorkbenchError, match=match) as err:
        RunConfig(**bad)
    assert "\n" not in str(err.value)


def test_config_round_trips_the_new_fields():
    cfg = RunConfig(correction="seq_mis", correction_params={"cap": 3.0}, proximal="loglinear", loss_scale_factor=64)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.correction_spec() == Correction(**{**PRESETS["seq_mis"], "cap": 3.0})
    assert RunConfig().correction_spec() is None


# ---- the loop --------------------------------------------------------------------------------------

# an untrained model is never right: a length-shaped reward gives the groups reward variance (weights move)
SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=3, eval_size=16, lr=1e-2, seed=3,
             rewards=(("overlong", 1.0, {"max_len": 4, "cache_len": 3}),))


def make_run(tokenizer, tiny_model_config, tmp_path=None, **overrides):
    cfg = RunConfig(**{**SMALL, "out_dir": str(tmp_path) if tmp_path else "", "run_name": "r", **overrides})
    model = build_model(tiny_model_config, tokenizer, seed=0)
    return Run(cfg, model=model, tokenizer=tokenizer, log=lambda s: None)


def deterministic(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([c for c in df.columns if not c.startswith("perf/")])


def test_loop_recompute_anchors_the_ratio_at_the_current_policy(tokenizer, tiny_model_config):
    df = make_run(tokenizer, tiny_model_config, staleness=2, proximal="recompute", correction="token_tis").run(4)
    # one update per batch: pi_prox is the policy being updated, the objective's ratio is exactly 1 ...
    assert df["offpolicy/ratio_max"].to_list() == pytest.approx([1.0] * 4, abs=1e-6)
    assert (df["offpolicy/clipfrac"] == 0.0).all()
    # ... while the behaviour weight pi_prox / mu carries the staleness
    assert df["correction/decoupled"].to_list() == [1.0] * 4
    assert abs(df["correction/rho_max"][3] - 1.0) > 1e-4
    assert all(df[c].is_finite().all() for c in ("loss/total", "loss/grad_norm", "correction/ess"))


def test_loop_recompute_is_once_per_batch_so_reuse_moves_the_ratio(tokenizer, tiny_model_config):
    df = make_run(tokenizer, tiny_model_config, staleness=2, proximal="recompute", correction="token_tis",
                  num_minibatches=2, prompts_per_step=8, group_size=4, lr=1e-2,
                  rewards=(("overlong", 1.0, {"max_len": 4, "cache_len": 3}),)).run(6)  # reward variance
    # AReaL: pi_prox is the policy at the start of the batch's first update. That update's ratio is
    # exactly 1; the second minibatch is trained after one update, so its ratio moves off 1
    # whenever that update changed the weights (non-zero gradient).
    ratio_max, grad = df["offpolicy/ratio_max"].to_list(), df["loss/grad_norm"].to_list()
    assert all(ratio_max[k] == pytest.approx(1.0, abs=1e-6) for k in (0, 2, 4))
    moved = [k for k in (1, 3, 5) if grad[k - 1] > 0]
    assert moved and all(abs(ratio_max[k] - 1.0) > 1e-5 for k in moved)


def test_loop_loglinear_alpha_follows_the_staleness(tokenizer, tiny_model_config):
    df = make_run(tokenizer, tiny_model_config, staleness=2, proximal="loglinear", correction="areal").run(4)
    # update k trains on data from version k - min(k, 2): AReaL's alpha = (s - 1) / s, 0 for s <= 1
    assert df["correction/prox_alpha_mean"].to_list() == pytest.approx([0.0, 0.0, 1 / 2, 1 / 2])


def test_loop_with_correction_resumes_exactly(tokenizer, tiny_model_config, tmp_path):
    kw = dict(staleness=2, updates_per_batch=2, num_minibatches=2, proximal="recompute", correction="seq_mis",
              correction_params={"cap": 3.0})
    full = make_run(tokenizer, tiny_model_config, tmp_path / "a", **kw).run(8)
    first = make_run(tokenizer, tiny_model_config, tmp_path / "b", **kw)
    first.run(3)  # mid-batch
    resumed = Run.resume(tmp_path / "b" / "r", model=build_model(tiny_model_config, tokenizer, seed=0),
                         tokenizer=tokenizer, log=lambda s: None)
    both = resumed.run(5)
    assert deterministic(both).equals(deterministic(full))
    assert "correction/rejected_frac" in both.columns


def test_update_step_recompute_equals_passing_the_current_policy_as_prox(tiny_model_config, tokenizer,
                                                                         addition_task):
    import random

    from workbench.steps.generate import SamplingParams, TransformersSampler
    from workbench.policy.logprobs import token_logprobs
    from workbench.steps.update import build_optimizer, update_step

    def batch_and_model():
        model = build_model(tiny_model_config, tokenizer, seed=0)
        ex = addition_task.sample(random.Random(0), 4)
        r = TransformersSampler(model, tokenizer).generate(ex, 4, SamplingParams(max_new_tokens=4),
                                                            generator=torch.Generator().manual_seed(0),
                                                            policy_version=0)
        adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).repeat(len(r) // 4)
        # pretend the sampler was a different policy: shift the behaviour log-probs
        beh = r.behavior_logprobs - 0.3 * torch.linspace(-1, 1, r.behavior_logprobs.shape[1])
        return model, r.with_(advantages=adv, behavior_logprobs=beh * r.response_mask)

    kw = dict(objective="ppo_clip", objective_params={"clip_low": 0.2, "clip_high": 0.2}, aggregation="token-mean",
              temperature=1.0, grad_clip=0.0, correction="token_tis")
    model_a, batch = batch_and_model()
    m_a = update_step(model_a, build_optimizer(model_a, 1e-3, 0.0, (0.9, 0.999)), batch, proximal="recompute", **kw)
    model_b, batch_b = batch_and_model()
    with torch.no_grad():
        prox, _ = token_logprobs(model_b, batch_b)
    m_b = update_step(model_b, build_optimizer(model_b, 1e-3, 0.0, (0.9, 0.999)), batch_b.with_(prox_logprobs=prox),
                      **kw)
    for key in ("loss/policy", "correction/rho_mean", "correction/truncated_frac", "loss/grad_norm"):
        assert m_a[key] == pytest.approx(m_b[key], rel=1e-6), key
    assert m_a["correction/decoupled"] == 1.0 and m_a["offpolicy/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(WorkbenchError, match="policy_version"):
        update_step(model_a, build_optimizer(model_a, 1e-3, 0.0, (0.9, 0.999)), batch, proximal="loglinear", **kw)


# ---- property test: random batches, every preset, both modes ---------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def corrected_batches(draw):
    b, t = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3, 40, 300]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.0, 0.05, 1.0, 50.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    beh = -torch.rand(b, t, generator=g, dtype=dtype) * 10
    lp = beh + (torch.rand(b, t, generator=g, dtype=dtype) * 2 - 1) * scale
    prox = beh + (torch.rand(b, t, generator=g, dtype=dtype) * 2 - 1) * scale
    mask = (torch.rand(b, t, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))).to(dtype)
    garbage = draw(st.sampled_from([0.0, math.nan, math.inf]))
    beh = torch.where(mask > 0, beh, torch.full((), garbage, dtype=dtype))
    adv = torch.randn(b, generator=g, dtype=dtype) * draw(st.sampled_from([0.0, 1.0]))
    return lp, beh, prox, adv, mask


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=corrected_batches(), preset=st.sampled_from(SAFETY_SPECS), decoupled=st.booleans(),
       objective=st.sampled_from(["ppo_clip", "reinforce", "gspo", "m2po"]),
       normalize=st.booleans())
def test_property_finite_and_padding_gets_no_gradient(batch, preset, decoupled, objective, normalize):
    lp, beh, prox, adv, mask = batch
    lp = lp.clone().requires_grad_()
    spec = {**({"preset": preset} if preset in PRESETS else as_spec(preset)), "normalize": normalize}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, m = policy_loss(objective, lp, beh, adv, mask, correction=spec,
                              prox_logprobs=prox if decoupled else None)
        loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(lp.grad).all())
    assert bool((lp.grad[mask == 0] == 0).all())
    for key in ("correction/truncated_frac", "correction/rejected_frac", "correction/rejected_seq_frac",
                "correction/truncated_low_frac", "correction/changed_frac"):
        assert 0.0 <= m[key] <= 1.0
    if not math.isnan(m["correction/ess"]):
        assert 0.0 <= m["correction/ess"] <= 1.0 + 1e-9
