"""``MemoryBrowser`` and ``TraceExplorer``: controls wired to the inspect and locate verbs.

``MemoryBrowser``: a prompt, a layer and a memory (chosen among the strongest at the prompt's
last token, or typed) -> the tokens its value promotes and suppresses, where its key fires on
the prompt, and, on demand, the corpus prefixes that make it fire most (trigger examples).

``TraceExplorer``: prompt / subject / target / kind / mode -> causal-trace heatmap; clicking a
cell (or setting ``cell``) shows that cell's detail: the effect along the layers at its token
and along the tokens at its layer, for every traced kind.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvlens.causal.trace import CausalTrace, trace
from kvlens.corpus import Corpus
from kvlens.memory.activations import KeyActivations, keys
from kvlens.memory.triggers import trigger_examples
from kvlens.memory.vocab import values
from kvlens.models.kvmodel import KVModel
from kvlens.prompts import subject_span
from kvlens.views import figures, trace_figures
from kvlens.views.widgets import App, check_index, figure_widget, notice, scored_text, show_figure


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
        # IntText, not BoundedIntText: a bounded box clamps an out-of-range number silently
        self.layer = widgets.IntText(value=model.n_layers // 2 if layer is None else model.check_layer(layer),
                                     description="layer", tooltip=f"0..{model.n_layers - 1}")
        self.memory = widgets.IntText(value=0, description="memory", tooltip=f"0..{model.d_ff - 1}")
        self.prompt_notice, self.memory_notice, self.triggers_notice = notice(), notice(), notice()
        self.strongest = widgets.Dropdown(options=[], description="strongest")
        self.norm = widgets.Dropdown(options=["none", "final"], value="none", description="read with")
        self.max_tokens = widgets.Dropdown(options=[2_000, 10_000, 50_000], value=2_000, description="corpus tokens")
        self.triggers_button = widgets.Button(description="Find trigger examples")
        self.values_fig, self.firing_fig = figure_widget(height=380), figure_widget(height=300)
        self.triggers_fig = figure_widget(height=360)
        super().__init__([widgets.HBox([self.prompt, self.layer]), self.prompt_notice,
                          widgets.HBox([self.strongest, self.memory, self.norm]), self.memory_notice,
                          self.values_fig, self.firing_fig,
                          widgets.HBox([self.max_tokens, self.triggers_button]), self.triggers_notice,
                          self.triggers_fig], model=model)
        self.notices += [self.prompt_notice, self.memory_notice, self.triggers_notice]
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
            self.acts = None
            if not self.prompt.value.strip():
                raise ValueError("empty prompt: type a text in the prompt box")
            layer = check_index(self.layer.value, "layer", 0, self.model.n_layers - 1)
            self.acts = keys(self.model, self.prompt.value, layers=[layer])
            top = self.acts.top(layer, k=self.k)
            self.strongest.options = [(f"m{m} ({c:+.2f})", m) for m, c in zip(top.memories, top.coefficients)]
            self.strongest.value = top.memories[0]  # triggers show_memory through _pick
            self.show_memory()
        self.guard(run, "reading the prompt", at=self.prompt_notice)

    def _pick(self, change: dict[str, Any]) -> None:
        if change["new"] is not None:
            self.memory.value = change["new"]

    def show_memory(self) -> None:
        """Draw the value tokens and where the chosen memory fires on the prompt."""
        def run() -> None:
            if self.acts is None or self.layer.value not in self.acts.coefficients:
                raise ValueError("the prompt could not be read: fix the prompt or the layer first")
            layer = self.layer.value
            memory = check_index(self.memory.value, "memory", 0, self.model.d_ff - 1)
            proj = values(self.model, layer, memory, k=self.k, norm=self.norm.value)
            ids = proj.top_ids[0].tolist() + proj.bottom_ids[0].tolist()
            to_pieces = getattr(self.model.tokenizer, "convert_ids_to_tokens", None)  # HF tokenizers have it
            pieces = dict(zip(ids, to_pieces(ids))) if to_pieces is not None else None
            show_figure(self.values_fig, figures.value_token_bars(proj, memory, pieces))
            show_figure(self.firing_fig, memory_firing_bars(self.acts, layer, memory))
        self.guard(run, f"memory L{self.layer.value}.m{self.memory.value}", at=self.memory_notice)

    def find_triggers(self) -> None:
        """Mine the corpus for the prefixes on which the chosen memory's key fires most."""
        def run() -> None:
            pair = (check_index(self.layer.value, "layer", 0, self.model.n_layers - 1),
                    check_index(self.memory.value, "memory", 0, self.model.d_ff - 1))
            found = trigger_examples(self.model, [pair], self.corpus, n=8, max_tokens=self.max_tokens.value,
                                     progress=False)
            show_figure(self.triggers_fig, figures.trigger_table(found, pair))
        self.guard(run, "mining trigger examples", at=self.triggers_notice)


def cell_detail(tr: CausalTrace, token: int, layer: int) -> go.Figure:
    """One trace cell in context: every kind's effect along the layers at ``token`` (left) and
    along the tokens at ``layer`` (right)."""
    if not (0 <= token < len(tr.tokens) and 0 <= layer < tr.n_layers):
        raise IndexError(f"cell ({token}, {layer}) is outside the trace "
                         f"({len(tr.tokens)} tokens x {tr.n_layers} layers)")
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"at token {token}: {tr.tokens[token]!r}", f"at layer {layer}"])
    for kind in tr.kinds:
        effect = tr.effect(kind)
        color = _KIND_COLORS[kind]
        fig.add_trace(go.Scatter(x=list(range(tr.n_layers)), y=effect[token].tolist(), name=kind, mode="lines+markers",
                                 line=dict(color=color), legendgroup=kind), row=1, col=1)
        fig.add_trace(go.Bar(x=[f"{i}:{t!r}" for i, t in enumerate(tr.tokens)], y=effect[:, layer].tolist(),
                             name=kind, marker_color=color, legendgroup=kind, showlegend=False), row=1, col=2)
    fig.add_vline(x=layer, line_dash="dot", row=1, col=1)
    fig.update_layout(title=f"Cell (token {token}, layer {layer}): indirect effect on p({tr.target.strip()!r})"
                            + (" — estimate" if tr.estimate else ""), height=340, barmode="group")
    fig.update_yaxes(title_text="indirect effect", row=1, col=1)
    return fig


#: How a trace scores a target of several tokens.
TRACE_SCORE = "the probability of the whole sequence, teacher-forced"

_KIND_COLORS = {"hidden": "#6a3d9a", "mlp": "#33a02c", "attn": "#e31a1c"}


class TraceExplorer(App):
    """Causal tracing with controls: prompt / subject / target / kind / mode -> heatmaps.

    Clicking a heatmap cell (or :meth:`select_cell`) shows that cell's detail. *Trace* runs on
    the button (an exact trace takes minutes on a CPU; the estimate takes seconds).
    """

    def __init__(self, model: KVModel, prompt: str = "{} is located in the city of",
                 subject: str = "The Eiffel Tower", target: str = "", *, kind: str = "all",
                 mode: str = "approx", samples: int = 10, run: bool = True) -> None:
        self.model = model
        self.result: CausalTrace | None = None
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="50%"))
        self.subject = widgets.Text(value=subject, description="subject")
        self.target = widgets.Text(value=target, description="target", placeholder="(model's top-1)")
        self.kind = widgets.Dropdown(options=["all", "hidden", "mlp", "attn"], value=kind, description="kind")
        self.mode = widgets.Dropdown(options=["approx", "exact"], value=mode, description="mode")
        # IntText, not BoundedIntText: a bounded box clamps an out-of-range number silently
        self.samples = widgets.IntText(value=samples, description="samples", tooltip="1..100")
        self.window = widgets.IntText(value=min(10, model.n_layers), description="window",
                                      tooltip=f"1..{model.n_layers}")
        self.inputs_notice, self.run_notice, self.cell_notice = notice(), notice(), notice()
        self.run_button = widgets.Button(description="Trace", button_style="primary")
        self.heatmap, self.detail_fig = figure_widget(height=420), figure_widget(height=340)
        self.detail = widgets.HTML()
        super().__init__([widgets.HBox([self.prompt, self.subject, self.target]), self.inputs_notice,
                          widgets.HBox([self.kind, self.mode, self.samples, self.window, self.run_button]),
                          self.run_notice, self.heatmap, self.detail, self.cell_notice, self.detail_fig], model=model)
        self.notices += [self.inputs_notice, self.run_notice, self.cell_notice]
        self.run_button.on_click(lambda _: self.run())
        if run:
            self.run()

    def check_inputs(self) -> dict[str, Any]:
        """The controls' values checked before any forward; a clear error naming the box otherwise."""
        prompt, subject, target = self.prompt.value, self.subject.value, self.target.value
        if not prompt.strip():
            raise ValueError("empty prompt: type a template such as '{} is located in the city of'")
        if not subject.strip():
            raise ValueError("empty subject: type the entity whose tokens are corrupted, e.g. 'The Eiffel Tower'")
        if "{}" not in prompt and subject not in prompt:
            raise ValueError(f"subject {subject!r} is not in the prompt {prompt!r} and the prompt has no '{{}}': "
                             "write the prompt as a template with '{}' where the subject goes")
        subject_span(self.model, prompt, subject)  # a template with several '{}', a subject covering no token
        return dict(prompt=prompt, subject=subject, target=target if target.strip() else None)

    def run(self) -> None:
        """Trace with the current controls and draw the heatmaps (inputs are checked first)."""
        inputs = self.guard(self.check_inputs, "checking the inputs", at=self.inputs_notice)
        if inputs is None:
            return
        if inputs["target"] is not None:
            self.show_note(f"target scored: {scored_text(self.model, inputs['target'], TRACE_SCORE)}",
                           self.inputs_notice)
        samples = self.guard(lambda: (check_index(self.samples.value, "samples", 1, 100),
                                      check_index(self.window.value, "window", 1, self.model.n_layers)),
                             "checking samples and window", at=self.run_notice, clear=False)
        if samples is None:
            return

        def go_trace() -> None:
            self.result = None
            self.result = trace(self.model, inputs["prompt"], inputs["subject"], inputs["target"],
                                kind=self.kind.value, mode=self.mode.value, samples=samples[0],
                                window=samples[1], progress=False)
            fig = trace_figures.trace_heatmaps(self.result) if len(self.result.kinds) > 1 \
                else trace_figures.trace_heatmap(self.result)
            show_figure(self.heatmap, fig)
            for heat in self.heatmap.data:
                heat.on_click(self._clicked)
            self.select_cell(*self.result.peak(self.result.kinds[0]), clear=False)
        self.guard(go_trace, f"tracing ({self.mode.value})", at=self.run_notice, clear=False)

    def _clicked(self, _trace: Any, points: Any, _state: Any) -> None:
        if points.xs:
            self.select_cell(int(str(points.ys[0]).split(":")[0]), int(points.xs[0]))

    def select_cell(self, token: int, layer: int, *, clear: bool = True) -> None:
        """Show the detail of cell (``token``, ``layer``) (``clear=False``: keep the messages shown)."""
        def show() -> None:
            if self.result is None:
                raise ValueError("no trace yet: press Trace")
            tr = self.result
            show_figure(self.detail_fig, cell_detail(tr, token, layer))
            cells = ", ".join(f"{k}: p={float(tr.scores[k][token, layer]):.3f} "
                              f"(IE {float(tr.effect(k)[token, layer]):+.3f})" for k in tr.kinds)
            self.detail.value = (f"<b>token {token} {html.escape(repr(tr.tokens[token]))}, layer {layer}</b>: "
                                 f"{html.escape(cells)}")
        self.guard(show, f"cell ({token}, {layer})", at=self.cell_notice, clear=clear)
