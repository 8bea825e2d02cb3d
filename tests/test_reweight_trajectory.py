"""TB (trajectory balance, VarGrad form) of workbench/steps/reweight/trajectory.py. The per-group estimate
log Z_hat and the residuals on the 2x3 example give its hand-computed rows (CASES, EXTRA_CASES,
DIAGNOSTICS) and analytic per-token gradient (GRADIENTS), which test_reweight_objectives.py runs; here:
``tb_log_z`` by hand, rows without tokens left out, the context TB needs, and the on-policy equivalence
with REINFORCE on group-centred rewards. The loop's reference model for TB is in test_reweight_context.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import policy_loss
from workbench.steps.reweight.trajectory import tb_log_z

from reweight_helpers import (
    ADV, B, BEH, F64, LP, REF, REWARDS, ROWS, T, VALID, close, coeff, ex_context, example, run_example,
)


# ---- TB: one group of two rows; s_i = sum_t (logp - ref), residual_i = logZ + s_i - R_i / beta ----
def _tb_parts(beta=0.012, reference="ref", reward="rewards"):
    ref = {k: (REF if reference == "ref" else BEH)[k[0]][k[1]] for k in VALID}
    s = {i: sum(LP[(i, t)] - ref[(i, t)] for t in ROWS[i]) for i in ROWS}
    rew = REWARDS if reward == "rewards" else [ADV[0], ADV[1]]
    log_z = sum(rew[i] / beta - s[i] for i in ROWS) / 2
    resid = {i: log_z + s[i] - rew[i] / beta for i in ROWS}
    return log_z, resid


def _tb(**kw):
    _, resid = _tb_parts(**kw)
    c = coeff("seq-mean-token-mean")
    loss = sum(c[(i, t)] * resid[i] ** 2 for (i, t) in VALID)  # = (L_0 + L_1) / 2
    grad = [[0.5 * 2 * resid[i] if (i, t) in c else 0.0 for t in range(T)] for i in range(B)]
    return loss, grad


CASES = {"tb": ({}, *_tb())}

EXTRA_CASES = [
    ("tb", {"reference": "anchor", "beta": 0.5}, *_tb(beta=0.5, reference="anchor")),
    ("tb", {"reward": "advantages", "beta": 2.0}, *_tb(beta=2.0, reward="advantages")),
]

_LOG_Z, _RESID = _tb_parts()
# Diagnostics on the example, by hand.
DIAGNOSTICS = {"tb": {"tb/log_z_mean": _LOG_Z, "tb/residual_rms": math.sqrt((_RESID[0] ** 2 + _RESID[1] ** 2) / 2)}}


def _g_tb(d, i, t):  # reference = beh - 0.25 (make_context), rewards j % 3, groups of two, beta 0.012
    rows = range(len(d["lr"]))
    s = {j: sum(d["lr"][j][u] + 0.25 for u in range(len(d["lr"][j])) if d["mask"][j][u]) for j in rows}
    rew = {j: float(j % 3) for j in rows}
    pair = [j for j in rows if j // 2 == i // 2]
    log_z = sum(rew[j] / 0.012 - s[j] for j in pair) / len(pair)
    length = sum(d["mask"][i])
    return 2 * length * (log_z + s[i] - rew[i] / 0.012)  # the row's loss is counted once per token


# name -> (params, analytic d(sum_t L_t)/d logp_t)
GRADIENTS = {"tb": ({}, _g_tb)}


def test_tb_log_z_by_hand():
    # two groups {0, 2} and {1} (row 3 has no valid token and is left out); beta 0.5
    s = torch.tensor([0.2, -0.4, 1.0, 9.0], dtype=F64)
    rew = torch.tensor([1.0, 0.0, 2.0, 5.0], dtype=F64)
    inv, n = torch.tensor([0, 1, 0, 2]), 2
    z = tb_log_z(s, rew, 0.5, inv, n)
    g0 = ((1.0 / 0.5 - 0.2) + (2.0 / 0.5 - 1.0)) / 2
    close(z[:3], [g0, 0.0 / 0.5 + 0.4, g0])
    _, _, m, _ = run_example("tb", {})
    assert m["tb/log_z_mean"] == pytest.approx(_tb_parts()[0], rel=1e-12)


def test_tb_ignores_rows_without_tokens_and_needs_its_context():
    lp, beh, adv, mask = example()
    ctx = ex_context()
    lp3 = torch.cat([lp.detach(), torch.zeros(1, 3, dtype=F64)]).requires_grad_()
    beh3 = torch.cat([beh, torch.zeros(1, 3, dtype=F64)])
    mask3 = torch.cat([mask, torch.zeros(1, 3, dtype=F64)])
    ctx3 = dict(ctx, group_id=torch.tensor([0, 0, 0]), rewards=torch.tensor([1.0, 0.0, 50.0], dtype=F64),
                ref_logprobs=torch.cat([ctx["ref_logprobs"], torch.zeros(1, 3, dtype=F64)]))
    loss3, m3 = policy_loss("tb", lp3, beh3, torch.tensor([1.0, -0.5, 3.0], dtype=F64), mask3, context=ctx3,
                            aggregation="seq-mean-token-mean")
    assert float(loss3.detach()) == pytest.approx(CASES["tb"][1], rel=1e-9)
    for key in ("group_id", "rewards", "ref_logprobs"):
        bad = dict(ctx)
        del bad[key]
        with pytest.raises(WorkbenchError, match=rf"needs context\['{key}'\]") as err:
            policy_loss("tb", lp, beh, adv, mask, context=bad)
        assert "\n" not in str(err.value)
    policy_loss("tb", lp, beh, adv, mask, reference="anchor", reward="advantages",
                context={"group_id": torch.tensor([0, 0])})


def test_tb_on_policy_is_reinforce_with_centred_rewards():
    # pi_ref = the sampler (reference="anchor"), on-policy: s_i = 0 and resid_i = log Z - R_i / beta
    # = -(R_i - mean_group R) / beta. With seq-mean-token-mean, d/dlogp_t of (1/B) sum_i L_i is
    # (1/B) 2 resid_i, and REINFORCE's is -(1/B) A_i / |y_i|: with A_i = |y_i| (R_i - mean_group R) the
    # TB gradient is (2 / beta) x REINFORCE's (the paper's equivalence, up to that factor).
    g = torch.Generator().manual_seed(7)
    b, t, beta = 6, 4, 0.25
    lp = (-torch.rand(b, t, generator=g, dtype=F64) * 2).requires_grad_()
    mask = torch.ones(b, t, dtype=F64)
    mask[1, 2:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=F64)
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, _ = policy_loss("tb", lp, lp.detach().clone(), torch.zeros(b, dtype=F64), mask, reference="anchor",
                          beta=beta, context={"group_id": gid, "rewards": rewards}, aggregation="seq-mean-token-mean")
    loss.backward()
    centred = rewards - torch.stack([rewards[gid == gid[i]].mean() for i in range(b)])
    lens = mask.sum(1)
    lp2 = lp.detach().clone().requires_grad_()
    ref_loss, _ = policy_loss("reinforce", lp2, lp2.detach(), centred * lens, mask, aggregation="seq-mean-token-mean")
    ref_loss.backward()
    torch.testing.assert_close(lp.grad, (2 / beta) * lp2.grad, rtol=1e-9, atol=1e-12)
