"""Plotly figures: pure functions from kvlens results to ``plotly.graph_objects.Figure``.

Memory figures: key activations (tokens × memories, layers × top memories, tokens × layers),
value tokens (bars and table), memories that write a token, the contribution waterfall of a
target logit, the logit-lens grid, layer-composition statistics and trigger-example tables.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go

from kvlens.memory.activations import KeyActivations
from kvlens.memory.contrib import Contributions
from kvlens.memory.lens import Composition, LogitLens
from kvlens.memory.triggers import TriggerExamples
from kvlens.memory.vocab import FoundMemories, VocabProjection


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be positive, got {k}")


def _labels(tokens: list[str]) -> list[str]:
    return [f"{i}:{t!r}" for i, t in enumerate(tokens)]


def key_activation_heatmap(acts: KeyActivations, layer: int, prompt: int = 0, k: int = 20) -> go.Figure:
    """Tokens × the ``k`` memories of ``layer`` that fire most (max |coefficient| over tokens)."""
    _check_k(k)
    acts.at(layer, prompt, 0)  # validates layer and prompt
    tokens = acts.tokens[prompt]
    coef = acts.coefficients[layer][prompt, : len(tokens)]
    top = coef.abs().amax(0).topk(min(k, coef.shape[-1])).indices
    z = coef[:, top].T.numpy()
    fig = go.Figure(go.Heatmap(z=z, x=_labels(tokens), y=[f"m{int(m)}" for m in top], colorscale="RdBu",
                               zmid=0, colorbar=dict(title="coefficient")))
    fig.update_layout(title=f"Layer {layer}: the {len(top)} most active memories per token",
                      xaxis_title="token", yaxis_title="memory", height=300 + 12 * len(top))
    return fig


def top_memories_heatmap(acts: KeyActivations, prompt: int = 0, token: int = -1, k: int = 10) -> go.Figure:
    """Layers × rank: the ``k`` strongest memories of every layer at one token (text = memory index)."""
    _check_k(k)
    tops = acts.top_per_layer(k, prompt, token)
    z = [t.coefficients for t in tops]
    text = [[f"m{m}" for m in t.memories] for t in tops]
    ranks = [f"#{r + 1}" for r in range(len(z[0]))]
    fig = go.Figure(go.Heatmap(z=z, x=ranks, y=[f"L{t.layer}" for t in tops],
                               text=text, texttemplate="%{text}", colorscale="RdBu", zmid=0,
                               colorbar=dict(title="coefficient")))
    fig.update_layout(title=f"Strongest memories per layer at token {tops[0].token!r}",
                      xaxis_title="rank (by |coefficient|)", yaxis_title="layer",
                      height=250 + 18 * len(tops))
    return fig


def key_activity_heatmap(acts: KeyActivations, prompt: int = 0) -> go.Figure:
    """Tokens × layers: the largest |coefficient| of each layer at each token (hover: which memory)."""
    acts.at(acts.layers[0], prompt, 0)
    tokens = acts.tokens[prompt]
    rows, memories = [], []
    for layer in acts.layers:
        peak = acts.coefficients[layer][prompt, : len(tokens)].abs().max(-1)
        rows.append(peak.values.tolist())
        memories.append([f"m{int(m)}" for m in peak.indices])
    fig = go.Figure(go.Heatmap(z=rows, x=_labels(tokens), y=[f"L{l}" for l in acts.layers], text=memories,
                               hovertemplate="%{y} %{x}: %{text} |m|=%{z:.2f}<extra></extra>",
                               colorscale="Viridis", colorbar=dict(title="max |m|")))
    fig.update_layout(title="Peak memory coefficient per layer and token", xaxis_title="token",
                      yaxis_title="layer", height=250 + 14 * len(acts.layers))
    return fig


def token_labels(texts: list[str], ids: list[int], pieces: Sequence[str | None] | None = None) -> list[str]:
    """One distinct label per token: its text quoted, with its id when the text alone is ambiguous.

    Tokens that decode to the same text (byte pieces of one character all decode to ``'�'``)
    would share one bar of a categorical axis; such tokens, and any that hold ``'�'``, are shown
    by their vocabulary piece (``pieces``, e.g. ``'<0xE2>'`` or ``'âĢ'``) when given, and their id.
    """
    seen: dict[str, int] = {}
    for t in texts:
        seen[t] = seen.get(t, 0) + 1
    out = []
    for i, (t, tid) in enumerate(zip(texts, ids)):
        if seen[t] > 1 or "\ufffd" in t:
            piece = pieces[i] if pieces is not None else None
            out.append(f"{piece!r} (id {tid})" if piece is not None and piece != t else f"{t!r} (id {tid})")
        else:
            out.append(repr(t))
    return out


def value_token_bars(proj: VocabProjection, memory: int, pieces: dict[int, str] | None = None) -> go.Figure:
    """Tokens that the value of ``memory`` promotes (blue, top) and suppresses (red, bottom).

    One row per token id (see :func:`token_labels`); ``pieces`` maps ids to vocabulary pieces
    (``tokenizer.convert_ids_to_tokens``) to show byte tokens by their bytes.
    """
    r = proj._row(memory)
    up_ids, down_ids = proj.top_ids[r].tolist(), proj.bottom_ids[r].tolist()
    up, down = proj.promoted(memory), proj.suppressed(memory)
    ids = list(reversed(down_ids)) + list(reversed(up_ids))
    texts = [t for t, _ in reversed(down)] + [t for t, _ in reversed(up)]
    tokens = token_labels(texts, ids, None if pieces is None else [pieces.get(i, "") or None for i in ids])
    scores = [s for _, s in reversed(down)] + [s for _, s in reversed(up)]
    colors = ["#c0392b"] * len(down) + ["#2471a3"] * len(up)
    fig = go.Figure(go.Bar(x=scores, y=tokens, orientation="h", marker_color=colors, customdata=ids,
                           hovertemplate="%{y}: %{x:.3f} (token id %{customdata})<extra></extra>"))
    fig.update_layout(title=f"Value L{proj.layer}.m{memory} in vocabulary space (norm={proj.norm})",
                      xaxis_title="logit", yaxis=dict(title="token", automargin=True, type="category"),
                      height=250 + 16 * len(tokens))
    return fig


def value_token_table(proj: VocabProjection) -> go.Figure:
    """A table: one row per memory, its promoted and suppressed tokens."""
    rows = proj.rows()
    cols = ["layer", "memory", "promotes", "suppresses"]
    fig = go.Figure(go.Table(header=dict(values=cols),
                             cells=dict(values=[[html.escape(str(r[c])) for r in rows] for c in cols])))
    fig.update_layout(title=f"Values of layer {proj.layer} in vocabulary space (norm={proj.norm})")
    return fig


def found_memories_bars(found: FoundMemories) -> go.Figure:
    """The values that most promote a token, with their score and the token's rank in each."""
    labels = [f"L{f.layer}.m{f.memory}" for f in found.found]
    fig = go.Figure(go.Bar(x=labels, y=[f.score for f in found.found],
                           text=[f"rank {f.rank}" for f in found.found], textposition="outside"))
    fig.update_layout(title=f"Memories whose value writes {found.token!r} (norm={found.norm})",
                      xaxis_title="memory", yaxis_title="logit of the token")
    return fig


def contribution_waterfall(contrib: Contributions, k: int = 10) -> go.Figure:
    """The logit of the target built up from the ``k`` largest memories and the rest.

    With ``norm="frozen"`` the bars end at the model's logit; with ``"none"`` at the sum of the
    FFN outputs' raw logits.
    """
    _check_k(k)
    top = contrib.top(k, sign="abs")
    chosen = sum(c for _, _, c in top)
    memories = sum(float(contrib.memory[l].double().sum()) for l in contrib.layers)
    biases = sum(contrib.bias.values())
    names = [f"L{l}.m{i}" for l, i, _ in top] + ["other memories", "value biases"]
    values = [c for _, _, c in top] + [memories - chosen, biases]
    if contrib.norm == "frozen":
        rest = contrib.logit - memories - biases
        names, values = names + ["embedding, attention, other layers, offset"], values + [rest]
        total = "logit"
    else:
        total = "FFN outputs (raw)"
    fig = go.Figure(go.Waterfall(x=names + [total], y=values + [0.0],
                                 measure=["relative"] * len(values) + ["total"]))
    fig.update_layout(title=f"Contributions to the logit of {contrib.target!r} after {contrib.token!r} "
                            f"(norm={contrib.norm})", yaxis_title="logit", showlegend=False)
    return fig


def logit_lens_grid(lens: LogitLens, prompt: int = 0) -> go.Figure:
    """Layers × tokens: the residual's top token (text) and its probability (colour)."""
    if not 0 <= prompt < len(lens.prompts):
        raise IndexError(f"prompt {prompt} is out of range (0..{len(lens.prompts) - 1})")
    ids, probs = lens.top_ids[prompt][..., 0], lens.top_probs[prompt][..., 0]
    text = [[html.escape(repr(lens.vocab[int(i)])) for i in row] for row in ids]
    fig = go.Figure(go.Heatmap(z=probs.tolist(), x=_labels(lens.tokens[prompt]),
                               y=[f"L{l}" for l in lens.layers],
                               text=text, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
                               colorbar=dict(title="p(top)")))
    fig.update_layout(title=f"Logit lens: {lens.prompts[prompt]!r}", xaxis_title="input token",
                      yaxis_title="residual after layer", height=250 + 20 * len(lens.layers))
    return fig


def composition_lines(comp: Composition) -> go.Figure:
    """Per layer: how often the FFN agrees with a single memory, and how often the final token is reached."""
    stats = comp.stats()
    layers = [r["layer"] for r in stats]
    fig = go.Figure()
    for key, name in (("no_memory_agreement", "FFN top differs from every memory's top (§5.1)"),
                      ("residual_predicts_final", "residual already predicts the final token (§5.2)"),
                      ("p_final", "mean p(final token) under the residual"),
                      ("composition", "FFN changed the residual's top to a compromise token")):
        fig.add_trace(go.Scatter(x=layers, y=[r[key] for r in stats], mode="lines+markers", name=name))
    fig.update_layout(title=f"Layer composition over {len(comp.prompts)} prompts (Geva et al. 2021, §5)",
                      xaxis_title="layer", yaxis_title="fraction of prompts", yaxis_range=[0, 1])
    return fig


def trigger_table(triggers: TriggerExamples, memory: tuple[int, int], context: int = 80) -> go.Figure:
    """The trigger examples of ``memory``: prefix (last ``context`` characters) with the token in bold."""
    rows = triggers[memory]
    texts = []
    for ex in rows:
        head = ex.text[: len(ex.text) - len(ex.token)] if ex.text.endswith(ex.token) else ex.text
        head = ("…" + head[-context:]) if len(head) > context else head
        texts.append(f"{html.escape(head)}<b>[{html.escape(ex.token)}]</b>")
    fig = go.Figure(go.Table(columnwidth=[1, 2, 10],
                             header=dict(values=["rank", "coefficient", "prefix (trigger token in bold)"]),
                             cells=dict(values=[list(range(1, len(rows) + 1)),
                                                [f"{ex.coefficient:.3f}" for ex in rows], texts],
                                        align=["center", "right", "left"])))
    fig.update_layout(title=f"Trigger examples of L{memory[0]}.m{memory[1]} "
                            f"({triggers.tokens_seen} tokens of {triggers.corpus_id})")
    return fig
