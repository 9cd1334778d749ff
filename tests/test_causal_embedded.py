"""Causal tracing on the real embedded model finds ROME's two sites (structure, no hard-coded numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlens.causal import sever, suggest_edit_layers, trace
from kvlens.causal.many import _known, as_fact
from kvlens.prompts import fill
from kvlens.views import trace_figures as tf

DATA = Path(__file__).resolve().parents[1] / "data" / "counterfact_mini.json"


@pytest.fixture(scope="module")
def facts(embedded):
    """Two facts from data/ that the model gets right, from different relations."""
    chosen, relations = [], set()
    for record in json.loads(DATA.read_text()):
        relation = record["requested_rewrite"]["relation_id"]
        prompt, subject, target = as_fact(record)
        if relation not in relations and _known(embedded, fill(prompt, subject), target):
            chosen.append((prompt, subject, target))
            relations.add(relation)
        if len(chosen) == 2:
            return chosen
    pytest.fail("data/counterfact_mini.json has fewer than two facts the embedded model knows")


@pytest.fixture(scope="module")
def traces(embedded, facts):
    return [trace(embedded, p, s, t, kind="all", samples=2, progress=False) for p, s, t in facts]


def test_late_layers_carry_the_last_token_effect(embedded, traces):
    n = embedded.n_layers
    for tr in traces:
        assert tr.total_effect > 0  # corrupting the subject hurts the prediction
        last_row = tr.effect("hidden")[-1]
        assert int(last_row.argmax()) >= n // 2, tr
        # restoring the last layer's state at the last token is the clean run
        assert float(tr.scores["hidden"][-1, -1]) == pytest.approx(tr.high, abs=1e-4)


def test_subject_tokens_carry_an_early_mlp_effect(embedded, traces):
    early = embedded.n_layers // 2
    for tr in traces:
        start, end = tr.subject_range
        mlp = tr.effect("mlp")
        subject_peak = float(mlp[start:end, :early].max())
        assert subject_peak > float(mlp[-1, :early].max()), tr  # early MLPs matter at the subject
        assert subject_peak > 0.2 * tr.total_effect, tr  # a strong share of the total effect
        assert int(mlp[start:end].max(0).values.argmax()) < early


def test_suggested_edit_layers_are_a_range_inside_the_model(embedded, facts, traces):
    prompt, subject, target = facts[0]
    sv = sever(embedded, prompt, subject, target, samples=2, progress=False)
    assert sv.high == pytest.approx(traces[0].high, rel=1e-5)
    layers = suggest_edit_layers(sv)
    assert isinstance(layers, range) and layers.step == 1
    assert 0 <= layers.start < layers.stop <= embedded.n_layers
    fig = tf.severed_chart(sv, layers)
    assert len(fig.data) == 3
    assert len(tf.trace_heatmaps(traces[0]).data) == 3


def test_exact_equals_plain_with_tokens_before_the_subject(embedded):
    """On the real model, with cells before the subject answered without a forward."""
    args = ("The capital of {} is", "France", " Paris")
    exact = trace(embedded, *args, kind="hidden", samples=2, progress=False)
    plain = trace(embedded, *args, kind="hidden", samples=2, mode="plain", per_forward=64, progress=False)
    start = exact.subject_range[0]
    assert start > 0
    assert float((exact.scores["hidden"] - plain.scores["hidden"]).abs().max()) < 1e-5
    assert float(exact.effect("hidden")[:start].abs().max()) == 0.0
    assert float(exact.effect("hidden")[start:].abs().max()) > 0.01
