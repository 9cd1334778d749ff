"""MemoryBrowser and TraceExplorer driven programmatically: controls -> core calls -> figures."""

from __future__ import annotations

import pytest
import torch

from kvlens.memory.vocab import values
from kvlens.views.explorers import MemoryBrowser
from tests.conftest import tiny


@pytest.fixture(scope="module")
def model():
    return tiny("gpt2")


def test_memory_browser_follows_layer_and_memory(model):
    app = MemoryBrowser(model, "hello world", layer=1, k=5)
    assert app.error_text == "" and len(app.strongest.options) == 5
    first = app.strongest.options[0][1]
    assert app.memory.value == first
    expected = values(model, 1, first, k=5)
    shown = list(app.values_fig.data[0].y)
    assert shown[-5:] == [repr(t) for t in reversed(expected.top_tokens[0])]  # promoted tokens, top last
    coef = app.acts.coefficients[1][0, : len(app.acts.tokens[0]), first]
    assert torch.allclose(torch.tensor(app.firing_fig.data[0].y, dtype=torch.float32), coef)
    app.layer.value = 2
    assert app.acts.layers == [2] and "L2.m" in app.firing_fig.layout.title.text
    app.memory.value = 7
    assert app.firing_fig.layout.title.text == "Where L2.m7 fires on the prompt"


def test_memory_browser_shows_errors_inline(model):
    app = MemoryBrowser(model, "hello", layer=0)
    app.prompt.value = "   "
    assert "empty prompt" in app.error_text
    app.prompt.value = "fine again"
    assert app.error_text == ""


def test_memory_browser_mines_trigger_examples(model, tmp_cache):
    app = MemoryBrowser(model, "hello world", layer=0)
    app.max_tokens.value = 2_000
    app.find_triggers()
    assert app.error_text == "" and app.triggers_fig.data[0].type == "table"
    assert f"L0.m{app.memory.value}" in app.triggers_fig.layout.title.text


def test_trace_explorer_draws_heatmaps_and_cell_detail(model):
    from kvlens.views.explorers import TraceExplorer

    app = TraceExplorer(model, "{} went to", "Bob", kind="all", mode="approx")
    assert app.error_text == "" and app.result is not None and app.result.estimate
    assert [t.type for t in app.heatmap.data] == ["heatmap"] * 3
    token, layer = app.result.peak("hidden")
    assert f"token {token}" in app.detail.value and f"layer {layer}" in app.detail.value
    app.select_cell(1, 2)
    hidden_line = app.detail_fig.data[0]
    assert list(hidden_line.y) == pytest.approx(app.result.effect("hidden")[1].tolist())
    app.heatmap.data[0]._dispatch_on_click(_points(app.heatmap.data[0], layer=0, label=app.heatmap.data[0].y[2]), None)
    assert "token 2" in app.detail.value and "layer 0" in app.detail.value
    app.select_cell(99, 0)
    assert "outside the trace" in app.error_text


def test_trace_explorer_reports_bad_subject_inline(model):
    from kvlens.views.explorers import TraceExplorer

    app = TraceExplorer(model, "{} went to", "Bob", kind="hidden", run=False)
    app.subject.value = ""
    app.run()
    assert "empty subject" in app.error_text and app.result is None


def _points(trace, layer: int, label: str):
    from plotly.callbacks import Points

    return Points(point_inds=[[0, layer]], xs=[layer], ys=[label], trace_name=trace.name, trace_index=0)
