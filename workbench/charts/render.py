"""Rendering a chart with no network: PNG and self-contained HTML files, the bundle a notebook
displays, and ``network_refs``, the check that an output loads nothing from the network.

Files: ``save_png`` / ``save_html`` compile and render through vl-convert (Vega-Lite and Vega in
an embedded JavaScript engine; external URLs refused; HTML inlines the JavaScript bundle).

Notebooks: Altair's default renderer writes HTML that loads vega, vega-lite and vega-embed from
a CDN (``Error loading script: https://cdn.jsdelivr.net/npm/vega@6`` offline). ``mimebundle`` is
what a cell displays instead, built here with no network:

- ``application/vnd.vega.v5+json``: the chart compiled to Vega by vl-convert (the compiler that
  draws the PNGs), which JupyterLab, Notebook 7 and VS Code render with the Vega they ship;
- ``image/png``: the same chart rendered by vl-convert, for every frontend without a Vega renderer
  (papermill and nbconvert outputs, GitHub's notebook view);
- ``text/plain``.

``ChartDisplay`` wraps a chart with that bundle (the prosperity report's ``show_chart`` returns one).
Importing this module also registers the bundle as Altair's ``workbench`` renderer and enables it in
place of Altair's CDN-loading default, so any Altair chart a notebook displays (``run_chart``,
``ControlPanel.chart()``) renders offline; a renderer the user enabled is left alone.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import altair as alt
import vl_convert as vlc

from workbench.errors import WorkbenchError, bad_value
from workbench.runs.files import atomic_write_bytes

VEGA_MIMETYPE = "application/vnd.vega.v5+json"  # what JupyterLab 4 / Notebook 7 / VS Code render natively
VEGA_SCHEMA = "https://vega.github.io/schema/vega/v5.json"  # that renderer's Vega major (the spec is compatible)
RENDERER = "workbench"


def spec_and_version(chart: alt.TopLevelMixin | dict[str, Any]) -> tuple[dict, str | None]:
    """The Vega-Lite dict of an Altair chart or a dict, and the vl-convert version to compile it with."""
    if isinstance(chart, dict):
        spec = chart
    elif isinstance(chart, alt.TopLevelMixin):
        spec = chart.to_dict(validate=False)
    else:
        raise bad_value("chart", type(chart).__name__, "an Altair chart or a Vega-Lite dict (e.g. from run_chart)")
    version = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return spec, version if version in vlc.get_vegalite_versions() else None


def png_bytes(chart: alt.TopLevelMixin | dict[str, Any], scale: float = 1.0) -> bytes:
    """A chart (Altair or a Vega-Lite dict) rendered to PNG offline (external URLs refused)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise bad_value("scale", scale, "a positive number")
    spec, version = spec_and_version(chart)
    return vlc.vegalite_to_png(spec, vl_version=version, scale=float(scale), allowed_base_urls=[])


def save_png(chart: alt.TopLevelMixin | dict[str, Any], path: str | Path, scale: float = 1.0) -> Path:
    """Render a chart (Altair or a Vega-Lite dict) to a PNG file offline (external URLs refused)."""
    png = png_bytes(chart, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, png)  # temp + rename, the umask's mode like every run file


def save_html(chart: alt.TopLevelMixin | dict[str, Any], path: str | Path) -> Path:
    """Write a self-contained HTML page (Vega, Vega-Lite and vega-embed inlined; no CDN): the
    tooltips work offline."""
    spec, version = spec_and_version(chart)
    html = vlc.vegalite_to_html(spec, vl_version=version, bundle=True)
    if network_refs(html):  # guard against a vl-convert behaviour change
        raise WorkbenchError(f"save_html: vl-convert's page loads {network_refs(html)[0]} despite bundle=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, html.encode("utf-8"))


def mimebundle(chart: alt.TopLevelMixin | dict[str, Any], png: bytes | None = None) -> dict[str, Any]:
    """The display bundle of a chart (module doc): compiled Vega, PNG (``png`` if given), text."""
    spec, version = spec_and_version(chart)
    vega = {**vlc.vegalite_to_vega(spec, vl_version=version), "$schema": VEGA_SCHEMA}
    png = png if png is not None else vlc.vegalite_to_png(spec, vl_version=version, allowed_base_urls=[])
    title = spec.get("title")
    text = title.get("text", "") if isinstance(title, dict) else title or ""
    return {VEGA_MIMETYPE: vega, "image/png": base64.b64encode(png).decode("ascii"),
            "text/plain": f"<chart{': ' + str(text) if text else ''}>"}


class ChartDisplay:
    """A chart a notebook cell displays offline (``mimebundle``); ``spec`` is its Vega-Lite dict."""

    def __init__(self, chart: alt.TopLevelMixin | dict[str, Any], png: bytes | None = None):
        self.spec, _ = spec_and_version(chart)
        self._png = png

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return mimebundle(self.spec, self._png)


def _altair_renderer(spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return mimebundle(spec)


def enable_offline_display() -> None:
    """Register the ``workbench`` Altair renderer; enable it unless the user chose a renderer."""
    if RENDERER not in alt.renderers.names():
        alt.renderers.register(RENDERER, _altair_renderer)
    if alt.renderers.active == "default":
        alt.renderers.enable(RENDERER)


# ----------------------------------------------------------------------------- network_refs
_URL = r"""(?:https?:)?//[^\s"'<>()`\\]+"""
_LOADS = [  # the contexts in which a browser fetches a URL: elements, JS module/AMD loaders, CSS
    re.compile(r"""<(?:script|link|img|iframe|source|embed|object|audio|video|track)\b[^>]*?"""
               rf"""\b(?:src|href|data|srcset)\s*=\s*["']?({_URL})""", re.IGNORECASE),
    re.compile(rf"""\bimport\s*(?:[\w*{{}}\s,$]+?\s*from\s*)?\(?\s*["']({_URL})["']"""),
    re.compile(rf"""\bexport\s+[^;"']*?\bfrom\s*["']({_URL})["']"""),
    re.compile(rf"""\brequire(?:js)?\s*\(\s*\[?\s*["']({_URL})["']"""),
    re.compile(rf"""\.src\s*=\s*["']({_URL})["']"""),
    re.compile(rf"""\b(?:fetch|loadScript|importScripts)\s*\(\s*["']({_URL})["']"""),
    re.compile(rf"""@import\s+(?:url\()?\s*["']?({_URL})""", re.IGNORECASE),
    re.compile(rf"""\burl\(\s*["']?({_URL})""", re.IGNORECASE),
]
_PATHS = re.compile(r"""\bpaths\s*[:=]\s*\{([^{}]*)\}""")  # requirejs.config({paths}) / a loader's table
_TEXT_TYPES = ("text/html", "application/javascript", "text/javascript", "image/svg+xml")


def _text_refs(text: str) -> list[str]:
    """The loaded URLs of HTML / JavaScript / CSS text in document order (one per occurrence)."""
    found = {m.start(1): m.group(1) for rx in _LOADS for m in rx.finditer(text)}
    found.update({m.start(1) + u.start(): u.group() for m in _PATHS.finditer(text)
                  for u in re.finditer(_URL, m.group(1))})
    return [found[k] for k in sorted(found)]


def _spec_refs(obj: Any) -> list[str]:
    """URLs a Vega / Vega-Lite spec loads: ``url`` properties (data sources, image marks)."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            value = v.get("value") if k == "url" and isinstance(v, dict) else v if k == "url" else None
            if isinstance(value, str) and re.fullmatch(_URL, value):  # {"url": URL} or {"url": {"value": URL}}
                out.append(value)
            else:
                out += _spec_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _spec_refs(v)
    return out


def _bundle_refs(data: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for mime, value in data.items():
        text = "".join(value) if isinstance(value, list) and all(isinstance(x, str) for x in value) else value
        if mime in _TEXT_TYPES and isinstance(text, str):
            out += _text_refs(text)
        elif "vega" in mime:
            out += _spec_refs(json_value(text))
    return out


def json_value(value: Any) -> Any:
    """A mimebundle entry as JSON (nbformat may store it as a string)."""
    return json.loads(value) if isinstance(value, str) else value


def network_refs(output: Any) -> list[str]:
    """Every URL a browser would fetch to render ``output``, in order (empty: it renders offline).

    ``output``: HTML or JavaScript text; a mimebundle ({mimetype: data}); a notebook output
    ({"output_type", "data"}); a notebook (cells' outputs and the saved widget state's ``_esm``
    modules); a widget (its ``_esm``); anything with ``_repr_mimebundle_``; or a list of these.
    Counted: script/link/img/iframe sources, JavaScript imports and AMD paths, CSS imports, and the
    ``url`` properties of Vega / Vega-Lite specs. Not counted: links a reader may click, XML
    namespaces and ``$schema`` identifiers, which nothing fetches.
    """
    if isinstance(output, str):
        return _text_refs(output)
    if isinstance(output, (list, tuple)):
        return [u for x in output for u in network_refs(x)]
    if isinstance(output, dict):
        if "cells" in output:  # a notebook
            refs = [u for c in output["cells"] for o in c.get("outputs", []) for u in network_refs(o)]
            state = output.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
            for model in state.get("state", {}).values():
                refs += _text_refs(str(model.get("state", {}).get("_esm", "")))
            return refs
        if "output_type" in output:
            return _bundle_refs(output.get("data", {}))
        return _bundle_refs(output)
    if isinstance(getattr(output, "_esm", None), str):
        return _text_refs(output._esm)
    if hasattr(output, "_repr_mimebundle_"):
        bundle = output._repr_mimebundle_()
        return _bundle_refs(bundle[0] if isinstance(bundle, tuple) else bundle)
    raise bad_value("output", type(output).__name__, "HTML text, a mimebundle, a notebook (output) or a widget")


enable_offline_display()

__all__ = ["RENDERER", "VEGA_MIMETYPE", "ChartDisplay", "enable_offline_display", "mimebundle", "network_refs",
           "png_bytes", "save_html", "save_png", "spec_and_version"]
