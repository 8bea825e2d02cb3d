"""Room set-up for the course (workbench/course/setup.py, workbench/cli/course.py): prepare builds the
tiny warm start into a temporary cache and the check then passes; the check reports a missing
cache, missing CI parameter files, failing course steps and a wrong environment one line each;
export / import copies the warm starts with checksums, and a corrupted or malformed export is
refused in one line with nothing written."""

from __future__ import annotations

import argparse
import hashlib
import json

import nbformat
import pytest

from workbench.cli import course as course_cli
from workbench.course import setup
from workbench.errors import WorkbenchError
from workbench.policy.model import TINY_MODEL, ModelConfig, load_policy
from workbench.policy.warm_start import SFTConfig, cache_key
from workbench.tasks import make_task


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    course_cli.add_parser(parser.add_subparsers(dest="command"))
    return course_cli.cli_main(parser.parse_args(["course", *argv]))


def _tiny_key() -> str:
    """The cache key of the tiny course warm start, built here from its parts."""
    task = make_task("addition", heldout_size=8)
    sft = SFTConfig(max_steps=2, batch_size=8, eval_every=1, warmup_steps=0)
    return cache_key(task, ModelConfig(**TINY_MODEL), sft)


@pytest.fixture
def room(tmp_path, monkeypatch):
    """A temporary cache (WORKBENCH_CACHE) and notebooks folder with one course step and its CI params."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    books = tmp_path / "notebooks"
    (books / "course").mkdir(parents=True)
    (books / "params" / "ci" / "course").mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(), books / "course" / "c1_intro.ipynb")
    (books / "params" / "ci" / "course" / "c1_intro.yaml").write_text("steps: 2\n")
    monkeypatch.setattr(setup, "notebooks_dir", lambda: books)
    return tmp_path


@pytest.fixture
def prepared(room):
    problems = setup.prepare("tiny", run_steps=False, log=lambda _: None)
    assert problems == []
    return room


def test_prepare_builds_the_tiny_warm_start_and_the_check_passes(prepared, capsys):
    entry = prepared / "cache" / "warm_start" / _tiny_key()
    meta = json.loads((entry / "warm_start.json").read_text())
    assert meta["key"] == entry.name and meta["model_config"]["hidden_size"] == TINY_MODEL["hidden_size"]
    model, _ = load_policy(entry)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert _cli("check", "--size", "tiny", "--no-steps") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ready"


def test_check_reports_a_missing_cache(room, capsys):
    problems = setup.check("tiny", run_steps=False, log=lambda _: None)
    expected_dir = room / "cache" / "warm_start" / _tiny_key()
    assert problems == [f"warm start addition (tiny) missing from the cache {expected_dir}: run python -m workbench "
                        "course prepare --size tiny, or import-cache DIR from a prepared machine"]
    assert _cli("check", "--size", "tiny", "--no-steps") == 1
    out = capsys.readouterr().out
    assert problems[0] in out.splitlines() and "ready" not in out


def test_check_reports_the_environment_one_line_each(prepared, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(setup, "PYTHONS", ((3, 0), (3, 1)))
    problems = setup.check("tiny", run_steps=False, log=lambda _: None)
    assert len(problems) == 3 and all("\n" not in p for p in problems)
    assert problems[0].startswith("python 3.") and problems[0].endswith("the course needs Python 3.0 to 3.1")
    assert problems[1].startswith("OMP_WAIT_POLICY='ACTIVE': expected PASSIVE")
    assert problems[2].startswith("HF_HUB_OFFLINE='0': expected '1'")


def test_check_reports_missing_course_steps_and_ci_params(room):
    (room / "notebooks" / "course" / "c2_staleness.ipynb").write_text(
        (room / "notebooks" / "course" / "c1_intro.ipynb").read_text())
    problems = setup.check("tiny", run_steps=True, log=lambda _: None)
    params = room / "notebooks" / "params" / "ci" / "course" / "c2_staleness.yaml"
    assert f"course step c2_staleness: no CI parameters file {params}" in problems
    for nb in (room / "notebooks" / "course").glob("*.ipynb"):
        nb.unlink()
    assert f"no course notebooks in {room / 'notebooks' / 'course'}" in setup.check("tiny", run_steps=False,
                                                                                  log=lambda _: None)


def _step(code: str) -> nbformat.NotebookNode:
    params = nbformat.v4.new_code_cell('out_dir = "runs"\nrun_name = "step"\nsteps = 10')
    params.metadata["tags"] = ["parameters"]
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}  # papermill reads it
    return nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(code)], metadata={"kernelspec": kernel})


def test_check_runs_each_course_step_and_reports_a_failure_in_one_line(prepared):
    books = prepared / "notebooks" / "course"
    nbformat.write(_step("import json, pathlib\n"  # no workbench import: the kernel starts in seconds
                         "d = pathlib.Path(out_dir, run_name); d.mkdir(parents=True)\n"
                         "(d / 'summary.json').write_text(json.dumps({'steps': steps}))"), books / "c1_intro.ipynb")
    nbformat.write(_step("raise ValueError('the step broke')"), books / "c2_broken.ipynb")
    (prepared / "notebooks" / "params" / "ci" / "course" / "c2_broken.yaml").write_text("steps: 2\n")
    log: list[str] = []
    problems = setup.check("tiny", log=log.append)
    assert len(problems) == 1 and problems[0].startswith("course step c2_broken: failed (")
    assert "the step broke" in problems[0] and "\n" not in problems[0]
    assert any(line.startswith("ok: course step c1_intro (") for line in log)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_import_round_trip_with_checksums(prepared, tmp_path, capsys):
    key = _tiny_key()
    source = prepared / "cache" / "warm_start" / key
    assert _cli("export-cache", str(tmp_path / "usb"), "--size", "tiny") == 0
    manifest = json.loads((tmp_path / "usb" / setup.MANIFEST).read_text())
    files = manifest["entries"][key]["files"]
    assert set(files) == {p.name for p in source.iterdir()} and "model.safetensors" in files
    for name, info in files.items():
        assert info == {"sha256": _sha256(source / name), "bytes": (source / name).stat().st_size}
    other = tmp_path / "other-machine"
    imported, kept = setup.import_cache(tmp_path / "usb", root=other)
    assert (imported, kept) == ([key], [])
    for name in files:
        assert (other / "warm_start" / key / name).read_bytes() == (source / name).read_bytes()
    assert setup.check("tiny", root=other, run_steps=False, log=lambda _: None) == []
    before = {p.name: p.stat().st_mtime_ns for p in (other / "warm_start" / key).iterdir()}
    assert setup.import_cache(tmp_path / "usb", root=other) == ([], [key])  # an entry present is left as it is
    assert {p.name: p.stat().st_mtime_ns for p in (other / "warm_start" / key).iterdir()} == before
    with pytest.raises(WorkbenchError, match="expected a new or empty folder"):
        setup.export_cache(tmp_path / "usb", "tiny")


def test_a_corrupted_export_is_refused_in_one_line_and_nothing_is_written(prepared, tmp_path):
    key = _tiny_key()
    setup.export_cache(tmp_path / "usb", "tiny")
    weights = tmp_path / "usb" / "warm_start" / key / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    other = tmp_path / "other-machine"
    keep = other / "warm_start" / "0123456789abcdef0123" / "warm_start.json"
    keep.parent.mkdir(parents=True)
    keep.write_text('{"kept": true}')
    with pytest.raises(WorkbenchError) as e:
        setup.import_cache(tmp_path / "usb", root=other)
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors does not match its checksum" in msg and "nothing was imported" in msg
    assert sorted(p.name for p in (other / "warm_start").iterdir()) == ["0123456789abcdef0123"]
    assert keep.read_text() == '{"kept": true}'


@pytest.mark.parametrize("damage, message", [
    (lambda m: "{not json", "invalid JSON"),
    (lambda m: json.dumps({**m, "workbench_version": "0.0.1"}), "exported by workbench '0.0.1'"),
    (lambda m: json.dumps({**m, "entries": {"../../etc": {"files": {}}}}), "entry '../../etc' is invalid"),
    (lambda m: json.dumps({**m, "entries": {k: {"files": {**v["files"], "../x.json": v["files"]["config.json"]}}
                                            for k, v in m["entries"].items()}}), "file '../x.json'"),
])
def test_a_malformed_manifest_is_refused_in_one_line(prepared, tmp_path, damage, message):
    setup.export_cache(tmp_path / "usb", "tiny")
    path = tmp_path / "usb" / setup.MANIFEST
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(WorkbenchError) as e:
        setup.import_cache(tmp_path / "usb", root=tmp_path / "other-machine")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "other-machine").exists()


def test_import_of_a_folder_without_a_manifest_and_export_without_a_cache(room, tmp_path):
    with pytest.raises(WorkbenchError, match="no workbench-cache.json in it"):
        setup.import_cache(tmp_path)
    missing = r"warm start addition \(tiny\) is not in the cache .* course prepare --size tiny"
    with pytest.raises(WorkbenchError, match=missing):
        setup.export_cache(tmp_path / "usb", "tiny")
    with pytest.raises(WorkbenchError, match=r"^size='huge' is invalid: expected full \| tiny$"):
        setup.check("huge")
