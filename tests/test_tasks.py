"""Tasks (determinism, held-out disjointness, verify, JSONL) and the char tokenizer."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from workbench.errors import WorkbenchError
from workbench.tasks import TASKS, Example, make_task
from workbench.policy.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer, tokenizer_alphabet


# ---------------------------------------------------------------- tasks
def test_registry_lists_builtin_tasks():
    assert {"addition", "reverse", "jsonl", "parquet", "hf_dataset"} <= set(TASKS.names())


@pytest.mark.parametrize("name", ["addition", "reverse"])
def test_sample_is_deterministic_given_rng(name):
    task = make_task(name)
    a = task.sample(random.Random(7), 50)
    b = task.sample(random.Random(7), 50)
    c = task.sample(random.Random(8), 50)
    assert a == b
    assert a != c
    # a task holds no random state: a fresh task with the same params gives the same draws
    assert make_task(name).sample(random.Random(7), 50) == a


@pytest.mark.parametrize("name,params", [
    ("addition", {}),
    ("addition", {"max_digits": 1, "heldout_size": 20}),  # tiny space: 100 prompts
    ("reverse", {"min_len": 3, "max_len": 3, "alphabet_size": 3, "heldout_size": 8}),  # 27 prompts
])
def test_heldout_is_fixed_and_disjoint_from_training(name, params):
    task = make_task(name, **params)
    held = {ex.prompt for ex in task.heldout}
    assert len(held) == len(task.heldout) == task.params["heldout_size"]
    assert [ex.prompt for ex in make_task(name, **params).heldout] == [ex.prompt for ex in task.heldout]
    train = task.sample(random.Random(0), 5000)
    train_prompts = {ex.prompt for ex in train}
    assert not (held & train_prompts)
    if name != "addition" or params:
        # small spaces: training covers everything that is not held out
        assert len(train_prompts) + len(held) == task._space_size()


def test_addition_answers_and_operands():
    task = make_task("addition", min_digits=2, max_digits=3)
    for ex in task.sample(random.Random(1), 500):
        a, b = ex.prompt.rstrip("=").split("+")
        assert ex.prompt.endswith("=")
        assert int(ex.answer) == int(a) + int(b)
        for operand in (a, b):
            assert 2 <= len(operand) <= 3 and not operand.startswith("0")
    one = make_task("addition", max_digits=1, heldout_size=10)
    lengths = {len(x) for ex in one.sample(random.Random(0), 200) for x in ex.prompt[:-1].split("+")}
    assert lengths == {1}
    assert task.max_answer_tokens == 3 + 1 + 1
    assert set("".join(ex.prompt + ex.answer for ex in task.heldout)) <= set(task.alphabet)


def test_addition_digit_counts_are_uniform():
    task = make_task("addition", min_digits=1, max_digits=3)
    counts = {1: 0, 2: 0, 3: 0}
    for ex in task.sample(random.Random(0), 3000):
        counts[len(ex.prompt[:-1].split("+")[0])] += 1
    assert all(800 < c < 1200 for c in counts.values()), counts


def test_reverse_task():
    task = make_task("reverse", min_len=4, max_len=6, alphabet_size=5)
    for ex in task.sample(random.Random(0), 200):
        s = ex.prompt[len("rev:"):-1]
        assert ex.prompt == f"rev:{s}=" and ex.answer == s[::-1]
        assert 4 <= len(s) <= 6 and set(s) <= set("abcde")
        assert set(ex.prompt + ex.answer) <= set(task.alphabet)
    assert task.max_answer_tokens == 7


def test_verify_and_expert():
    task = make_task("addition")
    ex = Example("37+485=", "522")
    assert task.verify("522", ex) and task.verify("  522\n", ex)
    assert not task.verify("5 22", ex) and not task.verify("523", ex) and not task.verify("", ex)
    for ex in task.sample(random.Random(3), 50) + task.heldout[:10]:
        assert task.verify(task.expert(ex), ex)


@pytest.mark.parametrize("params,match", [
    ({"digits": 3}, r"unknown param 'digits' for task 'addition': valid params are heldout_size, max_digits, min_digits"),
    ({"min_digits": 0}, r"addition.min_digits=0 is invalid"),
    ({"min_digits": 3, "max_digits": 2}, r"addition.max_digits=2 is invalid"),
    ({"max_digits": 1}, r"heldout_size=256 is invalid.*100 distinct prompts"),
    ({"max_digits": "3"}, r"max_digits='3' is invalid"),
])
def test_bad_params_one_line_errors(params, match):
    with pytest.raises(WorkbenchError, match=match) as e:
        make_task("addition", **params)
    assert "\n" not in str(e.value)


def test_unknown_task_lists_valid_names():
    with pytest.raises(WorkbenchError, match="valid tasks are addition, hf_dataset, jsonl, parquet, reverse"):
        make_task("multiplication")


# ---------------------------------------------------------------- jsonl
def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_happy_path(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}=", "answer": str(i), "level": i % 3}) for i in range(40)]
    lines.insert(5, "")  # blank lines are skipped
    lines.append(json.dumps({"prompt": "q3=", "answer": "3", "level": 0}))  # duplicate prompt
    path = _write(tmp_path / "t.jsonl", lines)
    task = make_task("jsonl", path=str(path), heldout_fraction=0.25)
    held = {ex.prompt for ex in task.heldout}
    assert len(held) == 10  # 25% of 40 unique prompts
    train = task.sample(random.Random(0), 2000)
    assert not held & {ex.prompt for ex in train}
    assert {ex.prompt for ex in train} == {ex.prompt for ex in task.train}
    assert task.sample(random.Random(5), 30) == task.sample(random.Random(5), 30)
    ex = train[0]
    assert ex.extra == {"level": int(ex.answer) % 3}
    assert task.verify(f" {ex.answer} ", ex)
    assert task.max_answer_tokens == 2 + 1
    assert set("q=0123456789") == set(task.alphabet)
    # same split from a second instance; the content hash is part of the fingerprint
    assert [e.prompt for e in make_task("jsonl", path=str(path), heldout_fraction=0.25).heldout] == \
        [e.prompt for e in task.heldout]
    fp = task.fingerprint
    _write(path, lines[:-1])
    assert make_task("jsonl", path=str(path), heldout_fraction=0.25).fingerprint != fp


@pytest.mark.parametrize("bad_line,what", [
    ('{"prompt": "a=", "answer": "1"', "bad JSON"),
    ('{"answer": "1"}', "missing 'prompt'"),
    ('{"prompt": "a="}', "missing 'answer'"),
    ('{"prompt": "a=", "answer": 1}', "'answer' must be a string, got int"),
    ('{"prompt": ["a"], "answer": "1"}', "'prompt' must be a string, got list"),
    ('["a", "1"]', "expected a JSON object"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad_line, what):
    good = json.dumps({"prompt": "x=", "answer": "y"})
    path = _write(tmp_path / "bad.jsonl", [good, good, bad_line, good])
    with pytest.raises(WorkbenchError) as e:
        make_task("jsonl", path=str(path))
    msg = str(e.value)
    assert f"{path}:3" in msg and what in msg and "\n" not in msg


def test_jsonl_missing_file_and_bad_fraction(tmp_path):
    with pytest.raises(WorkbenchError, match="no such file"):
        make_task("jsonl", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(WorkbenchError, match="jsonl.path=None is invalid"):
        make_task("jsonl")
    path = _write(tmp_path / "one.jsonl", [json.dumps({"prompt": "a", "answer": "b"})])
    with pytest.raises(WorkbenchError, match="nothing would be left to train on"):
        make_task("jsonl", path=str(path))
    with pytest.raises(WorkbenchError, match="heldout_fraction=1.5 is invalid"):
        make_task("jsonl", path=str(path), heldout_fraction=1.5)
    assert make_task("jsonl", path=str(path), heldout_fraction=0).heldout == []


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_special_ids_and_no_added_specials(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert len(tokenizer) == 4 + len(DEFAULT_ALPHABET)
    ids = tokenizer("12+3=")["input_ids"]
    assert len(ids) == 5 and not set(ids) & {0, 1, 2, 3}


@pytest.mark.parametrize("text", ["37+485=522", "rev:abc=cba", " a  b ", "(1.5, 2) * 3 - 4 / 5 < 6 > 7:", ""])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    padded = ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 3
    assert tokenizer.decode(padded, skip_special_tokens=True) == text


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=30))
def test_tokenizer_round_trip_property(text):
    tok = _TOK
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


_TOK = build_char_tokenizer()


def test_special_token_text_is_plain_characters(tokenizer, tmp_path):
    text = "a<eos>b<pad>"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tokenizer.eos_token_id not in ids
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again(text)["input_ids"] == ids
    assert again.decode(ids + [again.eos_token_id], skip_special_tokens=True) == text


def test_tokenizer_unknown_char_and_custom_alphabet():
    tok = build_char_tokenizer("ab")
    assert tok("aXb")["input_ids"] == [4, 3, 5]
    assert tok.decode([4, 3, 5], skip_special_tokens=True) == "ab"
    assert tokenizer_alphabet("0+=") == DEFAULT_ALPHABET
    assert tokenizer_alphabet("Zq!") == DEFAULT_ALPHABET + "!Z"
    with pytest.raises(WorkbenchError, match="alphabet=''"):
        build_char_tokenizer("")


def test_tokenizer_save_and_autotokenizer_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "rev:a b= b a, 12+7=19"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.decode(tokenizer(text)["input_ids"] + [2, 0], skip_special_tokens=True) == text
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (0, 2, 1)
    assert len(again) == len(tokenizer)
