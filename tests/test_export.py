"""kvlens.views.export without a kernel or a browser: what the exported page will carry.

The browser test (tests/test_browser.py) opens real exports; these check the notebook rewriting.
"""

from __future__ import annotations

import json

import nbformat
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from kvlens.views import export


def figure_widget_entry(data: list, layout: dict) -> dict:
    return {"model_name": "AnyModel", "model_module": "anywidget", "model_module_version": "~0.9.*",
            "state": {"_esm": "x" * 1000, "_widget_data": data, "_widget_layout": layout, "_config": {},
                      "_py2js_addTraces": {"trace_data": [{"y": [1]}]}, "_js2py_restyle": None},
            "buffers": [{"path": ["_py2js_addTraces", "trace_data", 0, "y"], "encoding": "base64", "data": "AA=="},
                        {"path": ["_config", "x"], "encoding": "base64", "data": "AA=="}]}


def notebook_with(state: dict, outputs: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=outputs)])
    nb.metadata["widgets"] = {export.WIDGET_STATE: {"version_major": 2, "version_minor": 0, "state": state}}
    return nb


def test_figure_widgets_get_the_kernels_figure_and_a_small_module():
    live = json.loads(pio.to_json(go.Figure(go.Bar(y=[3, 1]), layout=dict(title="after Next")), validate=False))
    state = {"a": figure_widget_entry([], {}), "b": figure_widget_entry([{"type": "scatter", "y": [1, 2]}], {}),
             "c": {"model_name": "HTMLModel", "model_module": "@jupyter-widgets/controls", "state": {"value": "hi"}}}
    nb = notebook_with(state, [])
    assert export.freeze_figure_widgets(nb, {"a": live}) == 2
    state = nb.metadata["widgets"][export.WIDGET_STATE]["state"]
    a, b = state["a"]["state"], state["b"]["state"]
    assert a["_widget_data"] == live["data"] and a["_widget_layout"]["title"]["text"] == "after Next"
    assert b["_widget_data"] == [{"type": "scatter", "y": [1, 2]}]  # no live figure: the saved one
    assert a["_esm"] == b["_esm"] == export.STATIC_FIGURE_ESM and len(a["_esm"]) < 1000
    assert a["_py2js_addTraces"] is None  # a stale update message would redraw the old figure
    assert [buf["path"][0] for buf in state["a"]["buffers"]] == ["_config"]
    assert state["c"]["state"] == {"value": "hi"}


def test_plotly_json_outputs_get_html_and_plotlyjs_copies_are_dropped():
    fig = go.Figure(go.Bar(y=[1, 2]))
    bundle = "<script type='text/javascript'>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>" \
             "<script>/** plotly.js v3 */" + "x" * 1_100_000 + "</script>"
    outputs = [nbformat.v4.new_output("display_data", data={"text/html": bundle}),
               nbformat.v4.new_output("display_data", data={export.PLOTLY_MIME: fig.to_plotly_json(),
                                                            "text/plain": "Figure"}),
               nbformat.v4.new_output("stream", name="stdout", text="kept\n")]
    nb = notebook_with({}, outputs)
    assert export.render_static_figures(nb) == 1
    kept = nb.cells[0].outputs
    assert len(kept) == 2 and kept[1]["text"] == "kept\n"
    html = kept[0]["data"]["text/html"]
    assert "Plotly.newPlot" in html and "plotly.js v" not in html  # drawn with the page's one plotly.js


def test_scripts_that_cannot_be_inlined_fall_back_to_a_data_url(tmp_path):
    ok, bad = tmp_path / "ok.js", tmp_path / "bad.js"
    ok.write_text("define('x', [], () => 1);")
    bad.write_text("var s = '</SCRIPT>';")
    assert export.inline_script(ok) == "define('x', [], () => 1);" and export.inline_script(bad) == ""


def test_missing_notebook_and_widget_js_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="npm install"):
        export.export_notebook(tmp_path / "x.ipynb", tmp_path / "x.html", js_dir=tmp_path)
    js = tmp_path / "js" / "node_modules"
    for rel in (export.REQUIRE_JS, export.EMBED_AMD):
        (js / rel).parent.mkdir(parents=True, exist_ok=True)
        (js / rel).write_text("//")
    with pytest.raises(FileNotFoundError, match="no notebook at"):
        export.export_notebook(tmp_path / "x.ipynb", tmp_path / "x.html", js_dir=tmp_path / "js")
