"""Report renderers for the edit and evaluate verbs: weight deltas, edit histories, edit reports.

Registered on import (:data:`kvlens.views.renderers.RENDERER_MODULES`). Each section records
the method's hyperparameters, the requests and the model it was computed for.
"""

from __future__ import annotations

from typing import Any

from kvlens.editing.delta import WeightDelta
from kvlens.editing.history import EditHistory
from kvlens.evaluate import EditReport
from kvlens.views import edit_figures, eval_figures
from kvlens.views.renderers import to_sections
from kvlens.views.report import Section


def delta_rows(delta: WeightDelta) -> list[dict[str, Any]]:
    """One row per edited weight: layer, role, rank (None = dense) and ‖ΔW‖_F."""
    return [{"layer": l, "role": r, "rank": "dense" if p.rank is None else p.rank, "norm": p.norm()}
            for (l, r), p in delta.parts.items()]


def outcome_rows(delta: WeightDelta) -> list[dict[str, Any]]:
    """Each request's target probability before/after on its own prompt (from ``info["outcome"]``)."""
    outcome = delta.info.get("outcome") or {}
    return [{"prompt": r["prompt"], "target": r["target"], "p before": r["p_before"], "p after": r["p_after"],
             "top-1 after": r["top1"], "reached": r["target_is_top1"]} for r in outcome.get("requests", [])]


@to_sections.register
def _delta(result: WeightDelta) -> list[Section]:
    roles = sorted({r for _, r in result.parts})
    text = (f"{result.method} changes the {' and '.join(roles)} weights of layer(s) {result.layers} "
            f"for {len(result.requests)} request(s): "
            + "; ".join(f"{q.text!r} -> {q.target_new!r}" for q in result.requests[:8])
            + (" …" if len(result.requests) > 8 else "") + ".")
    if "seconds" in result.info:
        text += f" Computed in {result.info['seconds']:.1f} s."
    # the edit state when the report is made (WeightDelta's own record of where it is applied)
    text += (" It is applied to the model now: the sections below that read the model see it." if result._handles
             else " It is not applied to the model now (computed, measured and reverted).")
    params = {"model": result.model_name, "method": result.method, "hparams": result.hparams,
              "requests": [q.to_dict() for q in result.requests],
              "fingerprints": {f"{l}.{r}": fp for (l, r), fp in result.base.items()}}
    name = f"{result.method} ({'+'.join(roles)})"  # every section says which side: ft (key) vs ft (value)
    sections = [Section(f"Edit: {result.method} ({'+'.join(roles)} weights)", text=text, table=delta_rows(result),
                        figure=edit_figures.part_norm_bars(result), params=params)]
    outcome = outcome_rows(result)
    if outcome:
        sections.append(Section(f"Edit: {name}, target probability on each edited prompt", table=outcome,
                                params={"method": result.method}))
    curve = edit_figures.optimisation_curve(result)
    opt_rows = edit_figures.optimisation_rows(result)
    if curve is not None or any(len(r) > 1 for r in opt_rows):
        sections.append(Section(f"Edit: {name}, optimisation", table=opt_rows, figure=curve,
                                params={"method": result.method}))
    shares = edit_figures.layer_shares(result)
    if shares is not None:
        sections.append(Section(f"Edit: {name}, each layer's share of the residual",
                                table=[dict(r) for r in result.info["layer_shares"]], figure=shares,
                                params={"method": result.method}))
    key = edit_figures.key_bars(result)
    if key is not None:
        sections.append(Section(f"Edit: {name}, the key the update was computed for", figure=key,
                                params={"method": result.method}))
    return sections


@to_sections.register
def _history(result: EditHistory) -> list[Section]:
    methods = [d.method for d in result.deltas]
    return [Section("Edit: sequential edits, weight norms",
                    text=f"{len(methods)} edit(s) applied in order: {', '.join(methods) or 'none'}.",
                    table=[dict(r) for r in result.norms],
                    figure=edit_figures.norm_history_lines(result.norms) if result.norms else None,
                    params={"model": result.model.name, "methods": methods})]


def report_rows(report: EditReport) -> list[dict[str, Any]]:
    """The metric table of ``report`` with each estimate as text (mean [95 % CI], x100)."""
    return [{k: (str(v) if k in report.states and v is not None else v) for k, v in row.items()}
            for row in report.table()]


@to_sections.register
def _edit_report(result: EditReport) -> list[Section]:
    states = " and ".join(result.states)
    shown = [name for row in result.table() for name in [row.get("metric")] if name]
    text = (f"{result.method or 'unedited'} on {result.model}: {len(result.cases)} case(s), {states}; values x100 "
            f"with 95 % confidence intervals (CI) over the cases; each metric names its convention. "
            f"{result.seconds:.1f} s. " + eval_figures.explain(shown + ["CI"]))
    metrics = [m for m in eval_figures.DEFAULT_METRICS if any(m in a for a in result.aggregate.values())]
    figure = eval_figures.metrics_bars(result, metrics) if metrics else None
    return [Section(f"Evaluate: {result.method or 'unedited model'}", text=text, table=report_rows(result),
                    figure=figure, params={"model": result.model, "method": result.method,
                                           "cases": [c.case_id for c in result.cases], "states": list(result.states)})]
