"""MemoryBrowser and TraceExplorer driven programmatically: controls -> core calls -> figures."""

from __future__ import annotations

import html

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


def _frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.hf.named_parameters()}


def test_memory_browser_refuses_out_of_range_layer_and_memory_without_clamping(model):
    saved = _frozen(model)
    app = MemoryBrowser(model, "hello world", layer=1, k=3)
    app.layer.value = 99
    assert "layer 99 is out of range: choose an integer from 0 to 2" in app.prompt_notice.value
    assert app.layer.value == 99 and app.acts is None  # said beside the box, not clamped to 2
    app.layer.value = 1
    assert app.error_text == ""
    app.memory.value = 10_000
    assert "memory 10000 is out of range: choose an integer from 0 to 127" in app.memory_notice.value
    app.memory.value = -1  # not read as "the last memory": said
    assert "memory -1 is out of range" in app.memory_notice.value
    app.find_triggers()
    assert "memory -1 is out of range" in app.triggers_notice.value
    assert all(torch.equal(saved[n], p) for n, p in model.hf.named_parameters())


def test_trace_explorer_checks_every_box_before_tracing(model):
    from kvlens.views.explorers import TraceExplorer

    saved = _frozen(model)
    app = TraceExplorer(model, "{} went to", "Bob", kind="hidden", run=False)
    boxes = [(dict(prompt="  "), "empty prompt", app.inputs_notice),
             (dict(subject=""), "empty subject", app.inputs_notice),
             (dict(prompt="Alice went to"), "is not in the prompt 'Alice went to' and the prompt has no '{}'",
              app.inputs_notice),
             (dict(prompt="{} met {}"), "exactly one '{}'", app.inputs_notice),
             (dict(samples=0), "samples 0 is out of range: choose an integer from 1 to 100", app.run_notice),
             (dict(window=9), "window 9 is out of range: choose an integer from 1 to 3", app.run_notice)]
    for change, message, box in boxes:
        app.prompt.value, app.subject.value, app.samples.value, app.window.value = "{} went to", "Bob", 2, 3
        for name, value in change.items():
            getattr(app, name).value = value
        app.run()
        assert message in html.unescape(box.value), change
        assert app.result is None and len(app.heatmap.data) == 0
    assert all(torch.equal(saved[n], p) for n, p in model.hf.named_parameters())


def test_trace_explorer_says_what_a_typed_target_scores(model):
    from kvlens.views.explorers import TraceExplorer

    app = TraceExplorer(model, "{} went to", "Bob", target="ab", kind="hidden", samples=1, run=False)
    app.run()
    assert app.error_text == "" and app.result is not None
    assert "target scored: ' ab' =" in app.note_text and "whole sequence" in app.note_text
    from kvlens.prompts import continuation_ids

    pieces = model.token_strings(continuation_ids(model, "ab"))  # the continuation rule: ' ab', as traced
    assert " + ".join(repr(p) for p in pieces) in app.note_text and len(app.result.target_ids) == len(pieces)
