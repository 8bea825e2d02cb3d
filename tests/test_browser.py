"""The real thing: JupyterLab on 127.0.0.1 with a token, notebook 02 opened in headless Chromium
(Debian's chromium driven by Playwright; no browser download), Run All, then the staleness slider
dragged and the objective changed *while training runs*. Asserts that each change reaches the loop
(knob_events.jsonl, the metrics' knob columns) and that the chart draws it (the knob rules' SVG
labels), and saves a screenshot to tests/artifacts/. Notebooks 01 and 05 are opened and run under
their CI parameters: every chart output is drawn, by JupyterLab's own Vega (a non-empty SVG or
canvas) or as its PNG (a loaded image of real size), no output shows an error, and nothing was fetched from a CDN (screenshots saved too).

Run with ``bash scripts/test_browser.sh`` (installs chromium and playwright if missing, then
``pytest -m browser``). ~1-2 minutes on 2 cores. Skipped when chromium or playwright is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from workbench.notebook import ci_params, find_notebook, load_params_file, notebooks_dir
from workbench.runs.metrics import read_metrics

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage"]
# notebook 02 shrunk to the tiny model; more updates than the test lasts, so it is changed while it trains
# (the kernel is shut down at the end)
PARAMS = {"tiny": True, "steps": 20000, "prompts_per_step": 4, "group_size": 4, "eval_every": 5, "eval_size": 16,
          "lr": 0.01, "chart_seconds": 0.5, "run_name": "browser"}


RENDERED = ("01", "05")  # opened, run and checked for rendered charts (02: the live test)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"JupyterLab did not answer at {url}")
        time.sleep(0.5)


def _events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_for(cond, timeout: float, what: str):
    t0 = time.monotonic()
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving tmp_path (holding a parametrised copy of notebook 02); yields (url, root)."""
    import papermill as pm

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (scripts/test_browser.sh installs it)")
    pytest.importorskip("playwright.sync_api")
    nb = tmp_path / "02_browser.ipynb"
    pm.execute_notebook(str(find_notebook("02")), str(nb), parameters=PARAMS, prepare_only=True, progress_bar=False)
    for stem in RENDERED:  # 01 and 05 under their CI parameters files, as CI runs them headless
        pm.execute_notebook(str(find_notebook(stem)), str(tmp_path / f"{stem}_browser.ipynb"),
                            parameters=load_params_file(ci_params(stem)), prepare_only=True, progress_bar=False)
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_HEADLESS"}
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / ".runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / ".config"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / ".workspaces"), JUPYTER_PLATFORM_DIRS="1")
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False",
         "--allow-root", "--LabApp.extension_manager=readonly",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         f"--LabApp.workspaces_dir={tmp_path / '.workspaces'}"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/status?token={token}")
        yield f"http://127.0.0.1:{port}", token, tmp_path
    finally:
        proc.send_signal(signal.SIGINT)  # jupyter server shuts its kernels down on SIGINT x2
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _show_chart(page) -> bool:
    """Scroll the panel's end into view (the panel element is stable; the chart's SVG is replaced on
    every refresh, so scrolling the SVG itself can keep failing); True once a chart SVG is there."""
    try:
        page.locator(".workbench-panel").first.evaluate("el => el.scrollIntoView({block: 'end'})")
    except Exception:
        return False
    return page.locator(".workbench-panel svg").count() > 0


def test_notebook_02_in_a_real_browser(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, token, root = lab
    run_dir = root / "runs" / "browser"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / ".chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROME_ARGS,
            viewport={"width": 1500, "height": 1300})
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        try:
            page.goto(f"{url}/lab/tree/02_browser.ipynb?token={token}", timeout=120_000)
            page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=120_000)
            page.wait_for_function("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
                                   " === 'idle'", timeout=120_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")

            # the panel renders, and training starts in the background
            page.wait_for_selector(".workbench-panel", timeout=180_000)
            _wait_for(lambda: run_dir.is_dir() and read_metrics(run_dir).height > 0, 180, "the first update")
            status = page.locator(".workbench-panel code").first
            _wait_for(lambda: "running" in status.inner_text(), 60, "status 'running'")

            # drag the staleness slider (continuous_update=False: the value is sent on release)
            slider = page.locator(".widget-slider:has(label:text-is('staleness s'))").first
            slider.scroll_into_view_if_needed()
            track = slider.locator(".noUi-target").first.bounding_box()
            handle = slider.locator(".noUi-handle").first.bounding_box()
            page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
            page.mouse.down()
            page.mouse.move(track["x"] + track["width"] * 0.125, handle["y"] + handle["height"] / 2, steps=8)
            page.mouse.up()
            readout = int(slider.locator(".widget-readout").first.inner_text().strip())
            assert readout > 0
            ev = _wait_for(lambda: [e for e in _events(run_dir / "knob_events.jsonl")
                                    if e["changes"].get("staleness") == readout], 60, "the staleness change")[0]

            # change the objective from the dropdown, still while training runs
            assert "running" in status.inner_text()
            page.locator(".widget-dropdown:has(label:text-is('objective')) select").first.select_option("m2po")
            ev2 = _wait_for(lambda: [e for e in _events(run_dir / "knob_events.jsonl")
                                     if e["changes"].get("objective") == "m2po"], 60, "the objective change")[0]
            assert ev2["update"] > ev["update"]

            # the loop used them: the knob columns of the metrics from those updates on
            def applied():  # a consistent prefix of the live run's rows
                df = read_metrics(run_dir)
                return [df] if df.height > ev2["update"] + 1 else None
            df = _wait_for(applied, 120, "updates after the changes")[0]
            after = df.filter(pl.col("update") >= ev["update"])
            assert after["knob/staleness"][0] == readout
            assert df.filter(pl.col("update") >= ev2["update"])["knob/objective"].to_list()[0] == "m2po"
            assert df.filter(pl.col("update") < ev["update"])["knob/staleness"].to_list()[-1] == 0

            # and the chart shows them: the knob rules' labels (SVG text) in the live chart. Pause first:
            # while the tiny model trains at tens of updates per second, a loaded machine's browser can
            # take longer to draw a spec of ~1000 rows than the panel takes to send the next one, so the
            # chart on screen lags; paused, the last spec (with both changes) is the one drawn
            page.locator(".workbench-panel button:has-text('Pause')").first.click()
            _wait_for(lambda: "paused" in status.inner_text(), 60, "status 'paused'")
            # scroll the panel, not the SVG: the live chart re-renders (a new SVG element) on every refresh
            _wait_for(lambda: _show_chart(page), 30, "the live chart")
            _wait_for(lambda: page.locator(f"svg text:has-text('staleness={readout}')").count() > 0, 120,
                      "the staleness rule in the chart")
            _wait_for(lambda: page.locator("svg text:has-text('objective=m2po')").count() > 0, 60,
                      "the objective rule in the chart")
            page.screenshot(path=str(ARTIFACTS / "browser_02_live.png"), full_page=True)
            assert "m2po" in status.inner_text()
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "browser_02_failure.png"), full_page=True)
            raise
        finally:
            try:  # stop training before the server goes down
                page.evaluate("window.jupyterapp.commands.execute('kernelmenu:shutdown')")
            except Exception:
                pass
            ctx.close()


def _open_and_run_all(page, url: str, token: str, name: str, timeout_ms: int = 300_000) -> None:
    """Open ``name`` in JupyterLab, Run All, and wait until every code cell has run and the kernel is idle.

    ``?reset`` starts from an empty workspace: without it JupyterLab restores the tabs of the notebook
    opened before (restarting its kernel), and for a moment the restored tab is the current widget, so
    Run All could go to the wrong notebook. Every predicate also names the notebook it expects."""
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}", timeout=120_000)
    widget = "window.jupyterapp.shell.currentWidget"
    ours = f"{widget} && {widget}.context && {widget}.context.path === {json.dumps(name)}"
    page.wait_for_function(f"{ours} && {widget}.sessionContext && {widget}.sessionContext.session"
                           f" && {widget}.sessionContext.session.kernel"
                           f" && {widget}.sessionContext.session.kernel.status === 'idle'", timeout=120_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # an error stops Run All (later cells stay unrun): finish then too, so the test reports the error
    done = (f"{ours} && {widget}.sessionContext.session.kernel.status === 'idle' && ("
            f"{widget}.content.widgets.every(c => c.model.type !== 'code' || "
            f"(c.model.executionCount !== null && !c.hasClass('jp-mod-pending')))"
            f" || document.querySelector('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.error\"]'))")
    page.wait_for_function(done, timeout=timeout_ms, polling=500)


def _chart_report(page) -> dict:
    """What the open notebook shows: its Vega outputs (each with the size of its SVG / canvas), the
    error outputs and the text of every output."""
    return page.evaluate("""() => {
        const charts = [...document.querySelectorAll('.jp-RenderedVegaCommon5')].map(el => {
            const g = el.querySelector('svg, canvas');
            const r = g ? g.getBoundingClientRect() : {width: 0, height: 0};
            let marks = el.querySelectorAll('svg path, svg line, svg rect, svg text').length;
            if (g && g.tagName.toLowerCase() === 'canvas') {  // Vega's default renderer: count inked pixels
                const d = g.getContext('2d').getImageData(0, 0, g.width, g.height).data;
                marks = 0;
                for (let i = 0; i < d.length; i += 4) {
                    if (d[i + 3] > 0 && (d[i] < 240 || d[i + 1] < 240 || d[i + 2] < 240)) marks++;
                }
            }
            return {drawn: !!g, width: r.width, height: r.height, marks};
        });
        const images = [...document.querySelectorAll('.jp-OutputArea-output.jp-RenderedImage img')].map(img =>
            ({drawn: img.complete && img.naturalWidth > 0, width: img.naturalWidth, height: img.naturalHeight}));
        const errors = [...document.querySelectorAll('.jp-OutputArea-output')].filter(el =>
            el.getAttribute('data-mime-type') === 'application/vnd.jupyter.error').length;
        const text = [...document.querySelectorAll('.jp-OutputArea-output')].map(el => el.innerText).join('\\n');
        return {charts, images, errors, text};
    }""")


def test_notebooks_01_and_05_draw_every_chart_in_a_real_browser(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, token, root = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / ".chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROME_ARGS,
            viewport={"width": 1500, "height": 1300})
        requests: list[str] = []
        ctx.on("request", lambda r: requests.append(r.url))
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        try:
            for stem in RENDERED:
                name = f"{stem}_browser.ipynb"
                _open_and_run_all(page, url, token, name)
                report = _chart_report(page)
                page.screenshot(path=str(ARTIFACTS / f"browser_{stem}.png"), full_page=True)
                assert report["errors"] == 0, (stem, report["text"][-2000:])
                for bad in ("Error loading script", "Traceback", "Javascript Error", "cdn.jsdelivr"):
                    assert bad not in report["text"], (stem, bad)
                executed = page.evaluate("window.jupyterapp.shell.currentWidget.content.model.toJSON()")
                datas = [o.get("data") or {} for c in executed["cells"] for o in (c.get("outputs") or [])]
                vega = sum("application/vnd.vega.v5+json" in d for d in datas)  # drawn by JupyterLab's Vega
                png = sum("image/png" in d and "application/vnd.vega.v5+json" not in d for d in datas)  # as images
                assert vega + png >= 1, stem
                assert (len(report["charts"]), len(report["images"])) == (vega, png), (stem, report, vega, png)
                for chart in report["charts"] + report["images"]:  # every chart drawn, and of a real size
                    assert chart["drawn"] and chart["width"] > 50 and chart["height"] > 50, (stem, chart)
                # not blank: SVG marks, or non-white canvas pixels (axes, lines, text)
                assert all(chart["marks"] > 100 for chart in report["charts"]), (stem, report["charts"])
                page.evaluate("window.jupyterapp.commands.execute('kernelmenu:shutdown')")
            external = [u for u in requests if not u.startswith(url)]
            assert external == [], external[:5]  # offline: nothing but the local server was asked for
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "browser_rendered_failure.png"), full_page=True)
            raise
        finally:
            ctx.close()
