"""Plotly figures of causal traces: pure functions from results to ``go.Figure``.

Colours follow ROME's plots (``plot_trace_heatmap``): purple for hidden states, green for MLP,
red for attention; the colour scale starts at the corrupted probability. Subject tokens are
marked with ``*`` and the target is named in the title.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvlens.causal.many import TraceSummary
from kvlens.causal.severed import CURVES, LayerChoice, SeveredTrace, suggest_edit_layers
from kvlens.causal.trace import CausalTrace

COLORSCALES = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
NAMES = {"hidden": "single restored layer", "mlp": "restored MLP", "attn": "restored attention"}
_LINE = {"normal": "#6a3d9a", "mlp_severed": "#33a02c", "attn_severed": "#e31a1c"}


def token_labels(tr: CausalTrace) -> list[str]:
    """Token labels for axes: ``position: token``, subject tokens marked with ``*``."""
    start, end = tr.subject_range
    return [f"{i}: {t!r}{'*' if start <= i < end else ''}" for i, t in enumerate(tr.tokens)]


def _heatmap(tr: CausalTrace, kind: str, colorbar: dict[str, Any] | None = None) -> go.Heatmap:
    z = tr.scores[kind].numpy()
    window = tr.params.get("window")
    title = f"p({tr.target.strip()})" + ("" if kind == "hidden" else f", window {window}")
    bar: dict[str, Any] = dict(title=dict(text=title, side="right"), thickness=12, tickformat=".2g",
                               **(colorbar or {}))
    return go.Heatmap(z=z, x=list(range(tr.n_layers)), y=token_labels(tr), colorscale=COLORSCALES[kind],
                      zmin=tr.low, zmax=max(tr.low + 1e-9, float(z.max())), colorbar=bar,
                      hovertemplate="layer %{x}<br>%{y}<br>p=%{z:.3f}<extra></extra>")


def _title(tr: CausalTrace, head: str) -> str:
    how = "ESTIMATE (attribution patching)" if tr.estimate else f"exact, {tr.params.get('samples')} noise samples"
    return f"{head}<br><sup>{how}; p clean {tr.high:.3f}, corrupted {tr.low:.3f}; subject tokens marked *</sup>"


def trace_heatmap(tr: CausalTrace, kind: str | None = None) -> go.Figure:
    """Tokens × layers heatmap of ``p(target)`` with the state of ``kind`` restored (width: the page's)."""
    kind = tr._kind(kind)
    fig = go.Figure(_heatmap(tr, kind))
    fig.update_layout(title=_title(tr, f"Impact of {NAMES[kind]} on p({tr.target.strip()!r})"),
                      xaxis_title="layer", height=240 + 24 * len(tr.tokens), margin=dict(t=90), autosize=True)
    fig.update_yaxes(autorange="reversed", automargin=True)
    return fig


def trace_heatmaps(tr: CausalTrace) -> go.Figure:
    """The heatmaps of every traced kind side by side (ROME's three-panel figure).

    The figure takes the width of the notebook column or page; each panel's colour bar sits at
    its own right edge, in the gap before the next panel, its title written along it.
    """
    n = len(tr.kinds)
    fig = make_subplots(rows=1, cols=n, shared_yaxes=True, horizontal_spacing=0.14 if n > 1 else 0.0,
                        subplot_titles=[NAMES[k] for k in tr.kinds])
    for i, kind in enumerate(tr.kinds):
        domain = fig.layout[f"xaxis{i + 1 if i else ''}"].domain
        bar = dict(x=domain[1] + 0.005, xanchor="left", len=0.9, y=0.5, yanchor="middle")
        fig.add_trace(_heatmap(tr, kind, colorbar=bar), row=1, col=i + 1)
        fig.update_xaxes(title_text="layer", row=1, col=i + 1)
    head = f"Causal trace of {tr.subject!r} → {tr.target.strip()!r}"
    fig.update_layout(title=_title(tr, head), height=280 + 24 * len(tr.tokens), margin=dict(t=110, r=60),
                      autosize=True)
    fig.update_yaxes(autorange="reversed", automargin=True)
    return fig


def severed_chart(sv: SeveredTrace, edit_layers: range | None = None) -> go.Figure:
    """Indirect effect per layer at the token, normal and with MLP / attention severed.

    The gap between the normal and MLP-severed curves is shaded; the suggested edit range
    (:func:`suggest_edit_layers`, unless given) is marked.
    """
    layers = list(range(sv.n_layers))
    fig = go.Figure()
    for curve in CURVES:
        fig.add_trace(go.Scatter(x=layers, y=sv.effect(curve).numpy(), name=curve.replace("_", " "),
                                 mode="lines+markers", line=dict(color=_LINE[curve]),
                                 fill="tonexty" if curve == "mlp_severed" else None,
                                 fillcolor="rgba(51,160,44,0.15)"))
    edit_layers = suggest_edit_layers(sv) if edit_layers is None else edit_layers
    fig.add_vrect(x0=edit_layers.start - 0.5, x1=edit_layers.stop - 0.5, fillcolor="gold", opacity=0.2,
                  line_width=0, annotation_text=f"suggested MLP edit layers {edit_layers.start}–"
                                                f"{edit_layers.stop - 1}", annotation_position="top left")
    fig.update_layout(title=(f"Severed paths at {sv.token_text!r} (token {sv.token}), target "
                             f"{sv.target.strip()!r}; shaded: gap normal − MLP severed"),
                      xaxis_title="restored layer", yaxis_title="indirect effect on p(target)",
                      height=420, autosize=True)
    return fig


def _band(x: list[int], mean: Any, half: Any, name: str, color: str) -> list[go.Scatter]:
    upper, lower = (mean + half).tolist(), (mean - half).tolist()
    return [go.Scatter(x=x + x[::-1], y=upper + lower[::-1], fill="toself", fillcolor=color, opacity=0.2,
                       line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=name),
            go.Scatter(x=x, y=mean.tolist(), name=name, mode="lines", line=dict(color=color), legendgroup=name)]


def average_curves(summary: TraceSummary, kind: str = "hidden") -> go.Figure:
    """Average indirect effect per layer for each token group, with 95 % CI bands."""
    if kind not in summary.mean:
        raise KeyError(f"kind {kind!r} was not traced; the summary holds {summary.kinds}")
    colors = ["#1f77b4", "#9467bd", "#d62728", "#2ca02c", "#8c564b", "#ff7f0e"]
    mean, ci = summary.mean[kind], summary.ci[kind]
    x = list(range(mean.shape[1]))
    fig = go.Figure()
    for g, name in enumerate(summary.groups):
        if not mean[g].isnan().all():
            for tr in _band(x, mean[g], ci[g], name, colors[g % len(colors)]):
                fig.add_trace(tr)
    fig.update_layout(title=f"Average indirect effect of {NAMES[kind]} over {summary.n_facts} facts (95 % CI)",
                      xaxis_title="layer", yaxis_title="average indirect effect", height=420, autosize=True)
    return fig


def layer_choice_chart(choice: LayerChoice) -> go.Figure:
    """The pooled edit range with its bootstrap interval, above every fact's own range.

    Top: the pooled MLP contribution per layer (:func:`~kvlens.causal.severed.mlp_contribution`
    of the mean gap), the chosen range shaded, whiskers on its first and last layer and on the
    one-layer choice (the peak, a diamond) spanning their bootstrap 95 % intervals. Bottom: one
    segment per fact, its own suggested range, sorted by first layer, so the spread that pooling
    removes is visible.
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.4, 0.6],
                        subplot_titles=("pooled MLP contribution (drop of the severed-MLP gap)",
                                        f"each fact's own range ({choice.n_facts} facts)"))
    n = int(choice.contribution.shape[0])
    fig.add_trace(go.Bar(x=list(range(n)), y=choice.contribution.tolist(), marker_color=_LINE["mlp_severed"],
                         name="pooled contribution", hovertemplate="layer %{x}: %{y:.4f}<extra></extra>"), row=1, col=1)
    top = float(choice.contribution.max()) if n else 0.0
    marks = ((choice.layers.start, choice.start_ci, "first", "first/last layer, bootstrap 95 %", 1.08, "circle"),
             (choice.last, choice.stop_ci, "last", None, 1.08, "circle"),
             (choice.peak, choice.peak_ci, "one-layer (peak)", "one-layer choice (peak), bootstrap 95 %", 1.2,
              "diamond"))
    for value, (lo, hi), label, legend, height, symbol in marks:
        fig.add_trace(go.Scatter(x=[value], y=[height * top], mode="markers",
                                 marker=dict(color="black", size=9, symbol=symbol),
                                 error_x=dict(type="data", symmetric=False, array=[hi - value],
                                              arrayminus=[value - lo]),
                                 name=legend or "", showlegend=legend is not None,
                                 hovertemplate=f"{label} layer %{{x}} (95 %: {lo:g}–{hi:g})<extra></extra>"),
                      row=1, col=1)
    order = sorted(range(choice.n_facts), key=lambda i: (choice.per_fact[i].start, choice.per_fact[i].stop))
    for rank, i in enumerate(order):
        r = choice.per_fact[i]
        fig.add_trace(go.Scatter(x=[r.start - 0.4, r.stop - 0.6], y=[rank, rank], mode="lines",
                                 line=dict(color="#6a3d9a", width=5), showlegend=rank == 0, name="one fact's range",
                                 legendgroup="facts", hovertemplate=(f"{choice.subjects[i]!r}: layers {r.start}–"
                                                                     f"{r.stop - 1}<extra></extra>")), row=2, col=1)
    for row in (1, 2):
        fig.add_vrect(x0=choice.layers.start - 0.5, x1=choice.layers.stop - 0.5, fillcolor="gold", opacity=0.2,
                      line_width=0, row=row, col=1)
    fig.update_xaxes(title_text="MLP layer", row=2, col=1)
    fig.update_yaxes(title_text="contribution", row=1, col=1)
    fig.update_yaxes(title_text="fact (sorted)", showticklabels=False, row=2, col=1)
    fig.update_layout(title=(f"MLP edit layers {choice.layers.start}–{choice.last} pooled over {choice.n_facts} facts "
                             f"({100 * choice.agreement:.0f} % of {len(choice.boot_ranges)} "
                             "bootstrap resamples agree)"),
                      height=360 + 10 * choice.n_facts, width=760)
    return fig
