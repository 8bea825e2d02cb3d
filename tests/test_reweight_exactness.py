"""Exactness of the reweight step against independent formulas, in float64 (rel err <= 1e-6):

- AReaL's log-linear proximal policy (Fu et al. 2025, arXiv:2505.24298): v_theta = the version
  being updated, v_prox = v_theta - 1, so alpha = (s - 1) / s for staleness s >= 1 and 0 below;
  compared with the exact policy one version back and with workbench's recompute.
- The KL penalty estimators k1 / k2 / k3 (value clamped to 10, verl's low_var_kl) / k3+ and the
  IS-corrected KL (TRL's use_bias_correction_kl): values and gradients, large log-ratios included.
- The KL term reduced with the run's aggregation (seq-mean-token-mean = mean of token means).
- The correction's normaliser ``denominator``: every valid token or only the kept ones, bypass and
  decoupled.
- The ratio diagnostics before (``raw_ratio_*``) and after (``ratio_*``) the proximal anchor, and
  ``offpolicy/correction_changed_frac``.

Expected numbers are computed in plain Python (``math``) from the formulas in the docstrings of
``workbench/steps/reweight/proximal.py``, ``workbench/steps/reweight/kl.py`` and
``workbench/steps/reweight/corrections.py``, never by calling the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import policy_loss
from workbench.steps.reweight.corrections import Correction
from workbench.steps.reweight.kl import kl_penalty, kl_term
from workbench.steps.reweight.proximal import loglinear_alpha, loglinear_proximal

torch.set_num_threads(1)
F64 = torch.float64
REL = 1e-9


def _flat(x):
    x = x.tolist() if isinstance(x, torch.Tensor) else x
    return [v for row in x for v in _flat(row)] if isinstance(x, (list, tuple)) else [x]


def close(got, want, rel=REL, abs_=1e-12):
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want) and got == pytest.approx(want, rel=rel, abs=abs_)


def areal_alpha(v_behave: int, k: int) -> float:
    """AReaL: alpha = (v_prox - v_b) / (v_theta - v_b), v_theta = k, v_prox = k - 1, in [0, 1]."""
    diff = k - v_behave
    return min(max((k - 1 - v_behave) / diff, 0.0), 1.0) if diff > 0 and v_behave >= 0 else 0.0


# ---- AReaL's log-linear proximal policy ---------------------------------------------------------
LP = [[-1.0, -2.0, -0.3], [-0.7, -1.1, 0.0]]
BEH = [[-1.4, -1.5, -0.9], [-0.2, -1.6, math.nan]]
MASK = [[1, 1, 1], [1, 1, 0]]
VALID = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_areal_alpha_on_two_updates():
    lp, beh, mask = torch.tensor(LP, dtype=F64), torch.tensor(BEH, dtype=F64), torch.tensor(MASK)
    versions = torch.tensor([2, 2])  # the whole batch was sampled by version 2
    # update 3: staleness 1 -> alpha 0 and pi_prox = mu (plain PPO against mu)
    prox, alpha = loglinear_proximal(lp, beh, versions, 3, mask)
    assert alpha.tolist() == [0.0, 0.0] == [areal_alpha(2, 3)] * 2
    close(prox, [[BEH[i][t] if MASK[i][t] else 0.0 for t in range(3)] for i in range(2)])
    # update 5: staleness 3 -> alpha 2/3
    prox, alpha = loglinear_proximal(lp, beh, versions, 5, mask)
    close(alpha, [2 / 3, 2 / 3])
    assert areal_alpha(2, 5) == pytest.approx(2 / 3)
    want = [[BEH[i][t] + 2 / 3 * (LP[i][t] - BEH[i][t]) if MASK[i][t] else 0.0 for t in range(3)] for i in range(2)]
    close(prox, want)
    # fresh data (v_b = k), staleness 1, 2, 5 and a negative (prompt) version
    close(loglinear_alpha(torch.tensor([5, 4, 3, 0, -1]), 5), [areal_alpha(v, 5) for v in (5, 4, 3, 0, -1)])
    assert [areal_alpha(v, 5) for v in (5, 4, 3, 0, -1)] == pytest.approx([0.0, 0.0, 0.5, 0.8, 0.0])


def test_alpha_zero_is_plain_ppo_against_mu():
    # Staleness 1: pi_prox = mu, so decoupled PPO with AReaL's behaviour cap is plain PPO-clip against
    # mu: L = -min(r A, clip(r, 0.8, 1.2) A), r = pi / mu, gradient -r A where the unclipped branch is
    # active, else 0; token-mean over the 5 valid tokens, no weight, nothing rejected.
    lp = torch.tensor(LP, dtype=F64, requires_grad=True)
    beh, mask = torch.tensor(BEH, dtype=F64), torch.tensor(MASK)
    adv = {0: 1.0, 1: -0.5}
    prox, _ = loglinear_proximal(lp, beh, torch.tensor([2, 2]), 3, mask)
    loss, m = policy_loss("ppo_clip", lp, beh, torch.tensor([1.0, -0.5], dtype=F64), mask, prox_logprobs=prox,
                          correction="areal", clip_low=0.2, clip_high=0.2)
    loss.backward()
    want_loss, want_grad = 0.0, [[0.0] * 3 for _ in range(2)]
    for i, t in VALID:
        r, a = math.exp(LP[i][t] - BEH[i][t]), adv[i]
        want_loss += -min(r * a, min(max(r, 0.8), 1.2) * a) / 5
        clipped = (a > 0 and r > 1.2) or (a < 0 and r < 0.8)
        want_grad[i][t] = 0.0 if clipped else -r * a / 5
    close(float(loss.detach()), want_loss)
    close(lp.grad, want_grad)
    assert m["correction/rejected_frac"] == 0.0 and m["correction/weight_mean"] == pytest.approx(1.0)


def test_per_token_versions_give_per_token_alpha():
    lp, beh = torch.tensor(LP, dtype=F64), torch.tensor(BEH, dtype=F64).nan_to_num()
    per_seq, a_seq = loglinear_proximal(lp, beh, torch.tensor([2, 4]), 5)
    per_tok, a_tok = loglinear_proximal(lp, beh, torch.tensor([[2, 2, 2], [4, 4, 4]]), 5)
    close(per_tok, per_seq.tolist())  # one version per completion: per token = per sequence
    assert a_tok.shape == (2, 3) and a_seq.shape == (2,)
    mixed = torch.tensor([[2, 4, 5], [1, 3, 0]])
    _, alpha = loglinear_proximal(lp, beh, mixed, 5)
    close(alpha, [[areal_alpha(v, 5) for v in row] for row in mixed.tolist()])
    with pytest.raises(WorkbenchError, match="behavior_version"):
        loglinear_proximal(lp, beh, torch.tensor([1, 2, 3]), 5)


def test_loglinear_is_the_policy_one_version_back_when_log_probs_move_linearly():
    # Synthetic log-probs moving by g per version: log pi_v = log mu + (v - v_b) g. AReaL's alpha
    # puts pi_prox exactly at v_prox = k - 1; workbench's recompute (a forward pass with the weights
    # the update starts from, version k) is one step g further, i.e. pi_theta itself.
    beh = torch.tensor([[-1.4, -1.5, -0.9], [-0.2, -1.6, -2.0]], dtype=F64)
    g = torch.tensor([[0.3, -0.2, 0.05], [-0.1, 0.4, 0.0]], dtype=F64)
    k = 7
    for s in range(1, 6):
        vb = k - s

        def at(v, vb=vb):
            return beh + (v - vb) * g  # [B, T]

        prox, _ = loglinear_proximal(at(k), beh, torch.tensor([vb, vb]), k)
        close(prox, at(k - 1).tolist())
        recompute = at(k)  # the trainer's log-probs at the start of update k
        close(recompute - prox, g.tolist())


def test_loglinear_error_on_a_softmax_policy_path_is_within_the_interpolation_bound():
    # A tiny categorical policy whose logits move linearly with the version, z_v = z0 + v d. Then
    # f(v) = log pi_v(a) is not linear (f'' = -Var_{pi_v}(d)), and the log-linear value at
    # v_prox = k - 1 differs from the exact one by at most max|f''| / 2 * (s - 1) * 1 (linear
    # interpolation error on [v_b, k]); alpha = s / (s + 1) would target v = k - s / (s + 1) instead.
    gen = torch.Generator().manual_seed(0)
    z0, d = torch.randn(4, 6, generator=gen, dtype=F64), 0.3 * torch.randn(4, 6, generator=gen, dtype=F64)
    actions = torch.tensor([0, 3, 5, 2])
    k, s = 9, 4
    vb = k - s

    def logp(v: float) -> torch.Tensor:
        return torch.log_softmax(z0 + v * d, dim=-1).gather(-1, actions[:, None]).squeeze(-1)  # [4]

    prox, _ = loglinear_proximal(logp(k)[None], logp(vb)[None], torch.tensor([vb]), k)
    err = (prox[0] - logp(k - 1)).abs()  # [4]
    for j in range(4):
        var = []
        for step in range(1001):
            p = torch.softmax(z0[j] + (vb + s * step / 1000) * d[j], dim=-1)
            var.append(float((p * d[j] ** 2).sum() - (p * d[j]).sum() ** 2))
        assert float(err[j]) <= 0.5 * max(var) * (s - 1) * 1.01
    assert float(err.max()) > 0  # the path is curved: the approximation is not exact here


# ---- KL penalty estimators ----------------------------------------------------------------------
X = [-0.5, 1.0, -5.0, 3.0, 25.0, -25.0]  # x = log pi_ref - log pi_theta
LPK = [-1.0, -2.0, -0.3, -4.0, -30.0, -0.1]
REF = [lp + x for lp, x in zip(LPK, X)]


def k3_value_grad(x: float) -> tuple[float, float]:
    """k3 = e^x - 1 - x, x clamped to +-20, value clamped to 10; d/dlogpi = 1 - e^x where no clamp acts."""
    xc = min(max(x, -20.0), 20.0)
    v = math.exp(xc) - 1 - xc
    return min(v, 10.0), (1 - math.exp(x)) if abs(x) < 20 and v < 10 else 0.0


EXPECTED_KL = {
    "k1": [(-x, 1.0) for x in X],
    "k2": [(x * x / 2, -x) for x in X],
    "k3": [k3_value_grad(x) for x in X],
    "k3+": [(k3_value_grad(x)[0], -x) for x in X],
}


def _kl_value_grad(estimator, behavior=None):
    lp = torch.tensor([LPK], dtype=F64, requires_grad=True)
    beh = None if behavior is None else torch.tensor([behavior], dtype=F64)
    kl = kl_penalty(lp, torch.tensor([REF], dtype=F64), estimator, behavior_logprobs=beh)  # [1, 6]
    kl.sum().backward()  # tokens are independent: grad_t = d kl_t / d logpi_t
    return kl[0].tolist(), lp.grad[0].tolist()


@pytest.mark.parametrize("estimator", sorted(EXPECTED_KL))
def test_kl_estimator_values_and_gradients(estimator):
    value, grad = _kl_value_grad(estimator)
    close(value, [v for v, _ in EXPECTED_KL[estimator]])
    close(grad, [g for _, g in EXPECTED_KL[estimator]])
    assert all(math.isfinite(v) for v in value + grad)
    if estimator == "k3":  # verl's low_var_kl bound: no token adds more than 10
        assert max(value) == 10.0


LOG_RHO = [0.2, -0.4, 1.0, 0.0, 30.0, -0.3]  # log pi_theta - log mu; 30 is clamped to 20


@pytest.mark.parametrize("estimator", sorted(EXPECTED_KL))
def test_is_corrected_kl_values_and_gradients(estimator):
    # TRL use_bias_correction_kl: rho * k with rho = exp(clamp(log pi - log mu, +-20)) carrying the
    # gradient: d(rho k) = rho k + rho dk where rho is not clamped, rho dk where it is.
    behavior = [lp - lr for lp, lr in zip(LPK, LOG_RHO)]
    value, grad = _kl_value_grad(estimator, behavior)
    want_v, want_g = [], []
    for (k, dk), lr in zip(EXPECTED_KL[estimator], LOG_RHO):
        rho = math.exp(min(max(lr, -20.0), 20.0))
        want_v.append(rho * k)
        want_g.append(rho * k + rho * dk if abs(lr) < 20 else rho * dk)
    close(value, want_v)
    close(grad, want_g)
    assert all(math.isfinite(v) for v in value + grad)
    if estimator == "k3":  # DeepSeek-V3.2: grad(rho k3) = rho (log pi - log pi_ref), the reverse KL's
        for t in range(3):  # tokens where no clamp acts
            assert grad[t] == pytest.approx(math.exp(LOG_RHO[t]) * (LPK[t] - REF[t]), rel=REL)


def test_kl_penalty_padding_and_bad_estimator():
    lp = torch.tensor([[-1.0, 0.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.5, math.nan]], dtype=F64)
    beh = torch.tensor([[-1.2, -math.inf]], dtype=F64)
    for estimator in EXPECTED_KL:
        kl = kl_penalty(lp, ref, estimator, mask=torch.tensor([[1, 0]]), behavior_logprobs=beh)
        (grad,) = torch.autograd.grad(kl.sum(), lp)
        assert kl[0, 1].item() == 0.0 and grad[0, 1].item() == 0.0
        assert bool(torch.isfinite(kl).all() and torch.isfinite(grad).all())
    with pytest.raises(WorkbenchError, match="kl_estimator='k4' is invalid"):
        kl_penalty(lp, ref, "k4")


# ---- KL term aggregated like the loss -----------------------------------------------------------
def test_kl_term_uses_the_run_aggregation():
    lp = [[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0], [-1.2, -0.8, 0.0], [0.0, 0.0, 0.0]]
    ref = [[-1.4, -1.0, -0.6], [-0.9, 5.0, 5.0], [-1.0, -2.0, 5.0], [5.0, 5.0, 5.0]]
    mask = [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]  # lengths 3, 1, 2 and an empty row
    rows = [[t for t in range(3) if mask[i][t]] for i in range(4)]
    for estimator in ("k1", "k3"):
        tok = {(i, t): (lp[i][t] - ref[i][t]) if estimator == "k1" else k3_value_grad(ref[i][t] - lp[i][t])[0]
               for i in range(4) for t in rows[i]}
        args = (torch.tensor(lp, dtype=F64), torch.tensor(ref, dtype=F64), torch.tensor(mask), estimator)
        seq_means = [sum(tok[(i, t)] for t in rows[i]) / len(rows[i]) for i in range(3)]  # B' = 3
        close(float(kl_term(*args, "seq-mean-token-mean")), sum(seq_means) / 3)
        close(float(kl_term(*args, "token-mean")), sum(tok.values()) / 6)
        close(float(kl_term(*args, "seq-mean-token-sum")), sum(tok.values()) / 3)
        close(float(kl_term(*args, "seq-mean-token-sum-norm", 4.0)), sum(tok.values()) / 4.0)
        assert abs(sum(seq_means) / 3 - sum(tok.values()) / 6) > 1e-3  # the two modes really differ here


# ---- the correction's normaliser: valid or kept tokens --------------------------------------------
# reinforce: L_t = -A_t log pi_t. log rho per token; token_k1 rejection outside [0.5, 2] (|log rho| >
# log 2 = 0.693) rejects (0, 1), (1, 0) and the only token of row 2.
LOG_RHO_B = [[0.1, 1.0, -0.2], [-1.0, 0.3, 0.0], [3.0, 0.0, 0.0]]
MASK_B = [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
LP_B = [[-1.0, -2.0, -0.5], [-0.7, -1.3, 0.0], [-0.4, 0.0, 0.0]]
ADV_B = [1.0, -0.5, 2.0]
KEPT = [(0, 0), (0, 2), (1, 1)]
REJECT = dict(reject="token_k1", reject_low=0.5, reject_high=2.0)


def _expected_grad(aggregation: str, denominator: str) -> dict:
    """{kept token: dL/dlogpi} by hand for reinforce with the rejection above; rejected tokens get 0."""
    count = KEPT if denominator == "kept" else [(i, t) for i in range(3) for t in range(3) if MASK_B[i][t]]
    if aggregation == "token-mean":
        coef = {tok: 1 / len(count) for tok in KEPT}
    else:  # seq-mean-token-mean over the rows with a counted token, each over its counted tokens
        rows = sorted({i for i, _ in count})
        coef = {(i, t): 1 / len(rows) / sum(1 for j, _ in count if j == i) for i, t in KEPT}
    return {tok: -ADV_B[tok[0]] * c for tok, c in coef.items()}


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("denominator", ["valid", "kept"])
def test_denominator_valid_or_kept(denominator, aggregation, decoupled):
    beh = torch.tensor([[-1.3, -1.9, -0.8], [-0.6, -1.0, 0.0], [-0.5, 0.0, 0.0]], dtype=F64)
    shift = torch.tensor(LOG_RHO_B, dtype=F64)
    if decoupled:  # rho = pi_prox / mu; pi_theta is elsewhere (reinforce ignores the ratio)
        lp, prox = torch.tensor(LP_B, dtype=F64), beh + shift
    else:
        lp, prox = beh + shift, None
    lp = lp.detach().requires_grad_(True)
    adv = torch.tensor(ADV_B, dtype=F64)
    corr = Correction(**REJECT, denominator=denominator)
    loss, m = policy_loss("reinforce", lp, beh, adv, torch.tensor(MASK_B), aggregation=aggregation,
                          prox_logprobs=prox, correction=corr)
    loss.backward()
    want_grad = _expected_grad(aggregation, denominator)
    # reinforce is linear in log pi: L = sum over kept tokens of coef_t (-A_t) log pi_t
    close(float(loss.detach()), sum(g * lp[i, t].item() for (i, t), g in want_grad.items()))
    close(lp.grad, [[want_grad.get((i, t), 0.0) for t in range(3)] for i in range(3)])
    assert m["correction/rejected_frac"] == pytest.approx(3 / 6)


def test_denominator_hand_numbers_and_validation():
    # the bypass token-mean case written out: kept losses -1 * lp(0,0), -1 * lp(0,2), 0.5 * lp(1,1)
    kept = [-1.0 * (-1.3 + 0.1), -1.0 * (-0.8 - 0.2), 0.5 * (-1.0 + 0.3)]
    lp = (torch.tensor([[-1.3, -1.9, -0.8], [-0.6, -1.0, 0.0], [-0.5, 0.0, 0.0]], dtype=F64)
          + torch.tensor(LOG_RHO_B, dtype=F64))
    beh = lp - torch.tensor(LOG_RHO_B, dtype=F64)
    for denominator, n in (("valid", 6), ("kept", 3)):
        loss, _ = policy_loss("reinforce", lp, beh, torch.tensor(ADV_B, dtype=F64), torch.tensor(MASK_B),
                              correction={**REJECT, "denominator": denominator})
        close(float(loss.detach()), sum(kept) / n)
    assert "kept" in Correction(**REJECT, denominator="kept").describe()
    with pytest.raises(WorkbenchError, match=r"^correction.denominator='all' is invalid: expected valid \| kept$"):
        Correction(denominator="all")


# ---- ratio diagnostics before / after the correction, and the changed fraction --------------------
def test_raw_and_anchored_ratio_statistics_and_changed_fraction():
    beh = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -2.5, 0.0]], dtype=F64)
    lp = beh + torch.tensor([[0.3, -0.2, 0.9], [0.1, -1.2, 0.0]], dtype=F64)  # log pi/mu
    prox = beh + torch.tensor([[0.0, 1.0, 0.2], [-0.9, 0.4, 0.0]], dtype=F64)  # log pi_prox/mu
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    raw = [math.exp(x) for x in (0.3, -0.2, 0.9, 0.1, -1.2)]  # pi / mu
    anchored = [math.exp(a - b) for a, b in zip((0.3, -0.2, 0.9, 0.1, -1.2), (0.0, 1.0, 0.2, -0.9, 0.4))]
    # decoupled, rejection only: rho = pi_prox / mu outside [0.5, 2] at (0, 1) (e^1) and (1, 0)
    # (e^-0.9): exactly 2 of the 5 valid tokens are changed
    _, m = policy_loss("reinforce", lp, beh, adv, mask, prox_logprobs=prox, correction=REJECT)
    close([m["offpolicy/raw_ratio_mean"], m["offpolicy/raw_ratio_min"], m["offpolicy/raw_ratio_max"]],
          [sum(raw) / 5, min(raw), max(raw)])
    close([m["offpolicy/ratio_mean"], m["offpolicy/ratio_min"], m["offpolicy/ratio_max"]],
          [sum(anchored) / 5, min(anchored), max(anchored)])
    assert m["offpolicy/correction_changed_frac"] == pytest.approx(2 / 5)
    # bypass, token TIS with C = 2: weight exp(log rho) changes every token with log rho != 0 and
    # truncates e^0.9 > 2; make (0, 0) and (1, 1) exactly on-policy -> 3 of 5 changed
    lp2 = beh + torch.tensor([[0.0, -0.2, 0.9], [0.1, 0.0, 0.0]], dtype=F64)
    _, m = policy_loss("reinforce", lp2, beh, adv, mask, correction="token_tis")
    assert m["offpolicy/correction_changed_frac"] == pytest.approx(3 / 5)
    assert m["correction/truncated_frac"] == pytest.approx(1 / 5)
    # no correction: nothing changed; in bypass mode raw and anchored ratios are the same numbers
    _, m = policy_loss("reinforce", lp, beh, adv, mask)
    assert m["offpolicy/correction_changed_frac"] == 0.0
    close([m["offpolicy/raw_ratio_mean"], m["offpolicy/raw_ratio_max"]], [sum(raw) / 5, max(raw)])
    assert m["offpolicy/ratio_mean"] == pytest.approx(m["offpolicy/raw_ratio_mean"], rel=REL)
