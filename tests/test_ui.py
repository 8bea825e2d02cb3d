"""The interactive face on a tiny model: the control panel driven programmatically while the
background thread trains (knob changes reach the next update; Pause / Step / Resume / Reset), the
replay of a recorded interactive session, live-chart specs, the per-token view, the weight-curve
explorer, same-batch replay, frontend detection and the headless runner's plumbing."""

from __future__ import annotations

import json
import math
import sys
import time

import polars as pl
import pytest
import torch

from workbench.branch_report import paired_differences
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import build_model
from workbench.notebook import TINY_REWARDS, ensure_kernel, find_notebook, load_params_file
from workbench.steps.reweight import OBJECTIVES
from workbench.charts import chart_spec
from workbench.ui import ControlPanel, Throttle, has_frontend, token_weights

from ui_helpers import scripted_session, wait_until

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=4, eval_size=16, lr=1e-2, seed=3, rewards=TINY_REWARDS)


def deterministic(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([c for c in df.columns if not c.startswith("perf/")])


def make_panel(tokenizer, tiny_model_config, tmp_path, *, headless=False, name="live", steps=400, **kw):
    cfg = RunConfig(**{**SMALL, "out_dir": str(tmp_path), "run_name": name, "steps": steps, **kw.pop("config", {})})
    model = build_model(tiny_model_config, tokenizer, seed=0)
    return ControlPanel(cfg, model=model, tokenizer=tokenizer, headless=headless, log=kw.pop("log", lambda s: None),
                        chart_seconds=0.05, **kw)


def events(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_widget_changes_reach_the_next_update_while_training(tokenizer, tiny_model_config, tmp_path):
    """Responsiveness: each widget change made while the thread trains is applied within one update."""
    panel = make_panel(tokenizer, tiny_model_config, tmp_path)
    run = panel.run
    panel.start()
    try:
        wait_until(lambda: run.version >= 2)
        assert panel.trainer.running
        changes = [("staleness", 3, {"staleness": 3}), ("objective", "m2po", {"objective": "m2po"}),
                   ("lr", 0.002, {"lr": 0.002}), ("temperature", 0.8, {"temperature": 0.8}),
                   ("staleness", 0, {"staleness": 0})]
        for widget, value, expect in changes:
            t0 = time.perf_counter()
            v_before = run.version
            panel.widgets[widget].value = value  # what the frontend does: sets the trait, observers fire
            assert time.perf_counter() - t0 < 0.5  # the callback does not wait for training
            wait_until(lambda: any(all(e["changes"].get(k) == v for k, v in expect.items()) and e["update"] >= v_before
                                   for e in run.knob_events))
            ev = [e for e in run.knob_events if all(e["changes"].get(k) == v for k, v in expect.items())][-1]
            # the update in progress when the value changed, or the one after it: never later
            assert v_before <= ev["update"] <= v_before + 1, (widget, v_before, ev)
            wait_until(lambda: len(run.rows) > ev["update"])  # the row is appended just after the version moves
            row = run.rows[ev["update"]]
            for k, v in expect.items():
                assert row[f"knob/{k}"] == pytest.approx(v)
        param = panel.widgets["param_widgets"]["tau"]  # m2po's slider was generated from its Param metadata
        v_before = run.version
        param.value = 0.08
        wait_until(lambda: len(run.rows) > v_before + 2)
        ev = [e for e in run.knob_events if e["changes"].get("objective_params", {}).get("tau") == 0.08][-1]
        assert v_before <= ev["update"] <= v_before + 1
    finally:
        panel.close()
    recorded = events(tmp_path / "live" / "knob_events.jsonl")
    assert recorded == run.knob_events and len(recorded) == 6
    assert panel.charts.renders >= 1  # the render thread drew while training ran


def test_invalid_widget_value_is_refused_and_shown(tokenizer, tiny_model_config, tmp_path):
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, config={"objective": "ppo_clip"})
    try:
        panel.widgets["objective"].value = "m2po"
        assert panel.knobs.objective == "m2po" and panel.knobs.applied.objective == "ppo_clip"  # from the next update
        assert set(panel.widgets["param_widgets"]) == {"tau", "variant"}
        assert panel.widgets["param_widgets"]["variant"].disabled  # not live: fixed for a run
        panel._set_knob({"owner": panel.widgets["lr"], "old": panel.widgets["lr"].value}, lr=5.0)
        assert "lr=5.0" in panel.last_error and panel.knobs.lr != 5.0
        assert "error" not in panel.status_text() or "lr" in panel.status_text()
    finally:
        panel.close()


def test_pause_step_resume_and_reset(tokenizer, tiny_model_config, tmp_path):
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, steps=12)
    try:
        panel.start()
        wait_until(lambda: panel.run.version >= 2)
        panel.pause()
        assert panel.wait(30) and panel.trainer.state == "paused"
        v = panel.run.version
        time.sleep(0.2)
        assert panel.run.version == v  # paused means paused
        panel.step()
        assert panel.wait(30) and panel.run.version == v + 1
        panel.resume()
        assert panel.wait(60) and panel.run.version == 12 and panel.trainer.state == "done"
        assert "update 12 / 12" in panel.status_text()
        panel.widgets["staleness"].value = 5
        old_dir = panel.run_dir
        panel.reset()
        assert panel.run.version == 0 and panel.run_dir != old_dir and panel.run_dir.name == "live-reset1"
        assert panel.run.config.staleness == 5  # the knob values shown carry into the new run's config
        assert json.loads((panel.run_dir / "config.json").read_text())["staleness"] == 5
        panel.step(2)
        assert panel.wait(30) and panel.run.version == 2
    finally:
        panel.close()


def test_recorded_interactive_session_replays_exactly(tokenizer, tiny_model_config, tmp_path):
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, steps=10)
    scripted_session(panel, staleness=2)
    live = panel.run
    assert live.version == 10 and len(live.knob_events) == 2, live.knob_events
    replay = make_panel(tokenizer, tiny_model_config, tmp_path, headless=True, name="replay", steps=10,
                        knob_schedule=str(tmp_path / "live" / "knob_events.jsonl"))
    replay.start()
    assert deterministic(replay.run.metrics).equals(deterministic(live.metrics))
    assert replay.run.knob_events == live.knob_events


def test_headless_panel_trains_in_the_cell_and_writes_outputs(tokenizer, tiny_model_config, tmp_path, capsys):
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, headless=True, name="h", steps=4)
    assert panel.box is None and panel.widgets == {}
    panel.show()
    assert "no frontend" in capsys.readouterr().out
    panel.start()
    assert panel.run.version == 4
    summary = panel.finish()
    d = tmp_path / "h"
    assert json.loads((d / "summary.json").read_text())["updates"] == 4 == summary["updates"]
    assert (d / "charts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wb-tok" in (d / "tokens.html").read_text()
    assert summary["interactive"] is False and summary["objective"] == "ppo_clip"


def test_live_spec_draws_panels_and_knob_rules():
    df = pl.DataFrame({"update": [0, 1, 2, 3], "reward/accuracy": [0.1, 0.2, float("nan"), 0.4],
                       "eval/accuracy": [None, 0.3, None, 0.5], "offpolicy/clipfrac": [0.0, 0.1, 0.2, 0.3],
                       "knob/staleness": [0, 0, 8, 8], "offpolicy/m2": [None, None, None, None]})
    ev = [{"update": 2, "changes": {"staleness": 8, "objective_params": {"tau": 0.08}}}]
    spec = chart_spec(df, ev, title="t")
    titles = [p["title"] for p in spec["concat"]]
    assert titles[0].startswith("accuracy") and not any(t.startswith("M2") for t in titles)  # all-null skipped
    assert spec["datasets"]["knobs"] == [{"update": 2, "label": "staleness=8 tau=0.08"}]
    assert all(any(layer["mark"]["type"] == "rule" for layer in p["layer"]) for p in spec["concat"])
    text = json.dumps(spec, allow_nan=False)  # no NaN in the JSON sent to the browser
    assert '"reward/accuracy": null' in text
    empty = chart_spec(pl.DataFrame())
    assert "no updates yet" in json.dumps(empty)


def test_throttle_limits_refreshes_by_updates_and_seconds():
    th = Throttle(every_updates=2, every_seconds=1.0)
    assert th.due(1, now=0.0)
    th.mark(1, now=0.0)
    assert not th.due(2, now=5.0)  # only one update since
    assert not th.due(3, now=0.5)  # too soon
    assert th.due(3, now=1.0)


def test_token_view_marks_silenced_tokens(tokenizer, tiny_model_config):
    cfg = RunConfig(**{**SMALL, "out_dir": "", "staleness": 2, "objective": "ppo_clip",
                       "objective_params": {"clip_low": 0.01, "clip_high": 0.01}})
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    for _ in range(30):  # until the latest batch carries reward variance (an untrained model's often does not)
        run.step()
        if run.version > 3 and bool((run.last_batch.advantages != 0).any()):
            break
    batch = run.last_batch
    v = token_weights(run, batch, "ppo_clip", run.knobs.objective_params, n=16)
    m, adv, r, w = v["mask"], v["advantage"], v["ratio"], v["weight"]
    sig = m & (adv != 0)
    assert bool(sig.any())
    outside_pos = sig & (adv > 0) & (r > 1.01 + 1e-6)
    outside_neg = sig & (adv < 0) & (r < 0.99 - 1e-6)
    assert bool((outside_pos | outside_neg).any())
    assert torch.all(w[outside_pos | outside_neg] == 0) and torch.all(v["silenced"] == (sig & (w == 0)))
    inside = sig & ~(outside_pos | outside_neg)
    assert torch.allclose(w[inside], r[inside], atol=1e-4)  # w = r inside the band
    is_view = token_weights(run, batch, "is", {}, n=16)
    assert torch.allclose(is_view["weight"][sig], r[sig], atol=1e-4) and not bool(is_view["silenced"].any())


def test_curve_explorer_curves_and_parameters():
    from workbench.ui.curves import CurveExplorer

    ex = CurveExplorer(["reinforce", "is", "ppo_clip", "m2po"], points=31, headless=True)
    df = ex.frame()
    assert df.height == 4 * 2 * 31 and df["weight"].is_finite().all()
    assert ex.weight_at("reinforce", 2.0, 1) == pytest.approx(1.0)
    assert ex.weight_at("is", 2.0, -1) == pytest.approx(2.0)
    assert ex.weight_at("ppo_clip", 1.25, 1) == 0.0 and ex.weight_at("ppo_clip", 1.1, 1) == pytest.approx(1.1)
    ex.set_params("ppo_clip", clip_high=0.28)
    assert ex.weight_at("ppo_clip", 1.25, 1) == pytest.approx(1.25)
    df = ex.frame()
    from workbench.steps.reweight.curves import weight_curve

    for name in ex.objectives:  # every curve is each ratio's weight alone, batched or not
        for sign in (1, -1):
            got = df.filter((pl.col("objective") == name) & (pl.col("advantage_sign") == sign))["weight"].to_list()
            alone = weight_curve(name, ex.ratios, sign, batched=False, **ex.params[name]).tolist()
            assert got == pytest.approx(alone, abs=1e-9), (name, sign)
    s = ex.summary()
    assert s["all_finite"] and s["weight_at_ratio_1"]["ppo_clip"] == {"pos": pytest.approx(1.0), "neg": pytest.approx(1.0)}
    spec = ex.spec()
    assert [p["title"]["text"] for p in spec["concat"]] == ["reinforce", "is", "ppo_clip", "m2po"]


def test_same_batch_replay_on_the_tiny_model(tokenizer, tiny_model_config):
    from workbench.studies.replay import FRESH_ROW, replay_summary, same_batch_replay

    cfg = RunConfig(**{**SMALL, "out_dir": "", "prompts_per_step": 8})
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    objs = ["reinforce", "is", "ppo_clip", "cispo", "m2po", "gspo"]
    table = same_batch_replay(run, 3, objs, warmup=4, onpolicy_factor=4, repeats=2)
    assert table["objective"].to_list() == 2 * (objs + [FRESH_ROW]) and table["repeat"].to_list() == [0] * 7 + [1] * 7
    assert run.version == 4 + 3 and table["staleness"].unique().to_list() == [3]  # both batches s versions old
    assert int(table["signal_tokens"].sum()) > 0
    for r in table.iter_rows(named=True):
        assert math.isfinite(r["grad_norm"]) and 0.0 <= r["silenced_frac"] <= 1.0
        if r["grad_norm"] > 0:
            assert -1.0 <= r["cosine_to_onpolicy"] <= 1.0
    for rep in (0, 1):
        by = {r["objective"]: r for r in table.filter(pl.col("repeat") == rep).iter_rows(named=True)}
        assert by["cispo"]["silenced_frac"] == 0.0  # CISPO clips the weight, never the gradient
        assert by["is"]["silenced_frac"] == 0.0 and by["ppo_clip"]["silenced_frac"] >= by["is"]["silenced_frac"]
    first, second = (table.filter((pl.col("repeat") == k) & (pl.col("objective") == "reinforce")) for k in (0, 1))
    assert first["grad_norm"][0] != second["grad_norm"][0]  # independent stale batches, not one batch twice
    s = replay_summary(table)
    assert s["objectives"] == objs and s["repeats"] == 2 and json.loads(json.dumps(s))["staleness"] == 3
    assert len(s["findings"]) >= len(objs) + 1 and set(s["verdicts"]) == set(objs)


def test_replay_at_staleness_zero_every_token_mean_objective_is_reinforce(tokenizer, tiny_model_config):
    """At ratio 1 each objective that reduces to REINFORCE has REINFORCE's gradient exactly, on every repeat."""
    from workbench.studies.replay import same_batch_replay

    cfg = RunConfig(**{**SMALL, "out_dir": "", "prompts_per_step": 8})
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    objs = [n for n in ("reinforce", "is", "ppo_clip", "cispo", "tis", "dual_clip", "m2po")
            if OBJECTIVES.meta(n)["default_aggregation"] == "token-mean"]
    table = same_batch_replay(run, 0, objs, warmup=3, onpolicy_factor=2, repeats=2)
    for rep in (0, 1):
        part = table.filter(pl.col("repeat") == rep)
        ref = part.filter(pl.col("objective") == "reinforce").row(0, named=True)
        assert ref["grad_norm"] > 0
        for r in part.filter(pl.col("objective").is_in(objs)).iter_rows(named=True):
            assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), r["objective"]
            assert r["cosine_to_onpolicy"] == pytest.approx(ref["cosine_to_onpolicy"], abs=1e-5), r["objective"]
            assert r["silenced_frac"] == 0.0


def test_has_frontend(monkeypatch):
    monkeypatch.delenv("WORKBENCH_HEADLESS", raising=False)
    assert has_frontend() is False  # plain python (pytest): no kernel
    monkeypatch.setenv("WORKBENCH_HEADLESS", "0")
    assert has_frontend() is True
    monkeypatch.setenv("WORKBENCH_HEADLESS", "1")
    assert has_frontend() is False


def test_runner_plumbing(tmp_path):
    name = ensure_kernel()
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(name)
    assert spec.argv[0] == sys.executable and spec.env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert find_notebook("2").stem == "02_staleness_and_clipping_live" == find_notebook("02_staleness_and_clipping_live").stem
    with pytest.raises(Exception, match="01_quickstart"):
        find_notebook("99")
    p = tmp_path / "p.yaml"
    p.write_text("tiny: true\nsteps: 3\n")
    assert load_params_file(p, "02_staleness_and_clipping_live", {"tiny": 0, "steps": 0}) == {"tiny": True, "steps": 3}
    with pytest.raises(WorkbenchError, match="notebook 03_objectives_explained declares no parameter 'steps'"):
        load_params_file(p, "03_objectives_explained", {"points": 0})


def test_cli_notebook_command_passes_parameters(monkeypatch, tmp_path, capsys):
    import workbench.notebook as nbmod
    from workbench.cli import main

    seen = {}

    def fake(notebook, parameters=None, **kw):
        seen.update(notebook=notebook, parameters=parameters, **kw)
        return {"updates": 3}

    monkeypatch.setattr(nbmod, "run_notebook", fake)
    code = main(["notebook", "02", "-p", "staleness", "64", "-p", "objective", "m2po", "-p", "tiny", "true",
                 "-f", "notebooks/params/ci/02_staleness_and_clipping_live.yaml", "--cwd", str(tmp_path)])
    assert code == 0
    assert seen["notebook"] == "02" and seen["parameters"] == {"staleness": 64, "objective": "m2po", "tiny": True}
    assert seen["params_file"] == "notebooks/params/ci/02_staleness_and_clipping_live.yaml"
    assert '"updates": 3' in capsys.readouterr().out


def test_the_panel_shows_active_health_warnings_with_their_update(tokenizer, tiny_model_config, tmp_path):
    # staleness 3: updates 1 and 2 train on the initial policy's batches (runs/health.py, initial_policy)
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, steps=2, config={"staleness": 3})
    try:
        assert panel.health_html() == ""  # nothing before the first update
        panel.step(2)
        assert panel.wait(60) and panel.run.version == 2
        panel.render()
        banner = panel.widgets["health"].value
        assert banner == panel.health_html() and "(also in health.jsonl)" in banner
        assert "<li>update 1: staleness 3 is longer than the 1 updates done" in banner
        journal = events(panel.run_dir / "health.jsonl")
        assert [(e["code"], e["event"]) for e in journal if e["code"] == "initial_policy"] == [("initial_policy", "start")]
        assert banner.count("<li>") == len(panel.run.health.banner())
    finally:
        panel.close()


# ---------------------------------------------------------------- Branch here (workbench/ui/branching.py)
def output_text(panel) -> str:
    return "".join(o["text"] for o in panel.branching.widgets["output"].outputs)


def every_path(root) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_branch_here_on_a_paused_run_then_the_parent_continues_exactly(tokenizer, tiny_model_config, tmp_path):
    """The button forks the paused run into control + variant x repeats, prints the CLI's table and
    sentences with intervals that match the paired t formula, and leaves the parent as it was."""
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, steps=7)
    try:
        panel.step(3)
        assert panel.wait(60) and panel.run.version == 3
        box = panel.branching.widgets
        assert box["button"] in panel.box.children[-1].children[1].children  # the box is in the panel
        box["variants"].value = "staleness=1 lr=0.003"
        box["steps"].value, box["repeats"].value = 2, 2
        t0 = time.perf_counter()
        box["button"].click()  # what the frontend does
        assert time.perf_counter() - t0 < 1.0  # the kernel is answered at once: the worker trains the branches
        panel.start()  # refused while the branches train: the parent stays at update 3
        assert panel.branching.wait(300) and panel.run.version == 3 and panel.trainer.state != "running"
        bs = panel.branching.result
        assert bs is not None and panel.branching.message == ""
        folder = tmp_path / "live-branches-at3"
        assert bs.folder == folder and (folder / "branches.json").is_file()
        names = {p.name for p in folder.iterdir() if p.is_dir()}
        assert names == {f"v{v}-{label}-r{r}" for v, label in ((0, "control"), (1, "staleness=1_lr=0.003"))
                         for r in (0, 1)}
        for b in bs.branches:  # each branch trained 2 updates after the fork, from the parent's 3 rows
            assert pl.read_parquet(b.path / "metrics.parquet")["update"].to_list() == [0, 1, 2, 3, 4]
        # the final row of the table, recomputed from the branches' own branch.json by the paired t formula
        finals = {(b.variant, b.repeat): json.loads((b.path / "branch.json").read_text())["final"]["eval/accuracy"]
                  for b in bs.branches}
        d = [finals[(1, r)] - finals[(0, r)] for r in (0, 1)]
        est = (d[0] + d[1]) / 2
        half = math.tan(math.pi * (0.975 - 0.5)) * abs(d[0] - d[1]) / 2  # t_{0.975, 1} sd / sqrt(2), df=1: Cauchy
        row = paired_differences(bs, "eval/accuracy").filter(pl.col("final")).row(0, named=True)
        assert (row["estimate"], row["lo"], row["hi"]) == pytest.approx((est, est - half, est + half), rel=1e-6, abs=1e-12)
        text = output_text(panel)
        assert (f"| eval/accuracy | staleness=1 lr=0.003 | 2 | {100 * (finals[(0, 0)] + finals[(0, 1)]) / 2:.2f} |"
                in text)
        assert f"{100 * est:+.2f} [{100 * (est - half):.2f}, {100 * (est + half):.2f}] | t |" in text
        assert "eval/accuracy: staleness=1 lr=0.003 vs control: " in text and "paired t-intervals" in text
        assert f"branch set: {folder}" in text and "Traceback" not in text
        assert f"chart: {folder / 'paired-eval_accuracy.png'}" in text  # update 4 is evaluated (eval_every 4)
        assert (folder / "paired-eval_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        chart = box["chart"]
        assert chart.layout.display is None and chart.spec["title"] == "live at update 3: eval/accuracy"
        assert {r["variant"] for r in chart.spec["data"]["values"]} == {"staleness=1 lr=0.003"}
        panel.start()  # the parent resumes where it paused
        assert panel.wait(60) and panel.run.version == 7
        parent = panel.run
    finally:
        panel.close()
    twin = make_panel(tokenizer, tiny_model_config, tmp_path, headless=True, name="twin", steps=7)
    twin.start()
    assert deterministic(parent.metrics).equals(deterministic(twin.run.metrics))
    assert parent.knob_events == twin.run.knob_events == []


def test_branch_here_is_refused_while_training_runs(tokenizer, tiny_model_config, tmp_path):
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, steps=400)
    try:
        panel.start()
        wait_until(lambda: panel.run.version >= 1)
        panel.branching.widgets["variants"].value = "staleness=2"
        panel.branching.widgets["button"].click()
        text = output_text(panel)
        assert text.startswith("branch here: Branch here is refused while training runs: press Pause")
        assert text.count("\n") == 1 and not panel.branching.busy
        assert "press Pause" in panel.status_text()
    finally:
        panel.close()
    assert not list(tmp_path.glob("live-branches*")) and panel.branching.result is None


@pytest.mark.parametrize("text, message", [
    ("staleness8", "variants='staleness8' is invalid at 'staleness8': expected KEY=VALUE pairs"),
    ("", "variants='' is invalid: expected KEY=VALUE pairs"),
    ("staleness=2; seed=4", "variants: changes[2]: 'seed' is a config field fixed when a run starts, not a live "
                            "knob: a branch can change only the live knobs staleness, sync_every"),
    ("stalenes=2", "variants: changes[1]: 'stalenes' is not a config field or knob"),
    ("lr=-1", "variants: changes[1]={'lr': -1}: lr=-1 is invalid"),
])
def test_branch_here_refuses_bad_text_in_one_line_and_writes_nothing(tokenizer, tiny_model_config, tmp_path,
                                                                      text, message):
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, steps=400)
    try:
        panel.step(1)
        assert panel.wait(60)
        before = every_path(tmp_path)
        panel.branching.widgets["variants"].value = text
        panel.branching.widgets["button"].click()
        assert not panel.branching.busy and panel.branching.result is None
        out = output_text(panel)
        assert out.startswith(f"branch here: {message}"), out
        assert out.count("\n") == 1 and "Traceback" not in out
        assert every_path(tmp_path) == before  # no checkpoint, no branch folder
    finally:
        panel.close()


def test_branch_here_without_a_frontend_runs_in_the_cell(tokenizer, tiny_model_config, tmp_path):
    said = []
    panel = make_panel(tokenizer, tiny_model_config, tmp_path, headless=True, name="h", steps=3, log=said.append)
    assert panel.branch_here("staleness=1") is None and said[-1].startswith("branch here: Branch here is refused at "
                                                                            "update 0")
    panel.step(2)
    bs = panel.branch_here("staleness=1; lr=0.003", steps=1)
    assert bs is panel.branching.result and [b.path.name for b in bs.branches] == [
        "v0-control-r0", "v1-staleness=1-r0", "v2-lr=0.003-r0"]
    assert "| eval/accuracy | lr=0.003 | 1 |" in "\n".join(said) and f"branch set: {tmp_path / 'h-branches-at2'}" in said
    assert panel.run.version == 2
