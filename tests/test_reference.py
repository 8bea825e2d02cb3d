"""Registry-generated docs and help: docs/objectives.md is up to date, --help shows every parameter
with its range, ``run`` prints lint warnings before starting."""

from __future__ import annotations

import pytest

from workbench.cli import main
from workbench.steps.reweight.reference import DOCS_PATH, objectives_markdown, param_line
from workbench.steps.reweight import OBJECTIVES
from workbench.steps.reweight.corrections import PRESETS


def test_committed_docs_are_up_to_date():
    assert DOCS_PATH.exists(), "run: python -m workbench docs"
    assert DOCS_PATH.read_text() == objectives_markdown(), "docs/objectives.md is stale: run python -m workbench docs"


def test_docs_check_and_write(tmp_path, capsys):
    out = tmp_path / "objectives.md"
    assert main(["docs", "--out", str(out), "--check"]) == 1
    assert main(["docs", "--out", str(out)]) == 0
    assert main(["docs", "--out", str(out), "--check"]) == 0
    assert out.read_text() == objectives_markdown()


def test_docs_cover_every_objective_parameter_and_preset():
    md = objectives_markdown()
    for name in OBJECTIVES.names():
        meta = OBJECTIVES.meta(name)
        assert f"## {name}\n" in md and meta["paper"].replace("|", "\\|") in md
        for p in meta["params"]:
            assert f"| `{p.name}` | `{p.default!r}` |" in md
    for preset in PRESETS:
        assert f"| `{preset}` |" in md


def test_help_shows_each_objective_parameter_with_its_range(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # argparse keeps the epilog raw, but be robust to wrapping
    for name in OBJECTIVES.names():
        for p in OBJECTIVES.meta(name)["params"]:
            assert " ".join(param_line(p).split()) in flat, (name, p.name)
    assert "in [0.0, 1.0], live" in out  # ppo_clip.clip_low
    for preset in PRESETS:
        assert preset in out
    assert "--correction" in out and "--proximal" in out


def test_run_prints_lint_warnings_before_starting(capsys):
    assert main(["run", "--model", "/nonexistent/ckpt", "--objective", "cispo", "--out-dir", ""]) == 2  # fails after linting
    err = capsys.readouterr().err
    assert err.index("lint warning [clip_inert]") < err.index("error:")
