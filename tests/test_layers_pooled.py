"""Layer choice that holds across facts: severed paths pooled over facts, with a bootstrap interval."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny

import kvlens as kv
from kvlens.causal.severed import LayerChoice, SeveredTrace, pool_edit_layers, suggest_edit_layers


def _trace(subject: str, gap: list[float]) -> SeveredTrace:
    """A severed trace whose normal − MLP-severed gap is ``gap`` (normal curve 1 everywhere)."""
    normal = torch.ones(len(gap), dtype=torch.float64)
    mlp = normal - torch.tensor(gap, dtype=torch.float64)
    return SeveredTrace("{} is", subject, 1, subject, " x", {"normal": normal, "mlp_severed": mlp,
                                                            "attn_severed": normal.clone()}, 1.0, 0.0)


def _facts(n_early: int, n_late: int) -> list[SeveredTrace]:
    """Facts whose gap falls over layers 1-2 (early) or 5-6 (late), of an 8-layer model."""
    early = [0.0, 0.8, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0]
    late = [0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.0, 0.0]
    return [_trace(f"e{i}", early) for i in range(n_early)] + [_trace(f"l{i}", late) for i in range(n_late)]


def test_pooled_range_is_the_rule_on_all_facts_and_keeps_each_facts_range():
    facts = _facts(3, 7)
    choice = pool_edit_layers(facts, n_boot=300, seed=1)
    assert isinstance(choice, LayerChoice)
    assert choice.layers == suggest_edit_layers(facts)
    assert choice.per_fact == [suggest_edit_layers(f) for f in facts]
    assert {r for r in choice.per_fact} == {range(2, 4), range(5, 7)}  # the two kinds of fact disagree
    assert choice.start_ci[0] <= choice.layers.start <= choice.start_ci[1]
    assert choice.stop_ci[0] <= choice.last <= choice.stop_ci[1]
    assert len(choice.boot_ranges) == 300 and 0 < choice.agreement <= 1
    assert choice.per_fact_contribution.shape == (10, 8)
    assert "pooled over 10 facts" in str(choice)
    # one layer (ROME's choice): the pooled contribution's peak, inside its bootstrap interval
    assert choice.peak == int(choice.contribution.argmax()) and choice.peak_ci[0] <= choice.peak <= choice.peak_ci[1]
    assert f"one layer: {choice.peak}" in str(choice)


def test_identical_facts_give_a_certain_range_and_mixed_facts_a_wider_interval():
    same = pool_edit_layers(_facts(0, 6), n_boot=200)
    assert same.agreement == 1.0 and same.start_ci == (same.layers.start,) * 2
    assert same.peak == 6 and same.peak_ci == (6.0, 6.0)  # the late facts' gap falls most at MLP 6
    mixed = pool_edit_layers(_facts(5, 5), n_boot=400, seed=0)
    assert mixed.agreement < 1.0
    assert mixed.start_ci[1] - mixed.start_ci[0] + mixed.stop_ci[1] - mixed.stop_ci[0] > 0


def test_fixed_size_and_seeded_bootstrap():
    a = pool_edit_layers(_facts(4, 6), size=2, n_boot=100, seed=3)
    b = pool_edit_layers(_facts(4, 6), size=2, n_boot=100, seed=3)
    assert len(a.layers) == 2 and all(len(r) == 2 for r in a.per_fact + a.boot_ranges)
    assert a.boot_ranges == b.boot_ranges


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least two facts"):
        pool_edit_layers(_facts(1, 0))
    with pytest.raises(ValueError, match="n_boot"):
        pool_edit_layers(_facts(2, 0), n_boot=0)
    with pytest.raises(ValueError, match="different layer counts"):
        pool_edit_layers([_trace("a", [0.0, 1.0, 0.0]), _trace("b", [0.0, 1.0])])
    with pytest.raises(ValueError, match="size must be between"):
        pool_edit_layers(_facts(2, 0), size=9)
    with pytest.raises(ValueError, match="share"):
        pool_edit_layers(_facts(2, 0), share=0)
    flat = [_trace("a", [0.0] * 4), _trace("b", [0.0] * 4)]
    with pytest.warns(UserWarning, match="no MLP range stands out"):
        pool_edit_layers(flat, n_boot=10)


def test_choose_edit_layers_on_a_tiny_model_and_its_figure_and_section():
    model = tiny("llama")
    facts = [("{} is in", "ab", None), ("{} lives in", "cd", None), ("{} works at", "efg", None)]
    choice = kv.choose_edit_layers(model, facts, samples=2, only_correct=False, n_boot=50, progress=False)
    sev = [kv.sever(model, p, s, t, samples=2, progress=False) for p, s, t in facts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert choice.layers == suggest_edit_layers(sev)
    assert choice.n_facts == 3 and choice.subjects == ["ab", "cd", "efg"]
    assert all(0 <= r.start < r.stop <= model.n_layers for r in choice.per_fact)
    with pytest.raises(ValueError, match="at least two"):
        kv.choose_edit_layers(model, facts[:1], only_correct=False, progress=False)

    from kvlens.views.renderers import to_sections
    from kvlens.views.trace_figures import layer_choice_chart

    fig = layer_choice_chart(choice)
    segments = [t for t in fig.data if t.legendgroup == "facts"]
    assert len(segments) == 3
    assert ({(round(t.x[0] + 0.4), round(t.x[1] + 0.6)) for t in segments}
            == {(r.start, r.stop) for r in choice.per_fact})
    (section,) = to_sections(choice)
    assert section.params["layers"] == [choice.layers.start, choice.last]
    assert section.params["peak"] == choice.peak
    (peak,) = [t for t in fig.data if t.type == "scatter" and t.marker.symbol == "diamond"]
    assert list(peak.x) == [choice.peak] and peak.error_x.arrayminus[0] == choice.peak - choice.peak_ci[0]


def test_summary_edit_layers_needs_severed_paths():
    model = tiny("gpt2")
    facts = [("{} is in", "ab", None), ("{} lives in", "cd", None)]
    summary = kv.trace_many(model, facts, kind="mlp", only_correct=False, samples=2, window=1, sever_paths=True,
                             progress=False)
    choice = summary.edit_layers(n_boot=20)
    assert choice.per_fact == [suggest_edit_layers(s) for s in summary.severed]
    plain = kv.trace_many(model, facts, kind="mlp", only_correct=False, samples=2, window=1, progress=False)
    with pytest.raises(ValueError, match="sever_paths=True"):
        plain.edit_layers()


def test_embedded_pooled_layers_over_a_few_facts(embedded):
    """On the real model: four bundled facts the model knows, pooled; each fact keeps its own range."""
    cases = kv.load_bundled()
    facts = [(c.prompt, c.subject, c.target_true) for c in cases[::60][:4]]
    choice = kv.choose_edit_layers(embedded, facts, samples=3, n_boot=200, progress=False)
    assert choice.n_facts + choice.params["skipped"] == 4 and choice.n_facts >= 2
    assert 0 <= choice.layers.start <= choice.last < embedded.n_layers
    assert choice.start_ci[0] <= choice.layers.start <= choice.start_ci[1]
    assert float(choice.contribution.sum()) > 0  # the MLP path matters for facts the model knows
    assert choice.peak_ci[0] <= choice.peak <= choice.peak_ci[1] and choice.contribution[choice.peak] > 0
