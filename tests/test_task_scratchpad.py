"""The ``scratchpad`` task: format, grading of the final answer only, held-out set, determinism, bad params."""

from __future__ import annotations

import random

import pytest

from workbench.errors import WorkbenchError
from workbench.policy.tokenizer import DEFAULT_ALPHABET
from workbench.tasks import TASKS, Example, make_task
from workbench.tasks.scratchpad import final_answer, scratchpad


def test_registered_and_documented_example():
    assert "scratchpad" in TASKS.names()
    # hand-written: 7+5 = 12 (write 2, carry 1); 4+8+1 = 13 (write 3, carry 1); sum 132
    assert scratchpad(47, 85) == "7+5+0=12,4+8+1=13,>132"
    # unequal lengths pad the shorter operand with 0; no final carry -> no leading digit
    assert scratchpad(7, 85) == "7+5+0=12,0+8+1=09,>92"
    assert scratchpad(0, 0) == "0+0+0=00,>0"
    assert scratchpad(999, 1) == "9+1+0=10,9+0+1=10,9+0+1=10,>1000"


def test_format_lengths_and_alphabet():
    task = make_task("scratchpad")
    assert task.params == {"min_digits": 2, "max_digits": 3, "heldout_size": 256}
    assert task.max_answer_tokens == 9 * 3 + 1 + 4 + 1  # columns, ">", 4-digit sum, EOS
    examples = task.sample(random.Random(3), 400) + task.heldout
    for ex in examples:
        a, b = (int(x) for x in ex.prompt.rstrip("=").split("+"))
        cols = max(len(str(a)), len(str(b)))
        pad, final = ex.answer.split(">")
        assert final == str(a + b)
        assert len(pad) == 9 * cols and pad.count(",") == cols
        assert len(ex.answer) + 1 <= task.max_answer_tokens
        assert set(ex.prompt + ex.answer) <= set(task.alphabet) <= set(DEFAULT_ALPHABET)
        assert task.expert(ex) == ex.answer  # SFT / CHORD imitate the full scratchpad
    assert max(len(ex.answer) for ex in examples) + 1 == task.max_answer_tokens  # the budget is reached
    # the longest prompt + answer + EOS fits the default model's 64 positions
    assert max(len(ex.prompt) for ex in examples) + task.max_answer_tokens <= 64


def test_verify_grades_only_the_final_answer():
    task = make_task("scratchpad")
    ex = Example("47+85=", scratchpad(47, 85))
    assert task.verify("7+5+0=12,4+8+1=13,>132", ex)
    assert task.verify(" 7+5+0=12,4+8+1=13,>132 ", ex)  # surrounding whitespace is stripped
    assert task.verify("1+1+0=99,>132", ex)  # a wrong scratchpad with the right final answer counts
    assert task.verify(">>>132", ex)  # the text after the last ">" is graded
    assert not task.verify("7+5+0=12,4+8+1=13,>131", ex)  # a right scratchpad with a wrong answer does not
    assert not task.verify("7+5+0=12,4+8+1=13,>0132", ex)  # exact string, no leading zeros
    assert not task.verify("132", ex)  # no ">": no final answer
    assert not task.verify("7+5+0=12,>", ex)
    assert final_answer("a>b> 12 ") == "12" and final_answer("12") is None


def test_heldout_fixed_disjoint_and_deterministic():
    task = make_task("scratchpad", min_digits=1, max_digits=1, heldout_size=30)  # 100 prompts
    held = [ex.prompt for ex in task.heldout]
    assert len(set(held)) == 30
    assert held == [ex.prompt for ex in make_task("scratchpad", min_digits=1, max_digits=1, heldout_size=30).heldout]
    train = {ex.prompt for ex in task.sample(random.Random(0), 3000)}
    assert not train & set(held)
    assert len(train) + len(held) == task._space_size() == 100
    big = make_task("scratchpad")
    a, b = big.sample(random.Random(7), 50), big.sample(random.Random(7), 50)
    assert a == b != big.sample(random.Random(8), 50)
    assert make_task("scratchpad").sample(random.Random(7), 50) == a  # no state in the task


@pytest.mark.parametrize("params,needle", [
    ({"min_digits": 0}, "scratchpad.min_digits=0 is invalid"),
    ({"max_digits": 1}, "scratchpad.max_digits=1 is invalid"),  # below the default min_digits=2
    ({"max_digits": 19}, "scratchpad.max_digits=19 is invalid"),
    ({"heldout_size": -1}, "scratchpad.heldout_size=-1 is invalid"),
    ({"min_digits": "2"}, "scratchpad.min_digits='2' is invalid"),
    ({"min_digits": 1, "max_digits": 1, "heldout_size": 51}, "at most half"),
    ({"digits": 3}, "unknown param 'digits'"),
])
def test_bad_params_are_one_line_errors(params, needle):
    with pytest.raises(WorkbenchError) as e:
        make_task("scratchpad", **params)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # ~100 s on one core: SFT of the default model from scratch
def test_default_warm_start_reaches_the_band(tmp_path):
    import json

    import torch

    from workbench.policy.warm_start import META_FILE, warm_start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = warm_start(make_task("scratchpad"), cache_dir=tmp_path, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((path / META_FILE).read_text())
    assert meta["in_band"] and 0.2 <= meta["accuracy"] <= 0.5


def test_final_answer_reward_grades_what_verify_grades():
    from workbench.steps.rewards import REWARDS
    from workbench.tasks import make_task
    task = make_task("scratchpad")
    ex = task.heldout[0]
    final = ex.answer.rsplit(">", 1)[1]
    wrong_pad = ex.answer.replace("+", "-", 1)  # a scratchpad error, the right final answer
    completions = [ex.answer, wrong_pad, ex.answer[:-1] + str((int(final[-1]) + 1) % 10), ex.answer.split(">")[0]]
    fn = REWARDS.get("final_answer")
    got = fn([ex.prompt] * 4, completions, answers=[ex.answer] * 4)
    assert got == [1.0, 1.0, 0.0, 0.0]
    assert got == [float(task.verify(c, ex)) for c in completions]
