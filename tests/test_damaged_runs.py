"""Resuming a damaged run directory through the CLI (``python -m workbench resume DIR``): every file a
run writes, each damaged in the ways a disk fault, a copy cut short or a hand edit leaves it. Each case
ends in one of two ways: a one-line ``error: ...`` with exit 2 and every file of the folder as it was,
or (a damaged newest checkpoint with an intact older one, a damaged journal or lock file, which the
checkpoint or the lock protocol supersede) exit 0 with a one-line notice, training on to exactly the
metrics of a resume of the intact folder from the checkpoint it fell back to. Never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import polars as pl
import pytest
from safetensors.torch import load_file, save_file

from workbench.cli import main
from workbench.config import RunConfig
from workbench.loop import Run
from workbench.notebook import TINY_REWARDS
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model, save_policy
from workbench.policy.tokenizer import build_char_tokenizer

FIELDS = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=4, group_size=4,
              eval_every=5, eval_size=8, seed=3, threads=1, rewards=TINY_REWARDS, steps=8, checkpoint_every=2)
DONE = 6  # updates the base run made: checkpoints update_000002, _000004 and _000006; resumes train to 8
LATEST, OLDER = "checkpoints/update_000006", "checkpoints/update_000004"
OUTCOMES: dict[str, str] = {}  # case -> what the resume did
CLEAN: set[str] = set()  # cases whose every assertion held


# ------------------------------------------------------------------------------ damage
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(path.name).randbytes(path.stat().st_size))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def text(content: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(content)


def edit_json(**changes) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def other_model_size(path: Path) -> None:
    big = build_model(ModelConfig(**{**TINY_MODEL, "hidden_size": 64}), build_char_tokenizer(), seed=0)
    save_file({k: v.detach().clone() for k, v in big.state_dict().items()}, str(path))


def half_precision(path: Path) -> None:
    save_file({k: v.half() for k, v in load_file(str(path)).items()}, str(path))


def torn_last_line(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b'{"changes": {"lr": 0.0')


def garbage_line(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + [b"\x00\x17 not json\n"] + lines[1:]))


def old_garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage{")
    os.utime(path, (time.time() - 3600, time.time() - 3600))  # not a lock being written right now


def every_checkpoint(name: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(run_dir: Path) -> None:
        for folder in sorted((run_dir / "checkpoints").glob("update_*")):
            damage(folder / name)
    return apply


def missing(path: Path) -> None:
    path.unlink()


def parquet_of(change: Callable[[pl.DataFrame], pl.DataFrame]) -> Callable[[Path], None]:
    return lambda path: change(pl.read_parquet(path)).write_parquet(path)


def drop_tensor(name: str) -> Callable[[Path], None]:
    return lambda path: save_file({k: v for k, v in load_file(str(path)).items() if k != name}, str(path))


def optimizer_groups(**changes) -> Callable[[Path], None]:
    """Change (None: remove) hyperparameters of every param group in optimizer.json."""
    def apply(path: Path) -> None:
        meta = json.loads(path.read_text())
        for group in meta["param_groups"]:
            group.update(changes)
            for k, v in changes.items():
                if v is None:
                    del group[k]
        path.write_text(json.dumps(meta))
    return apply


def queue_without_tensors(path: Path) -> None:
    """A queued batch whose tensors are not in buffer.safetensors (the JSON of another checkpoint)."""
    meta = json.loads(path.read_text())
    meta["queue"].append({"rollouts": {"prompts": ["1+1="], "completions": ["2"], "answers": ["2"], "extras": [{}]},
                          "score_metrics": {}})
    path.write_text(json.dumps(meta))


ERROR, FALLBACK, NOTICE = "error", "fallback", "notice"  # notice: resumed from the latest checkpoint
# case -> (path under the run dir, damage done to it, expected outcome, a needle of the error or notice)
CASES: dict[str, tuple] = {
    "metrics.parquet truncated": ("metrics.parquet", truncate, ERROR, "metrics="),
    "metrics.parquet random bytes": ("metrics.parquet", random_bytes, ERROR, "metrics="),
    "metrics.parquet empty": ("metrics.parquet", empty, ERROR, "metrics="),
    "metrics.parquet missing": ("metrics.parquet", missing, ERROR, "metrics on disk hold 0 rows"),
    "metrics.parquet of another table": ("metrics.parquet", parquet_of(lambda df: df.drop("update")), ERROR,
                                         "metrics.parquet"),
    "metrics.parquet with every row twice": ("metrics.parquet", parquet_of(lambda df: pl.concat([df, df])), ERROR,
                                             "metrics.parquet"),
    "model.safetensors truncated": (f"{LATEST}/model.safetensors", truncate, FALLBACK, "model.safetensors: truncated"),
    "model.safetensors random bytes": (f"{LATEST}/model.safetensors", random_bytes, FALLBACK, "model.safetensors: "),
    "model.safetensors empty": (f"{LATEST}/model.safetensors", empty, FALLBACK, "model.safetensors: truncated"),
    "model.safetensors of another model size": (f"{LATEST}/model.safetensors", other_model_size, FALLBACK,
                                                "a checkpoint of another model?"),
    "model.safetensors in float16": (f"{LATEST}/model.safetensors", half_precision, FALLBACK, "float16"),
    "model.safetensors truncated in every checkpoint": (".", every_checkpoint("model.safetensors", truncate), ERROR,
                                                        "has no intact checkpoint"),
    "optimizer.safetensors missing": (f"{LATEST}/optimizer.safetensors", missing, FALLBACK, "missing optimizer"),
    "optimizer.safetensors truncated": (f"{LATEST}/optimizer.safetensors", truncate, FALLBACK, "optimizer.safetensors"),
    "optimizer.safetensors random bytes": (f"{LATEST}/optimizer.safetensors", random_bytes, FALLBACK,
                                           "optimizer.safetensors"),
    "optimizer.safetensors lacking a moment": (f"{LATEST}/optimizer.safetensors", drop_tensor("0.exp_avg_sq"),
                                               FALLBACK, "optimizer.safetensors"),
    "optimizer.json invalid JSON": (f"{LATEST}/optimizer.json", text('{"param_groups": ['), FALLBACK,
                                    "optimizer.json"),
    "optimizer.json betas of garbage": (f"{LATEST}/optimizer.json", optimizer_groups(betas="x"), FALLBACK,
                                        "optimizer.json"),
    "optimizer.json without lr": (f"{LATEST}/optimizer.json", optimizer_groups(lr=None), FALLBACK, "optimizer.json"),
    "optimizer.json missing": (f"{LATEST}/optimizer.json", missing, FALLBACK, "missing optimizer.json"),
    "buffer.json missing": (f"{LATEST}/buffer.json", missing, FALLBACK, "missing buffer.json"),
    "buffer.json invalid JSON": (f"{LATEST}/buffer.json", text('{"queue": [{"rollouts"'), FALLBACK, "buffer.json"),
    "buffer.json a batch without its tensors": (f"{LATEST}/buffer.json", queue_without_tensors, FALLBACK,
                                                "buffer.json"),
    "state.json invalid JSON": (f"{LATEST}/state.json", text('{"version": 6, "knobs"'), FALLBACK, "state.json"),
    "state.json missing": (f"{LATEST}/state.json", missing, FALLBACK, "missing state.json"),
    "state.json version 'abc'": (f"{LATEST}/state.json", edit_json(version="abc"), FALLBACK, "version='abc'"),
    "state.json version negative": (f"{LATEST}/state.json", edit_json(version=-6), FALLBACK, "version=-6"),
    "state.json knob_events of garbage": (f"{LATEST}/state.json", edit_json(knob_events=[5, "x"]), FALLBACK,
                                          "knob_events"),
    "state.json invalid JSON in every checkpoint": (".", every_checkpoint("state.json", text("{")), ERROR,
                                                    "has no intact checkpoint"),
    "checkpoints folder missing": ("checkpoints", shutil.rmtree, ERROR, "no checkpoint"),
    "config.json invalid JSON": ("config.json", text('{"task": "addition", '), ERROR, "config.json"),
    "config.json a list": ("config.json", text("[]"), ERROR, "config.json"),
    "config.json unknown field": ("config.json", edit_json(no_such_field=1), ERROR, "config.json"),
    "config.json of an invalid value": ("config.json", edit_json(staleness=-1), ERROR, "config.json"),
    "knob_events.jsonl torn last line": ("knob_events.jsonl", torn_last_line, NOTICE, "knob_events.jsonl"),
    "knob_events.jsonl garbage line": ("knob_events.jsonl", garbage_line, NOTICE, "knob_events.jsonl"),
    "knob_events.jsonl missing": ("knob_events.jsonl", missing, NOTICE, "knob_events.jsonl"),
    "run.lock garbage": ("run.lock", old_garbage, NOTICE, "unreadable lock file"),
}


# ------------------------------------------------------------------------------ the runs
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A run of 6 of its 8 updates with a knob change (so a journal), checkpoints every 2 updates."""
    tok = build_char_tokenizer()
    model = save_policy(build_model(ModelConfig(**TINY_MODEL), tok, seed=0), tok,
                        tmp_path_factory.mktemp("model") / "ckpt")
    run = Run(RunConfig(**FIELDS, model=str(model), out_dir=str(tmp_path_factory.mktemp("base")), run_name="r"),
              log=lambda s: None)
    run.run(3)
    run.knobs.lr = 5e-4
    run.run(DONE - 3)
    run.close()
    assert (run.dir.path / "knob_events.jsonl").read_text().count("\n") == 1
    return run.dir.path


def deterministic(run_dir: Path) -> pl.DataFrame:
    df = pl.read_parquet(run_dir / "metrics.parquet")
    return df.select(sorted(c for c in df.columns if not c.startswith("perf/")))


def no_charts(run) -> None:
    """The CLI's end without charts.png and the printed summary (building the chart costs seconds a run)."""
    run.write_summary()


def resume(run_dir: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["resume", str(run_dir), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def references(base, tmp_path_factory) -> dict[str, pl.DataFrame]:
    """Metrics of the intact folder resumed to update 8 from each checkpoint a damaged one may use."""
    out = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr("workbench.cli.run._finish", no_charts)
        for name, checkpoint in ((NOTICE, None), (FALLBACK, OLDER.split("/")[1])):
            d = shutil.copytree(base, tmp_path_factory.mktemp(name) / "r")
            argv = ["resume", str(d), "--no-progress"] + (["--checkpoint", checkpoint] if checkpoint else [])
            assert main(argv) == 0
            out[name] = deterministic(d)
    assert out[NOTICE].height == out[FALLBACK].height == 8
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_run_directory_is_one_line_or_a_noticed_fallback(case, base, references, tmp_path, capsys,
                                                                   monkeypatch):
    where, damage, expected, needle = CASES[case]
    monkeypatch.setattr("workbench.cli.run._finish", no_charts)
    d = shutil.copytree(base, tmp_path / "r")
    damage(d / where)
    before = digest(d)
    code, out, err = resume(d, capsys)
    lines = [s for s in (out + err).splitlines() if s.strip()]
    OUTCOMES[case] = f"exit {code}: " + (err.strip().splitlines() or ["(no stderr)"])[0][:150]
    assert "Traceback" not in out + err
    if expected == ERROR:
        assert code == 2, (out, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
        assert digest(d) == before  # nothing on disk changed, nothing written
    else:
        assert code == 0, (out, err)
        notices = [s for s in lines if not s.startswith("run directory: ")]  # the CLI's first line aside
        assert len(notices) == 1 and needle in notices[0], lines
        if expected == FALLBACK:
            assert notices[0].startswith("checkpoint update_000006 is damaged (")
            assert notices[0].endswith("; resuming from update_000004")
        OUTCOMES[case] = f"exit 0: {notices[0][:150]}"
        assert deterministic(d).equals(references[expected])  # trained on exactly as from that checkpoint
    CLEAN.add(case)


def test_intact_folder_resumes_without_a_notice(base, references, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("workbench.cli.run._finish", no_charts)
    d = shutil.copytree(base, tmp_path / "r")
    code, out, err = resume(d, capsys)
    assert code == 0 and err == "" and out.startswith("run directory: ") and out.count("\n") == 1, (out, err)
    assert deterministic(d).equals(references[NOTICE])


def test_zz_summary(request):
    print(f"\ndamaged run directories: {len(CASES)} cases, {len(OUTCOMES)} probed, {len(CLEAN)} clean outcomes")
    for case, outcome in OUTCOMES.items():
        print(f"  [{'ok' if case in CLEAN else 'BAD'}] {case}: {outcome}")
    assert CLEAN == set(OUTCOMES)
    if not request.config.getoption("keyword") and not request.config.getoption("markexpr").replace("not slow", ""):
        assert len(OUTCOMES) == len(CASES)
