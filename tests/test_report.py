"""Reports take results through the renderer registry and record what produced each section."""

from __future__ import annotations

import re

import plotly.graph_objects as go
import pytest

import kvlens
from kvlens.views.renderers import to_sections
from kvlens.views.report import Report, Section, versions
from tests.conftest import tiny


@pytest.fixture(scope="module")
def acts() -> kvlens.KeyActivations:
    return kvlens.keys(tiny("gpt2"), "hello world", layers=[0, 2])


def test_add_accepts_results_figures_text_and_tables(acts):
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout=dict(title="bars"))
    r = Report("mixed").add(acts, fig, "a plain note", {"title": "Settings", "lr": 0.5}, Section("raw"))
    titles = [s.title for s in r.sections]
    assert titles == ["Key activations at layer 0", "Key activations at layer 2", "bars", "Notes",
                      "Settings", "raw"]
    key_section = r.sections[1]
    assert key_section.params["layer"] == 2 and key_section.params["prompt"] == "hello world"
    assert key_section.table[0]["memory"] == acts.top(2, k=10).memories[0]
    assert r.sections[4].table == [{"name": "lr", "value": 0.5}]
    page = r.to_html()
    assert page.count("plotly.js v") <= 2 and page.count("Plotly.newPlot") == 3
    assert not re.search(r"<script[^>]+src=", page)
    for package, version in versions().items():
        assert f"&quot;{package}&quot;: &quot;{version}&quot;" in page


def test_nested_lists_and_extra_params(acts):
    top = acts.top(0, k=3)
    r = Report("nested").add([top, ["note"]], params={"seed": 7})
    assert [s.params.get("seed") for s in r.sections] == [7, 7]
    assert r.sections[0].params["k"] == 3 and len(r.sections[0].table) == 3
    assert len(r) == 2 and "nested" in r._repr_html_()


def test_unknown_result_type_is_a_clear_error():
    with pytest.raises(TypeError, match="no renderer is registered for it"):
        Report("x").add(object())
    with pytest.raises(TypeError, match="no renderer"):
        to_sections(3.5)


def test_user_text_is_escaped_everywhere():
    evil = "<script>alert(1)</script>"
    fig = go.Figure(go.Bar(x=[evil], y=[1]), layout=dict(title=evil))
    r = Report(evil).add(Section(evil, text=evil, table=[{evil: evil}], params={evil: evil}), fig)
    page = r.to_html()
    assert "<script>alert(1)" not in page
    assert page.count("&lt;script&gt;alert(1)") >= 5


def test_report_with_only_a_figure_section_list(tmp_path):
    r = Report("figs").add(Section("two figures", figure=go.Figure(go.Scatter(y=[1, 2])),
                                   figures=[go.Figure(go.Scatter(y=[3, 1]))]))
    path = r.save(tmp_path / "deep" / "r.html")
    assert path.read_text().count("Plotly.newPlot") == 2
