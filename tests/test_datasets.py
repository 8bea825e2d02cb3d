"""Tasks from data: parquet files and ``save_to_disk`` folders, the field mapping, held-out splits,
final-answer formats, the ``math_equiv`` reward (built-in fallback and Math-Verify), tiny runs on
each source, and bad inputs (one line, nothing written).

``save_to_disk`` folders are written here with pyarrow in the layout ``datasets`` writes
(``write_saved``: ``state.json``, ``dataset_info.json``, Arrow IPC stream shards, ``dataset_dict.json``
for a DatasetDict); when ``datasets`` is installed, one test also reads a folder its own writer made.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from datetime import date
from fractions import Fraction
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc
import pytest

from workbench.tasks import math_answers
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.tasks.math_answers import final_answer, last_boxed, to_number
from workbench.policy.model import build_model
from workbench.steps.rewards import REWARDS, math_equiv
from workbench.tasks import make_task

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


# ------------------------------------------------------------------------------ data writers
def write_dataset(folder: Path, columns: dict[str, list] | pa.Table, shards: int = 1) -> Path:
    """One ``Dataset.save_to_disk`` folder: ``shards`` Arrow IPC streams, ``state.json`` listing them,
    ``dataset_info.json`` with the features (datasets 5.2.0's layout)."""
    table = columns if isinstance(columns, pa.Table) else pa.table(columns)
    features = {f.name: {"dtype": "float64" if f.type == pa.float64() else str(f.type), "_type": "Value"}
                for f in table.schema}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    folder.mkdir(parents=True)
    names, step = [], -(-table.num_rows // shards)
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * step, step))
        names.append({"filename": name})
    state = {"_data_files": names, "_fingerprint": "0123456789abcdef", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return folder


def write_saved(folder: Path, splits: dict[str, dict[str, list]], shards: int = 1) -> Path:
    """A ``DatasetDict.save_to_disk`` folder: ``dataset_dict.json`` and one Dataset folder per split."""
    for name, columns in splits.items():
        write_dataset(folder / name, columns, shards)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return folder


def gsm8k_columns(n: int, start: int = 0) -> dict[str, list]:
    """GSM8K-shaped rows: ``question``, a ``solution`` ending in ``#### <sum>``, ``level``."""
    qs = [f"{i}+{i + 3}=" for i in range(start, start + n)]
    return {"question": qs, "solution": [f"{i} plus {i + 3}\n#### {2 * i + 3}" for i in range(start, start + n)],
            "level": [i % 3 for i in range(start, start + n)]}


GSM8K = dict(prompt="question", answer="solution", answer_format="gsm8k")


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# -------------------------------------------------------------------------- math: the fallback
@pytest.mark.parametrize("text,value", [
    ("42", Fraction(42)), ("007", Fraction(7)), ("-3", Fraction(-3)), ("\u22123", Fraction(-3)), ("+4", Fraction(4)),
    ("3.50", Fraction(7, 2)), (".5", Fraction(1, 2)), ("5.", Fraction(5)), ("1,234", Fraction(1234)),
    ("1{,}234.5", Fraction(2469, 2)), ("12,345,678", Fraction(12345678)), ("3/4", Fraction(3, 4)),
    ("-6/8", Fraction(-3, 4)), ("\\frac{2}{4}", Fraction(1, 2)), ("\\dfrac{10}{4}", Fraction(5, 2)),
    ("-\\tfrac{1}{3}", Fraction(-1, 3)), ("$12$", Fraction(12)), ("$$12$$", Fraction(12)), ("\\(7\\)", Fraction(7)),
    ("\\boxed{9}", Fraction(9)), ("$\\boxed{\\frac{1}{2}}$.", Fraction(1, 2)), ("42.", Fraction(42)),
    ("50%", Fraction(50)), ("12.5\\%", Fraction(25, 2)), (" 8 ", Fraction(8)),
    ("3/0", None), ("1,23", None), ("1,2345", None), ("1e3", None), ("\\sqrt{2}", None), ("x", None), ("", None),
    ("\\$18", None), ("1 234", None), ("2 1/2", None), ("\\frac{1.5}{2}", None), ("--3", None),
])
def test_to_number_accepts_exactly_the_documented_forms(text, value):
    assert to_number(text) == value


def test_final_answer_extraction():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{ {x} }") == " {x} "
    assert last_boxed("\\boxed{12") is None and last_boxed("no box") is None
    assert final_answer("work\n#### 1,000\nQuestion: 2+2") == "1,000"
    assert final_answer("#### 3 then \\boxed{4}") == "4"  # a box wins over ####
    assert final_answer("  plain  ") == "plain"


EQUAL = [("42", "42"), (" 42\n", "42"), ("1,234", "1234"), ("0.5", "1/2"), ("\\frac{2}{4}", "0.50"),
         ("\\boxed{3/4}", "0.75"), ("$12$", "12."), ("50%", "50"), ("The answer is 42.", "42"),
         ("so it is 7, then 8", "8"), ("#### 1{,}000", "1000"), ("first \\boxed{5}, final \\boxed{6}", "6"),
         ("$\\boxed{\\dfrac{2}{4}}$", "\\frac{1}{2}"), ("-0", "0"), ("A", "A"), (" (B) ", "(B)"), ("x + 1", "x+1"),
         ("\\boxed{6", "6")]  # an unclosed box is prose: its last number
UNEQUAL = [("50%", "0.5"), ("0.333", "1/3"), ("4.2", "42"), ("1,23", "123"), ("\\boxed{5}", "6"), ("3/0", "0"),
           ("", "0"), ("", ""), ("7, then 8", "7"), ("a", "A"), ("x+1", "1+x"), ("-3", "3"),
           ("2\\sqrt{2}", "\\sqrt{8}")]


@pytest.mark.parametrize("completion,answer", EQUAL)
def test_builtin_says_equal(completion, answer):
    assert math_equiv(["p"], [completion], answers=[answer], backend="builtin") == [1.0]


@pytest.mark.parametrize("completion,answer", UNEQUAL)
def test_builtin_says_not_equal(completion, answer):
    assert math_equiv(["p"], [completion], answers=[answer], backend="builtin") == [0.0]


def test_math_equiv_is_registered_and_its_backend_checked_at_config_time():
    assert "math_equiv" in REWARDS and REWARDS.meta("math_equiv")["summary"]
    for bad, what in [({"backend": "sympy"}, "math_equiv backend='sympy' is invalid: expected auto | math_verify"),
                      ({"backnd": "auto"}, "has no parameter 'backnd'")]:
        with pytest.raises(WorkbenchError, match=what) as e:
            RunConfig(rewards=[("math_equiv", 1.0, bad)])
        assert "\n" not in str(e.value)
    RunConfig(rewards=[("math_equiv", 1.0, {"backend": "builtin"})])


def test_without_math_verify_auto_falls_back_and_math_verify_says_how_to_install(monkeypatch):
    monkeypatch.setattr(math_answers, "_math_verify", lambda: None)
    with pytest.raises(WorkbenchError, match=r"pip install 'workbench\[data\]'") as e:
        math_equiv(["p"], ["1"], answers=["1"], backend="math_verify")
    assert "\n" not in str(e.value)
    # the fallback: exact rationals yes, symbolic no
    assert math_equiv(["p"] * 2, ["0.5", "$\\sqrt{8}$"], answers=["1/2", "2\\sqrt{2}"]) == [1.0, 0.0]


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed (pip install 'workbench[data]')")
@pytest.mark.parametrize("backend", ["math_verify", "auto"])
def test_math_verify_backend_handles_symbolic_answers(backend):
    completions = ["$\\sqrt{8}$", "$1+x$", "\\boxed{\\frac{6}{4}}", "I get $\\frac{1}{3}$", "#### 41", "A"]
    answers = ["2\\sqrt{2}", "x+1", "1.5", "0.333", "42", "A"]
    want = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert math_equiv(["p"], ["$\\sqrt{8}$"], answers=["2\\sqrt{2}"], backend="builtin") == [0.0]  # symbolic
    assert math_equiv(["p"] * 6, completions, answers=answers, backend=backend) == want
    got = []  # another thread: no signal-based timeout there, same verdicts
    worker = threading.Thread(target=lambda: got.append(math_equiv(["p"] * 6, completions, answers=answers,
                                                                   backend=backend)))
    worker.start()
    worker.join()
    assert got == [want]


# ------------------------------------------------------------------------------------ sources
def test_parquet_task_maps_columns_and_holds_out_unique_prompts(tmp_path):
    cols = gsm8k_columns(40)
    cols["question"][39] = cols["question"][0]  # a duplicate prompt: held out or trained on as one
    cols["solution"][39] = cols["solution"][0]
    cols["tag"] = [f"t{i}" for i in range(39)] + ["t0"]
    path = tmp_path / "gsm.parquet"
    pl.DataFrame(cols).write_parquet(path)
    task = make_task("parquet", path=str(path), prompt="Q: {question} A:", answer="solution",
                     answer_format="gsm8k", heldout_fraction=0.25)
    examples = task.heldout + task.train
    assert sorted(ex.prompt for ex in examples) == sorted(f"Q: {q} A:" for q in cols["question"])
    for ex in examples:
        i = cols["question"].index(ex.prompt[3:-3])
        assert ex.answer == str(2 * i + 3) and ex.extra == {"level": i % 3, "tag": f"t{i}"}
    held = {ex.prompt for ex in task.heldout}
    assert len(held) == round(0.25 * 39)  # unique prompts
    assert not held & {ex.prompt for ex in task.train}
    assert (cols["question"][0] in {p[3:-3] for p in held}) == (len(task.heldout) == len(held) + 1)
    again = make_task("parquet", path=str(path), prompt="Q: {question} A:", answer="solution",
                      answer_format="gsm8k", heldout_fraction=0.25, extra=["level"])
    assert [ex.prompt for ex in again.heldout] == [ex.prompt for ex in task.heldout]
    assert again.heldout[0].extra.keys() == {"level"}
    # the same rows as JSONL give the same split: one mechanism for every source
    jsonl = tmp_path / "gsm.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in pl.DataFrame(cols).to_dicts()))
    from_jsonl = make_task("jsonl", path=str(jsonl), prompt="Q: {question} A:", answer="solution",
                           answer_format="gsm8k", heldout_fraction=0.25)
    assert from_jsonl.heldout == task.heldout and from_jsonl.train == task.train
    assert task.max_answer_tokens == 2 + 1 and set(task.alphabet) >= set("Q: A=+0123456789")


def test_parquet_fingerprint_follows_the_file(tmp_path):
    path = tmp_path / "t.parquet"
    pl.DataFrame(gsm8k_columns(10)).write_parquet(path)
    fp = make_task("parquet", path=str(path), **GSM8K).fingerprint
    assert make_task("parquet", path=str(path), **GSM8K).fingerprint == fp
    pl.DataFrame(gsm8k_columns(10, start=1)).write_parquet(path)
    assert make_task("parquet", path=str(path), **GSM8K).fingerprint != fp


def test_hf_dataset_dict_splits(tmp_path):
    train, test = gsm8k_columns(12), gsm8k_columns(4, start=100)
    train["question"][5], train["solution"][5] = test["question"][1], test["solution"][1]  # in both splits
    folder = write_saved(tmp_path / "gsm", {"train": train, "test": test}, shards=2)
    task = make_task("hf_dataset", path=str(folder), heldout_split="test", **GSM8K)
    assert [ex.prompt for ex in task.heldout] == test["question"]
    assert [ex.answer for ex in task.heldout] == [str(2 * i + 3) for i in range(100, 104)]
    assert [ex.prompt for ex in task.train] == train["question"][:5] + train["question"][6:]  # shard order kept
    by_fraction = make_task("hf_dataset", path=str(folder), heldout_fraction=0.25, **GSM8K)
    assert len(by_fraction.heldout) == 3 and len(by_fraction.train) == 9
    assert {ex.prompt for ex in by_fraction.heldout + by_fraction.train} == set(train["question"])
    on_test = make_task("hf_dataset", path=str(folder), split="test", heldout_fraction=0.25, **GSM8K)
    assert {ex.prompt for ex in on_test.heldout + on_test.train} == set(test["question"])
    fp = task.fingerprint  # hashes the files read: other test rows, another fingerprint
    for p in sorted((folder / "test").iterdir()):
        p.unlink()
    (folder / "test").rmdir()
    write_dataset(folder / "test", gsm8k_columns(4, start=200))
    assert make_task("hf_dataset", path=str(folder), heldout_split="test", **GSM8K).fingerprint != fp


def test_hf_single_dataset_equals_the_same_rows_as_parquet(tmp_path):
    cols = gsm8k_columns(20)
    write_dataset(tmp_path / "ds", cols)
    pl.DataFrame(cols).write_parquet(tmp_path / "t.parquet")
    a = make_task("hf_dataset", path=str(tmp_path / "ds"), prompt="{question}", answer="solution",
                  answer_format="gsm8k", heldout_fraction=0.2)
    b = make_task("parquet", path=str(tmp_path / "t.parquet"), prompt="{question}", answer="solution",
                  answer_format="gsm8k", heldout_fraction=0.2)
    assert a.heldout == b.heldout and a.train == b.train and len(a.heldout) == 4


@pytest.mark.skipif(not HAS_DATASETS, reason="datasets is not installed (pip install 'workbench[data]')")
def test_reads_folders_written_by_datasets_itself(tmp_path):
    import datasets

    cols = gsm8k_columns(10)
    ds = datasets.Dataset.from_dict(cols)
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dd"))
    ds.shuffle(seed=0).select([3, 1, 2]).save_to_disk(str(tmp_path / "sel"), num_shards=2)
    dd = make_task("hf_dataset", path=str(tmp_path / "dd"), heldout_split="test", **GSM8K)
    assert [ex.prompt for ex in dd.heldout] == cols["question"][:2]
    assert [ex.prompt for ex in dd.train] == cols["question"][2:]
    sel = make_task("hf_dataset", path=str(tmp_path / "sel"), heldout_fraction=0.3, **GSM8K)
    assert sorted(ex.prompt for ex in sel.heldout + sel.train) == sorted(ds.shuffle(seed=0).select([3, 1, 2])["question"])
    write_dataset(tmp_path / "mine", cols)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == sorted(
        p.name for p in (tmp_path / "dd" / "train").iterdir())


@pytest.mark.parametrize("params,answer", [
    (dict(answer_format="boxed"), "\\frac{1}{2}"),
    (dict(answer_regex=r"answer is (\S+)"), "7"),  # the last match
    (dict(answer_regex=r"\d+"), "9"),  # no group: the whole last match
    (dict(), "so the answer is \\boxed{\\frac{1}{2}}; the answer is 7 and 9"),
])
def test_answer_formats(tmp_path, params, answer):
    path = tmp_path / "t.parquet"
    text = "so the answer is \\boxed{\\frac{1}{2}}; the answer is 7 and 9"
    pl.DataFrame({"prompt": ["a", "b"], "answer": [text, text]}).write_parquet(path)
    task = make_task("parquet", path=str(path), heldout_fraction=0.5, **params)
    assert task.heldout[0].answer == task.train[0].answer == answer


def test_verify_math_equiv(tmp_path):
    path = tmp_path / "t.parquet"
    pl.DataFrame({"prompt": ["a", "b"], "answer": ["#### 1,000", "#### 1/2"]}).write_parquet(path)
    exact = make_task("parquet", path=str(path), answer_format="gsm8k", heldout_fraction=0.5)
    math = make_task("parquet", path=str(path), answer_format="gsm8k", heldout_fraction=0.5, verify="math_equiv")
    ex = next(e for e in exact.heldout + exact.train if e.answer == "1,000")
    assert not exact.verify("1000", ex) and exact.verify(" 1,000 ", ex)
    assert math.verify("1000", ex) and math.verify("\\boxed{1000}", ex) and not math.verify("100", ex)


# ---------------------------------------------------------------------------------------- runs
def write_source(kind: str, root: Path) -> dict:
    """The same 16 GSM8K-shaped rows as a ``kind`` source; the task params that read them."""
    cols = gsm8k_columns(16)
    if kind == "jsonl":
        path = root / "t.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in pl.DataFrame(cols).to_dicts()))
        return dict(path=str(path), heldout_fraction=0.25, **GSM8K)
    if kind == "parquet":
        pl.DataFrame(cols).write_parquet(root / "t.parquet")
        return dict(path=str(root / "t.parquet"), heldout_fraction=0.25, **GSM8K)
    test = {k: v[:4] for k, v in cols.items()}
    train = {k: v[4:] for k, v in cols.items()}
    return dict(path=str(write_saved(root / "ds", {"train": train, "test": test})), heldout_split="test", **GSM8K)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf_dataset"])
def test_tiny_run_trains_on_each_source_with_math_equiv(kind, tmp_path, tokenizer, tiny_model_config):
    params = write_source(kind, tmp_path)
    cfg = RunConfig(task=kind, task_params=params, rewards=[("math_equiv", 1.0)], prompts_per_step=2, group_size=2,
                    eval_every=1, eval_size=4, max_new_tokens=4, steps=2, seed=0, threads=1,
                    out_dir=str(tmp_path / "runs"), run_name=kind)
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    df = run.run(2)
    assert df["policy_version"].to_list() == [1, 2]
    assert df["eval/accuracy"].drop_nulls().len() >= 2
    answers = {q: str(2 * i + 3) for i, q in enumerate(gsm8k_columns(16)["question"])}
    batch = run.last_batch
    assert all(answers[p] == a for p, a in zip(batch.prompts, batch.answers))  # "#### n" became "n"
    assert all(e["level"] == int(p.split("+")[0]) % 3 for p, e in zip(batch.prompts, batch.extras))
    assert not {ex.prompt for ex in run.task.heldout} & set(batch.prompts)
    want = math_equiv(batch.prompts, batch.completions, answers=batch.answers)
    assert batch.rewards.tolist() == want
    assert json.loads((tmp_path / "runs" / kind / "config.json").read_text())["task"] == kind


# ---------------------------------------------------------------------------------- bad inputs
def _parquet(root: Path, **changes) -> str:
    cols = {**gsm8k_columns(20), **changes}
    pl.DataFrame(cols).write_parquet(root / "t.parquet")
    return str(root / "t.parquet")


def _with_row(column: str, index: int, value) -> dict:
    cols = gsm8k_columns(20)
    cols[column][index] = value
    return cols


def _hf(root: Path, train: dict | None = None) -> str:
    return str(write_saved(root / "ds", {"train": train or gsm8k_columns(20), "test": gsm8k_columns(4, 50)}))


def _hf_single(root: Path) -> str:
    return str(write_dataset(root / "one", gsm8k_columns(20)))


def _hf_broken(root: Path, how: str) -> str:
    folder = Path(_hf(root))
    if how == "shard":
        (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    elif how == "state":
        (folder / "train" / "state.json").write_text('{"_data_files": [')
    elif how == "escape":
        (folder / "train" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../x.arrow"}]}))
    elif how == "split folder":
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "dev"]}))
    elif how == "no state":
        (folder / "train" / "state.json").unlink()
        return str(folder / "train")
    return str(folder)


BAD = {  # name: (task, write(root) -> path, params, fragments of the message; {path} is the path)
    "missing column": ("parquet", _parquet, dict(prompt="qestion"),
                       ["parquet.prompt='qestion' is invalid", "{path}", "its columns are: question, solution, level"]),
    "template column": ("parquet", _parquet, dict(prompt="Q: {qestion}"), ["no 'qestion'", "question, solution"]),
    "bad template": ("parquet", _parquet, dict(prompt="Q: {question"), ["parquet.prompt='Q: {question' is invalid"]),
    "positional template": ("parquet", _parquet, dict(prompt="Q: {}"), ["not {}"]),
    "empty prompt row 17": ("parquet", lambda r: _parquet(r, **_with_row("question", 17, "   ")), {},
                            ["{path} row 17: empty prompt"]),
    "null answer row 3": ("hf_dataset", lambda r: _hf(r, _with_row("solution", 3, None)), {},
                          ["{path}/train row 3: 'solution' must be a string, got null"]),
    "int answer": ("parquet", lambda r: _parquet(r, solution=list(range(20))), dict(answer_format="raw"),
                   ["{path} row 0: 'solution' must be a string, got int 0"]),
    "no #### row 2": ("parquet", lambda r: _parquet(r, **_with_row("solution", 2, "just 7")), {},
                      ["{path} row 2: 'solution' has no '#### <final answer>' (answer_format='gsm8k')"]),
    "no box": ("parquet", _parquet, dict(answer_format="boxed"), ["row 0: 'solution' has no closed \\boxed{...}"]),
    "empty answer": ("parquet", lambda r: _parquet(r, **_with_row("solution", 4, "#### ")), {},
                     ["row 4: 'solution': empty answer"]),
    "fraction 1": ("parquet", _parquet, dict(heldout_fraction=1.0), ["parquet.heldout_fraction=1.0 is invalid", "[0, 1)"]),
    "fraction -0.1": ("parquet", _parquet, dict(heldout_fraction=-0.1), ["heldout_fraction=-0.1 is invalid"]),
    "fraction 0": ("parquet", _parquet, dict(heldout_fraction=0), ["task_params.heldout_fraction=0 is invalid"]),
    "fraction str": ("hf_dataset", _hf, dict(heldout_fraction="0.1"), ["hf_dataset.heldout_fraction='0.1'"]),
    "fraction eats all": ("parquet", lambda r: _parquet(r, question=["same"] * 20), {}, ["1 unique prompt(s)"]),
    "unknown split": ("hf_dataset", _hf, dict(split="validation"), ["hf_dataset.split='validation'", "train, test"]),
    "unknown heldout split": ("hf_dataset", _hf, dict(heldout_split="dev"), ["heldout_split='dev'", "train, test"]),
    "split of a Dataset": ("hf_dataset", _hf_single, dict(heldout_split="test"), ["single Dataset", "heldout_fraction"]),
    "split and fraction": ("hf_dataset", _hf, dict(heldout_split="test", heldout_fraction=0.2),
                           ["hf_dataset.heldout_fraction=0.2 is invalid", "heldout_split='test'"]),
    "same split": ("hf_dataset", _hf, dict(heldout_split="train"), ["a split other than split='train'"]),
    "bad format": ("parquet", _parquet, dict(answer_format="latex"), ["answer_format='latex'", "raw | gsm8k | boxed"]),
    "bad regex": ("parquet", _parquet, dict(answer_format="raw", answer_regex="(\\d+"), ["a valid regular expression"]),
    "two groups": ("parquet", _parquet, dict(answer_format="raw", answer_regex=r"(\d)(\d)"), ["at most one capturing"]),
    "regex and format": ("parquet", _parquet, dict(answer_regex=r"\d+"), ["answer_format='gsm8k' (give one"]),
    "regex misses row 0": ("parquet", _parquet, dict(answer_format="raw", answer_regex=r"answer: (\d+)"),
                           ["{path} row 0: 'solution' does not match answer_regex"]),
    "extra column": ("parquet", _parquet, dict(extra=["lvl"]), ["parquet.extra=['lvl']", "no 'lvl'", "question"]),
    "extra reserved": ("parquet", _parquet, dict(extra=["answers"]), ["other than prompts, completions"]),
    "extra date": ("parquet", lambda r: _parquet(r, when=[date(2024, 1, 1)] * 20), dict(extra=["when"]),
                   ["column 'when' is Date"]),
    "column shadows": ("parquet", lambda r: _parquet(r, completions=["x"] * 20), {}, ["'completions' would shadow"]),
    "verify": ("parquet", _parquet, dict(verify="fuzzy"), ["parquet.verify='fuzzy'", "exact | math_equiv"]),
    "no rows": ("parquet", lambda r: _parquet(r, **{k: [] for k in gsm8k_columns(1)}), {}, ["it has no rows"]),
    "no parquet": ("parquet", lambda r: str(r / "nope.parquet"), {}, ["no such file"]),
    "not parquet": ("parquet", lambda r: (r / "x.parquet").write_bytes(b"PAR1 garbage") and str(r / "x.parquet"), {},
                    ["not a readable parquet file"]),
    "hf not a folder": ("hf_dataset", lambda r: _parquet(r), {}, ["no such folder"]),
    "hf plain folder": ("hf_dataset", lambda r: str(r), {}, ["not a save_to_disk folder"]),
    "hf no state": ("hf_dataset", lambda r: _hf_broken(r, "no state"), {}, ["not a save_to_disk folder"]),
    "hf bad shard": ("hf_dataset", lambda r: _hf_broken(r, "shard"), {},
                     ["{path}/train/data-00000-of-00001.arrow: not a readable Arrow IPC stream"]),
    "hf bad state": ("hf_dataset", lambda r: _hf_broken(r, "state"), {}, ["{path}/train/state.json: bad JSON"]),
    "hf escaping shard": ("hf_dataset", lambda r: _hf_broken(r, "escape"), {}, ["inside the folder"]),
    "hf missing split folder": ("hf_dataset", lambda r: _hf_broken(r, "split folder"), dict(heldout_split="dev"),
                                ["split 'dev' has no state.json"]),
    "jsonl mapped key": ("jsonl", lambda r: write_source("jsonl", r)["path"], dict(prompt="q"), ["t.jsonl:1: missing 'q'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_line_and_writes_nothing(case, tmp_path):
    task, write, params, fragments = BAD[case]
    data = tmp_path / "data"
    data.mkdir()
    path = write(data)
    before = snapshot(data)
    params = {"path": path, **({} if task == "jsonl" else GSM8K), **params}
    with pytest.raises(WorkbenchError) as e:
        Run(RunConfig(task=task, task_params=params, out_dir=str(tmp_path / "runs"), run_name="r"), log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    for fragment in fragments:
        assert fragment.replace("{path}", path) in msg, (fragment, msg)
    assert not (tmp_path / "runs").exists()  # the task is built before the run directory opens
    assert snapshot(data) == before
