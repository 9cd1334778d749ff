"""Plotly figures of edits: pure functions from deltas, histories and before/after measurements.

* :func:`target_probability_bars` — p(new) and p(true) before vs after on the edited prompt, its
  paraphrases and its neighbours;
* :func:`key_shift_bars` — the memory coefficients at one token before vs after an edit;
* :func:`part_norm_bars` — ‖ΔW‖ of each edited weight (each layer's share of a MEMIT update);
* :func:`optimisation_curve` — the loss per optimisation step, where the method records it;
* :func:`norm_history_lines` — ‖W‖ of every edited weight after each sequential edit;
* :func:`trace_difference` — a causal trace after an edit minus the trace before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from kvlens.causal.trace import CausalTrace
from kvlens.editing.delta import WeightDelta
from kvlens.memory.activations import KeyActivations

_COLORS = {"before": "#9e9e9e", "after": "#1565c0"}


def target_probability_bars(rows: Sequence[Mapping[str, Any]], title: str = "") -> go.Figure:
    """Grouped bars from rows ``{group, prompt, p_new_before, p_new_after, p_true_before, p_true_after}``.

    ``group`` is ``edited`` / ``paraphrase`` / ``neighbour``; the x axis lists the prompts. True-object
    bars are hatched. Missing ``p_true_*`` (no known true object) are left out.
    """
    if not rows:
        raise ValueError("no rows to plot: measure at least the edited prompt")
    labels = [f"{r['group']} {i}: {_short(str(r['prompt']))}" for i, r in enumerate(rows)]
    fig = go.Figure()
    for obj, pattern in (("new", ""), ("true", "/")):
        for state in ("before", "after"):
            key = f"p_{obj}_{state}"
            if all(r.get(key) is None for r in rows):
                continue
            fig.add_bar(name=f"p({obj}) {state}", x=labels, y=[r.get(key) for r in rows],
                        marker=dict(color=_COLORS[state], pattern_shape=pattern),
                        hovertemplate="%{x}<br>%{y:.3f}<extra>" + f"p({obj}) {state}</extra>")
    fig.update_layout(barmode="group", title=title or "Target vs true object, before and after the edit",
                      yaxis=dict(title="probability (geometric mean over target tokens)", range=[0, 1]),
                      height=380, legend=dict(orientation="h", y=-0.35))
    return fig


def key_shift_bars(before: KeyActivations, after: KeyActivations, layer: int, token: int = -1,
                   k: int = 10) -> go.Figure:
    """Coefficients of the ``k`` memories at ``layer`` that change most at ``token`` (prompt 0)."""
    b, a = before.at(layer, 0, token), after.at(layer, 0, token)
    top = (a - b).abs().topk(min(k, b.numel())).indices
    names = [f"m{int(i)}" for i in top]
    tok = before.tokens[0][token]
    fig = go.Figure([go.Bar(name="before", x=names, y=b[top].tolist(), marker_color=_COLORS["before"]),
                     go.Bar(name="after", x=names, y=a[top].tolist(), marker_color=_COLORS["after"])])
    change = float((a - b).norm())
    fig.update_layout(barmode="group", height=320, xaxis_title="memory (largest changes first)",
                      yaxis_title="coefficient",
                      title=f"Key activations at layer {layer}, token {tok!r}: ‖Δm‖ = {change:.3g}")
    return fig


def part_norm_bars(delta: WeightDelta) -> go.Figure:
    """‖ΔW‖_F of every edited weight, and its share of the total (MEMIT: each layer's share)."""
    norms = {f"L{l} {r}": p.norm() for (l, r), p in delta.parts.items()}
    total = sum(norms.values()) or 1.0
    fig = go.Figure(go.Bar(x=list(norms), y=list(norms.values()),
                           text=[f"{100 * v / total:.0f}%" for v in norms.values()], textposition="outside",
                           marker_color=_COLORS["after"]))
    fig.update_layout(title=f"{delta.method}: ‖ΔW‖ per edited weight (share of the total)", height=300,
                      xaxis_title="edited weight", yaxis_title="Frobenius norm")
    return fig


def optimisation_curve(delta: WeightDelta) -> go.Figure | None:
    """The loss at every optimisation step, when the method records one per step (FT, LoRA).

    ROME and MEMIT record only each request's final loss and step count; for them this
    returns None (see :func:`optimisation_rows`).
    """
    opt = delta.info.get("opt") or {}
    loss = opt.get("loss")
    steps = opt.get("steps")
    if not isinstance(loss, list) or not isinstance(steps, int) or len(loss) != steps or steps < 2:
        return None
    fig = go.Figure(go.Scatter(x=list(range(1, len(loss) + 1)), y=loss, mode="lines+markers", name="loss"))
    fig.update_layout(title=f"{delta.method}: loss per optimisation step", xaxis_title="step",
                      yaxis_title="loss (NLL + KL)", yaxis_type="log", height=300)
    return fig


def optimisation_rows(delta: WeightDelta) -> list[dict[str, Any]]:
    """Per request: final loss, steps taken and ‖δ‖ against its reference, as recorded by the method."""
    opt = delta.info.get("opt") or {}
    loss, steps = opt.get("loss"), opt.get("steps")
    per_request = isinstance(steps, list)
    rows = []
    for i, req in enumerate(delta.requests):
        row: dict[str, Any] = {"request": f"{req.text} -> {req.target_new}"}
        if per_request and isinstance(loss, list) and i < len(loss):
            row.update(final_loss=loss[i], steps=steps[i])
        elif isinstance(loss, list) and loss:
            row.update(final_loss=loss[-1], steps=steps)
        rows.append(row)
    if "delta_norm" in delta.info and rows:  # ROME: ‖δ‖ against the clamp reference ‖MLP output‖
        rows[0].update(delta_norm=delta.info["delta_norm"], reference_norm=delta.info.get("reference_norm"))
    for row, norm in zip(rows, delta.info.get("delta_norms") or []):  # MEMIT: ‖z − h‖
        row["z_minus_h_norm"] = norm
    return rows


def norm_history_lines(norms: Sequence[Mapping[str, float]]) -> go.Figure:
    """‖W‖_F of each edited weight (columns ``"layer.role"``) after each step (column ``step``)."""
    if not norms:
        raise ValueError("no norm history: apply at least one edit")
    names = sorted({k for row in norms for k in row if k != "step"})
    fig = go.Figure([go.Scatter(x=[row["step"] for row in norms if name in row],
                                y=[row[name] for row in norms if name in row], mode="lines+markers",
                                name=f"L{name.replace('.', ' ')}") for name in names])
    fig.update_layout(title="Weight norm of each edited layer over sequential edits", xaxis_title="edits applied",
                      yaxis_title="‖W‖_F", height=300)
    return fig


def trace_difference(before: CausalTrace, after: CausalTrace, kind: str | None = None) -> go.Figure:
    """Heatmap of ``after − before`` restored probability (same prompt, tokens and layers)."""
    if before.tokens != after.tokens:
        raise ValueError("the traces were made on different prompts; re-trace the same prompt after the edit")
    kind = before._kind(kind)
    diff = (after.scores[kind] - before.scores[kind]).numpy()
    span = float(abs(diff).max()) or 1e-9
    start, end = before.subject_range
    labels = [f"{i}: {t!r}{'*' if start <= i < end else ''}" for i, t in enumerate(before.tokens)]
    fig = go.Figure(go.Heatmap(z=diff, x=list(range(diff.shape[1])), y=labels, colorscale="RdBu", zmid=0,
                               zmin=-span, zmax=span, colorbar=dict(title="Δp"),
                               hovertemplate="layer %{x}<br>%{y}<br>Δp=%{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Re-trace after the edit minus before ({kind}): p({before.target.strip()!r}) "
                            f"→ p({after.target.strip()!r})", xaxis_title="layer", height=220 + 24 * len(labels))
    fig.update_yaxes(autorange="reversed")
    return fig


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
