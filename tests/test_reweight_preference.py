"""The preference family of workbench/steps/reweight/preference.py: online_dpo, ipo, wpo, copg, slic.

An independent float64 implementation written here from the papers' formulas (plain Python loops over
groups and pairs, ``math`` only; it never calls the code under test) gives the loss and the analytic
gradient of every objective; the code must match it to 1e-6 relative on random batches with masked
tokens, log-ratios up to +-50, groups with ties, all-equal groups, a group of one and an empty row. It
also gives the hand-computed rows on the 2x3 example that test_reweight_objectives.py runs (CASES,
EXTRA_CASES, METRICS, GRADIENTS). CoPG is also checked in the paper's own terms (per-sample regularised
rewards R(y) - beta ln(pi(y)/pi_ref(y)) and the squared contrast of a pair) and against its IPO special
case. Then: ties and all-equal groups give no pair and exactly zero gradient,
pair counts, one-line errors, and a tiny training run with objective=online_dpo.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import build_model
from workbench.steps.reweight import OBJECTIVES, make_inputs, policy_loss

from reweight_helpers import B, BEH, F64, LP, REF, REWARDS, T, error_message, ex_context, example, sigmoid

NAMES = ("online_dpo", "ipo", "wpo", "copg", "slic")
DEFAULTS = {"online_dpo": {"beta": 0.1}, "ipo": {"tau": 0.1}, "wpo": {"beta": 0.1, "alignment": "none"},
            "copg": {"beta": 0.1}, "slic": {"delta": 1.0}}


# ---------------------------------------------------------------------------------------------
# the independent reference: batches as lists, pairs by loops, each paper's pair loss and d l / d z
# ---------------------------------------------------------------------------------------------
def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def ref_pairs(rewards, groups, lengths, mode):
    """[(w, l)]: best_worst = first row with the group's max reward vs first with its min (if max > min);
    all = every (w, l) of one group with r_w > r_l. Rows without a valid token are no samples."""
    members = {}
    for i, g in enumerate(groups):
        if lengths[i] > 0:
            members.setdefault(g, []).append(i)
    out = []
    for rows in members.values():
        if mode == "all":
            out += [(w, l) for w in rows for l in rows if rewards[w] > rewards[l]]
            continue
        hi, lo = max(rewards[i] for i in rows), min(rewards[i] for i in rows)
        if hi > lo:
            out.append((min(i for i in rows if rewards[i] == hi), min(i for i in rows if rewards[i] == lo)))
    return out


def pair_terms(name, p, b, w, l):
    """(l_p, d l_p / d z) of pair (w, l) of batch ``b`` for objective ``name`` with params ``p``."""
    if name == "slic":
        z = b["logp_sum"][w] - b["logp_sum"][l]
        return max(0.0, p["delta"] - z), (-1.0 if p["delta"] - z > 0 else 0.0)
    z = b["h"][w] - b["h"][l]
    if name == "ipo":
        c = 1.0 / (2.0 * p["tau"])
        return (z - c) ** 2, 2.0 * (z - c)
    if name == "copg":
        u = (b["rewards"][w] - b["rewards"][l]) - p["beta"] * z
        return u * u, -2.0 * p["beta"] * u
    loss, dz = softplus(-p["beta"] * z), -p["beta"] * sigmoid(-p["beta"] * z)  # -log sigmoid(beta z)
    if name == "wpo":
        q = b["logq_mean_behaviour"] if p.get("alignment") == "behaviour" else b["logq_mean"]
        weight = min(1.0, math.exp(q[w] + q[l]))
        return weight * loss, weight * dz
    return loss, dz


def describe(lp, beh, ref, mask, rewards, groups):
    """The per-row quantities of a batch given as lists (float64 math)."""
    rows = range(len(lp))
    valid = [[t for t in range(len(lp[i])) if mask[i][t]] for i in rows]
    lengths = [len(v) for v in valid]
    return {
        "valid": valid, "lengths": lengths, "rewards": rewards, "groups": groups,
        "h": [sum(lp[i][t] - ref[i][t] for t in valid[i]) for i in rows],
        "logp_sum": [sum(lp[i][t] for t in valid[i]) for i in rows],
        "logq_mean": [sum(lp[i][t] for t in valid[i]) / max(lengths[i], 1) for i in rows],
        "logq_mean_behaviour": [sum(lp[i][t] - beh[i][t] for t in valid[i]) / max(lengths[i], 1) for i in rows],
    }


def reference(name, params, b, row_weight=None):
    """(loss, grad [B][T]) of the mean pair loss (1/P) sum_p l_p (the seq-mean-token-mean loss).

    ``row_weight(w, l)`` multiplies pair p's loss (the per-token construction test passes
    (len_w + len_l) B' / (2 P) to get the sum of the unaggregated per-token losses)."""
    p = {**DEFAULTS[name], **params}
    pairs = ref_pairs(b["rewards"], b["groups"], b["lengths"], p.get("pairs", "best_worst"))
    n_rows = len(b["lengths"])
    width = max((max(v) + 1 for v in b["valid"] if v), default=1)
    grad_row = [0.0] * n_rows
    loss = 0.0
    for w, l in pairs:
        c = row_weight(w, l, len(pairs)) if row_weight else 1.0 / len(pairs)
        lp_, dz = pair_terms(name, p, b, w, l)
        loss += c * lp_
        grad_row[w] += c * dz
        grad_row[l] -= c * dz
    return loss, [[grad_row[i] if t in b["valid"][i] else 0.0 for t in range(width)] for i in range(n_rows)]


# ---------------------------------------------------------------------------------------------
# the 2x3 example (one group, rewards 1 and 0: row 0 wins) and the tables test_reweight_objectives.py runs
# ---------------------------------------------------------------------------------------------
EX_MASK = [[1, 1, 1], [1, 1, 0]]
EX_LP = [[LP.get((i, t), 0.0) for t in range(T)] for i in range(B)]
EX = describe(EX_LP, BEH, REF, EX_MASK, REWARDS, [0, 0])
EX_BEH = describe(EX_LP, BEH, BEH, EX_MASK, REWARDS, [0, 0])  # reference = behaviour


def _case(name, params, ex=EX):
    loss, grad = reference(name, params, ex)
    return loss, [row + [0.0] * (T - len(row)) for row in grad]


# slic: the example's log-likelihood margin is exactly 1.0 (the hinge's kink at delta = 1), so 2.0 / 0.5
CASES = {name: (p, *_case(name, p)) for name, p in (
    ("online_dpo", {}), ("ipo", {}), ("wpo", {}), ("copg", {}), ("slic", {"delta": 2.0}))}

EXTRA_CASES = [
    ("online_dpo", {"reference": "behaviour", "beta": 0.5}, *_case("online_dpo", {"beta": 0.5}, EX_BEH)),
    ("online_dpo", {"pairs": "all", "beta": 2.0}, *_case("online_dpo", {"beta": 2.0})),
    ("ipo", {"reference": "behaviour", "tau": 0.25}, *_case("ipo", {"tau": 0.25}, EX_BEH)),
    ("wpo", {"alignment": "behaviour", "beta": 0.3}, *_case("wpo", {"alignment": "behaviour", "beta": 0.3})),
    ("copg", {"reference": "behaviour", "beta": 0.7}, *_case("copg", {"beta": 0.7}, EX_BEH)),
    ("slic", {"delta": 0.5}, *_case("slic", {"delta": 0.5})),  # margin 1 > 0.5: no loss, no gradient
]

_Z = EX["h"][0] - EX["h"][1]
METRICS = {
    "online_dpo": {"pref/pairs": 1.0, "pref/margin": _Z, "pref/accuracy": 1.0},
    "wpo": {"wpo/weight_mean": min(1.0, math.exp(EX["logq_mean"][0] + EX["logq_mean"][1]))},
    "copg": {"copg/residual_mean": (REWARDS[0] - REWARDS[1]) - 0.1 * _Z},
    "slic": {"pref/margin": EX["logp_sum"][0] - EX["logp_sum"][1]},
}


def _grad_fn(name, params=None):
    """d(sum of the unaggregated per-token losses)/d logp on random_batch with make_context's context
    (groups of two rows, rewards j % 3, reference = behaviour - 0.25): each row carries (B'/P)(1/2) of
    its pairs' losses on each of its tokens, so pair p counts (len_w + len_l) B' / (2 P) times."""
    def grad(d, i, t):
        lp = [[b_ + r for b_, r in zip(brow, lrow)] for brow, lrow in zip(d["beh"], d["lr"])]
        ref = [[b_ - 0.25 for b_ in brow] for brow in d["beh"]]
        n = len(lp)
        b = describe(lp, d["beh"], ref, d["mask"], [float(j % 3) for j in range(n)], [j // 2 for j in range(n)])
        n_rows = sum(1 for x in b["lengths"] if x)
        weight = lambda w, l, n_pairs: (b["lengths"][w] + b["lengths"][l]) * n_rows / (2 * n_pairs)  # noqa: E731
        return reference(name, params or {}, b, weight)[1][i][t]
    return params or {}, grad


GRADIENTS = {name: _grad_fn(name) for name in NAMES}


# ---------------------------------------------------------------------------------------------
# random batches against the reference
# ---------------------------------------------------------------------------------------------
def random_case(seed, scale):
    """A random float64 batch: 9 rows in 4 groups (3/3/2/1 rows); group 0 has a tie (rows 0 and 1), group 1
    a row without valid tokens (row 5: not a sample), group 2 is all-equal, group 3 is a group of one;
    masked tokens elsewhere; log-ratios (and log pi / pi_ref) in +-scale; rewards from {0, 0.5, 1}."""
    g = torch.Generator().manual_seed(seed)
    n, t = 9, 6
    beh = -torch.rand(n, t, generator=g, dtype=F64) * 4
    lp = beh + (torch.rand(n, t, generator=g, dtype=F64) * 2 - 1) * scale
    ref = lp - (torch.rand(n, t, generator=g, dtype=F64) * 2 - 1) * scale
    mask = (torch.rand(n, t, generator=g) < 0.7).to(F64)
    mask[:, 0] = 1.0
    mask[5] = 0.0
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    rewards = torch.randint(0, 3, (n,), generator=g).to(F64) / 2
    rewards[1] = rewards[0]
    rewards[7] = rewards[6]
    return lp, beh, ref, mask, rewards, groups


def _as_lists(*xs):
    return [x.tolist() for x in xs]


PARAMS = [("online_dpo", {}), ("online_dpo", {"pairs": "all", "beta": 0.7}),
          ("online_dpo", {"reference": "behaviour"}), ("ipo", {}), ("ipo", {"pairs": "all", "tau": 2.0}),
          ("wpo", {}), ("wpo", {"alignment": "behaviour", "pairs": "all"}), ("copg", {}),
          ("copg", {"pairs": "all", "beta": 0.05, "reference": "behaviour"}), ("slic", {}),
          ("slic", {"pairs": "all", "delta": 3.0})]


def _token_mean_weight(b):
    """token-mean: row i's share counts |y_i| / N, so pair p weighs (len_w + len_l) B' / (2 P N)."""
    n_rows, n_tokens = sum(1 for x in b["lengths"] if x), sum(b["lengths"])
    return lambda w, l, n_pairs: (b["lengths"][w] + b["lengths"][l]) * n_rows / (2 * n_pairs * n_tokens)


@pytest.mark.parametrize("name,params", PARAMS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PARAMS)])
@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_loss_and_gradient_match_the_independent_float64_reference(name, params, scale, seed, agg):
    lp, beh, ref, mask, rewards, groups = random_case(seed, scale)
    lp.requires_grad_(True)
    ctx = {"group_id": groups, "rewards": rewards, "ref_logprobs": ref}
    loss, metrics = policy_loss(name, lp, beh, torch.zeros(9, dtype=F64), mask, aggregation=agg, context=ctx,
                                **params)
    loss.backward()
    lpl, behl, refl, maskl = _as_lists(lp.detach(), beh, ref, mask)
    refl = behl if params.get("reference") == "behaviour" else refl
    b = describe(lpl, behl, refl, maskl, rewards.tolist(), groups.tolist())
    # seq-mean-token-mean is the paper's mean over pairs; token-mean weighs each row's half by its length
    expected_loss, expected_grad = reference(name, params, b, _token_mean_weight(b) if agg == "token-mean" else None)
    expected_grad = [row + [0.0] * (6 - len(row)) for row in expected_grad]
    torch.testing.assert_close(loss.detach(), torch.tensor(expected_loss, dtype=F64), rtol=1e-6, atol=1e-12)
    scale_g = max(abs(x) for row in expected_grad for x in row)
    torch.testing.assert_close(lp.grad, torch.tensor(expected_grad, dtype=F64), rtol=1e-6, atol=1e-12 * (1 + scale_g))
    assert torch.isfinite(lp.grad).all() and (lp.grad[mask == 0] == 0).all()
    assert (lp.grad[5:] == 0).all()  # the row without tokens, the all-equal group, the group of one
    pairs = ref_pairs(rewards.tolist(), groups.tolist(), b["lengths"], params.get("pairs", "best_worst"))
    assert metrics["pref/pairs"] == len(pairs)


# ---------------------------------------------------------------------------------------------
# CoPG in the paper's own terms: per-sample regularised rewards, the squared contrast of a pair
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, pairs, reference", [(0.1, "best_worst", "initial"), (0.37, "all", "behaviour"),
                                                    (2.0, "all", "initial")])
@pytest.mark.parametrize("seed", [0, 1])
def test_copg_is_the_papers_squared_contrast_of_regularised_rewards(beta, pairs, reference, seed):
    """Flet-Berliac et al. 2024 (arXiv:2406.19185): R_b(y) = R(y) - beta ln(pi(y)/pi_ref(y)) per sample and
    l(y_w, y_l) = (R_b(y_w) - R_b(y_l))^2 (Command A, arXiv:2504.00698, k = 2); the loss is the mean over
    pairs (seq-mean-token-mean, the family's default), and d l / d log pi(y_t) = -2 beta (R_b(y) - R_b(y'))
    for every token of y (y' the other sample)."""
    lp, beh, ref, mask, rewards, groups = random_case(seed, 1.0)
    lp.requires_grad_(True)
    pi_ref = beh if reference == "behaviour" else ref
    loss, metrics = policy_loss("copg", lp, beh, torch.zeros(9, dtype=F64), mask,
                                context={"group_id": groups, "rewards": rewards, "ref_logprobs": ref},
                                aggregation="seq-mean-token-mean", beta=beta, pairs=pairs, reference=reference)
    loss.backward()
    n, t = lp.shape
    valid = [[j for j in range(t) if mask[i, j] > 0] for i in range(n)]
    reg = [float(rewards[i]) - beta * sum(float(lp[i, j].detach()) - float(pi_ref[i, j]) for j in valid[i])
           for i in range(n)]  # R_b(y_i)
    pl = ref_pairs(rewards.tolist(), groups.tolist(), [len(v) for v in valid], pairs)
    want_loss, row_grad = 0.0, [0.0] * n
    for w, l in pl:
        diff = reg[w] - reg[l]
        want_loss += diff * diff / len(pl)
        row_grad[w] += -2.0 * beta * diff / len(pl)  # d diff / d log pi(y_w,t) = -beta
        row_grad[l] += 2.0 * beta * diff / len(pl)
    want_grad = torch.tensor([[row_grad[i] if j in valid[i] else 0.0 for j in range(t)] for i in range(n)], dtype=F64)
    assert pl and float(loss.detach()) == pytest.approx(want_loss, rel=1e-6)
    torch.testing.assert_close(lp.grad, want_grad, rtol=1e-6, atol=1e-12)
    assert metrics["copg/residual_mean"] == pytest.approx(sum(reg[w] - reg[l] for w, l in pl) / len(pl), rel=1e-6)


def test_copg_with_reward_gap_one_half_is_ipo_times_tau_squared():
    """The paper's IPO special case: r_w - r_l = 1/2, beta = tau gives tau^2 (z - 1/(2 tau))^2."""
    lp, beh, ref, mask, _, groups = random_case(3, 1.0)
    rewards = torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0], dtype=F64)  # every pair: gap 1/2
    tau = 0.25
    out = {}
    for name, params in (("copg", {"beta": tau}), ("ipo", {"tau": tau})):
        x = lp.clone().requires_grad_(True)
        loss, _ = policy_loss(name, x, beh, torch.zeros(9, dtype=F64), mask,
                              aggregation="seq-mean-token-mean",
                              context={"group_id": groups, "rewards": rewards, "ref_logprobs": ref}, **params)
        loss.backward()
        out[name] = (float(loss.detach()), x.grad)
    assert out["copg"][0] == pytest.approx(tau ** 2 * out["ipo"][0], rel=1e-9) and out["ipo"][0] > 0
    torch.testing.assert_close(out["copg"][1], tau ** 2 * out["ipo"][1], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_extreme_log_ratios_and_long_rows(name, dtype):
    g = torch.Generator().manual_seed(5)
    n, t = 6, 256
    beh = -torch.rand(n, t, generator=g, dtype=dtype) * 10
    lp = (beh + (torch.rand(n, t, generator=g, dtype=dtype) * 2 - 1) * 50).requires_grad_()
    mask = (torch.rand(n, t, generator=g) < 0.8).to(dtype)
    ctx = {"group_id": torch.tensor([0, 0, 0, 1, 1, 1]), "rewards": torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0]),
           "ref_logprobs": beh + 30.0}
    for params in ({}, {"pairs": "all"}):
        loss, metrics = policy_loss(name, lp, beh, torch.zeros(n), mask, context=ctx, **params)
        (grad,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[mask == 0] == 0).all()
        own = {k: v for k, v in metrics.items() if k.split("/")[0] in ("pref", "wpo", "copg", "loss")}
        assert len(own) >= 4 and all(math.isfinite(v) for v in own.values()), own


# ---------------------------------------------------------------------------------------------
# ties, all-equal groups, pair counts
# ---------------------------------------------------------------------------------------------
def _run(name, rewards, groups, **params):
    lp, beh, _, mask = example()
    lp = torch.cat([lp.detach(), lp.detach() - 0.3]).requires_grad_()  # 4 rows: 3, 2, 3, 2 valid tokens
    beh, mask = torch.cat([beh, beh]), torch.cat([mask, mask])
    ctx = {"group_id": torch.tensor(groups), "rewards": torch.tensor(rewards, dtype=F64),
           "ref_logprobs": torch.cat([torch.tensor(REF, dtype=F64)] * 2)}
    loss, m = policy_loss(name, lp, beh, torch.zeros(4, dtype=F64), mask, context=ctx, **params)
    loss.backward()
    return loss.detach(), lp.grad, m


@pytest.mark.parametrize("name", NAMES)
def test_all_equal_groups_give_no_pair_zero_loss_and_zero_gradient(name):
    loss, grad, m = _run(name, [0.5, 0.5, 1.0, 1.0], [0, 0, 1, 1], pairs="all")
    assert float(loss) == 0.0 and (grad == 0).all() and m["pref/pairs"] == 0.0
    assert math.isnan(m["pref/margin"]) and math.isnan(m["pref/accuracy"])
    # one group with a pair, one all-equal: the all-equal group's rows get exactly zero gradient
    loss, grad, m = _run(name, [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], delta=5.0) if name == "slic" else \
        _run(name, [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
    assert m["pref/pairs"] == 1.0 and (grad[2:] == 0).all() and (grad[:2] != 0).any()


@pytest.mark.parametrize("rewards,mode,expected", [
    ([1.0, 1.0, 0.0, 0.0], "best_worst", [(0, 2)]),  # ties: the first row of the max and of the min
    ([0.0, 1.0, 1.0, 0.0], "best_worst", [(1, 0)]),
    ([2.0, 1.0, 1.0, 0.0], "all", [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]),  # the 1-1 tie makes no pair
    ([1.0, 1.0, 0.0, 0.0], "all", [(0, 2), (0, 3), (1, 2), (1, 3)]),
])
def test_pairs_of_one_group(rewards, mode, expected):
    assert ref_pairs(rewards, [0] * 4, [3, 2, 3, 2], mode) == expected  # the reference itself, by hand
    _, grad, m = _run("online_dpo", rewards, [0, 0, 0, 0], pairs=mode)
    assert m["pref/pairs"] == len(expected)
    in_pairs = {i for p in expected for i in p}
    for i in range(4):
        assert bool((grad[i] != 0).any()) == (i in in_pairs), i


# ---------------------------------------------------------------------------------------------
# errors and the reference option
# ---------------------------------------------------------------------------------------------
def test_initial_reference_needs_ref_logprobs_and_names_the_option():
    lp, beh, adv, mask = example()
    ctx = {"group_id": torch.tensor([0, 0]), "rewards": torch.tensor(REWARDS, dtype=F64)}
    msg = error_message(policy_loss, "online_dpo", lp, beh, adv, mask, context=ctx)
    assert "context['ref_logprobs']" in msg
    inp = make_inputs(lp, beh, adv, mask)  # the objective itself, called without policy_loss's check
    inp.context = ctx
    for name in ("online_dpo", "ipo", "wpo", "copg"):
        msg = error_message(OBJECTIVES.get(name), inp, **{**DEFAULTS[name], "pairs": "best_worst",
                                                          "reference": "initial"})
        assert f"{name}.reference='initial'" in msg and "reference='behaviour'" in msg
    policy_loss("online_dpo", lp, beh, adv, mask, context=ctx, reference="behaviour")  # no reference needed
    policy_loss("slic", lp, beh, adv, mask, context=ctx)


@pytest.mark.parametrize("name,params,match", [
    ("online_dpo", {"beta": 0.0}, r"online_dpo\.beta=0\.0 is invalid: expected a number > 0"),
    ("ipo", {"tau": 0.0}, r"ipo\.tau=0\.0 is invalid"),
    ("wpo", {"alignment": "vocab"}, r"wpo\.alignment='vocab' is invalid: expected one of none, behaviour"),
    ("copg", {"pairs": "every"}, r"copg\.pairs='every' is invalid: expected one of best_worst, all"),
    ("slic", {"delta": -1.0}, r"slic\.delta=-1\.0 is out of range"),
    ("slic", {"reference": "initial"}, r"has no parameter 'reference'"),
])
def test_bad_params_are_one_line_errors(name, params, match):
    lp, beh, adv, mask = example()
    with pytest.raises(WorkbenchError, match=match) as err:
        policy_loss(name, lp, beh, adv, mask, context=ex_context(), **params)
    assert "\n" not in str(err.value)


def test_metadata_live_flags():
    for name in NAMES:
        params = {p.name: p for p in OBJECTIVES.meta(name)["params"]}
        assert OBJECTIVES.meta(name)["default_aggregation"] == "seq-mean-token-mean"
        assert all(params[k].live for k in ("beta", "tau", "delta") if k in params)
        assert not any(params[k].live for k in ("pairs", "reference", "alignment") if k in params)


# ---------------------------------------------------------------------------------------------
# a tiny training run
# ---------------------------------------------------------------------------------------------
def test_tiny_run_with_online_dpo_trains_with_finite_losses(tokenizer, tiny_model_config):
    cfg = RunConfig(task="addition", task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=4,
                    group_size=4, eval_every=10, eval_size=8, lr=1e-2, seed=3, staleness=1,
                    objective="online_dpo", rewards=(("overlong", 1.0, {"max_len": 4, "cache_len": 3}),))
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    assert run.ref_model is not None  # reference='initial': the loop builds the frozen initial policy
    before = {k: v.clone() for k, v in run.model.named_parameters()}
    df = run.run(4)
    assert df.height == 4 and df["loss/total"].is_finite().all() and df["loss/policy"].is_finite().all()
    assert (df["pref/pairs"] > 0).any()
    assert any(not torch.equal(before[k], v) for k, v in run.model.named_parameters())
