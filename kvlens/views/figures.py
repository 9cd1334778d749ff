"""Plotly figures: pure functions from kvlens results to ``plotly.graph_objects.Figure``."""

from __future__ import annotations

import plotly.graph_objects as go

from kvlens.memory.activations import KeyActivations


def key_activation_heatmap(acts: KeyActivations, layer: int, prompt: int = 0, k: int = 20) -> go.Figure:
    """Tokens × the ``k`` memories of ``layer`` that fire most (max |coefficient| over tokens)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    tokens = acts.tokens[prompt]
    coef = acts.coefficients[layer][prompt, : len(tokens)]
    top = coef.abs().amax(0).topk(min(k, coef.shape[-1])).indices
    z = coef[:, top].T.numpy()
    labels = [f"{i}:{t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=[f"m{int(m)}" for m in top], colorscale="RdBu",
                               zmid=0, colorbar=dict(title="coefficient")))
    fig.update_layout(title=f"Layer {layer}: the {len(top)} most active memories per token",
                      xaxis_title="token", yaxis_title="memory", height=300 + 12 * len(top))
    return fig
