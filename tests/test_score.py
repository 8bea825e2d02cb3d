"""Tests for workbench.steps.score: rewards, their combination and validation, advantages, filtering."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.rollouts import Rollouts
from workbench.steps.score import (
    ADVANTAGES, REWARDS, combine, compute_rewards, format_reward, overlong, score, zero_variance_mask,
)

torch.set_num_threads(1)


def make(completions, answers, group_id, lengths=None, extras=None, T=6):
    """A tiny Rollouts with dummy token tensors; ``lengths`` sets response_mask row sums."""
    B = len(completions)
    lengths = lengths if lengths is not None else [1] * B
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    return Rollouts(
        prompt_ids=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.ones(B, T, dtype=torch.long),
        response_mask=mask,
        behavior_logprobs=torch.zeros(B, T),
        policy_version=torch.zeros(B, dtype=torch.long),
        group_id=torch.tensor(group_id, dtype=torch.long),
        prompts=[f"p{g}" for g in group_id],
        completions=list(completions),
        answers=list(answers),
        extras=list(extras) if extras is not None else [],
    )


# Two groups with unequal rewards, interleaved, non-contiguous ids 5 and 2:
#   group 5 at rows 0, 2, 4: rewards 2, 0, 1 -> mean 1, deviations (1, -1, 0), unbiased std 1
#   group 2 at rows 1, 3:    rewards 4, 0    -> mean 2, deviations (2, -2),    unbiased std 2*sqrt(2)
R = torch.tensor([2.0, 4.0, 0.0, 0.0, 1.0])
G = torch.tensor([5, 2, 5, 2, 5])
S2 = math.sqrt(2.0)
# batch std of R: mean 1.4, squared deviations sum 0.36+6.76+1.96+1.96+0.16 = 11.2, /4 -> sqrt(2.8)
# centred (1, 2, -1, -2, 0): mean 0, squares sum 10, /4 -> sqrt(2.5)
EXPECTED = {
    "grpo": [1.0, 2 / (2 * S2), -1.0, -2 / (2 * S2), 0.0],
    "dr_grpo": [1.0, 2.0, -1.0, -2.0, 0.0],
    "rloo": [2 - 0.5, 4 - 0.0, 0 - 1.5, 0 - 4.0, 1 - 1.0],
    "lite_ppo": [x / math.sqrt(2.8) for x in (1.0, 2.0, -1.0, -2.0, 0.0)],
    "reinforce_pp": [x / math.sqrt(2.5) for x in (1.0, 2.0, -1.0, -2.0, 0.0)],
    "none": [2.0, 4.0, 0.0, 0.0, 1.0],
    # no confidences given: every (better, worse) pair ties at sigmoid(0) = 1/2, so 2 * 1/2 per side; row 4
    # (reward 1) beats row 2 and loses to row 0 (tests/test_advantages_seed.py has the confidence cases)
    "capo": [1.0, 1.0, -1.0, -1.0, 0.0],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_advantage_estimators_hand_computed(name):
    adv = ADVANTAGES.get(name)(R, G)
    assert adv.shape == (5,) and adv.dtype == torch.float32
    assert torch.allclose(adv, torch.tensor(EXPECTED[name]), atol=1e-5)


def test_every_estimator_has_a_test_and_metadata():
    assert set(ADVANTAGES.names()) == set(EXPECTED)
    for name in ADVANTAGES:
        assert "arXiv" in ADVANTAGES.meta(name)["paper"] and ADVANTAGES.meta(name)["summary"]


def test_group_of_size_one():
    r, g = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([4, 8, 8])
    assert ADVANTAGES.get("grpo")(r, g).tolist() == pytest.approx([0.0, -1 / S2, 1 / S2], abs=1e-5)
    assert ADVANTAGES.get("rloo")(r, g).tolist() == pytest.approx([0.0, -1.0, 1.0])
    assert ADVANTAGES.get("dr_grpo")(r, g).tolist() == pytest.approx([0.0, -0.5, 0.5])
    assert zero_variance_mask(r, g).tolist() == [True, False, False]
    # a batch made only of singletons: every baseline estimator gives 0, no NaN
    for name in ("grpo", "dr_grpo", "rloo", "lite_ppo", "reinforce_pp"):
        assert ADVANTAGES.get(name)(torch.tensor([3.0]), torch.tensor([0])).tolist() == [0.0]


def test_vectorised_matches_python_reference_on_shuffled_groups():
    gen = torch.Generator().manual_seed(0)
    gid = torch.randint(0, 300, (2000,), generator=gen) * 7  # sparse, unsorted ids
    r = torch.randint(0, 3, (2000,), generator=gen).float()
    grpo, rloo = ADVANTAGES.get("grpo")(r, gid), ADVANTAGES.get("rloo")(r, gid)
    for g in gid.unique()[:40].tolist():
        rows = (gid == g).nonzero(as_tuple=True)[0]
        x = r[rows].double()
        want = (x - x.mean()) / (x.std() + 1e-6) if len(x) > 1 else torch.zeros_like(x)
        assert torch.allclose(grpo[rows].double(), want, atol=1e-5)
        if len(x) > 1:
            assert torch.allclose(rloo[rows].double(), x - (x.sum() - x) / (len(x) - 1), atol=1e-5)


def test_bad_advantage_inputs():
    with pytest.raises(WorkbenchError, match="group_id"):
        ADVANTAGES.get("grpo")(R, G[:3])
    with pytest.raises(WorkbenchError, match="unknown advantage estimator 'ppo'.*grpo"):
        score(make(["1"], ["1"], [0]), "exact_match", advantage="ppo")


# --------------------------------------------------------------- estimator options (advantage_params)
C = [1.0, 2.0, -1.0, -2.0, 0.0]  # R - mean_G for R, G above


def test_lite_ppo_std_choices_hand_computed():
    f, r = ADVANTAGES.get("lite_ppo"), R.double()
    # TRL scale_rewards="batch": unbiased std of the raw rewards, sqrt(11.2 / 4)
    trl = [c / (math.sqrt(2.8) + 1e-6) for c in C]
    assert f(r, G).tolist() == pytest.approx(trl, rel=1e-12)
    assert f(r, G, std="batch_rewards").tolist() == pytest.approx(trl, rel=1e-12)
    # AReaL group mean + batch std: unbiased std of the centred rewards, sqrt(10 / 4)
    assert f(r, G, std="batch_centred").tolist() == pytest.approx([c / (math.sqrt(2.5) + 1e-6) for c in C], rel=1e-12)
    # a batch whose centred rewards have a smaller spread than the raw ones: the two really differ
    r2, g2 = torch.tensor([10.0, 11.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1])
    c2 = [-0.5, 0.5, -0.5, 0.5]  # centred; raw mean 5.5, squares 20.25+30.25+30.25+20.25 = 101 -> /3
    assert f(r2, g2).tolist() == pytest.approx([c / (math.sqrt(101 / 3) + 1e-6) for c in c2], rel=1e-12)
    assert f(r2, g2, std="batch_centred").tolist() == pytest.approx([c / (math.sqrt(1 / 3) + 1e-6) for c in c2],
                                                                     rel=1e-12)


def _token_whitened(c: list[float], lengths: list[int], eps: float = 1e-6) -> list[float]:
    """verl's masked_whiten of the advantage broadcast over each row's tokens (unbiased variance),
    read back one value per row; rows without tokens get 0."""
    tokens = [x for x, n in zip(c, lengths) for _ in range(n)]
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((x - mean) ** 2 for x in tokens) / (len(tokens) - 1))
    return [(x - mean) / (std + eps) if n else 0.0 for x, n in zip(c, lengths)]


def test_reinforce_pp_whiten_sequences_or_tokens_hand_computed():
    f, r = ADVANTAGES.get("reinforce_pp"), R.double()
    seq = [c / (math.sqrt(2.5) + 1e-6) for c in C]  # the centred mean is 0 over sequences
    assert f(r, G).tolist() == pytest.approx(seq, rel=1e-12)
    assert f(r, G, whiten="sequences").tolist() == pytest.approx(seq, rel=1e-12)
    # tokens, lengths (2, 1, 3, 1, 3), N = 10: m = sum L c / N = -1 / 10, s^2 = sum L (c - m)^2 / 9 = 12.9 / 9
    lengths = torch.tensor([2, 1, 3, 1, 3])
    want = [(c + 0.1) / (math.sqrt(12.9 / 9) + 1e-6) for c in C]
    assert f(r, G, whiten="tokens", lengths=lengths).tolist() == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(_token_whitened(C, [2, 1, 3, 1, 3]), rel=1e-12)
    # a row without tokens gets 0 and does not count
    got = f(r, G, whiten="tokens", lengths=torch.tensor([2, 0, 3, 1, 3])).tolist()
    assert got == pytest.approx(_token_whitened(C, [2, 0, 3, 1, 3]), rel=1e-12, abs=1e-12) and got[1] == 0.0
    with pytest.raises(WorkbenchError, match="^lengths=None is invalid: expected a tensor of shape"):
        f(r, G, whiten="tokens")


def test_score_passes_the_options_and_the_response_lengths():
    # rewards (1, 0, 1 | 0, 1, 0) in groups 0 and 1: centred (1/3, -2/3, 1/3 | -1/3, 2/3, -1/3)
    lengths = [1, 2, 3, 4, 5, 6]
    ro = make(["1", "2", "1", "x", "1", "2"], ["1"] * 6, [0, 0, 0, 1, 1, 1], lengths=lengths, T=6)
    c = [1 / 3, -2 / 3, 1 / 3, -1 / 3, 2 / 3, -1 / 3]
    out, _ = score(ro, "exact_match", advantage="reinforce_pp", advantage_params={"whiten": "tokens"})
    assert out.advantages.tolist() == pytest.approx(_token_whitened(c, lengths), rel=1e-6)
    out, _ = score(ro, "exact_match", advantage="lite_ppo", advantage_params={"std": "batch_centred"})
    std_c = math.sqrt(sum(x * x for x in c) / 5)
    assert out.advantages.tolist() == pytest.approx([x / (std_c + 1e-6) for x in c], rel=1e-6)


def test_bad_advantage_options_one_line():
    with pytest.raises(WorkbenchError, match=r"^advantage_params.std='x' is invalid: expected batch_rewards \| "
                                             r"batch_centred \(advantage=lite_ppo\)$"):
        ADVANTAGES.get("lite_ppo")(R, G, std="x")
    with pytest.raises(WorkbenchError, match=r"^advantage_params has no key 'std' for advantage='grpo': valid keys "
                                             r"are none$"):
        score(make(["1"], ["1"], [0]), "exact_match", advantage="grpo", advantage_params={"std": "batch_centred"})
    assert RunConfig(advantage="reinforce_pp", advantage_params={"whiten": "tokens"}).advantage_params == {
        "whiten": "tokens"}
    with pytest.raises(WorkbenchError, match=r"^advantage_params has no key 'whiten' for advantage='lite_ppo': "
                                             r"valid keys are std$"):
        RunConfig(advantage="lite_ppo", advantage_params={"whiten": "tokens"})
    with pytest.raises(WorkbenchError, match=r"^advantage_params.whiten='seq' is invalid"):
        RunConfig(advantage="reinforce_pp", advantage_params={"whiten": "seq"})


# ------------------------------------------------------------------------------------ rewards
def test_builtin_rewards():
    comps, ans = [" 57 ", "5x", "", "58", "abc", "-3.5"], ["57", "57", "57", "57", "cab", "-1.25"]
    assert REWARDS.get("exact_match")([""] * 6, comps, answers=ans) == [1.0, 0, 0, 0, 0, 0]
    assert format_reward([""] * 6, comps, answers=ans) == [0.1, 0.0, 0.0, 0.1, 0.1, 0.1]
    assert format_reward([""], ["12"], answers=["3"], value=0.5) == [0.5]
    assert format_reward([""], ["1-2"], answers=["3"]) == [0.0]  # '-' not in the answer


def test_overlong_tokens_and_chars():
    # max_len 10, cache 4: 0 up to 6, then (6 - n) / 4, -1 beyond 10
    got = overlong([""] * 5, [""] * 5, max_len=10, cache_len=4, response_lengths=[3, 6, 8, 10, 12])
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    got = overlong([""] * 2, ["x" * 7, "x" * 9], max_len=10, cache_len=4, unit="chars", penalty_factor=2.0)
    assert got == pytest.approx([-0.5, -1.5])
    assert REWARDS.get("length_penalty") is overlong
    with pytest.raises(WorkbenchError, match="^reward function 'overlong' raised WorkbenchError: .*max_len"):
        compute_rewards("overlong", make(["1"], ["1"], [0]))


def test_combination_with_weights_and_params():
    ro = make(["7", "8", "x", ""], ["7", "7", "7", "7"], [0, 0, 1, 1], lengths=[1, 2, 5, 6])

    def bonus(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    spec = [("exact_match", 1.0), ("format", 0.5, {"value": 0.2}), (bonus, -2.0),
            ("overlong", 1.0, {"max_len": 6, "cache_len": 2})]
    # exact (1, 0, 0, 0); format*0.5 (0.1, 0.1, 0, 0); bonus*-2 (-2, -2, -2, 0);
    # overlong tokens (1, 2, 5, 6): (0, 0, -0.5, -1)
    want = [1 + 0.1 - 2, 0.1 - 2, -2 - 0.5, -1.0]
    got = compute_rewards(spec, ro)
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(want, abs=1e-6)
    assert combine("exact_match", ["p"], ["7"], answers=["7"]).tolist() == [1.0]
    assert combine(("format", 2.0), ["p"], ["7"], answers=["7"]).tolist() == pytest.approx([0.2])


def test_extras_passed_as_kwargs():
    seen = {}

    def spy(prompts, completions, **kw):
        seen.update(kw, prompts=prompts)
        return [0.0] * len(completions)

    ro = make(["1", "2"], ["1", "3"], [0, 0], lengths=[2, 4],
              extras=[{"difficulty": 2, "tag": "a"}, {"difficulty": 3}])
    compute_rewards([(spy, 1.0)], ro)
    assert seen["difficulty"] == [2, 3] and seen["tag"] == ["a", None]
    assert seen["answers"] == ["1", "3"] and seen["response_lengths"] == [2, 4]
    assert seen["prompts"] == ["p0", "p0"]


def _raises(prompts, completions, **kw):
    raise ValueError("boom\nsecond line")


def _none(prompts, completions, **kw):
    return None


def _nan(prompts, completions, **kw):
    return [1.0, float("nan")]


def _inf(prompts, completions, **kw):
    return [float("inf"), 1.0]


def _short(prompts, completions, **kw):
    return [1.0]


def _string_item(prompts, completions, **kw):
    return [1.0, "1.0"]


def _string(prompts, completions, **kw):
    return "10"


@pytest.mark.parametrize("fn, expected", [
    (_raises, "reward function '_raises' raised ValueError: boom second line"),
    (_none, "reward function '_none' returned None: expected a list of 2 finite floats"),
    (_nan, "reward function '_nan' returned nan at index 1: expected a finite float"),
    (_inf, "reward function '_inf' returned inf at index 0: expected a finite float"),
    (_short, "reward function '_short' returned 1 values: expected a list of 2 finite floats"),
    (_string_item, "reward function '_string_item' returned '1.0' at index 1: expected a finite float"),
    (_string, "reward function '_string' returned '10': expected a list of 2 finite floats"),
])
def test_bad_reward_functions_one_line_errors(fn, expected):
    ro = make(["1", "2"], ["1", "2"], [0, 0])
    with pytest.raises(WorkbenchError) as info:
        score(ro, [("exact_match", 1.0), (fn, 1.0)])
    msg = str(info.value)
    assert msg.startswith(expected) and "\n" not in msg


def test_bad_specs():
    ro = make(["1"], ["1"], [0])
    with pytest.raises(WorkbenchError, match="unknown reward 'exact'.*exact_match"):
        compute_rewards([("exact", 1.0)], ro)
    with pytest.raises(WorkbenchError, match="weight of reward 'exact_match'"):
        compute_rewards([("exact_match", float("nan"))], ro)
    with pytest.raises(WorkbenchError, match="rewards_spec"):
        compute_rewards([], ro)
    with pytest.raises(WorkbenchError, match="rollouts.answers"):
        compute_rewards("exact_match", ro.with_(answers=[]))


# ---------------------------------------------------------------------------- score / metrics
def test_score_attaches_rewards_advantages_and_metrics():
    # group 3: correct, wrong (rewards 1, 0); group 1: wrong, wrong, correct (0, 0, 1)
    ro = make(["4", "5", "x", "9", "6"], ["4", "4", "6", "6", "6"], [3, 3, 1, 1, 1], lengths=[1, 3, 2, 6, 2])
    out, m = score(ro, "exact_match", advantage="dr_grpo")
    assert out.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert out.advantages.tolist() == pytest.approx([0.5, -0.5, -1 / 3, -1 / 3, 2 / 3])
    adv = [0.5, -0.5, -1 / 3, -1 / 3, 2 / 3]
    adv_mean = sum(adv) / 5  # = 1/15
    expected = {
        "reward/mean": 0.4,
        "reward/std": math.sqrt(0.24),  # population: p(1 - p) with p = 0.4
        "reward/accuracy": 0.4,
        "reward/zero_var_group_frac": 0.0,
        "reward/filtered_seqs": 0.0,
        "reward/response_len_mean": 14 / 5,
        "reward/response_len_max": 6.0,
        "reward/adv_mean": adv_mean,
        "reward/adv_std": math.sqrt(sum((a - adv_mean) ** 2 for a in adv) / 5),
        "reward/pos_adv_frac": 0.4,
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-6), k


def test_accuracy_is_exact_match_regardless_of_spec():
    ro = make(["4", "5"], ["4", "4"], [0, 0])
    _, m = score(ro, [("format", 1.0)])
    assert m["reward/accuracy"] == 0.5 and m["reward/mean"] == pytest.approx(0.1)


def test_zero_variance_groups_counted_and_filtered():
    # group 10 all correct, group 4 all wrong, group 7 mixed
    ro = make(["1", "1", "2", "x", "3", "y"], ["1", "1", "9", "9", "3", "3"], [10, 10, 4, 4, 7, 7])
    out, m = score(ro, "exact_match", advantage="grpo", filter_zero_variance=False)
    assert len(out) == 6 and m["reward/filtered_seqs"] == 0.0
    assert m["reward/zero_var_group_frac"] == pytest.approx(2 / 3)
    assert zero_variance_mask(out.rewards, out.group_id).tolist() == [True] * 4 + [False] * 2

    out, m = score(ro, "exact_match", advantage="grpo", filter_zero_variance=True)
    assert len(out) == 2 and out.group_id.tolist() == [7, 7] and out.completions == ["3", "y"]
    assert out.rewards.tolist() == [1.0, 0.0]
    assert out.advantages.tolist() == pytest.approx([1 / S2, -1 / S2], abs=1e-5)
    assert m["reward/filtered_seqs"] == 4.0 and m["reward/zero_var_group_frac"] == pytest.approx(2 / 3)
    assert m["reward/accuracy"] == pytest.approx(3 / 6)  # over the whole input batch
    assert m["reward/pos_adv_frac"] == 0.5


def test_filtering_everything_returns_empty_batch():
    ro = make(["1", "1", "2"], ["1", "1", "1"], [0, 0, 1])
    out, m = score(ro, "exact_match", filter_zero_variance=True)
    assert len(out) == 0 and out.rewards.shape == (0,) and out.advantages.shape == (0,)
    assert out.completions == [] and out.response_mask.shape == (0, 6)
    assert m["reward/filtered_seqs"] == 3.0 and m["reward/zero_var_group_frac"] == 1.0
    assert math.isnan(m["reward/adv_mean"]) and m["reward/mean"] == pytest.approx(2 / 3)
