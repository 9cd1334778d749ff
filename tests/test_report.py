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
    assert titles == ["Inspect: key activations at layer 0", "Inspect: key activations at layer 2", "bars", "Notes",
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


def test_memory_results_render_with_their_parameters(embedded):
    from kvlens.memory.intervene import intervene
    from kvlens.memory.lens import logit_lens
    from kvlens.memory.vocab import find_memories, values

    proj = values(embedded, 20, [5, 6, 7, 8, 9], k=5)
    found = find_memories(embedded, " Paris", layers=[20, 25], k=4)
    lens = logit_lens(embedded, "The Eiffel Tower is located in the city of", layers=[5, 15, 25])
    iv = intervene(embedded, "The Eiffel Tower is located in the city of",
                   {(f.layer, f.memory): 0.0 for f in found.found}, target=" Paris")
    r = Report("memories").add(proj, found, lens, iv)
    titles = [s.title for s in r.sections]
    assert titles[:2] == ["Inspect: values of layer 20 in vocabulary space",
                          "Inspect: memories whose value writes ' Paris'"]
    assert titles[2].startswith("Inspect: logit lens") and titles[3] == "Inspect: intervention on memories"
    assert len(r.sections[0].all_figures()) == 4 and len(r.sections[0].table) == 5
    assert r.sections[0].params["memories"] == [5, 6, 7, 8, 9] and r.sections[1].params["layers"] == [20, 25]
    assert [row["memory"] for row in r.sections[1].table] == [f.memory for f in found.found]
    assert f"{iv.after.top!r}" in r.sections[3].text and r.sections[3].table[0]["after"] == iv.after.tokens[0]
    assert r.to_html().count("Plotly.newPlot") == 6


def test_edit_results_render(tmp_path):
    import warnings

    from kvlens.datasets import EvalCase
    from kvlens.editing import EditHistory, ValueFT
    from kvlens.editing.request import EditRequest
    from kvlens.evaluate import evaluate

    model = tiny("llama")
    case = EvalCase(0, "{} lives in", "Bob", " Rome", " Oslo", paraphrase_prompts=("Bob resides in",),
                    neighborhood_prompts=("Carol lives in",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = ValueFT(layers=(1,), lr=0.05, steps=5, norm_constraint=None).compute(
            model, [EditRequest(case.prompt, case.subject, case.target_new, case.target_true)])
    scores = evaluate(model, [case], delta, method="FT values")
    history = EditHistory(model)
    history.push(delta)
    history.undo()
    r = Report("edits").add(delta, scores, history)
    assert "not applied to the model now" in r.sections[0].text
    with delta.applied(model):
        assert "It is applied to the model now" in Report("applied").add(delta).sections[0].text
    titles = [s.title for s in r.sections]
    assert titles == ["Edit: ft (value weights)", "Edit: ft (value), target probability on each edited prompt",
                      "Edit: ft (value), optimisation", "Evaluate: FT values", "Edit: sequential edits, weight norms"]
    assert r.sections[0].table == [{"layer": 1, "role": "value", "rank": "dense",
                                    "norm": delta.parts[(1, "value")].norm()}]
    assert r.sections[0].params["fingerprints"] == {"1.value": delta.base[(1, "value")]}
    assert {row["metric"] for row in r.sections[3].table} >= {"ES", "PS", "NS"}
    assert len(r.sections[4].table) == 3  # norms before, after the push, after the undo
    page = r.save(tmp_path / "edits.html").read_text()
    assert page.count("Plotly.newPlot") == 4 and "&quot;1.value&quot;" in page


def test_causal_trace_renders_with_its_parameters():
    from kvlens.causal import trace

    tr = trace(tiny("llama"), "{} went to", "Bob", kind="all", mode="approx", window=2, progress=False)
    (section,) = Report("t").add(tr).sections
    assert section.title == "Locate: causal trace of 'Bob'" and "estimate" in section.text
    assert section.params["mode"] == "approx" and section.params["kinds"] == ["hidden", "mlp", "attn"]
    assert [row["kind"] for row in section.table] == ["hidden", "mlp", "attn"]
    token, layer = tr.peak("mlp")
    assert section.table[1]["layer"] == layer
    assert section.table[1]["indirect effect"] == float(tr.effect("mlp")[token, layer])
