"""Plotly figures of edits: pure functions from deltas, histories and before/after measurements.

* :func:`target_probability_bars` — p(new) and p(true) before vs after on the edited prompt, its
  paraphrases and its neighbours;
* :func:`key_shift_bars` — the memory coefficients at one token before vs after an edit (key-side edits);
* :func:`edit_reach_lines` — where an edit acts: the change of each layer's FFN output and residual,
  and the new target read from each layer, before vs after;
* :func:`part_norm_bars` — ‖ΔW‖ of each edited weight (each layer's share of a MEMIT update);
* :func:`optimisation_curve` — inside the optimisation: NLL, KL, norm penalty and ‖δ‖ vs its clamp
  per step (ROME / MEMIT), or the loss per step (fine-tuning, LoRA);
* :func:`layer_shares` — MEMIT: each layer's share of the residual, and what is left after the edit;
* :func:`key_bars` — the key an update was computed for, and where the update writes;
* :func:`norm_history_lines` — ‖W‖ of every edited weight after each sequential edit;
* :func:`trace_difference` — a causal trace after an edit minus the trace before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from kvlens.causal.trace import CausalTrace
from kvlens.editing.delta import WeightDelta
from kvlens.memory.activations import KeyActivations
from kvlens.memory.readout import LayerReadout

_COLORS = {"before": "#9e9e9e", "after": "#1565c0"}


def target_probability_bars(rows: Sequence[Mapping[str, Any]], title: str = "") -> go.Figure:
    """Horizontal grouped bars from rows ``{group, prompt, p_new_before, p_new_after, p_true_before, p_true_after}``.

    ``group`` is ``edited`` / ``paraphrase`` / ``neighbour``; one row per prompt, its text on the
    left (long prompts shortened; the full text in the hover), never rotated over the bars.
    True-object bars are hatched; missing ``p_true_*`` (no known true object) are left out.
    """
    if not rows:
        raise ValueError("no rows to plot: measure at least the edited prompt")
    labels = [f"{r['group']} {i}: {_short(str(r['prompt']), 44)}" for i, r in enumerate(rows)]
    prompts = [str(r["prompt"]) for r in rows]
    fig = go.Figure()
    for obj, pattern in (("true", "/"), ("new", "")):
        for state in ("after", "before"):
            key = f"p_{obj}_{state}"
            if all(r.get(key) is None for r in rows):
                continue
            fig.add_bar(name=f"p({obj}) {state}", y=labels, x=[r.get(key) for r in rows], orientation="h",
                        customdata=prompts, marker=dict(color=_COLORS[state], pattern_shape=pattern),
                        hovertemplate="%{customdata}<br>%{x:.3f}<extra>" + f"p({obj}) {state}</extra>")
    fig.update_layout(barmode="group", title=title or "Target vs true object, before and after the edit",
                      xaxis=dict(title="probability (geometric mean over the target's tokens)", range=[0, 1]),
                      yaxis=dict(autorange="reversed", automargin=True), height=160 + 4 * 14 * len(rows),
                      legend=dict(orientation="h", y=1.0, yanchor="bottom", x=1.0, xanchor="right",
                                  traceorder="reversed"),
                      margin=dict(t=90))
    return fig


def edit_reach_lines(before: LayerReadout, after: LayerReadout, edited: Sequence[int], label: str = "") -> go.Figure:
    """Where an edit acts: per layer, how much the FFN output and the residual changed (left) and the
    probability of the new target read from the residual after each layer (right), before vs after.

    A value edit at layer l changes the FFN output of l (its key activations stay as they were) and,
    through the residual, every layer above; the edited layers are shaded.
    """
    change = before.change(after)
    layers = list(range(len(change["mlp_subject"])))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=["‖after − before‖ per layer",
                                        f"p({before.target_token!r}) read after each layer"])
    for key, name, color, dash in (("mlp_subject", "FFN output, subject's last token", "#2e7d32", None),
                                   ("resid_subject", "residual, subject's last token", "#6a1b9a", None),
                                   ("resid_last", "residual, last token", "#6a1b9a", "dot")):
        fig.add_trace(go.Scatter(x=layers, y=change[key], name=name, mode="lines+markers",
                                 line=dict(color=color, dash=dash)), row=1, col=1)
    for state, readout in (("before", before), ("after", after)):
        fig.add_trace(go.Scatter(x=layers, y=readout.p_target.tolist(), name=f"p({before.target_token!r}) {state}",
                                 mode="lines+markers", line=dict(color=_COLORS[state])), row=1, col=2)
    for col in (1, 2):
        for layer in edited:
            fig.add_vrect(x0=layer - 0.5, x1=layer + 0.5, fillcolor="gold", opacity=0.3, line_width=0, row=1, col=col)
        fig.update_xaxes(title_text="layer (edited: shaded)", tick0=0, dtick=max(1, len(layers) // 10), row=1, col=col)
    fig.update_yaxes(title_text="L2 norm of the change", row=1, col=1)
    fig.update_yaxes(title_text="probability (logit lens)", range=[0, 1], row=1, col=2)
    title = f"{label + ': ' if label else ''}where the edit acts on {_short(before.prompt, 50)!r}"
    fig.update_layout(title=title, height=380, legend=dict(orientation="h", y=-0.25), margin=dict(t=80))
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


_CURVES = (("nll", "NLL of the new target"), ("kl", "KL essence term"), ("decay", "norm penalty"),
           ("norm", "‖δ‖ (dashed: its clamp)"))


def optimisation_curve(delta: WeightDelta, *, max_lines: int = 8) -> go.Figure | None:
    """The optimisation inside an edit, step by step; None if the method recorded no steps.

    ROME / MEMIT (target vector, ROME Eq. 4 / MEMIT Eq. 16): per request, the target NLL, the
    KL essence term, the norm penalty and ‖δ‖ against its clamp (dashed), up to ``max_lines``
    requests (more: the mean over the requests still optimising at each step). Fine-tuning and
    LoRA: the total loss (NLL + KL) per step.
    """
    batches = [info.get("opt") or {} for _, info in _batches(delta)]
    if batches and all(isinstance(b.get("curves"), Mapping) for b in batches):
        curves = {k: [c for b in batches for c in b["curves"][k]] for k, _ in _CURVES}
        if any(len(c) > 1 for c in curves["nll"]):
            return _target_curves(delta, curves, [x for b in batches for x in b.get("max_norm") or []], max_lines)
    opt = delta.info.get("opt") or {}
    loss, steps = opt.get("loss"), opt.get("steps")
    if not isinstance(loss, list) or not isinstance(steps, int) or len(loss) != steps or steps < 2:
        return None
    fig = go.Figure(go.Scatter(x=list(range(1, len(loss) + 1)), y=loss, mode="lines+markers", name="loss"))
    fig.update_layout(title=f"{delta.method}: loss per optimisation step", xaxis_title="step",
                      yaxis_title="loss (NLL + KL)", yaxis_type="log", height=300)
    return fig


def _target_curves(delta: WeightDelta, curves: Mapping[str, list[list[float]]], max_norm: Sequence[float],
                   max_lines: int) -> go.Figure:
    n = len(curves["nll"])
    fig = make_subplots(rows=1, cols=4, subplot_titles=[title for _, title in _CURVES], horizontal_spacing=0.06)
    if n <= max_lines:
        names = [_short(f"{q.text} → {q.target_new}", 30) for q in delta.requests[:n]]
        series = {k: list(curves[k]) for k, _ in _CURVES}
        bounds = list(max_norm)
    else:  # the mean over the requests still optimising at each step
        names = [f"mean of {n} requests"]
        series = {k: [_mean_per_step(curves[k])] for k, _ in _CURVES}
        bounds = [sum(max_norm) / len(max_norm)] if max_norm else []
    palette = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#4e342e", "#ad1457"]
    for col, (key, _) in enumerate(_CURVES, start=1):
        for i, values in enumerate(series[key]):
            color = palette[i % len(palette)]
            fig.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines", name=names[i],
                                     legendgroup=names[i], showlegend=col == 1, line=dict(color=color)),
                          row=1, col=col)
            if key == "norm" and i < len(bounds) and values:
                fig.add_trace(go.Scatter(x=[0, len(values) - 1], y=[bounds[i]] * 2, mode="lines", showlegend=False,
                                         legendgroup=names[i], line=dict(color=color, dash="dash"),
                                         hovertemplate="clamp %{y:.3g}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="step (0: before the first update)", row=1, col=col)
    fig.update_layout(title=f"{delta.method}: inside the target-vector optimisation", height=340,
                      legend=dict(orientation="h", y=-0.3))
    return fig


def _mean_per_step(per_request: Sequence[Sequence[float]]) -> list[float]:
    longest = max((len(c) for c in per_request), default=0)
    out = []
    for step in range(longest):
        alive = [c[step] for c in per_request if len(c) > step]
        out.append(sum(alive) / len(alive))
    return out


def _batches(delta: WeightDelta) -> list[tuple[int, Mapping[str, Any]]]:
    """(index of its first request, its info) for each sequential batch of ``delta`` (one if none)."""
    out, first = [], 0
    for info in delta.info.get("chunks") or [delta.info]:
        out.append((first, info))
        first += info.get("n_requests", len(delta.requests))
    return out


def layer_shares(delta: WeightDelta, batch: int = -1) -> go.Figure | None:
    """MEMIT: each layer's share of the residual z − h^L (Eq. 20), and what the edit left over.

    With sequential batches, ``batch`` picks one (default: the last).
    """
    batches = _batches(delta)
    info = batches[batch][1]
    shares = info.get("layer_shares")
    if not shares:
        return None
    which = f" (batch {range(len(batches))[batch] + 1} of {len(batches)})" if len(batches) > 1 else ""
    layers = [f"L{r['layer']}" for r in shares]
    fig = go.Figure([
        go.Bar(x=layers, y=[r["share"] for r in shares], name="assigned ‖r^l‖ / ‖z − h‖",
               text=[f"{100 * r['share']:.0f}%" for r in shares], textposition="outside",
               marker_color=_COLORS["after"]),
        go.Scatter(x=layers, y=[r["remaining"] / max(1e-12, shares[0]["remaining"]) for r in shares],
                   mode="lines+markers", name="still to insert before the layer", line=dict(color="#c62828")),
    ])
    left = info.get("remaining_after")
    note = f"; left after the edit: {left / max(1e-12, shares[0]['remaining']):.0%}" if left is not None else ""
    fig.update_layout(title=f"{delta.method}: each layer's share of the residual{which}{note}", height=320,
                      xaxis_title="edited layer", yaxis_title="fraction of mean ‖z − h^L‖", yaxis_tickformat=".0%")
    return fig


def key_bars(delta: WeightDelta, *, request: int = 0, top: int = 20) -> go.Figure | None:
    """The key the update was computed for: its largest memory coefficients, and where ΔV writes.

    Bars: k* (ROME), or k_i^l at the top edited layer (MEMIT / AlphaEdit, recorded for the first
    requests of each batch), the key averaged over prefix contexts, for the ``top`` memories with
    the largest |k*|; markers: the update's left factor for this request, rescaled to the same
    largest value (ROME: C⁻¹k*; MEMIT: column i of (λC + KKᵀ)⁻¹K; AlphaEdit: its null-space
    projected counterpart). None when the delta recorded no key for ``request``.
    """
    if not 0 <= request < len(delta.requests):
        return None
    first, info = [b for b in _batches(delta) if b[0] <= request][-1]
    local = request - first
    if "key" in info and local == 0:
        layer, key = delta.layers[0], info["key"]
    elif info.get("keys"):
        layer = max(int(l) for l in info["keys"])
        shown = info["keys"][str(layer)]
        if local >= len(shown):
            return None
        key = shown[local]
    else:
        return None
    k = torch.as_tensor(key, dtype=torch.float32)
    order = k.abs().argsort(descending=True)[:top]
    fig = go.Figure(go.Bar(x=[f"m{int(i)}" for i in order], y=k[order].tolist(), name="k* (key coefficient)",
                           marker_color=_COLORS["after"]))
    part = delta.parts.get((layer, "value"))
    if part is not None and part.rank is not None and request < part.left.shape[1]:
        u = part.left[:, request].float()
        scale = float(k[order].abs().max()) / max(1e-12, float(u[order].abs().max()))
        fig.add_trace(go.Scatter(x=[f"m{int(i)}" for i in order], y=(u[order] * scale).tolist(), mode="markers",
                                 name="where ΔV writes (left factor, rescaled)", marker=dict(color="#c62828", size=9)))
    req = delta.requests[request]
    fig.update_layout(title=_short(f"{delta.method}: key at layer {layer} for {req.subject!r}", 70), height=320,
                      xaxis_title=f"memory (top {len(order)} by |k*|)", yaxis_title="coefficient")
    return fig


def optimisation_rows(delta: WeightDelta) -> list[dict[str, Any]]:
    """Per request: final loss, steps taken and ‖δ‖ against its reference, as recorded by the method
    (a method that optimises all requests as one batch, as fine-tuning, has one loss: on the first row)."""
    opt = delta.info.get("opt") or {}
    loss, steps = opt.get("loss"), opt.get("steps")
    per_request = isinstance(steps, list)
    rows = []
    for i, req in enumerate(delta.requests):
        row: dict[str, Any] = {"request": f"{req.text} -> {req.target_new}"}
        if per_request and isinstance(steps, list) and isinstance(loss, list) and i < len(loss):
            row.update(final_loss=loss[i], steps=steps[i])
        elif isinstance(loss, list) and loss and i == 0:  # one optimisation of all requests together
            row.update({"final loss (all requests together)": loss[-1], "steps": steps})
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
