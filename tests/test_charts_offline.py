"""Every chart workbench draws renders with no network (workbench.charts.render): each chart kind is put
through the display path the notebooks use (IPython's display formatter, the live and curve widgets'
JavaScript, the report's show_chart, a saved notebook) and ``network_refs`` of what comes out is empty.
``network_refs`` itself is checked on the outputs that do load from a CDN (Altair's default HTML
renderer, JupyterChart's online module), so an empty answer means something."""

from __future__ import annotations

import base64
import math

import altair as alt
import nbformat
import polars as pl
import pytest
from altair.jupyter.jupyter_chart import load_js_src
from IPython.core.formatters import DisplayFormatter

from workbench.charts.render import RENDERER, VEGA_MIMETYPE, ChartDisplay, mimebundle
from workbench.charts import chart_spec, network_refs, run_chart, save_html
from workbench.errors import WorkbenchError
from workbench.studies.prosperity import ONPOLICY
from workbench.studies.prosperity_report import FIGURES, curve_chart, curve_frame, figures, show_chart
from workbench.ui.curves import CurveExplorer
from workbench.ui.live import LiveCharts

PNG = b"\x89PNG\r\n\x1a\n"
EVENTS = [{"update": 4, "changes": {"staleness": 8}}, {"update": 9, "changes": {"objective": "m2po"}}]


def displayed(obj) -> dict:
    """The mimebundle IPython's ``display(obj)`` (or a cell's last expression) sends to the frontend."""
    data, _ = DisplayFormatter().format(obj)
    return data


def run_metrics(n: int = 16) -> pl.DataFrame:
    return pl.DataFrame({
        "update": list(range(n)), "knob/objective": ["ppo_clip"] * 9 + ["m2po"] * (n - 9),
        "knob/tau": [None] * 9 + [0.04] * (n - 9),
        "eval/accuracy": [0.3 + 0.01 * i if i % 5 == 0 else None for i in range(n)],
        "reward/accuracy": [0.3 + 0.01 * i for i in range(n)],
        "offpolicy/clipfrac": [0.0] * 4 + [0.01 * (i % 3) for i in range(n - 4)],
        "offpolicy/m2": [1e-14] * 4 + [0.01 + 0.001 * i for i in range(n - 4)],
        "offpolicy/ess_token": [1.0 - 1e-14] * 4 + [0.9 - 0.01 * i for i in range(n - 4)],
    })


def sweep_frame() -> pl.DataFrame:
    """A small objective x staleness x seed sweep with every column the report's figures draw."""
    rows = []
    for objective, staleness in ((ONPOLICY, 0), ("ppo_clip", 64), ("m2po", 64)):
        for seed in (0, 1):
            for u in range(20):
                rows.append({"run": f"{objective}-{staleness}-{seed}", "objective": objective, "staleness": staleness,
                             "seed": seed, "update": u, "status": "ok",
                             "eval/accuracy": 0.3 + 0.01 * u + 0.01 * seed if u % 5 == 4 else None,
                             "offpolicy/clipfrac": 0.01 * seed, "offpolicy/masked_frac": 0.001 * u,
                             "offpolicy/truncated_frac": 0.0, "offpolicy/m2": 0.001 * u, "offpolicy/ess_token": 0.9,
                             "loss/entropy": 1.0 - 0.01 * u, "reward/response_len_mean": 5.0 + math.sin(u)})
    return pl.from_dicts(rows, infer_schema_length=None)


def assert_offline_bundle(data: dict) -> None:
    assert set(data) == {VEGA_MIMETYPE, "image/png", "text/plain"}  # no text/html: nothing to load a CDN
    assert base64.b64decode(data["image/png"])[:8] == PNG  # the headless fallback
    assert data[VEGA_MIMETYPE]["$schema"].endswith("/vega/v5.json") and data[VEGA_MIMETYPE]["marks"]
    assert network_refs(data) == []


# ----------------------------------------------------------------------------- the detector
def test_network_refs_finds_what_a_browser_would_fetch():
    html = """<script src="https://cdn.jsdelivr.net/npm/vega@6"></script><link rel="stylesheet" href="//x.org/a.css">
    <a href="https://example.org/docs">docs</a><svg xmlns="http://www.w3.org/2000/svg"></svg>
    <script>import vegaEmbed from "https://esm.sh/vega-embed@7";
    requirejs.config({paths: {"v": "https://unpkg.com/v"}});
    s.src = "https://cdn.example.com/x.js";</script><style>@import url("https://fonts.example.com/f.css");</style>"""
    assert network_refs(html) == ["https://cdn.jsdelivr.net/npm/vega@6", "//x.org/a.css", "https://esm.sh/vega-embed@7",
                                  "https://unpkg.com/v", "https://cdn.example.com/x.js",
                                  "https://fonts.example.com/f.css"]
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"url": "https://x.org/d.csv"},
            "mark": "image", "encoding": {"url": {"value": "http://x.org/i.png"}}}
    assert network_refs({"application/vnd.vegalite.v5+json": spec}) == ["https://x.org/d.csv", "http://x.org/i.png"]
    assert network_refs("<p>see https://vega.github.io/editor/</p>") == []  # text and links are not loads
    with pytest.raises(WorkbenchError, match="output='int' is invalid"):
        network_refs(3)


def test_network_refs_flags_altairs_cdn_renderer_and_online_widget():
    chart = alt.Chart(alt.Data(values=[{"a": 1}])).mark_point().encode(x="a:Q")
    assert alt.renderers.active == RENDERER  # importing workbench.charts replaced Altair's CDN default
    with alt.renderers.enable("default"):
        cdn = displayed(chart)
    assert "text/html" in cdn and "https://cdn.jsdelivr.net/npm/vega@6?noext" in network_refs(cdn)
    assert any(u.startswith("https://esm.sh/vega-embed") for u in network_refs(load_js_src()))


# ----------------------------------------------------------------------------- every chart kind
def test_charts_png_specs_display_and_export_offline(tmp_path):
    spec = chart_spec(run_metrics(), EVENTS, title="run")
    assert_offline_bundle(mimebundle(spec))
    assert_offline_bundle(displayed(ChartDisplay(spec)))
    assert network_refs(save_html(spec, tmp_path / "run.html").read_text()) == []


def test_panel_chart_and_any_altair_chart_display_offline():
    # ControlPanel.chart() returns run_chart(...): displaying it goes through Altair's renderer
    assert_offline_bundle(displayed(run_chart(run_metrics(), "run", EVENTS)))
    assert_offline_bundle(displayed(alt.Chart(alt.Data(values=[{"a": 1}])).mark_point().encode(x="a:Q")))


def test_live_panel_charts_load_their_javascript_offline():
    live = LiveCharts(interactive=True)
    spec = live.render(run_metrics(), EVENTS, title="live")
    assert live.widget.spec == spec and network_refs(live.widget) == []  # the widget's module: vl-convert's bundle
    assert len(live.widget._esm) > 100_000  # inlined vega + vega-lite + vega-embed, not a CDN import
    view = displayed(live.widget)
    assert "application/vnd.jupyter.widget-view+json" in view and network_refs(view) == []
    assert network_refs({"application/vnd.vegalite.v5+json": spec}) == []
    assert_offline_bundle(mimebundle(spec))  # the same spec as a static chart


def test_prosperity_report_figures_display_offline(tmp_path):
    df = sweep_frame()
    charts = figures(df, smooth=2)
    assert set(charts) == {stem for stem, *_ in FIGURES}
    for stem, cols, _, axis, scale in FIGURES:  # y titles say the quantity and its unit, never a raw key
        y = charts[stem].to_dict()["spec"]["layer"][0]["encoding"]["y"]
        assert y["title"] == axis and "/" not in axis.replace("nats^2", "") and "(" in axis, (stem, y["title"])
    drawn = charts["accuracy"].to_dict()["data"]["values"]  # accuracy drawn in %, as its axis says
    logged = curve_frame(df, ("eval/accuracy",), smooth=2).to_dicts()
    assert [r["mean"] for r in drawn] == pytest.approx([100 * r["mean"] for r in logged], rel=1e-12)
    for stem, chart in charts.items():
        shown = show_chart(chart, tmp_path / f"{stem}.png")  # what notebook 05 displays
        assert isinstance(shown, ChartDisplay) and (tmp_path / f"{stem}.png").read_bytes()[:8] == PNG
        data = displayed(shown)
        assert_offline_bundle(data)
        assert base64.b64decode(data["image/png"]) == (tmp_path / f"{stem}.png").read_bytes()
    assert_offline_bundle(displayed(curve_chart(df, "eval/accuracy", "held-out accuracy")))


def test_notebook_03_curves_display_offline():
    ex = CurveExplorer(["ppo_clip", "m2po", "tb"], points=21, headless=False)
    assert ex.widgets["objective"].value == "ppo_clip"
    for name in ("focus", "chart"):
        widget = ex.widgets[name]
        assert network_refs(widget) == [] and network_refs({"application/vnd.vegalite.v5+json": widget.spec}) == []
    assert network_refs(displayed(ex.box)) == []
    assert_offline_bundle(mimebundle(ex.spec()))
    assert_offline_bundle(mimebundle(ex.focus()))


def test_a_saved_notebook_of_these_outputs_loads_nothing(tmp_path):
    spec = chart_spec(run_metrics(), EVENTS)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("show_chart(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data=displayed(ChartDisplay(spec)))]
    nb.cells = [cell]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    saved = nbformat.read(str(path), as_version=4)
    assert network_refs(saved) == []
    with alt.renderers.enable("default"):
        saved.cells[0].outputs.append(nbformat.v4.new_output("display_data", data=displayed(run_chart(run_metrics()))))
    assert "https://cdn.jsdelivr.net/npm/vega@6?noext" in network_refs(saved)  # what the old notebook 05 held
