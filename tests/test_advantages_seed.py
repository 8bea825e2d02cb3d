"""The CAPO advantage estimator (workbench/steps/advantages_seed.py, arXiv:2604.12632): hand-computed groups, an
independent plain-Python reference of the pairwise logistic-AUC advantage with noise masking on shuffled graded
groups, the calibration direction, what ``score`` passes it (the mean behaviour log-prob of each response), and its
numeric option's one-line errors.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.lint import group_relative
from workbench.rollouts import Rollouts
from workbench.steps.score import ADVANTAGES, score, validate_advantage_params

torch.set_num_threads(1)
F64 = torch.float64


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def capo_by_hand(rewards, groups, conf, margin):
    """A_i = 2 mean over kept (i better than j) of sigmoid(s_j - s_i) - 2 mean over kept (k better than i) of
    sigmoid(s_i - s_k); a pair is dropped when the worse response is more confident by more than ``margin``."""
    out = []
    for i in range(len(rewards)):
        up, down = [], []
        for j in range(len(rewards)):
            if groups[j] != groups[i]:
                continue
            if rewards[i] > rewards[j] and not conf[j] - conf[i] > margin:
                up.append(sig(conf[j] - conf[i]))
            if rewards[j] > rewards[i] and not conf[i] - conf[j] > margin:
                down.append(sig(conf[i] - conf[j]))
        out.append(2 * (sum(up) / len(up) if up else 0.0) - 2 * (sum(down) / len(down) if down else 0.0))
    return out


def run(rewards, groups, conf=None, **options):
    f = ADVANTAGES.get("capo")
    c = None if conf is None else torch.tensor(conf, dtype=F64)
    return f(torch.tensor(rewards, dtype=F64), torch.tensor(groups), confidence=c, **options).tolist()


def test_hand_computed_binary_group_and_noise_mask():
    # one correct response (s = -1.0) against two incorrect ones (s = -0.5, more confident; s = -2.0)
    r, g, s = [1.0, 0.0, 0.0], [7, 7, 7], [-1.0, -0.5, -2.0]
    want = [2 * (sig(0.5) + sig(-1.0)) / 2, -2 * sig(0.5), -2 * sig(-1.0)]
    assert run(r, g, s) == pytest.approx(want, rel=1e-12)
    # margin 0.3: the pair (0, 1) is misranked by 0.5 > 0.3 and dropped
    assert run(r, g, s, noise_margin=0.3) == pytest.approx([2 * sig(-1.0), 0.0, -2 * sig(-1.0)], rel=1e-12)
    # the confident wrong answer is pushed down harder than the unconfident one; the correct answer that is
    # already more confident than a wrong one gets less push from that pair
    a = run(r, g, s)
    assert a[1] < a[2] < 0 < a[0]


def test_hand_computed_graded_group_gets_both_terms():
    r, g, s = [2.0, 1.0, 0.0], [0, 0, 0], [0.0, 0.2, -0.3]
    want = [2 * (sig(0.2) + sig(-0.3)) / 2, 2 * sig(-0.5) - 2 * sig(0.2), -2 * (sig(-0.3) + sig(-0.5)) / 2]
    assert run(r, g, s) == pytest.approx(want, rel=1e-12)


def test_without_confidence_every_pair_ties_at_one_half():
    # the test_score example: groups 5 (2, 0, 1) and 2 (4, 0)
    assert run([2.0, 4.0, 0.0, 0.0, 1.0], [5, 2, 5, 2, 5]) == pytest.approx([1.0, 1.0, -1.0, -1.0, 0.0], rel=1e-12)


def test_constant_groups_and_singletons_get_zero():
    assert run([1.0, 1.0, 3.0, 0.5], [0, 0, 1, 2], [-0.1, -3.0, -1.0, -2.0]) == [0.0, 0.0, 0.0, 0.0]
    assert run([], []) == []


@pytest.mark.parametrize("margin", [0.0, 0.4, 1.0, 50.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_an_independent_reference_on_shuffled_groups(seed, margin):
    rng = random.Random(seed)
    n = 40
    groups = [rng.choice([3, 11, 4, 99, 0]) for _ in range(n)]  # unsorted, non-contiguous ids
    rewards = [float(rng.choice([0, 0.5, 1, 1, 2])) for _ in range(n)]  # graded, with ties
    conf = [-rng.random() * 3 for _ in range(n)]
    got = run(rewards, groups, conf, noise_margin=margin)
    want = capo_by_hand(rewards, groups, conf, margin)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert any(abs(x) > 0 for x in got)
    if margin == 0.0:  # every misranked pair is dropped: some response lost pairs relative to margin 50
        assert want != capo_by_hand(rewards, groups, conf, 50.0)


def test_keeps_the_reward_dtype_and_is_group_relative():
    out = ADVANTAGES.get("capo")(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), confidence=torch.tensor([-1.0, -1.0]))
    assert out.dtype == torch.float32 and out.tolist() == [1.0, -1.0]
    assert group_relative("capo")


def _rollouts(rewards_text, group_id, logprobs, lengths, T=4):
    b = len(group_id)
    mask = torch.zeros(b, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    beh = torch.tensor(logprobs, dtype=torch.float32)  # [B, T]; padded entries are garbage
    return Rollouts(prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2, dtype=torch.long),
                    response_ids=torch.ones(b, T, dtype=torch.long), response_mask=mask, behavior_logprobs=beh,
                    policy_version=torch.zeros(b, dtype=torch.long), group_id=torch.tensor(group_id),
                    prompts=["p"] * b, completions=list(rewards_text), answers=["1"] * b)


def test_score_passes_the_mean_behaviour_log_prob_as_confidence():
    # rows: correct (mean lp -0.5), wrong (mean lp -0.25: more confident), wrong (-2.0); padding holds -100
    lp = [[-0.25, -0.75, -100.0, -100.0], [-0.25, -100.0, -100.0, -100.0], [-1.0, -3.0, -2.0, -100.0]]
    ro = _rollouts(["1", "x", "y"], [0, 0, 0], lp, [2, 1, 3])
    out, _ = score(ro, "exact_match", advantage="capo")
    conf = [-0.5, -0.25, -2.0]
    assert out.advantages.tolist() == pytest.approx(capo_by_hand([1.0, 0.0, 0.0], [0, 0, 0], conf, 1.0), rel=1e-6)
    out, _ = score(ro, "exact_match", advantage="capo", advantage_params={"noise_margin": 0.1})
    assert out.advantages.tolist() == pytest.approx(capo_by_hand([1.0, 0.0, 0.0], [0, 0, 0], conf, 0.1), rel=1e-6)
    assert out.advantages[1] == 0.0  # its only pair is misranked by 0.25 > 0.1


def test_noise_margin_errors_are_one_line():
    cases = [({"noise_margin": -1.0}, r"^advantage_params.noise_margin=-1.0 is invalid: expected a number in "
                                      r"\[0.0, 50.0\] \(advantage=capo\)$"),
             ({"noise_margin": True}, r"^advantage_params.noise_margin=True is invalid"),
             ({"noise_margin": "big"}, r"^advantage_params.noise_margin='big' is invalid"),
             ({"noise_margin": math.nan}, r"^advantage_params.noise_margin=nan is invalid"),
             ({"margin": 1.0}, r"^advantage_params has no key 'margin' for advantage='capo': valid keys are "
                               r"noise_margin$")]
    for params, pattern in cases:
        with pytest.raises(WorkbenchError, match=pattern):
            validate_advantage_params("capo", params)
        with pytest.raises(WorkbenchError, match=pattern):
            RunConfig(advantage="capo", advantage_params=params)
    assert RunConfig(advantage="capo", advantage_params={"noise_margin": 0.5}).advantage_params == {"noise_margin": 0.5}
    with pytest.raises(WorkbenchError, match=r"^advantage_params.noise_margin=60 is invalid"):
        ADVANTAGES.get("capo")(torch.zeros(2), torch.zeros(2, dtype=torch.long), noise_margin=60)
    with pytest.raises(WorkbenchError, match=r"^confidence=.* is invalid: expected a finite tensor of shape \(2,\)"):
        ADVANTAGES.get("capo")(torch.zeros(2), torch.zeros(2, dtype=torch.long), confidence=torch.zeros(3))
