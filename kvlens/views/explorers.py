"""``MemoryBrowser`` and ``TraceExplorer``: controls wired to the inspect and locate verbs.

``MemoryBrowser``: a prompt, a layer and a memory (chosen among the strongest at the prompt's
last token, or typed) -> the tokens its value promotes and suppresses, where its key fires on
the prompt, and, on demand, the corpus prefixes that make it fire most (trigger examples).

``TraceExplorer``: prompt / subject / target / kind / mode -> causal-trace heatmap; clicking a
cell (or setting ``cell``) shows that cell's detail: the effect along the layers at its token
and along the tokens at its layer, for every traced kind.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from kvlens.corpus import Corpus
from kvlens.memory.activations import KeyActivations, keys
from kvlens.memory.triggers import trigger_examples
from kvlens.memory.vocab import values
from kvlens.models.kvmodel import KVModel
from kvlens.views import figures
from kvlens.views.widgets import App, figure_widget, show_figure


def memory_firing_bars(acts: KeyActivations, layer: int, memory: int, prompt: int = 0) -> go.Figure:
    """The coefficient of one memory at every token of a prompt (where its key fires)."""
    coef = acts.coefficients[layer][prompt, : len(acts.tokens[prompt]), memory].tolist()
    labels = [f"{i}:{t!r}" for i, t in enumerate(acts.tokens[prompt])]
    fig = go.Figure(go.Bar(x=labels, y=coef, marker_color=["#1565c0" if c >= 0 else "#c62828" for c in coef]))
    fig.update_layout(title=f"Where L{layer}.m{memory} fires on the prompt", xaxis_title="token",
                      yaxis_title="coefficient", height=300)
    return fig


class MemoryBrowser(App):
    """Browse the memories of a layer: value tokens, where the key fires, trigger examples.

    Args:
        model: the model (read only).
        prompt: the prompt whose strongest memories are offered and on which firing is shown.
        layer: the starting layer (default: the middle one).
        corpus: the text mined for trigger examples (default: the bundled Wikipedia sample).
    """

    def __init__(self, model: KVModel, prompt: str = "The Eiffel Tower is located in the city of",
                 layer: int | None = None, *, corpus: Corpus | None = None, k: int = 10) -> None:
        self.model, self.corpus, self.k = model, corpus, k
        self.acts: KeyActivations | None = None
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="60%"))
        self.layer = widgets.BoundedIntText(value=model.n_layers // 2 if layer is None else model.check_layer(layer),
                                            min=0, max=model.n_layers - 1, description="layer")
        self.memory = widgets.BoundedIntText(value=0, min=0, max=model.d_ff - 1, description="memory")
        self.strongest = widgets.Dropdown(options=[], description="strongest")
        self.norm = widgets.Dropdown(options=["none", "final"], value="none", description="read with")
        self.max_tokens = widgets.Dropdown(options=[2_000, 10_000, 50_000], value=2_000, description="corpus tokens")
        self.triggers_button = widgets.Button(description="Find trigger examples")
        self.values_fig, self.firing_fig = figure_widget(height=380), figure_widget(height=300)
        self.triggers_fig = figure_widget(height=360)
        super().__init__([widgets.HBox([self.prompt, self.layer]),
                          widgets.HBox([self.strongest, self.memory, self.norm]),
                          widgets.HBox([self.values_fig, self.firing_fig]),
                          widgets.HBox([self.max_tokens, self.triggers_button]), self.triggers_fig])
        self.prompt.observe(lambda _: self.read_prompt(), names="value")
        self.layer.observe(lambda _: self.read_prompt(), names="value")
        self.strongest.observe(self._pick, names="value")
        self.memory.observe(lambda _: self.show_memory(), names="value")
        self.norm.observe(lambda _: self.show_memory(), names="value")
        self.triggers_button.on_click(lambda _: self.find_triggers())
        self.read_prompt()

    def read_prompt(self) -> None:
        """Read the key activations of the prompt at the layer; offer its strongest memories."""
        def run() -> None:
            layer = self.model.check_layer(self.layer.value)
            self.acts = keys(self.model, self.prompt.value, layers=[layer])
            top = self.acts.top(layer, k=self.k)
            self.strongest.options = [(f"m{m} ({c:+.2f})", m) for m, c in zip(top.memories, top.coefficients)]
            self.strongest.value = top.memories[0]  # triggers show_memory through _pick
            self.show_memory()
        self.guard(run, "reading the prompt")

    def _pick(self, change: dict[str, Any]) -> None:
        if change["new"] is not None:
            self.memory.value = change["new"]

    def show_memory(self) -> None:
        """Draw the value tokens and where the chosen memory fires on the prompt."""
        def run() -> None:
            if self.acts is None or self.layer.value not in self.acts.coefficients:
                raise ValueError("the prompt could not be read: fix it first")
            layer, memory = self.layer.value, self.memory.value
            show_figure(self.values_fig, figures.value_token_bars(
                values(self.model, layer, memory, k=self.k, norm=self.norm.value), memory))
            show_figure(self.firing_fig, memory_firing_bars(self.acts, layer, memory))
        self.guard(run, f"memory L{self.layer.value}.m{self.memory.value}")

    def find_triggers(self) -> None:
        """Mine the corpus for the prefixes on which the chosen memory's key fires most."""
        def run() -> None:
            pair = (self.layer.value, self.memory.value)
            found = trigger_examples(self.model, [pair], self.corpus, n=8, max_tokens=self.max_tokens.value,
                                     progress=False)
            show_figure(self.triggers_fig, figures.trigger_table(found, pair))
        self.guard(run, "mining trigger examples")
