"""The command line: a headless run on a local checkpoint, --help from the registries, errors."""

from __future__ import annotations

import json

import polars as pl
import pytest

from workbench.cli import field_docs, main
from workbench.config import RunConfig
from workbench.policy.model import save_policy
from workbench.steps.reweight import OBJECTIVES
from workbench.steps.score import ADVANTAGES
from workbench.tasks import TASKS

SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--eval-every", "3", "--eval-size", "8",
         "--task-params", "max_digits=2", "heldout_size=8", "--no-progress"]


def test_run_on_a_local_checkpoint_writes_everything(tiny_model, tokenizer, tmp_path, capsys):
    ckpt = save_policy(tiny_model, tokenizer, tmp_path / "ckpt")
    code = main(["run", "--model", str(ckpt), "--steps", "3", "--out-dir", str(tmp_path / "runs"),
                 "--run-name", "c", "--objective", "m2po", "--objective-params", "tau=0.08", *SMALL])
    assert code == 0
    d = tmp_path / "runs" / "c"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["objective"] == "m2po" and cfg["objective_params"]["tau"] == 0.08
    assert pl.read_parquet(d / "metrics.parquet").height == 3
    assert json.loads((d / "summary.json").read_text())["updates"] == 3
    assert (d / "charts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"updates": 3' in capsys.readouterr().out


def test_help_lists_the_registries(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for name in OBJECTIVES.names() + ADVANTAGES.names() + TASKS.names():
        assert name in out
    assert "--staleness" in out and "Fixed lag s" in out  # flags documented from the field docstrings


def test_every_config_field_has_a_docstring():
    import dataclasses

    docs = field_docs(RunConfig)
    missing = [f.name for f in dataclasses.fields(RunConfig) if not docs.get(f.name)]
    assert missing == []


@pytest.mark.parametrize("argv, needle", [
    (["run", "--objective", "nope"], "unknown objective 'nope'"),
    (["run", "--staleness", "-2"], "staleness=-2"),
    (["run", "--objective-params", "clip_low"], "expected key=value"),
    (["resume", "/nonexistent/run"], "run_dir="),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_run_on_the_default_config_prints_the_on_policy_note_and_no_warning(capsys):
    assert main(["run", "--model", "/nonexistent/ckpt", "--out-dir", ""]) == 2  # fails after linting
    err = capsys.readouterr().err
    assert err.index("on-policy run (staleness 0): the ratio is 1, so ppo_clip trains as REINFORCE") < \
        err.index("error:")
    assert "warning" not in err.lower()
    assert main(["run", "--model", "/nonexistent/ckpt", "--out-dir", "", "--objective", "cispo"]) == 2
    err = capsys.readouterr().err
    assert "lint warning [clip_inert]" in err and "on-policy run" not in err
