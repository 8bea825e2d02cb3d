"""The knob reference (workbench/course/knob_reference.py): docs/knobs.md lists every live knob and
every registered objective parameter with its registry default, range, liveness and paper; the page
is current (``docs --check`` compares it too); the live knobs' stated ranges are what ``RunConfig``
accepts; ``knob_reference(filter)`` narrows the table and renders as a widget or a DataFrame."""

from __future__ import annotations

import inspect

import pytest

from workbench.cli import main
from workbench.config import RunConfig
from workbench.course.knob_reference import KNOBS_PATH, LIVE_KNOBS, knob_reference, knobs_markdown
from workbench.errors import WorkbenchError
from workbench.knobs import LIVE_FIELDS
from workbench.steps.reweight import OBJECTIVES
from workbench.steps.reweight.corrections import PRESETS
from workbench.steps.score import ADVANTAGES


def _page_rows() -> dict[str, list[str]]:
    """name -> the cells of its row in the committed docs/knobs.md (parsed here, not by the module)."""
    rows = {}
    for line in KNOBS_PATH.read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def _expected_range(p) -> str:
    if p.choices is not None:
        return "one of " + ", ".join(p.choices)
    lo = "-inf" if p.low is None else repr(p.low)
    hi = "inf" if p.high is None else repr(p.high)
    return f"[{lo}, {hi}]"


def test_every_live_knob_is_on_the_page_with_its_config_default():
    rows = _page_rows()
    defaults = RunConfig()
    missing = [k for k in LIVE_FIELDS if k not in rows]
    assert not missing, f"live knobs missing from docs/knobs.md: {missing} (run python -m workbench docs)"
    for knob in LIVE_FIELDS:
        expected = "{}" if knob == "objective_params" else repr(getattr(defaults, knob))
        assert rows[knob][1] == f"`{expected}`", knob
        assert rows[knob][3] == "yes", knob


def test_every_objective_parameter_is_on_the_page_with_registry_metadata():
    rows = _page_rows()
    expected = {f"{o}.{p.name}": (o, p) for o in OBJECTIVES.names() for p in OBJECTIVES.meta(o)["params"]}
    assert len(expected) > 50  # the registry is populated: the loop below checks something
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"objective parameters missing from docs/knobs.md: {missing} (run python -m workbench docs)"
    for name, (objective, p) in expected.items():
        _, default, range_, live, effect, paper = rows[name]
        assert default == f"`{p.default!r}`", name
        assert range_ == _expected_range(p).replace("|", "\\|"), name
        assert live == ("yes" if p.live else "no"), name
        assert effect.startswith(p.doc.replace("|", "\\|")), name
        assert paper == OBJECTIVES.meta(objective)["paper"].replace("|", "\\|"), name


def test_advantage_options_and_correction_presets_are_on_the_page():
    rows = _page_rows()
    for estimator in ADVANTAGES.names():
        meta = ADVANTAGES.meta(estimator)
        for key in {**meta.get("choices", {}), **meta.get("numbers", {})}:
            default = inspect.signature(ADVANTAGES.get(estimator)).parameters[key].default
            assert rows[f"{estimator}.{key}"][1] == f"`{default!r}`"
    for preset in PRESETS:
        assert f"correction={preset}" in rows


def test_the_docs_are_current_and_check_compares_the_knob_page(tmp_path, capsys):
    assert KNOBS_PATH.read_text() == knobs_markdown(), "docs/knobs.md is stale: run python -m workbench docs"
    assert main(["docs", "--check"]) == 0
    out = tmp_path / "objectives.md"
    assert main(["docs", "--out", str(out)]) == 0
    assert (tmp_path / "knobs.md").read_text() == knobs_markdown()
    assert main(["docs", "--out", str(out), "--check"]) == 0
    (tmp_path / "knobs.md").write_text(knobs_markdown().replace("| `staleness` |", "| `stale` |"))
    capsys.readouterr()
    assert main(["docs", "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert "knobs.md is out of date" in err and "objectives.md" not in err


# knob -> (range text, values RunConfig accepts, values it refuses)
LIVE_RANGES = {
    "staleness": ("an integer >= 0", [0, 7], [-1]),
    "sync_every": ("an integer >= 1", [1, 4], [0]),
    "max_staleness": ("an integer >= 0, or -1 for no limit", [-1, 0, 5], [-2]),
    "lr": ("a float in (0, 1)", [1e-6, 0.999], [0.0, 1.0]),
    "temperature": ("a float > 0", [1e-3, 3.0], [0.0, -1.0]),
    # the numerics knobs (workbench.knobs.NUMERICS_FIELDS)
    "top_p": ("a float in (0, 1]", [0.05, 1.0], [0.0, 1.5]),
    "top_k": ("an integer >= 0", [0, 40], [-1]),
    "sampler_logits_dtype": ("'' (exact) | bf16 | fp16", ["", "bf16", "fp16"], ["int8", "bfloat16"]),
    "trainer_logits_dtype": ("'' (exact) | bf16 | fp16", ["", "bf16", "fp16"], ["float16"]),
    "sampler_logit_noise": ("a finite float >= 0 (0 = off)", [0.0, 0.5], [-0.1]),
    "trainer_logit_noise": ("a finite float >= 0 (0 = off)", [0.0, 2.0], [-1.0]),
    "replay_sampling_mask": ("true or false", [True, False], [1, "yes"]),
}


@pytest.mark.parametrize("knob", sorted(LIVE_RANGES))
def test_a_live_knobs_stated_range_is_what_the_config_accepts(knob):
    text, good, bad = LIVE_RANGES[knob]
    assert LIVE_KNOBS[knob].range == text
    for v in good:
        assert getattr(RunConfig(**{knob: v}), knob) == v
    for v in bad:
        with pytest.raises(WorkbenchError, match=rf"^{knob}={v!r} is invalid"):
            RunConfig(**{knob: v})


def test_filter_narrows_the_table_to_the_matching_knobs():
    table = knob_reference("clip_high", widget=False)
    expected = {f"{o}.clip_high" for o in OBJECTIVES.names()
                if any(p.name == "clip_high" for p in OBJECTIVES.meta(o)["params"])}
    assert len(expected) >= 2 and set(table["name"]) == expected
    assert set(table["kind"]) == {"objective parameter"}
    live = knob_reference("live knob", widget=False)
    assert list(live["name"]) == list(LIVE_FIELDS) and live["live"].all()
    whole = knob_reference(widget=False)
    n_params = sum(len(OBJECTIVES.meta(o)["params"]) for o in OBJECTIVES.names())
    n_options = sum(len({**ADVANTAGES.meta(a).get("choices", {}), **ADVANTAGES.meta(a).get("numbers", {})})
                    for a in ADVANTAGES.names())
    assert whole.height == len(LIVE_FIELDS) + n_params + n_options + len(PRESETS)


def test_widget_form_is_an_html_table_of_the_same_rows():
    import ipywidgets as W

    w = knob_reference("m2po.", widget=True)
    assert isinstance(w, W.HTML) and w.value.startswith("<table")
    names = [f"m2po.{p.name}" for p in OBJECTIVES.meta("m2po")["params"]]
    assert w.value.count("<tr>") == len(names) + 1  # the header row and one per parameter
    for name in names:
        assert f"<td style='vertical-align:top;padding:2px 6px'>{name}</td>" in w.value


@pytest.mark.parametrize("bad", [3, "", "no-such-knob-anywhere"])
def test_a_bad_filter_is_one_line_naming_it(bad):
    with pytest.raises(WorkbenchError) as e:
        knob_reference(bad, widget=False)
    assert str(e.value).startswith(f"filter={bad!r}") and "\n" not in str(e.value)
