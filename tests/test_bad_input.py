"""Generated bad inputs: each must fail with a one-line ``WorkbenchError`` and leave the disk as it was.

The README promises one-line errors for everything a user can get wrong, so the bad inputs are
generated rather than hand-picked: every ``RunConfig`` field x bad values by type (None, a wrong
type, a bool for an int, a string for a number, out of range; read from the field annotations, so a
new field is covered), live knobs, ``Run.run(n)``, CLI flags and ``--config`` files (in process:
exit 2, exactly one stderr line ``error: ...``, no traceback), JSONL task files (non-UTF-8,
truncated JSON, missing fields, wrong types, an overlong line), reward function outputs (dict,
str, generator, wrong length, NaN) and model folders (no weights, only pickled weights, no
config.json, empty). Nothing here builds a model: validation happens before one is built.

``pytest -s tests/test_bad_input.py`` prints ``bad inputs tried: N, clean one-line errors: N``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.cli import config_flags, main
from workbench.cli import run as cli_run
from workbench.config import RunConfig
from workbench.knobs import Knobs
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import load_policy
from workbench.runs.rundir import RunDir
from workbench.steps.rewards import combine
from workbench.tasks import MAX_JSONL_LINE_BYTES, make_task

TRIED: list[str] = []
CLEAN: list[str] = []


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a digest of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def clean_error(fn, *args, root: Path | None = None, **kwargs) -> str:
    """Call ``fn``; it must raise a one-line WorkbenchError and (with ``root``) change nothing there."""
    TRIED.append(getattr(fn, "__name__", "?"))
    before = snapshot(root) if root is not None else None
    with pytest.raises(WorkbenchError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert msg.strip() and "\n" not in msg, repr(msg)
    assert "Traceback" not in msg
    if root is not None:
        assert snapshot(root) == before, "a bad input changed files on disk"
    CLEAN.append(msg)
    return msg


# ------------------------------------------------------------------------------ RunConfig fields
AT_LEAST_ONE = ("prompts_per_step", "group_size", "updates_per_batch", "num_minibatches", "sync_every", "steps",
                "eval_every", "eval_size")
OUT_OF_RANGE = {
    **{name: [0, -1] for name in AT_LEAST_ONE},
    **{name: [-1] for name in ("staleness", "warmup_steps", "checkpoint_every", "threads", "top_k",
                               "max_new_tokens", "seed")},
    "seed": [-1, 2**63, 2**80],
    "max_staleness": [-2],
    "keep_checkpoints": [-1],
    "run_name": ["..", ".", "a/b", "/abs", "a\\b"],
    "temperature": [0.0, -1.0],
    "top_p": [0.0, 1.5],
    "lr": [0.0, 1.0, -1e-3],
    "loss_scale_factor": [-1.0],
    **{name: [-0.1] for name in ("weight_decay", "grad_clip", "kl_coef", "entropy_coef")},
    **{name: ["nosuch"] for name in ("task", "advantage", "objective", "dtype", "device", "sampler", "aggregation",
                                     "correction", "proximal", "lr_schedule", "kl_estimator")},
    "objective_params": [{"nosuch": 1}, {"clip_low": 1.5}, {"clip_low": "x"}],
    "sampler_params": [{"dtype": "float32"}],
    "correction_params": [{"cap": 3.0}],
    "model_params": [{"foo": 1}, {"hidden_size": "a"}, {"hidden_size": 0}, {"hidden_size": True},
                     {"arch": [1]}, {"num_heads": 3}],
    "sft_params": [{"foo": 1}, {"lr": "x"}, {"target_band": 3}, {"max_steps": 0}],
    "adam_betas": [0.9, (0.9,), (0.9, 0.99, 0.1), (0.9, "x"), (0.9, 1.0), (True, 0.9), (float("nan"), 0.9)],
    "rewards": ["exact_match", [], [("exact_match",)], [("exact_match", "1")], [("nosuch", 1.0)],
                [("exact_match", 1.0, "p")], [("exact_match", float("nan"))], [("exact_match", True)],
                [(5, 1.0)], ["exact_match", 1.0], [("exact_match", 1.0, {"nope": 1})],
                [("overlong", 1.0, {"max_lne": 64})]],
}
BY_TYPE = {
    "int": [None, "1", 1.5, True, 2**64, -(2**64)],
    "float": [None, "0.1", True, float("nan"), float("inf")],
    "bool": [None, "yes", 1, 0.0],
    "str": [None, 5, ["a"], b"x"],
    "dict": [None, "a=1", [("a", 1)], {1: 2}],
    "tuple": [None, "x"],
}


def _kind(f: dataclasses.Field) -> str:
    kind = str(f.type)
    return "dict" if kind.startswith("dict") else "tuple" if kind.startswith("tuple") else kind


CONFIG_CASES = [(f.name, v) for f in dataclasses.fields(RunConfig)
                for v in BY_TYPE.get(_kind(f), []) + OUT_OF_RANGE.get(f.name, [])]


def test_every_field_has_bad_values():
    assert {name for name, _ in CONFIG_CASES} == {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("name, value", CONFIG_CASES, ids=[f"{n}={v!r}"[:60] for n, v in CONFIG_CASES])
def test_bad_config_field(name, value):
    msg = clean_error(RunConfig, **{name: value})
    assert name.rstrip("s") in msg or (isinstance(value, dict) and any(str(k) in msg for k in value)), msg


def test_config_field_messages_say_what_is_wrong():
    assert "lr='0.1' is invalid: expected a finite number" in clean_error(RunConfig, lr="0.1")
    assert "rewards='exact_match' is invalid: expected a non-empty list of (name, weight)" in \
        clean_error(RunConfig, rewards="exact_match")
    assert "valid keys are arch, hidden_size" in clean_error(RunConfig, model_params={"foo": 1})
    assert "valid keys are max_steps" in clean_error(RunConfig, sft_params={"foo": 1})
    assert "64 bits" in clean_error(RunConfig, seed=2**80)


@pytest.mark.parametrize("call", [
    lambda: RunConfig(foo=1),
    lambda: RunConfig(**{"lr ": 0.1}),
    lambda: RunConfig(*range(80)),
    lambda: RunConfig.from_dict([]),
    lambda: RunConfig.from_dict("lr=0.1"),
    lambda: RunConfig.from_dict(None),
    lambda: RunConfig.from_dict({"foo": 1}),
    lambda: RunConfig.from_dict({"rewards": "exact_match"}),
    lambda: RunConfig.from_dict({"adam_betas": 0.9}),
    lambda: RunConfig().replace(lr="0.1"),
    lambda: RunConfig().replace(foo=1),
], ids=lambda c: "api")
def test_bad_config_api(call):
    clean_error(call)


def test_valid_configs_stay_valid():
    cfg = RunConfig(rewards=[["exact_match", 1], ("format", 0.5, {"value": 0.2})], adam_betas=[0.9, 0.95])
    assert cfg.rewards == (("exact_match", 1), ("format", 0.5, {"value": 0.2})) and cfg.adam_betas == (0.9, 0.95)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig(seed=2**63 - 1, lr=1e-8, temperature=3, model_params={"hidden_size": 64},
                     sft_params={"target_band": [0.1, 0.2]}).seed == 2**63 - 1


# ------------------------------------------------------------------------------ knobs and run(n)
KNOB_CASES = [dict(lr="0.1"), dict(lr=None), dict(lr=float("nan")), dict(lr=2.0), dict(staleness=True),
              dict(staleness=-3), dict(staleness="4"), dict(staleness=2**70), dict(temperature="hot"),
              dict(temperature=0), dict(sync_every=0), dict(max_staleness=-5), dict(objective="nope"),
              dict(objective=None), dict(objective=["ppo_clip"]), dict(objective_params="abc"),
              dict(objective_params=[1]), dict(objective_params={"nope": 1}), dict(group_size=2), dict(foo=1)]


@pytest.mark.parametrize("changes", KNOB_CASES, ids=[repr(c)[:50] for c in KNOB_CASES])
def test_bad_knob(changes):
    knobs = Knobs(RunConfig())
    before = knobs.as_dict()
    msg = clean_error(knobs.set, **changes)
    (name, value), = changes.items()
    assert name in msg or (isinstance(value, dict) and any(str(k) in msg for k in value)), msg
    assert knobs.as_dict() == before and knobs.pending == []


@pytest.mark.parametrize("n", ["3", -1, 1.5, True, [1], float("nan")])
def test_bad_run_length(n):
    run = Run.__new__(Run)  # no model: run(n) checks n before anything else
    clean_error(run.run, n)


# ------------------------------------------------------------------------------------------ CLI
def _cli_cases(tmp: Path) -> list[list[str]]:
    a_file = tmp / "a_file"
    cases = [
        [], ["frobnicate"], ["run", "--stalenes", "4"], ["run", "--obj", "m2po"], ["run", "--lr-sched", "cosine"],
        ["run", "--help-me"], ["run", "--lr", "abc"], ["run", "--lr", "nan"], ["run", "--lr", "inf"],
        ["run", "--lr", "2"], ["run", "--temperature", "-1"], ["run", "--seed", str(2**80)], ["run", "--seed", "-1"],
        ["run", "--seed", "1.5"], ["run", "--staleness", "x"], ["run", "--group-size", "0"],
        ["run", "--num-minibatches", "3"], ["run", "--measure-mismatch", "yes"], ["run", "--adam-betas", "0.9"],
        ["run", "--adam-betas", "a", "b"], ["run", "--adam-betas", "0.9", "1.5"],
        ["run", "--objective", "nope"], ["run", "--task", "sudoku"], ["run", "--dtype", "float8"],
        ["run", "--model-params", "foo=1"], ["run", "--model-params", "hidden_size=abc"],
        ["run", "--model-params", "hidden_size=1e999"], ["run", "--sft-params", "foo=1"],
        ["run", "--sft-params", "lr=abc"], ["run", "--rewards", "exact_match=abc"], ["run", "--rewards", "exact_match"],
        ["run", "--rewards", "nosuch=1"], ["run", "--rewards", "exact_match=nan"], ["run", "--rewards"],
        ["run", "--rewards", "exact_match=true"], ["run", "--task-params", "=3"], ["run", "--task-params", "max_digits"],
        ["run", "--task-params", "x=" + "[" * 100_000], ["run", "--objective-params", "clip_low"],
        ["run", "--objective-params", "clip_low=2"], ["run", "--correction-params", "cap=3"],
        ["run", "--sampler-params", "dtype=float32"],
        ["run", "--out-dir", str(a_file)], ["run", "--out-dir", str(a_file / "sub")],
        ["sweep", "--out-dir", str(a_file)], ["sweep", "--lr", "abc"], ["sweep", "--stalenes", "2"],
        ["report", "--out-dir", str(a_file)], ["report", "--size", "huge"], ["report", "--siz", "cpu"],
        ["lint", "--lr", "abc"], ["lint", "--staleness", "-2"], ["resume", "/nonexistent/run"], ["resume"],
        ["list", "--extra"], ["docs", "--chec"],
    ]
    cases += [["run", "--config", str(tmp / "configs" / name)] for name in CONFIG_FILES]
    cases.append(["run", "--config", str(tmp / "configs" / "lr.json"), "--staleness", "1"])
    cases.append(["sweep", "--config", str(tmp / "configs" / "list.json")])
    return cases


CONFIG_FILES = {"missing.json": None, "bad.json": b'{"lr": 0.1', "list.json": b"[1, 2]", "str.json": b'"x"',
                "lr.json": b'{"lr": "abc"}', "foo.json": b'{"foo": 1}', "empty.json": b"",
                "latin1.json": b'{"run_name": "caf\xe9"}', "rewards.json": b'{"rewards": "exact_match"}',
                "params.json": b'{"model_params": {"foo": 1}}', "deep.json": b"[" * 100_000,
                "bad.yaml": b"lr: [1, 2\n", "list.yaml": b"- 1\n- 2\n", "empty.yaml": b"", "lr.yaml": b"lr: abc\n",
                "tab.yaml": b"a:\n\t- 1\n", "folder.json": "dir"}


def _write_inputs(tmp: Path) -> None:
    """The files the CLI cases point at (``_cli_cases`` itself only builds argv lists)."""
    (tmp / "a_file").write_text("not a folder")
    (tmp / "configs").mkdir()
    for name, content in CONFIG_FILES.items():
        if content == "dir":
            (tmp / "configs" / name).mkdir()
        elif content is not None:
            (tmp / "configs" / name).write_bytes(content)


CLI_CASE_COUNT = len(_cli_cases(Path("tmp")))  # argv lists only: nothing is written here


@pytest.mark.parametrize("index", range(CLI_CASE_COUNT))
def test_bad_cli_input(index, tmp_path, monkeypatch, capsys):
    _write_inputs(tmp_path)
    argv = _cli_cases(tmp_path)[index]
    monkeypatch.chdir(tmp_path)  # the default out dir "runs" would be here
    TRIED.append(" ".join(argv)[:80])
    before = snapshot(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (argv, captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(tmp_path) == before
    CLEAN.append(lines[0])


def test_config_file_errors_name_the_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text('{"lr": "abc"}')
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "lr='abc'" in err
    path.write_text('{"lr": 0.1')
    assert main(["lint", "--config", str(path)]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    ok = tmp_path / "ok.yaml"
    ok.write_text("staleness: 2\nobjective: m2po\n")
    assert main(["lint", "--config", str(ok)]) == 0  # a YAML config works


def test_unwritable_out_dir_is_refused(tmp_path, monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(config_flags.tempfile, "mkstemp", denied)  # root ignores file modes: simulate them
    TRIED.append("unwritable out dir")
    assert main(["run", "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write in" in err and "Permission denied" in err
    CLEAN.append(err)


def test_a_bug_is_one_line_with_the_traceback_in_a_file(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_run, "cli_main", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("internal error: RuntimeError: boom (traceback written to ")
    path = Path(err.split("traceback written to ", 1)[1].rstrip(")\n"))
    assert path.parent == tmp_path and "Traceback" in path.read_text() and "boom" in path.read_text()

    def broken_during_a_run(args):
        run = type("FakeRun", (), {"dir": RunDir(tmp_path / "runs" / "r")})()  # noqa: F841 - found by main
        raise RuntimeError("boom in a run")

    monkeypatch.setattr(cli_run, "cli_main", broken_during_a_run)
    assert main(["list"]) == 1
    assert "boom in a run" in (tmp_path / "runs" / "r" / "internal_error.txt").read_text()
    assert str(tmp_path / "runs" / "r" / "internal_error.txt") in capsys.readouterr().err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_run, "cli_main", interrupted)
    with pytest.raises(KeyboardInterrupt):  # left to the graceful-stop handler
        main(["list"])


# ----------------------------------------------------------------------------------------- JSONL
GOOD = b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n'
JSONL_CASES = {
    "non-utf8 prompt": (b'{"prompt": "caf\xe9", "answer": "1"}\n', 1),
    "non-utf8 on line 3": (GOOD + b'{"prompt": "\xff\xfe", "answer": "1"}\n', 3),
    "latin-1 file": ('{"prompt": "é", "answer": "e"}\n'.encode("latin-1"), 1),
    "utf-16 file": ('{"prompt": "a", "answer": "b"}\n'.encode("utf-16"), 1),
    "truncated JSON": (b'{"prompt": "1+1=", "answer"', 1),
    "truncated last line": (GOOD + b'{"prompt": "3+3=", "ans', 3),
    "two objects on a line": (b'{"prompt": "a", "answer": "b"} {"prompt": "c", "answer": "d"}\n', 1),
    "missing answer": (b'{"prompt": "1+1="}\n', 1),
    "missing prompt": (GOOD + b'{"answer": "2"}\n', 3),
    "empty object": (b"{}\n", 1),
    "prompt int": (b'{"prompt": 5, "answer": "5"}\n', 1),
    "answer null": (b'{"prompt": "x", "answer": null}\n', 1),
    "answer number": (b'{"prompt": "1+1=", "answer": 2}\n', 1),
    "prompt list": (b'{"prompt": ["a"], "answer": "a"}\n', 1),
    "prompt bool": (b'{"prompt": true, "answer": "a"}\n', 1),
    "answer dict": (b'{"prompt": "a", "answer": {"x": 1}}\n', 1),
    "line is a list": (b"[1, 2]\n", 1),
    "line is a string": (b'"prompt"\n', 1),
    "line is null": (b"null\n", 1),
    "deeply nested": (b"[" * 100_000 + b"\n", 1),
    "overlong line": (b'{"prompt": "' + b"1" * (MAX_JSONL_LINE_BYTES + 10) + b'", "answer": "1"}\n', 1),
    "overlong line 3": (GOOD + b'{"prompt": "x", "answer": "' + b"a" * (MAX_JSONL_LINE_BYTES + 1) + b'"}\n', 3),
    "overlong without newline": (b"1" * (MAX_JSONL_LINE_BYTES + 1), 1),
    "empty file": (b"", None),
    "blank lines only": (b"\n \n\t\n", None),
    "huge prompt repr": (b'{"prompt": [' + b"1," * 50_000 + b'1], "answer": "1"}\n', 1),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_bad_jsonl(case, tmp_path):
    content, lineno = JSONL_CASES[case]
    path = tmp_path / "task.jsonl"
    path.write_bytes(content)
    msg = clean_error(make_task, "jsonl", path=str(path), root=tmp_path)
    assert str(path) in msg
    if lineno is not None:
        assert f"{path}:{lineno}:" in msg
    if "overlong" in case:
        assert str(MAX_JSONL_LINE_BYTES) in msg
    assert len(msg) < 1000


@pytest.mark.parametrize("params", [dict(path=None), dict(path=""), dict(path=5), dict(path="/nonexistent.jsonl"),
                                    dict(path="/"), dict(path="a\0b"), dict(heldout_fraction=1.0),
                                    dict(heldout_fraction="0.1"), dict(heldout_fraction=True),
                                    dict(max_answer_tokens=0), dict(max_answer_tokens=1.5), dict(nosuch=1)],
                         ids=lambda p: repr(p)[:40])
def test_bad_jsonl_params(params, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(GOOD)
    clean_error(make_task, "jsonl", **{"path": str(path), **params}, root=tmp_path)


def test_a_line_of_exactly_the_limit_is_read(tmp_path):
    body = b'{"prompt": "x", "answer": "'
    line = body + b"a" * (MAX_JSONL_LINE_BYTES - len(body) - 2) + b'"}'
    assert len(line) == MAX_JSONL_LINE_BYTES
    path = tmp_path / "task.jsonl"
    path.write_bytes(line + b"\r\n" + GOOD)
    assert len(make_task("jsonl", path=str(path), heldout_fraction=0.3).train) + 1 == 3


# ------------------------------------------------------------------- parquet and save_to_disk tasks
DATA_PARAMS = [dict(prompt=None), dict(prompt=""), dict(prompt=5), dict(prompt="{}"), dict(prompt="{a.b}"),
               dict(prompt="{0}"), dict(prompt="x {"), dict(prompt="nosuch"), dict(answer=None), dict(answer=""),
               dict(answer=["answer"]), dict(answer="nosuch"), dict(extra="level"), dict(extra=[1]),
               dict(extra=["level", "level"]), dict(extra=[""]), dict(extra=["nosuch"]), dict(extra=["answers"]),
               dict(answer_format=None), dict(answer_format="GSM8K"), dict(answer_format="gsm8k"),
               dict(answer_format="boxed"), dict(answer_regex=5), dict(answer_regex=""), dict(answer_regex="["),
               dict(answer_regex="(a)(b)"), dict(answer_regex="zzz"), dict(answer_regex="1", answer_format="boxed"),
               dict(verify=None), dict(verify="exact_match"), dict(heldout_fraction=1.0), dict(heldout_fraction=-1),
               dict(heldout_fraction=True), dict(heldout_fraction="0.1"), dict(heldout_fraction=float("nan")),
               dict(max_answer_tokens=0), dict(max_answer_tokens=2.5), dict(path=None), dict(path=""),
               dict(path=7), dict(path="a\0b"), dict(nosuch=1)]
SPLIT_PARAMS = [dict(split="dev"), dict(split=3), dict(split=["train"]), dict(heldout_split="dev"),
                dict(heldout_split=None, split="nope"), dict(heldout_split="train"),
                dict(heldout_split="test", heldout_fraction=0.1)]


def _data_files(root: Path) -> tuple[Path, Path]:
    """A parquet file and a save_to_disk DatasetDict folder (pyarrow streams, state.json) of the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["1+1=", "2+2=", "3+3=", "4+4="], "answer": ["2", "4", "6", "8"], "level": [1, 2, 3, 4]})
    pq.write_table(table, root / "t.parquet")
    for split in ("train", "test"):
        (root / "ds" / split).mkdir(parents=True)
        with pa.OSFile(str(root / "ds" / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (root / "ds" / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (root / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    return root / "t.parquet", root / "ds"


@pytest.mark.parametrize("task,params", [(t, p) for p in DATA_PARAMS for t in ("parquet", "hf_dataset")]
                         + [("hf_dataset", p) for p in SPLIT_PARAMS] + [("parquet", dict(split="train"))],
                         ids=lambda v: v if isinstance(v, str) else repr(v)[:40])
def test_bad_data_task_params(task, params, tmp_path):
    parquet, folder = _data_files(tmp_path)
    path = str(parquet if task == "parquet" else folder)
    msg = clean_error(make_task, task, **{"path": path, **params}, root=tmp_path)
    assert len(msg) < 1000


# --------------------------------------------------------------------------------------- rewards
def _gen():
    yield 1.0
    yield 0.0


REWARD_OUTPUTS = {
    "dict by index": {0: 1.0, 1: 0.0},
    "dict by name": {"a": 1.0, "b": 0.0},
    "str": "10",
    "bytes": b"10",
    "generator": _gen(),
    "iterator": iter([1.0, 0.0]),
    "set": {1.0, 0.0},
    "None": None,
    "scalar": 1.0,
    "too short": [1.0],
    "too long": [1.0, 0.0, 1.0],
    "empty": [],
    "NaN": [float("nan"), 1.0],
    "inf": [0.0, float("inf")],
    "-inf tensor": torch.tensor([0.0, -math.inf]),
    "bools": [True, False],
    "strings": ["1", "0"],
    "None inside": [1.0, None],
    "nested": [[1.0], [0.0]],
    "2-D tensor": torch.ones(2, 1),
    "0-d tensor": torch.tensor(1.0),
    "bool tensor": torch.tensor([True, False]),
    "2-D numpy": np.ones((2, 1)),
    "NaN numpy": np.array([np.nan, 1.0]),
    "object": object(),
}


@pytest.mark.parametrize("case", sorted(REWARD_OUTPUTS))
def test_bad_reward_output(case):
    value = REWARD_OUTPUTS[case]

    def my_reward(prompts, completions, **kwargs):
        return value

    msg = clean_error(combine, [(my_reward, 1.0)], ["1+1=", "2+2="], ["2", "5"], answers=["2", "4"])
    assert "'my_reward'" in msg


def test_good_reward_outputs_are_accepted():
    for value in ([1.0, 0.0], (1, 0), torch.tensor([1.0, 0.0]), np.array([1.0, 0.0]), range(1, -1, -1)):
        out = combine([(lambda p, c, **k: value, 1.0)], ["a", "b"], ["x", "y"], answers=["x", "z"])
        assert out.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("spec", [[("exact_match", "w")], [("nosuch", 1.0)], [("exact_match", float("nan"))],
                                  [("exact_match", 1.0, "p")], [(5, 1.0)], [], [("exact_match", 1.0, {"nope": 1})]],
                         ids=lambda s: repr(s)[:40])
def test_bad_reward_spec(spec):
    clean_error(combine, spec, ["a"], ["b"], answers=["b"])


def test_reward_that_raises_is_one_line():
    def raises(prompts, completions, **kwargs):
        raise ValueError("line one\nline two")

    assert "'raises' raised ValueError" in clean_error(combine, [(raises, 1.0)], ["a"], ["b"], answers=["b"])


# ---------------------------------------------------------------------------------- model folders
def _folder(root: Path, files: dict[str, bytes]) -> Path:
    path = root / "model"
    path.mkdir()
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


CONFIG, TOKENIZER = {"config.json": b'{"model_type": "llama"}'}, {"tokenizer.json": b"{}"}
MODEL_FOLDERS = {
    "empty folder": ({}, "config.json"),
    "no config.json": ({**TOKENIZER, "model.safetensors": b"x"}, "config.json"),
    "config only": (CONFIG, "safetensors"),
    "no weights": ({**CONFIG, **TOKENIZER}, "safetensors"),
    "only pytorch_model.bin": ({**CONFIG, **TOKENIZER, "pytorch_model.bin": b"x"}, "pickled"),
    "sharded bin": ({**CONFIG, **TOKENIZER, "pytorch_model-00001-of-00002.bin": b"x",
                     "pytorch_model.bin.index.json": b"{}"}, "pickled"),
    "only a .pt": ({**CONFIG, **TOKENIZER, "model.pt": b"x"}, "pickled"),
    "only a .pth": ({**CONFIG, **TOKENIZER, "weights.pth": b"x"}, "pickled"),
    "only a .ckpt": ({**CONFIG, **TOKENIZER, "last.ckpt": b"x"}, "pickled"),
    "bin without tokenizer": ({**CONFIG, "pytorch_model.bin": b"x"}, "pickled"),
    "safetensors without tokenizer": ({**CONFIG, "model.safetensors": b"x"}, "tokenizer"),
}


@pytest.mark.parametrize("case", sorted(MODEL_FOLDERS))
def test_bad_model_folder(case, tmp_path):
    files, needle = MODEL_FOLDERS[case]
    path = _folder(tmp_path, files)
    msg = clean_error(load_policy, path, root=tmp_path)
    assert needle in msg and str(path) in msg
    if needle == "pickled":
        assert "never unpickles" in msg and "safe_serialization=True" in msg


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_model_path_that_is_not_a_folder(where, tmp_path):
    path = tmp_path / "model"
    if where == "a file":
        path.write_bytes(b"x")
    clean_error(load_policy, path, root=tmp_path)


def test_run_with_a_pickled_model_folder_fails_before_anything(tmp_path):
    path = _folder(tmp_path, {**CONFIG, **TOKENIZER, "pytorch_model.bin": b"x"})
    cfg = RunConfig(model=str(path), out_dir=str(tmp_path / "runs"), task_params={"heldout_size": 8})
    assert "never unpickles" in clean_error(Run, cfg, log=lambda s: None, root=tmp_path)


# ---------------------------------------------------------------------------------------- summary
def test_zz_summary(request):
    print(f"\nbad inputs tried: {len(TRIED)}, clean one-line errors: {len(CLEAN)}")
    assert len(CLEAN) == len(TRIED)
    if not request.config.getoption("keyword") and not request.config.getoption("markexpr"):
        assert len(TRIED) >= 200
