"""The main job (``workbench.studies.mission``, ``python -m workbench compare``): on a tiny local model
for a few updates, the study writes one figure and one table with the arms and columns it promises,
every interval is the closed form recomputed here, every comparison sentence says what its interval
says, and the CLI prints the table and exits 0."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import polars as pl
import pytest

from workbench.cli import main
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.lint import lint
from workbench.notebook import TINY_REWARDS
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model, save_policy
from workbench.policy.tokenizer import build_char_tokenizer
from workbench.studies import mission
from workbench.sweeps import build_cells

Z = 1.959963984540054  # the two-sided 95% standard normal quantile
TINY = dict(task_params={"max_digits": 2, "heldout_size": 8}, prompts_per_step=4, group_size=4, eval_every=2,
            eval_size=8, lr=1e-2, rewards=TINY_REWARDS, steps=4)
ARMS = mission.arms(2, ("ppo_clip", "m2po"))
COLUMNS = {"arm", "staleness", "objective", "seeds", "eval_n", "initial_accuracy", "final_accuracy", "final_lo",
           "final_hi", "interval", "clipped_frac", "masked_frac", "truncated_frac", "mean_m2", "mean_ess", "run_dirs"}


def wilson(p: float, n: int) -> tuple[float, float]:
    """Wilson 1927 in closed form: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float, float]:
    (l1, u1), (l2, u2) = wilson(p1, n1), wilson(p2, n2)
    d = p1 - p2
    return d, d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("mission")
    tok = build_char_tokenizer()
    model = save_policy(build_model(ModelConfig(**TINY_MODEL), tok, seed=0), tok, root / "ckpt")
    base = mission.base_config(model=str(model), out_dir=str(root / "runs"), **TINY)
    return base, mission.run_mission(base, ARMS, 1, workers=0, progress=False, log=lambda s: None)


def summaries(table: pl.DataFrame) -> list[dict]:
    """Each arm's summary.json, read from the run directory the table names (not from the table)."""
    return [json.loads((Path(d) / "summary.json").read_text()) for d in table["run_dirs"].to_list()]


def test_writes_one_figure_and_one_table_with_every_arm(study):
    base, result = study
    assert result.failed == [] and set(result.files) == {"figure", "markdown", "csv", "parquet"}
    assert result.files["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pl.read_parquet(result.files["parquet"])
    assert set(table.columns) == COLUMNS
    assert table["arm"].to_list() == ["on-policy", "stale uncorrected", "stale + ppo_clip", "stale + m2po"]
    assert table["staleness"].to_list() == [0, 2, 2, 2]
    assert table["objective"].to_list() == ["reinforce", "reinforce", "ppo_clip", "m2po"]
    assert table["interval"].to_list() == ["wilson"] * 4 and table["eval_n"].to_list() == [8] * 4
    csv = pl.read_csv(result.files["csv"])
    assert csv["arm"].to_list() == table["arm"].to_list()
    assert csv["final_hi"].to_list() == pytest.approx(table["final_hi"].to_list(), rel=1e-12)
    md = result.files["markdown"].read_text()
    assert sum(line.startswith(f"| {a.label} |") for line in md.splitlines() for a in ARMS) == 4
    for arm, run_dir in zip(ARMS, table["run_dirs"].to_list()):  # each run's own directory, with its arm's config
        cfg = json.loads((Path(run_dir) / "config.json").read_text())
        assert (cfg["staleness"], cfg["objective"], cfg["steps"]) == (arm.staleness, arm.objective, base.steps)
        assert (Path(run_dir) / "metrics.parquet").is_file()


def test_every_interval_is_the_wilson_closed_form(study):
    _, result = study
    table = result.table
    for row, s in zip(table.iter_rows(named=True), summaries(table)):
        assert row["final_accuracy"] == s["eval/final_accuracy"]
        lo, hi = wilson(s["eval/final_accuracy"], 8)
        assert (row["final_lo"], row["final_hi"]) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)
        metrics = pl.read_parquet(Path(row["run_dirs"]) / "metrics.parquet")
        assert row["mean_m2"] == pytest.approx(float(metrics["offpolicy/m2"].mean()), rel=1e-9)
        assert row["clipped_frac"] == pytest.approx(float(metrics["offpolicy/clipfrac"].mean()), rel=1e-9, abs=1e-15)
    bands = mission.curves(*_frames(result)).filter(pl.col("panel") == "accuracy")
    assert bands.height == 4 * 3  # the start and evaluations after updates 2 and 4, per arm
    for r in bands.iter_rows(named=True):
        assert (r["lo"], r["hi"]) == pytest.approx(wilson(r["value"], 8), rel=1e-9, abs=1e-12)


def _frames(result) -> tuple[pl.DataFrame, pl.DataFrame]:
    runs = result.table["run_dirs"].to_list()
    folders = sorted({Path(d).parents[1] for d in runs})
    cells = pl.concat([pl.read_parquet(f / "sweep_runs.parquet") for f in folders], how="diagonal_relaxed")
    metrics = pl.concat([pl.read_parquet(f / "sweep.parquet") for f in folders], how="diagonal_relaxed")
    return mission.with_arms(cells, ARMS), mission.with_arms(metrics, ARMS)


SENTENCE = re.compile(r"^(.+) - (.+): ([+-]\d+\.\d) points; (.+)$")


def check_sentence(sentence: str, d: float, lo: float, hi: float) -> None:
    m = SENTENCE.match(sentence)
    assert m, sentence
    assert float(m.group(3)) == pytest.approx(round(100 * d, 1), abs=1e-9)
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}] points" in m.group(4)
    assert ("excludes 0" in m.group(4)) == (lo > 0 or hi < 0)
    assert ("includes 0" in m.group(4)) == (lo <= 0 <= hi)


def test_each_comparison_sentence_states_its_interval(study):
    _, result = study
    finals = {a.label: s["eval/final_accuracy"] for a, s in zip(ARMS, summaries(result.table))}
    pairs = [(a.label, b.label) for a, b in mission.comparison_pairs(ARMS)]
    assert pairs[0] == ("stale uncorrected", "on-policy") and len(result.sentences) == len(pairs) == 5
    for (a, b), sentence in zip(pairs, result.sentences):
        assert sentence.startswith(f"{a} - {b}: ")
        check_sentence(sentence, *newcombe(finals[a], 8, finals[b], 8))


def synthetic_cells(finals: dict[str, list[float]], n: int = 256) -> pl.DataFrame:
    rows = [{"arm": a, "run": f"{a}-{i}", "seed": i, "eval_n": n, mission.FINAL: f}
            for a, fs in finals.items() for i, f in enumerate(fs)]
    return pl.from_dicts(rows)


def test_resolved_and_unresolved_differences_on_known_accuracies():
    """0.60 vs 0.40 of 256 is resolved, 0.52 vs 0.50 is not; the bounds are Newcombe's from the Wilson closed form."""
    arms = mission.arms(16, ("ppo_clip",))
    cells = synthetic_cells({"on-policy": [0.60], "stale uncorrected": [0.40], "stale + ppo_clip": [0.52]})
    sentences = mission.comparisons(cells, arms)
    expected = [newcombe(0.40, 256, 0.60, 256), newcombe(0.52, 256, 0.40, 256), newcombe(0.52, 256, 0.60, 256)]
    for sentence, (d, lo, hi) in zip(sentences, expected):
        check_sentence(sentence, d, lo, hi)
    assert "excludes 0" in sentences[0] and "stale uncorrected < on-policy" in sentences[0]
    near = mission.comparisons(synthetic_cells({"on-policy": [0.50], "stale uncorrected": [0.52],
                                                "stale + ppo_clip": [0.51]}), arms)
    assert all("includes 0" in s for s in near)


def test_two_seeds_use_the_bootstrap_across_seeds():
    """With two values the percentile bootstrap of the mean puts a quarter of its mass on each value
    alone, so its 95% bounds are the two values themselves (workbench.stats)."""
    one, kind = mission.final_interval([0.6], 256)
    assert kind == "wilson" and tuple(one) == pytest.approx((0.6, *wilson(0.6, 256)), rel=1e-12)
    est, kind = mission.final_interval([0.40, 0.48], 256)
    assert kind == "bootstrap" and tuple(est) == pytest.approx((0.44, 0.40, 0.48), rel=1e-12)
    arms = mission.arms(16, ("m2po",))
    cells = synthetic_cells({"on-policy": [0.60, 0.62], "stale uncorrected": [0.30, 0.34], "stale + m2po": [0.5, 0.5]})
    d = mission.difference(cells, arms[1], arms[0])
    assert tuple(d) == pytest.approx((-0.29, -0.32, -0.26), rel=1e-12)  # [0.30-0.62, 0.34-0.60]


def test_grids_cover_the_arms_exactly_and_bad_arms_are_refused(tmp_path):
    for rules in (("ppo_clip", "m2po"), ("ppo_clip", "m2po", "topr")):
        arms = mission.arms(16, rules)
        grids = mission.sweep_grids(arms)
        assert grids[0] == {"staleness": [0, 16], "objective": ["reinforce"]}
        assert grids[1] == {"staleness": [16], "objective": list(rules)}
        cells = {(s, o) for g in grids for s in g["staleness"] for o in g["objective"]}
        assert cells == {(a.staleness, a.objective) for a in arms} and sum(
            len(g["staleness"]) * len(g["objective"]) for g in grids) == len(arms)
    for staleness, rules, word in ((0, ("m2po",), "staleness=0"), (16, (), "rules=[]"),
                                   (16, ("m2po", "m2po"), "rules="), (16, ("reinforce",), "rules="),
                                   (16, ("nope",), "nope")):
        with pytest.raises(WorkbenchError, match=re.escape(word)):
            mission.arms(staleness, rules)
    for name in ("", "..", "a/b"):
        with pytest.raises(WorkbenchError, match=re.escape(f"name={name!r} is invalid")):
            mission.run_mission(mission.base_config(out_dir=str(tmp_path)), name=name)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_only_the_uncorrected_arm_gets_a_lint_warning(tmp_path):
    """The default arms at the mission's scale, built as the sweep builds them: the uncorrected arm is
    what ``stale_ignored`` is about; nothing else (no lag, eval-size or clip warning) fires."""
    base = mission.base_config()
    codes = {}
    for grid in mission.sweep_grids(mission.ARMS):
        for c in build_cells(base, grid, None, tmp_path):
            cfg = RunConfig.from_dict(c.spec["config"])
            codes[(cfg.staleness, cfg.objective)] = [w.code for w in lint(cfg)]
    assert codes == {(0, "reinforce"): [], (16, "reinforce"): ["stale_ignored"], (16, "ppo_clip"): [],
                     (16, "m2po"): []}


def test_cli_prints_the_table_and_exits_0(study, capsys, tmp_path):
    base, result = study
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({k: v for k, v in base.to_dict().items() if k not in ("steps", "staleness")}))
    code = main(["compare", "--config", str(config), "--steps", "4", "--staleness", "2", "--rules", "ppo_clip,m2po",
                 "--workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 runs, 2 already complete" not in out and out.count("already complete, 0 to run") == 2  # resumed
    assert mission.markdown_table(result.table) in out
    for sentence in result.sentences:
        assert f"- {sentence}" in out
    assert "intervals: 95% Wilson interval of one evaluation on n = 8" in out
    assert main(["compare", "--objective", "m2po", "--workers", "0"]) == 2
    assert "--objective is invalid for compare" in capsys.readouterr().err
    assert main(["compare", "--preset", "verl_vanilla", "--workers", "0"]) == 2  # a preset would be half-applied
    assert "--preset is invalid for compare" in capsys.readouterr().err
