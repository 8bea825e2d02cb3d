"""Shared helpers of the reweight tests (tests/test_reweight_*.py): the 2x3 example batch with its
context and a generic context for any batch, the building blocks of the hand derivations (aggregation
coefficients, token cases, clip, sigmoid, PPO's per-token loss, sequence log-ratios, CHORD's mu
schedule), and the runners: an objective on the example, the one-line error check, the random batch of
the gradient tests and on-policy gradients next to REINFORCE's. Expected numbers are derived in plain
Python (``math``) from the formulas in the objectives' docstrings (and their papers), never by calling the
implementation; only the runners call it.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight import OBJECTIVES, policy_loss
from workbench.steps.reweight.core import objective_needs

torch.set_num_threads(1)
F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# The 2x3 example: row 0 has A = +1 and three tokens, row 1 has A = -0.5 and one padded token.
# log r = logprobs - behavior_logprobs:
#   row 0: 0.1 (inside every clip range), 0.5 (r = 1.65 > 1.2: clipped high), -0.3 (A > 0, r < 1: kept)
#   row 1: -1.5 (r = 0.22 < 0.8: clipped low), 1.3 (r = 3.67: unclipped for PPO, > c = 3 for dual-clip)
# The padded token has garbage (logprobs 7.0, behavior -inf) that must not leak. Both rows answer the
# same prompt (one group of 2) with rewards 1 and 0. ref_logprobs and the expert batch (3 + 1 valid
# expert tokens) carry garbage at padded positions too.
# ---------------------------------------------------------------------------------------------
BEH = [[-1.0, -2.0, -0.5], [-1.5, -2.5, -math.inf]]
LR = {(0, 0): 0.1, (0, 1): 0.5, (0, 2): -0.3, (1, 0): -1.5, (1, 1): 1.3}
VALID = list(LR)
ROWS = {0: [0, 1, 2], 1: [0, 1]}
ADV = {0: 1.0, 1: -0.5}
LP = {k: BEH[k[0]][k[1]] + v for k, v in LR.items()}
R = {k: math.exp(v) for k, v in LR.items()}
B, T, N = 2, 3, 5
REWARDS = [1.0, 0.0]
REF = [[-1.2, -1.7, -0.9], [-1.0, -2.0, math.nan]]
EXPERT_LP = [[-0.2, -1.5, -0.05], [-0.7, 3.0, math.nan]]
EXPERT_MASK = [[1, 1, 1], [1, 0, 0]]
EXPERT_VALID = [(0, 0), (0, 1), (0, 2), (1, 0)]
STEP = 250


def example(adv=None):
    """Fresh float64 tensors for the example (logprobs is a leaf requiring grad)."""
    lp = [[LP.get((i, t), 7.0) for t in range(T)] for i in range(B)]
    logprobs = torch.tensor(lp, dtype=F64, requires_grad=True)
    beh = torch.tensor(BEH, dtype=F64)
    advantages = torch.tensor([ADV[0], ADV[1]], dtype=F64) if adv is None else adv
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
    return logprobs, beh, advantages, mask


def ex_context(state=None):
    """The example's context (a fresh state unless given; the expert log-probs are a grad leaf)."""
    return {"group_id": torch.tensor([0, 0]), "rewards": torch.tensor(REWARDS, dtype=F64), "step": STEP,
            "state": {} if state is None else state, "ref_logprobs": torch.tensor(REF, dtype=F64),
            "expert_logprobs": torch.tensor(EXPERT_LP, dtype=F64, requires_grad=True),
            "expert_mask": torch.tensor(EXPERT_MASK, dtype=F64)}


def make_context(name, logprobs, behavior_logprobs, advantages, response_mask, params=None):
    """A generic context for objective ``name`` on any batch (None if it needs none): groups of two
    rows, rewards 0, 1, 2, 0, ..., update 5, a fresh state, reference = behaviour - 0.25, and an
    expert batch shaped like the batch (behaviour log-probs, the same mask)."""
    if not objective_needs(name, params):
        return None
    b = logprobs.shape[0]
    beh = behavior_logprobs.detach()
    return {"group_id": torch.arange(b) // 2, "rewards": (torch.arange(b) % 3).to(beh.dtype), "step": 5,
            "state": {}, "ref_logprobs": beh - 0.25, "expert_logprobs": beh.clone(),
            "expert_mask": response_mask.clone()}


# ---------------------------------------------------------------------------------------------
# building blocks of the hand derivations
# ---------------------------------------------------------------------------------------------


def coeff(mode, factor=None):
    """Coefficient of each valid token's loss in the aggregate (docs/design.md, "Aggregation")."""
    n_rows = len(ROWS)
    if mode == "token-mean":
        return {k: 1.0 / N for k in VALID}
    if mode == "seq-mean-token-sum":
        return {k: 1.0 / n_rows for k in VALID}
    if mode == "seq-mean-token-mean":
        return {(i, t): 1.0 / (n_rows * len(ROWS[i])) for (i, t) in VALID}
    return {k: 1.0 / (factor or T) for k in VALID}


def token_case(loss_fn, dloss_fn, mode="token-mean"):
    """(loss, grad) for a token-separable objective: loss_fn(key), dloss_fn(key) = dL_t/dlogp_t."""
    c = coeff(mode)
    loss = sum(c[k] * loss_fn(k) for k in VALID)
    grad = [[c[(i, t)] * dloss_fn((i, t)) if (i, t) in c else 0.0 for t in range(T)] for i in range(B)]
    return loss, grad


def ratio_case(loss_fn, dloss_fn, mode="token-mean"):
    """``token_case`` with loss_fn(r, a, lp), dloss_fn(r, a, lp) = dL/dlogp of the token's ratio,
    advantage and log-prob."""
    return token_case(lambda k: loss_fn(R[k], ADV[k[0]], LP[k]), lambda k: dloss_fn(R[k], ADV[k[0]], LP[k]), mode)


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def softplus(x):
    return math.log1p(math.exp(x))


def sign(x):
    return (x > 0) - (x < 0)


def ppo_loss(r, a, lo=0.2, hi=0.2):
    return -min(r * a, clip(r, 1 - lo, 1 + hi) * a)


def ppo_dloss(r, a, lo=0.2, hi=0.2):
    clipped = (a > 0 and r > 1 + hi) or (a < 0 and r < 1 - lo)
    return 0.0 if clipped else -r * a


def seq_logr(i, mean):
    """Row i's sequence log-ratio on the example: the sum (or mean) of its valid log r."""
    s = sum(LR[(i, t)] for t in ROWS[i])
    return s / len(ROWS[i]) if mean else s


def row_log_ratio(lr, mask, i, mean):
    """``seq_logr`` on any batch given as lists (lr = log r, mask)."""
    vals = [lr[i][t] for t in range(len(lr[i])) if mask[i][t]]
    return sum(vals) / len(vals) if mean else sum(vals)


def valid_log_ratios(d):
    """{(i, t): log r} over the valid tokens of a batch given as lists (d["lr"], d["mask"])."""
    return {(i, t): d["lr"][i][t] for i in range(len(d["lr"])) for t in range(len(d["lr"][i])) if d["mask"][i][t]}


def mu_by_hand(step, warmup, decay, peak, valley):
    """CHORD's mu schedule: linear warm-up to peak, cosine decay to valley, then valley."""
    if step < warmup:
        return step / warmup * peak
    if step >= warmup + decay:
        return valley
    return (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay)) + valley


# ---------------------------------------------------------------------------------------------
# running the code under test
# ---------------------------------------------------------------------------------------------


def run_example(name, params, state=None):
    """policy_loss on the example with its context (``params["_agg"]`` picks the aggregation, default
    the objective's), backpropagated: (loss, logprobs.grad, metrics, context)."""
    params = dict(params)
    agg = params.pop("_agg", OBJECTIVES.meta(name)["default_aggregation"])
    lp, beh, adv, mask = example()
    ctx = ex_context(state)
    loss, metrics = policy_loss(name, lp, beh, adv, mask, aggregation=agg, context=ctx, **params)
    loss.backward()
    return loss, lp.grad, metrics, ctx


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=F64), rtol=1e-6, atol=1e-12)


def error_message(fn, *args, **kw):
    """The message of the WorkbenchError ``fn(*args, **kw)`` raises, checked to be one line."""
    with pytest.raises(WorkbenchError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def random_batch(seed, b=4, t=5, scale=0.6):
    """A random float64 batch (log r in +-scale; row 0 has 3 valid tokens, row 2 one; A = 1, -0.7, 0.4, -1.3)."""
    g = torch.Generator().manual_seed(seed)
    beh = -torch.rand(b, t, generator=g, dtype=F64) * 3
    lr = (torch.rand(b, t, generator=g, dtype=F64) * 2 - 1) * scale
    lp = (beh + lr).requires_grad_()
    mask = torch.ones(b, t, dtype=F64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.tensor([1.0, -0.7, 0.4, -1.3][:b], dtype=F64)
    return lp, beh, adv, mask


def on_policy_grads(name, params=None, adv_shape="B"):
    """The gradients of objective ``name`` (with ``params``) and of ``reinforce`` on ``random_batch(3)``
    evaluated on-policy (behaviour = logprobs), both with ``name``'s default aggregation and a generic
    context. ``adv_shape="BT"`` spreads each row's advantage over its tokens (x 0.5 ... 1.5)."""
    agg = OBJECTIVES.meta(name)["default_aggregation"]
    grads = []
    for obj, p in ((name, params or {}), ("reinforce", {})):
        lp, _, adv, mask = random_batch(3)
        if adv_shape == "BT":
            adv = adv[:, None] * torch.linspace(0.5, 1.5, 5, dtype=F64)
        beh = lp.detach().clone()
        ctx = make_context(obj, lp, beh, adv, mask, p)
        loss, _ = policy_loss(obj, lp, beh, adv, mask, aggregation=agg, context=ctx, **p)
        loss.backward()
        grads.append(lp.grad)
    return grads


def token_grad(name, lp, beh, adv, **params):
    """The gradient of objective ``name`` w.r.t. the log-probs of one sequence (float64, every token
    valid, token-level advantages ``adv``), and its metrics."""
    leaf = torch.tensor([lp], dtype=F64, requires_grad=True)
    loss, m = policy_loss(name, leaf, torch.tensor([beh], dtype=F64), torch.tensor([adv], dtype=F64),
                          torch.ones(1, len(lp), dtype=F64), **params)
    loss.backward()
    return leaf.grad[0].tolist(), m
