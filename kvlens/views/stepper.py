"""``EditStepper``: step through a queue of edits, one request at a time, with before/after views.

Each *Next* computes the chosen method's :class:`~kvlens.editing.delta.WeightDelta` for the next
request (with a progress indicator; cached, so a later *Next* over the same history is instant),
evaluates it before/after with :func:`kvlens.evaluate.evaluate`, reads the key activations at
the edited layers, and pushes it on an :class:`~kvlens.editing.history.EditHistory`. *Back*
reverts the last edit bitwise. The views show what the last step did: target vs true
probabilities on the prompt, its paraphrases and neighbours; key activations before vs after;
the metric table; inside the edit (‖ΔW‖ per weight, the optimisation record); weight norms over
the steps; and on demand a re-trace of the fact as a difference heatmap.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets

from kvlens.causal.trace import trace
from kvlens.datasets import EvalCase, as_cases, load_bundled
from kvlens.editing import MEMIT, ROME, KeyFT, LoRAKeys, LoRAValues, ValueFT
from kvlens.editing.base import EditMethod
from kvlens.editing.delta import WeightDelta
from kvlens.editing.history import EditHistory
from kvlens.editing.request import EditRequest
from kvlens.evaluate import EditReport, evaluate
from kvlens.memory.activations import KeyActivations, keys
from kvlens.models.kvmodel import KVModel
from kvlens.prompts import subject_span
from kvlens.views import edit_figures
from kvlens.views.render_edit import outcome_rows, report_rows
from kvlens.views.report import table_html
from kvlens.views.widgets import App, figure_widget, show_figure


def default_methods() -> dict[str, Callable[[], EditMethod]]:
    """The method menu: value-side and key-side methods with their presets for the model."""
    return {"ROME (values)": ROME, "MEMIT (values)": MEMIT, "fine-tune values": ValueFT,
            "fine-tune keys": KeyFT, "LoRA values": LoRAValues, "LoRA keys": LoRAKeys}


def to_request(case: EvalCase) -> EditRequest:
    """The edit request of an evaluation case."""
    return EditRequest(case.prompt, case.subject, case.target_new, case.target_true)


def probability_rows(report: EditReport) -> list[dict[str, Any]]:
    """Rows for :func:`~kvlens.views.edit_figures.target_probability_bars` from a before/after report."""
    before, after = report.raw["before"][0], report.raw["after"][0]
    rows: list[dict[str, Any]] = []
    groups = (("edited", "rewrite_new", "rewrite_true"), ("paraphrase", "paraphrase_new", "paraphrase_true"),
              ("neighbour", "neighborhood_new", "neighborhood_expected"))
    for group, new_key, true_key in groups:
        for i, score in enumerate(after[new_key] or after[true_key]):
            row: dict[str, Any] = {"group": group, "prompt": score.prompt}
            for state, raw in (("before", before), ("after", after)):
                row[f"p_new_{state}"] = raw[new_key][i].prob if raw[new_key] else None
                row[f"p_true_{state}"] = raw[true_key][i].prob if raw[true_key] else None
            rows.append(row)
    return rows


@dataclass
class Step:
    """One computed step: the delta, its before/after report, key activations before and after."""

    label: str
    case: EvalCase
    delta: WeightDelta
    report: EditReport
    keys_before: KeyActivations
    keys_after: KeyActivations | None = None


class EditStepper(App):
    """Step through edit requests with a chosen method; every step can be undone bitwise.

    Args:
        model: the model to edit (edits are applied to it; *Revert all* restores it bitwise).
        requests: the queue: :class:`~kvlens.editing.request.EditRequest` s,
            :class:`~kvlens.datasets.EvalCase` s (with paraphrases and neighbours) or records.
        methods: menu label -> factory of an editing method (default: :func:`default_methods`).
        method: the label selected at start (default: the first).
    """

    def __init__(self, model: KVModel, requests: Sequence[Any] = (), *,
                 methods: Mapping[str, Callable[[], EditMethod]] | None = None, method: str | None = None) -> None:
        self.model = model
        self.history = EditHistory(model)
        self.methods = dict(methods or default_methods())
        self.queue: list[EvalCase] = []
        self.steps: list[Step] = []  # the applied steps, in order
        self._cache: dict[tuple, Step] = {}
        self.compute_count = 0
        self.method = widgets.Dropdown(options=list(self.methods), value=method or next(iter(self.methods)),
                                       description="method")
        self.next_button = widgets.Button(description="Next ▶", button_style="primary")
        self.back_button = widgets.Button(description="◀ Back")
        self.all_button = widgets.Button(description="Apply all")
        self.revert_button = widgets.Button(description="Revert all", button_style="warning")
        self.position = widgets.HTML()
        self.list = widgets.Select(options=[], rows=6, layout=widgets.Layout(width="100%"))
        self.fields = {name: widgets.Text(description=name, placeholder=hint) for name, hint in
                       (("prompt", "{} is located in the city of"), ("subject", "The Eiffel Tower"),
                        ("target_new", " Rome"), ("target_true", " Paris (optional)"))}
        self.add_button = widgets.Button(description="Add request")
        self.n_cases = widgets.BoundedIntText(value=3, min=1, max=500, description="cases")
        self.cases_button = widgets.Button(description="Add from data set")
        self.probs, self.key_fig = figure_widget(height=380), figure_widget(height=320)
        self.parts_fig, self.opt_fig = figure_widget(height=300), figure_widget(height=300)
        self.norms_fig, self.trace_fig = figure_widget(height=300), figure_widget(height=420)
        self.shares_fig, self.edit_key_fig = figure_widget(height=10), figure_widget(height=10)
        self.metrics, self.inside = widgets.HTML(), widgets.HTML()
        self.retrace_button = widgets.Button(description="Re-trace (estimate)")
        tabs = widgets.Tab(children=[self.probs, self.key_fig, self.metrics,
                                     widgets.VBox([self.parts_fig, self.inside, self.opt_fig, self.shares_fig,
                                                   self.edit_key_fig]), self.norms_fig,
                                     widgets.VBox([self.retrace_button, self.trace_fig])])
        for i, title in enumerate(["probabilities", "key activations", "metrics", "inside the edit",
                                   "weight norms", "re-trace"]):
            tabs.set_title(i, title)
        controls = widgets.HBox([self.method, self.back_button, self.next_button, self.all_button,
                                 self.revert_button, self.position])
        adder = widgets.VBox([widgets.HBox(list(self.fields.values())[:2]),
                              widgets.HBox([*list(self.fields.values())[2:], self.add_button]),
                              widgets.HBox([self.n_cases, self.cases_button])])
        super().__init__([controls, self.list, adder, tabs])
        self.next_button.on_click(lambda _: self.next())
        self.back_button.on_click(lambda _: self.back())
        self.all_button.on_click(lambda _: self.apply_all())
        self.revert_button.on_click(lambda _: self.revert_all())
        self.add_button.on_click(lambda _: self.add_typed())
        self.cases_button.on_click(lambda _: self.add_from_dataset(self.n_cases.value))
        self.retrace_button.on_click(lambda _: self.retrace())
        if requests:
            self.add(requests)
        self._refresh()

    # ---- the queue ---------------------------------------------------------------------
    def add(self, requests: Any) -> None:
        """Append requests, cases or records to the queue."""
        items = [requests] if isinstance(requests, (EditRequest, EvalCase, dict)) else list(requests)
        cases = [EvalCase(f"typed-{len(self.queue) + i}", r.prompt, r.subject, r.target_new, r.target_true)
                 if isinstance(r, EditRequest) else as_cases(r)[0] for i, r in enumerate(items)]
        for case in cases:
            subject_span(self.model, case.prompt, case.subject)  # fails early on a bad subject
        self.queue.extend(cases)
        self._refresh()

    def add_typed(self) -> None:
        """Add the request typed in the fields (errors shown inline)."""
        f = {k: w.value for k, w in self.fields.items()}
        self.guard(lambda: self.add([EditRequest(f["prompt"], f["subject"], f["target_new"],
                                                 f["target_true"] or None)]), "adding a request")

    def add_from_dataset(self, n: int) -> None:
        """Add the next ``n`` cases of the bundled fact set not yet in the queue."""
        def load() -> None:
            known = {c.case_id for c in self.queue}
            self.add([c for c in load_bundled() if c.case_id not in known][:n])
        self.guard(load, f"loading {n} case(s)")

    # ---- stepping ----------------------------------------------------------------------
    def _key(self, upto: int) -> tuple:
        return tuple((s.label, s.case.case_id) for s in self.steps[:upto])

    def next(self) -> None:
        """Compute (or reuse) and apply the edit of the next request in the queue."""
        if len(self.steps) >= len(self.queue):
            self.show_error("the queue is done: add requests, or go Back")
            return
        self.guard(self._next, f"step {len(self.steps) + 1}")
        self._refresh()

    def _next(self) -> None:
        case, label = self.queue[len(self.steps)], self.method.value
        key = self._key(len(self.steps)) + ((label, case.case_id),)
        step = self._cache.get(key)
        with self.working(f"computing {label} for {case.rewrite_prompt!r}") as progress:
            if step is None:
                delta = self.methods[label]().compute(self.model, [to_request(case)])
                self.compute_count += 1
                progress(0.6)
                report = evaluate(self.model, [case], delta, method=label)
                progress(0.8)
                step = Step(label, case, delta, report, keys(self.model, case.rewrite_prompt, layers=delta.layers))
            self.history.push(step.delta)
            self.steps.append(step)
            if step.keys_after is None:
                step.keys_after = keys(self.model, case.rewrite_prompt, layers=step.delta.layers)
            self._cache[key] = step

    def back(self) -> None:
        """Revert the last applied edit (bitwise)."""
        if not self.steps:
            self.show_error("nothing to revert: no edit is applied")
            return
        self.guard(self.history.undo, "reverting the last edit")
        del self.steps[len(self.history):]
        self._refresh()

    def apply_all(self) -> None:
        """*Next* until the queue is done (stops at the first error)."""
        while len(self.steps) < len(self.queue) and not self.error.value:
            self.next()

    def revert_all(self) -> None:
        """Revert every applied edit: the weights are bitwise those before the first."""
        self.guard(self.history.undo_all, "reverting all edits")
        del self.steps[len(self.history):]
        self._refresh()

    # ---- views -------------------------------------------------------------------------
    def _refresh(self) -> None:
        marks = ["✓" if i < len(self.steps) else ("▶" if i == len(self.steps) else "·") for i in range(len(self.queue))]
        self.list.options = [f"{m} {i + 1}. {c.rewrite_prompt} → {c.target_new.strip()}"
                             + (f"  [{self.steps[i].label}]" if i < len(self.steps) else "")
                             for i, (m, c) in enumerate(zip(marks, self.queue))]
        self.position.value = f"<b>{len(self.steps)} / {len(self.queue)}</b> applied"
        self.back_button.disabled = not self.steps
        self.next_button.disabled = len(self.steps) >= len(self.queue)
        if self.steps:
            self._draw(self.steps[-1])
        if self.history.norms and self.steps:
            show_figure(self.norms_fig, edit_figures.norm_history_lines(self.history.norms))

    def _draw(self, step: Step) -> None:
        show_figure(self.probs, edit_figures.target_probability_bars(
            probability_rows(step.report), title=f"Step {len(self.steps)} ({step.label}): {step.case.rewrite_prompt}"))
        span = subject_span(self.model, step.case.prompt, step.case.subject)
        layer = step.delta.layers[0]
        if step.keys_after is not None:
            show_figure(self.key_fig, edit_figures.key_shift_bars(step.keys_before, step.keys_after, layer, span.last))
        self.metrics.value = table_html(report_rows(step.report))
        show_figure(self.parts_fig, edit_figures.part_norm_bars(step.delta))
        seconds = float(step.delta.info.get("seconds", 0.0))
        note = f"{step.delta.method} computed in {seconds:.1f} s; per-request optimisation record:"
        self.inside.value = (table_html(outcome_rows(step.delta)) + f"<p>{html.escape(note)}</p>"
                             + table_html(edit_figures.optimisation_rows(step.delta)))
        for widget, fig in ((self.opt_fig, edit_figures.optimisation_curve(step.delta)),
                            (self.shares_fig, edit_figures.layer_shares(step.delta)),
                            (self.edit_key_fig, edit_figures.key_bars(step.delta))):
            if fig is not None:
                show_figure(widget, fig)
            widget.layout.height = fig.layout.height if fig is not None else 10

    def retrace(self, mode: str = "approx") -> None:
        """Trace the last edited fact before and after its edit; show the difference heatmap."""
        if not self.steps:
            self.show_error("apply an edit first: the re-trace compares the fact before and after it")
            return

        def run() -> None:
            step = self.steps[-1]
            target = step.case.target_true or step.case.target_new
            args: dict[str, Any] = dict(prompt=step.case.prompt, subject=step.case.subject, target=target,
                                        mode=mode, progress=False)
            after = trace(self.model, **args)
            self.history.undo()
            try:
                before = trace(self.model, **args)
            finally:
                self.history.push(step.delta)
            show_figure(self.trace_fig, edit_figures.trace_difference(before, after))
        self.guard(run, "re-tracing before and after the edit")
