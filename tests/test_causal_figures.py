"""Plotly views of causal traces: pure functions of results."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
from test_causal import PROMPT, SUBJECT, sharp

from kvlens.causal import sever, trace, trace_many
from kvlens.views import trace_figures as tf


@pytest.fixture(scope="module")
def model():
    return sharp("llama")


def test_heatmaps_mark_subject_tokens_and_name_the_target(model):
    tr = trace(model, PROMPT, SUBJECT, kind="all", noise=1.0, samples=1, window=2, progress=False)
    fig = tf.trace_heatmaps(tr)
    heatmaps = [d for d in fig.data if isinstance(d, go.Heatmap)]
    assert len(heatmaps) == 3
    labels = list(heatmaps[0].y)
    start, end = tr.subject_range
    assert [i for i, label in enumerate(labels) if label.endswith("*")] == list(range(start, end))
    assert repr(tr.target.strip()) in fig.layout.title.text
    assert [h.colorscale[-1][1] for h in heatmaps] != [heatmaps[0].colorscale[-1][1]] * 3  # one palette per kind
    single = tf.trace_heatmap(tr, "mlp")
    assert single.data[0].z.shape == (len(tr.tokens), model.n_layers)
    assert single.data[0].zmin == pytest.approx(tr.low)


def test_estimates_are_labelled_in_figures(model):
    tr = trace(model, PROMPT, SUBJECT, kind="all", noise=1.0, samples=1, window=2, mode="approx", progress=False)
    assert "ESTIMATE" in tf.trace_heatmaps(tr).layout.title.text
    assert "ESTIMATE" in tf.trace_heatmap(tr, "hidden").layout.title.text


def test_severed_chart_shows_three_curves_the_gap_and_the_edit_range(model):
    sv = sever(model, PROMPT, SUBJECT, noise=1.0, samples=1, progress=False)
    fig = tf.severed_chart(sv, edit_layers=range(1, 2))
    assert [d.name for d in fig.data] == ["normal", "mlp severed", "attn severed"]
    assert fig.data[1].fill == "tonexty"  # the gap between normal and MLP-severed is shaded
    assert fig.layout.shapes[0].x0 == 0.5 and fig.layout.shapes[0].x1 == 1.5
    assert list(fig.data[0].y) == pytest.approx(sv.effect("normal").tolist())


def test_average_curves_draw_bands_per_token_group(model):
    facts = [("ab {} xyz", "cd"), ("q {} rs", "efg")]
    summary = trace_many(model, facts, only_correct=False, progress=False, noise=1.0, samples=1, window=2)
    fig = tf.average_curves(summary, "hidden")
    lines = [d for d in fig.data if d.mode == "lines"]
    bands = [d for d in fig.data if d.fill == "toself"]
    assert len(lines) == len(bands) == sum(not summary.mean["hidden"][g].isnan().all() for g in range(6))
    assert str(summary.n_facts) in fig.layout.title.text
    with pytest.raises(KeyError):
        tf.average_curves(summary, "neurons")
