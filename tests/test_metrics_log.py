"""The metrics log: same values as ``Run.metrics``, a readable prefix after any crash, resume without
duplicates. Cost independence is measured by ``bench/metrics_append.py``, not here."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import build_model
from workbench.runs import metrics
from workbench.runs.metrics import BASE, PARTS, TAIL, MetricsLog, read_metrics
from workbench.runs.rundir import RunDir

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=3, eval_size=16, lr=1e-3, seed=3)


def make_run(tokenizer, tiny_model_config, out_dir, **overrides) -> Run:
    cfg = RunConfig(**{**SMALL, "out_dir": str(out_dir), "run_name": "r", **overrides})
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)


def deterministic(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([c for c in df.columns if not c.startswith("perf/")])


def row(k: int) -> dict:
    """Heterogeneous like the loop's rows: eval columns every 3rd update, objective parameter columns
    that change with the objective (an int that becomes a float), strings, None, nan/inf, bools."""
    r = {"update": k, "policy_version": k + 1, "knob/objective": "m2po" if k < 6 else "cispo",
         "knob/staleness": k // 4}
    if k < 6:
        r["knob/tau"] = 1 if k < 3 else 0.04
    else:
        r["knob/clip_high"] = 0.28
    r.update({"reward/accuracy": k / 7, "offpolicy/m2": [math.nan, math.inf, -math.inf, -0.0, 1e-310][k % 5],
              "loss/note": None if k % 2 else "ok", "buffer/synced": k % 2 == 0})
    if (k + 1) % 3 == 0:
        r["eval/accuracy"] = 0.1 * k
        r["perf/time_eval"] = 0.5
    r["perf/time_step"] = 1.0 + k
    return r


ROWS = [row(k) for k in range(11)]


def expected(n: int) -> pl.DataFrame:
    """What ``Run.metrics`` holds after the first ``n`` rows."""
    return pl.from_dicts(ROWS[:n], infer_schema_length=None) if n else pl.DataFrame()


@pytest.fixture(params=[2, 4, 512], ids=lambda n: f"parts_of_{n}")
def seg(request, monkeypatch) -> int:
    """Rows per sealed part: 2 and 4 put most rows in parquet parts, 512 keeps them in the tail."""
    monkeypatch.setattr(metrics, "SEGMENT_ROWS", request.param)
    return request.param


def leftovers(d) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob(".*"))


def test_read_equals_from_dicts_of_the_same_rows(tmp_path, seg):
    log = MetricsLog(tmp_path)
    assert read_metrics(tmp_path).shape == (0, 0)
    for r in ROWS:
        log.append(r)
    assert_frame_equal(read_metrics(tmp_path), expected(11))
    assert (tmp_path / PARTS).exists() == (seg < 11) and not (tmp_path / BASE).exists()
    log.compact()  # one metrics.parquet, nothing else
    assert [p.name for p in tmp_path.iterdir()] == [BASE]
    assert_frame_equal(pl.read_parquet(tmp_path / BASE), expected(11))


def test_rows_after_a_compaction_read_as_one_frame(tmp_path, seg):
    log = MetricsLog(tmp_path)
    for i, r in enumerate(ROWS):
        log.append(r)
        if i in (2, 7):  # e.g. run(3), run(5), then steps: base + parts + tail, columns appearing later
            log.compact()
            assert_frame_equal(read_metrics(tmp_path), expected(i + 1))
    assert_frame_equal(read_metrics(tmp_path), expected(11))
    assert log.rows == MetricsLog(tmp_path).rows == 11


def test_temp_files_and_a_torn_line_are_ignored_then_cleaned(tmp_path, seg):
    log = MetricsLog(tmp_path)
    for r in ROWS[:5]:
        log.append(r)
    with open(tmp_path / TAIL, "ab") as f:
        f.write(json.dumps(ROWS[5]).encode()[:40])  # killed mid-append: half a row, no newline
    (tmp_path / f".{BASE}.k3j2").write_bytes(b"PAR1 half a parquet file")
    (tmp_path / f".{TAIL}.x9").write_bytes(b'{"metrics_tail": 1')
    (tmp_path / PARTS).mkdir(exist_ok=True)
    (tmp_path / PARTS / ".000000004-000000006.parquet.u7").write_bytes(b"PAR1")
    assert_frame_equal(read_metrics(tmp_path), expected(5))
    log = MetricsLog(tmp_path)  # the next open (a resumed or continued run)
    assert leftovers(tmp_path) == [] and log.rows == 5
    for r in ROWS[5:]:
        log.append(r)
    assert_frame_equal(read_metrics(tmp_path), expected(11))


def test_reading_stops_at_the_first_invalid_line(tmp_path):
    log = MetricsLog(tmp_path)
    for r in ROWS[:6]:
        log.append(r)
    lines = (tmp_path / TAIL).read_bytes().split(b"\n")
    lines[4] = lines[4][:10]  # row 3 damaged: rows 4 and 5 after it are not a prefix any more
    (tmp_path / TAIL).write_bytes(b"\n".join(lines))
    assert_frame_equal(read_metrics(tmp_path), expected(3))
    assert MetricsLog(tmp_path).rows == 3


def test_a_tail_left_by_an_interrupted_seal_does_not_chain(tmp_path):
    log = MetricsLog(tmp_path, segment_rows=4)
    for r in ROWS[:3]:
        log.append(r)
    tail = (tmp_path / TAIL).read_bytes()
    log.append(ROWS[3])  # sealed: part 0-4, the tail removed
    assert not (tmp_path / TAIL).exists()
    (tmp_path / TAIL).write_bytes(tail)  # killed after the part's rename, before the tail's removal
    assert_frame_equal(read_metrics(tmp_path), expected(4))  # not 7 rows: the tail starts at 0, not 4
    log = MetricsLog(tmp_path, segment_rows=4)
    assert not (tmp_path / TAIL).exists()
    for r in ROWS[4:]:
        log.append(r)
    assert_frame_equal(read_metrics(tmp_path), expected(11))


def test_parts_and_tail_left_by_an_interrupted_compaction_do_not_chain(tmp_path):
    log = MetricsLog(tmp_path, segment_rows=2)
    for r in ROWS[:5]:
        log.append(r)  # parts 0-2, 2-4, tail: row 4
    saved = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    log.compact()
    for rel, data in saved.items():  # killed after the base's rename, before parts and tail were removed
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    assert_frame_equal(read_metrics(tmp_path), expected(5))  # not 10
    log = MetricsLog(tmp_path, segment_rows=2)
    assert not (tmp_path / TAIL).exists() and not list((tmp_path / PARTS).iterdir())
    for r in ROWS[5:]:
        log.append(r)
    assert_frame_equal(read_metrics(tmp_path), expected(11))


@pytest.mark.parametrize("compact_at", [None, 3, 8])
@pytest.mark.parametrize("keep", [0, 2, 3, 5, 9])
def test_truncate_keeps_a_prefix_then_appends(tmp_path, compact_at, keep, seg):
    log = MetricsLog(tmp_path)
    for i, r in enumerate(ROWS[:9]):
        log.append(r)
        if i + 1 == compact_at:
            log.compact()
    log.truncate(keep)  # the first rows of what was read: later rows' columns stay, null
    assert log.rows == keep and MetricsLog(tmp_path).rows == keep
    assert_frame_equal(read_metrics(tmp_path), expected(9).head(keep) if keep else expected(0))
    for r in ROWS[keep:]:
        log.append(r)
    assert_frame_equal(read_metrics(tmp_path), expected(11))
    with pytest.raises(WorkbenchError, match="rows=12 is invalid"):
        log.truncate(12)


@pytest.mark.parametrize("keep", [0, 3, 4, 5])
def test_an_interrupted_truncate_reads_as_a_prefix_with_every_kept_row(tmp_path, monkeypatch, keep):
    log = MetricsLog(tmp_path, segment_rows=2)
    for r in ROWS[:9]:
        log.append(r)

    def killed(df, path):
        raise KeyboardInterrupt  # before the new base is in place

    real = metrics._write_parquet
    monkeypatch.setattr(metrics, "_write_parquet", killed)
    with pytest.raises(KeyboardInterrupt):
        log.truncate(keep)
    df = read_metrics(tmp_path)  # the rows before, cut somewhere at or after `keep`
    assert df.height >= keep
    assert_frame_equal(df, expected(df.height))
    monkeypatch.setattr(metrics, "_write_parquet", real)
    MetricsLog(tmp_path, segment_rows=2).truncate(keep)  # the resume, again
    assert_frame_equal(read_metrics(tmp_path), expected(df.height).head(keep) if keep else expected(0))


def test_a_row_changed_after_its_append_is_sealed_as_appended(tmp_path):
    log = MetricsLog(tmp_path, segment_rows=2)
    r = dict(ROWS[0])
    log.append(r)
    r["reward/accuracy"] = -1.0  # e.g. a hook editing the row it was given
    log.append(ROWS[1])  # seals rows 0-1 into a part
    assert_frame_equal(read_metrics(tmp_path), expected(2))


def test_bad_values_are_one_line_errors(tmp_path):
    log = MetricsLog(tmp_path)
    with pytest.raises(WorkbenchError, match="metrics value .* is invalid") as err:
        log.append({"update": 0, "x": object()})
    assert "\n" not in str(err.value)
    with pytest.raises(WorkbenchError, match="metrics column 3 is invalid"):
        log.append({3: 1.0})
    assert log.rows == 0 and read_metrics(tmp_path).height == 0
    (tmp_path / BASE).write_bytes(b"not parquet")
    with pytest.raises(WorkbenchError, match="unreadable") as err:
        read_metrics(tmp_path)
    assert "\n" not in str(err.value)


ROW_SOURCE = """
def child_row(k):
    # ~8 KB of JSON: one append takes several write calls, so a kill can tear a line
    return {"update": k, **{f"offpolicy/c{j:03d}": k + j / 1000 for j in range(300)},
            **({"eval/accuracy": k / 10} if k % 10 == 9 else {})}
"""
CHILD = ROW_SOURCE + textwrap.dedent("""
    import sys
    from workbench.runs.metrics import MetricsLog
    log = MetricsLog(sys.argv[1], segment_rows=16)
    k0 = k = log.rows
    while True:
        log.append(child_row(k))
        k += 1
        if k % 37 == 0:
            log.compact()
        if k == k0 + 5:
            open(sys.argv[1] + "/started", "w").close()
""")
_child: dict = {}
exec(ROW_SOURCE, _child)  # the rows the child writes, to compare with
child_row = _child["child_row"]


def test_sigkill_mid_append_leaves_a_prefix_of_whole_rows(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    seen = 0
    for kill_after in (0.05, 0.13, 0.21, 0.34):  # appends, compactions and opens interrupted alike
        (tmp_path / "started").unlink(missing_ok=True)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env)
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        assert child.poll() is None, "the appending process exited early"
        time.sleep(kill_after)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        df = read_metrics(tmp_path)
        assert df.height >= max(seen, 5)  # complete rows are never lost, nor duplicated
        assert df["update"].to_list() == list(range(df.height))
        assert_frame_equal(df, pl.from_dicts([child_row(k) for k in range(df.height)], infer_schema_length=None))
        seen = df.height
    MetricsLog(tmp_path)  # what a kill during a seal or compaction left (temp files) is cleaned on open
    assert leftovers(tmp_path) == []


def test_resume_drops_the_interrupted_updates_and_never_duplicates(tokenizer, tiny_model_config, tmp_path, seg):
    kw = dict(staleness=1, checkpoint_every=3)
    full = make_run(tokenizer, tiny_model_config, tmp_path / "a", **kw).run(8)
    first = make_run(tokenizer, tiny_model_config, tmp_path / "b", **kw)
    for _ in range(5):  # killed after update 5: rows 3 and 4 are on disk, past the checkpoint at 3
        first.step()
    d = tmp_path / "b" / "r"
    assert read_metrics(d).height == 5 and (d / (TAIL if seg > 5 else PARTS)).exists()
    resumed = Run.resume(d, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer,
                         log=lambda s: None)
    assert resumed.version == 3 and read_metrics(d)["update"].to_list() == [0, 1, 2]
    assert_frame_equal(read_metrics(d), resumed.metrics)  # disk and memory agree from the resume on
    resumed.step()
    assert read_metrics(d)["update"].to_list() == [0, 1, 2, 3]
    both = resumed.run(4)  # ends with checkpoint + summary: one metrics.parquet
    assert not (d / TAIL).exists() and not (d / PARTS).exists()
    assert_frame_equal(deterministic(pl.read_parquet(d / BASE)), deterministic(full))
    assert_frame_equal(deterministic(read_metrics(d)), deterministic(both))
    # an explicit older checkpoint of a finished (compacted) run: the base itself is cut
    again = Run.resume(d, d / "checkpoints" / "update_000003", model=build_model(tiny_model_config, tokenizer, seed=0),
                       tokenizer=tokenizer, log=lambda s: None)
    assert read_metrics(d)["update"].to_list() == [0, 1, 2]
    again.run(5)
    assert_frame_equal(deterministic(read_metrics(d)), deterministic(full))


def test_write_summary_compacts_what_a_session_appended(tokenizer, tiny_model_config, tmp_path, seg):
    run = make_run(tokenizer, tiny_model_config, tmp_path)
    run.run(2)
    run.step()  # steps after run(): the base holds 2 rows, the tail 1
    d = tmp_path / "r"
    assert pl.read_parquet(d / BASE).height == 2 and RunDir(d).read_metrics().height == 3
    assert_frame_equal(read_metrics(d), run.metrics)
    run.write_summary()
    assert not (d / TAIL).exists() and not (d / PARTS).exists()
    assert_frame_equal(pl.read_parquet(d / BASE), run.metrics)
