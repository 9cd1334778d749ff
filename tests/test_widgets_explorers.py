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
