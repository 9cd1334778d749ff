"""Plotly figures of task tuning (Qiu et al. 2024 §4): pure functions from results to ``go.Figure``.

One group of bars per task (and ``overall``), one bar per variant, error bars the 95 % CIs
(Wilson for accuracy, bootstrap for macro-F1). Colours: grey for the untuned model and the
standard ``q,v`` LoRA, blue for keys, teal for the gate, orange for values.
"""

from __future__ import annotations

import plotly.graph_objects as go

from kvlens.tuning.compare import TuningComparison

COLORS = {"untuned": "#bdbdbd", "q,v": "#737373", "+keys": "#1f77b4", "+gate": "#17becf", "+values": "#ff7f0e"}
METRICS = {"accuracy": "accuracy", "macro_f1": "macro-F1"}


def tuning_bars(result: TuningComparison, metric: str = "accuracy") -> go.Figure:
    """Per task and overall: ``metric`` (``"accuracy"`` or ``"macro_f1"``) of every variant, with 95 % CIs."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    rows = result.table()
    groups = [*result.tasks, "overall"]
    fig = go.Figure()
    for v in result.rows:
        mine = {r["task"]: r for r in rows if r["variant"] == v}
        y = [mine[t][metric] for t in groups]
        fig.add_trace(go.Bar(
            name=v, x=groups, y=y, marker_color=COLORS.get(v, "#9467bd"),
            error_y=dict(type="data", symmetric=False,
                         array=[mine[t][f"{metric}_high"] - mine[t][metric] for t in groups],
                         arrayminus=[mine[t][metric] - mine[t][f"{metric}_low"] for t in groups]),
            hovertemplate=f"{v}<br>%{{x}}: %{{y:.1f}}<extra></extra>"))
    hp = result.hparams
    fig.update_layout(barmode="group", yaxis=dict(title=f"{METRICS[metric]} (x100, 95 % CI)", range=[0, 105]),
                      title=(f"Task tuning with LoRA r {hp.rank}: standard (q,v) vs + keys / + gate / + values — "
                             f"{METRICS[metric]} on {result.params.get('n_test', '?')} test examples"),
                      legend_title="LoRA targets", height=440, width=max(640, 120 * len(groups) + 200))
    return fig
