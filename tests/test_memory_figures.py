"""Memory figures are pure functions of results and show the numbers of those results."""

from __future__ import annotations

import html

import plotly.graph_objects as go
import pytest

from kvlens import corpus as kc
from kvlens.memory import activations, contrib, lens, triggers, vocab
from kvlens.views import figures
from tests.conftest import tiny


@pytest.fixture(scope="module")
def m():
    return tiny("gpt2", seed=1)


@pytest.fixture(scope="module")
def acts(m):
    return activations.keys(m, ["hello world", "abc"])


def test_key_heatmaps(acts):
    fig = figures.key_activation_heatmap(acts, 1, prompt=0, k=5)
    assert fig.data[0].z.shape == (5, len("hello world"))
    top = figures.top_memories_heatmap(acts, prompt=1, k=4)
    assert list(top.data[0].y) == ["L0", "L1", "L2"]
    assert list(top.data[0].text[2]) == [f"m{i}" for i in acts.top(2, 4, prompt=1).memories]
    activity = figures.key_activity_heatmap(acts, prompt=1)
    assert activity.data[0].z[0][1] == pytest.approx(float(acts.at(0, 1, 1).abs().max()))
    with pytest.raises(ValueError, match="k must be positive"):
        figures.key_activation_heatmap(acts, 1, k=0)
    with pytest.raises(KeyError, match="not captured"):
        figures.key_activation_heatmap(acts, 7)


def test_value_figures(m):
    proj = vocab.values(m, 0, [1, 2], k=3)
    bars = figures.value_token_bars(proj, 2)
    assert len(bars.data[0].x) == 6 and max(bars.data[0].x) == pytest.approx(float(proj.top_scores[1, 0]))
    table = figures.value_token_table(proj)
    assert isinstance(table.data[0], go.Table) and list(table.data[0].cells.values[1]) == ["1", "2"]
    found = figures.found_memories_bars(vocab.find_memories(m, 7, k=4))
    assert len(found.data[0].x) == 4


def test_contribution_waterfall_ends_at_the_logit(m):
    c = contrib.contributions(m, "hello world", 9, norm="frozen")
    fig = figures.contribution_waterfall(c, k=5)
    bars = list(fig.data[0].y[:-1])
    assert sum(bars) == pytest.approx(c.logit, rel=1e-5, abs=1e-6) and fig.data[0].x[-1] == "logit"
    raw = contrib.contributions(m, "hello world", 9, norm="none")
    fig = figures.contribution_waterfall(raw, k=5)
    assert sum(fig.data[0].y[:-1]) == pytest.approx(sum(raw.ffn.values()), rel=1e-5, abs=1e-6)


def test_logit_lens_grid_and_composition(m):
    ll = lens.logit_lens(m, ["hello world"], k=2)
    fig = figures.logit_lens_grid(ll)
    last_row = list(fig.data[0].text[-1])
    assert last_row[-1] == html.escape(repr(ll.vocab[int(ll.final_ids[0][-1])]))
    with pytest.raises(IndexError):
        figures.logit_lens_grid(ll, prompt=3)
    comp = lens.composition(m, ["hello world", "abc"], k=2)
    lines = figures.composition_lines(comp)
    expected = [r["residual_predicts_final"] for r in comp.stats()]
    assert len(lines.data) == 4 and list(lines.data[1].y) == expected


def test_trigger_table_highlights_the_token(m, tmp_path):
    (tmp_path / "t.txt").write_text("some text <with> markup & more text to mine")
    res = triggers.trigger_examples(m, (1, 3), kc.from_files(tmp_path), n=3, window=16, cache=False,
                                    progress=False)
    fig = figures.trigger_table(res, (1, 3), context=10)
    cells = fig.data[0].cells.values
    assert list(cells[0]) == [1, 2, 3] and all("<b>[" in t for t in cells[2])
    assert "<with>" not in "".join(cells[2])  # corpus text is escaped


def test_value_bars_give_distinct_tokens_distinct_rows():
    import torch

    # two byte pieces that both decode to '�' (one promoted, one suppressed), and a plain token
    proj = vocab.VocabProjection("m", 0, [5], "none", torch.tensor([[7, 8]]), torch.tensor([[2.0, 1.0]]),
                                 [["\ufffd", " Paris"]], torch.tensor([[9, 3]]), torch.tensor([[-2.0, -1.0]]),
                                 [["\ufffd", " Rome"]])
    fig = figures.value_token_bars(proj, 5)
    rows = list(fig.data[0].y)
    assert len(set(rows)) == 4 and "' Paris'" in rows and "'\ufffd' (id 7)" in rows and "'\ufffd' (id 9)" in rows
    shown = figures.value_token_bars(proj, 5, pieces={7: "<0xE2>", 9: "<0x80>"})
    assert "'<0xE2>' (id 7)" in shown.data[0].y and "'<0x80>' (id 9)" in shown.data[0].y  # bytes, by their piece
    assert fig.layout.yaxis.type == "category" and list(fig.data[0].customdata) == [3, 9, 8, 7]
