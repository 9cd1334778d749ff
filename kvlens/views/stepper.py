"""``EditStepper``: step through a queue of edits, one request at a time, with before/after views.

Each *Next* computes the chosen method's :class:`~kvlens.editing.delta.WeightDelta` for the next
request (in a background thread inside a kernel, with the optimisation steps counted on the
progress bar and a *Cancel* that leaves the model bit-identical; cached, so a later *Next* over
the same history is instant), evaluates it before/after with :func:`kvlens.evaluate.evaluate`,
reads the key activations and the layer outputs from the edited layer up, and pushes it on an
:class:`~kvlens.editing.history.EditHistory`. *Back* reverts the last edit bitwise. The views
always show the state that is applied (cleared when none is): target vs true probabilities on
the prompt, its paraphrases and neighbours; where the edit acts (the key activations for a
key-side edit; the FFN outputs and residuals of the edited layer and those above it, and the
new target read from each layer); the metric table; inside the edit (‖ΔW‖ per weight, the
optimisation record); weight norms over the steps; and on demand a re-trace of the fact.
Errors and warnings appear next to the control that caused them.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ipywidgets as widgets

from kvlens.causal.trace import trace
from kvlens.datasets import EvalCase, as_cases, load_bundled, without_edited_neighbours
from kvlens.editing._shared import EditProgress
from kvlens.editing.base import EditMethod
from kvlens.editing.history import EditHistory
from kvlens.editing.request import EditRequest
from kvlens.evaluate import evaluate
from kvlens.independent import requests_of
from kvlens.memory.activations import keys
from kvlens.memory.readout import layer_readout
from kvlens.models.kvmodel import KVModel
from kvlens.prompts import continuation, continuation_ids, subject_span
from kvlens.views import edit_figures
from kvlens.views.render_edit import outcome_rows, report_rows
from kvlens.views.report import table_html
from kvlens.views.steps import (
    EDIT_SCORE,
    NO_EDIT_HTML,
    Step,
    default_methods,
    empty_figure,
    in_kernel,
    probability_rows,
)
from kvlens.views.widgets import (
    App,
    Cancelled,
    check_index,
    figure_widget,
    notice,
    refresh_edit_state,
    scored_text,
    show_figure,
)

__all__ = ["EDIT_SCORE", "EditStepper", "Step", "default_methods", "in_kernel", "probability_rows"]


class EditStepper(App):
    """Step through edit requests with a chosen method; every step can be undone bitwise.

    Args:
        model: the model to edit (edits are applied to it; *Revert all* restores it bitwise).
        requests: the queue: :class:`~kvlens.editing.request.EditRequest` s,
            :class:`~kvlens.datasets.EvalCase` s (with paraphrases and neighbours) or records.
        methods: menu label -> factory of an editing method (default: :func:`default_methods`).
        method: the label selected at start (default: the first).
        background: compute in a background thread, so that the page stays live and *Cancel*
            can be clicked (default: inside a kernel). Call :meth:`wait` to join it.
    """

    #: the state (:meth:`_key`) the shown re-trace belongs to; unset until the first re-trace
    _traced_for: tuple[Any, ...] | None

    def __init__(self, model: KVModel, requests: Sequence[Any] = (), *,
                 methods: Mapping[str, Callable[[], EditMethod]] | None = None, method: str | None = None,
                 background: bool | None = None) -> None:
        self.model = model
        self.history = EditHistory(model)
        self.methods = dict(methods or default_methods())
        self.queue: list[EvalCase] = []
        self.steps: list[Step] = []  # the applied steps, in order
        self._cache: dict[tuple, Step] = {}
        self._norm_fig: tuple[int, Any] = (-1, None)
        self.compute_count = 0
        self.background = in_kernel() if background is None else background
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None
        self.progress_log: list[EditProgress] = []  # the steps reported by the last computation
        self._blank = empty_figure("", 10)
        self._retrace_prompt = empty_figure("Re-trace: press the button to compare before and after the last "
                                            "applied edit")
        self._no_edit = {name: empty_figure(f"{name}: no edit is applied")
                         for name in ("Probabilities", "Where the edit acts", "Inside the edit", "Weight norms")}
        self.method = widgets.Dropdown(options=list(self.methods), value=method or next(iter(self.methods)),
                                       description="method")
        self.next_button = widgets.Button(description="Next ▶", button_style="primary")
        self.back_button = widgets.Button(description="◀ Back")
        self.all_button = widgets.Button(description="Apply all")
        self.revert_button = widgets.Button(description="Revert all", button_style="warning")
        self.cancel_button = widgets.Button(description="Cancel", button_style="danger",
                                            layout=widgets.Layout(visibility="hidden"))
        self.position = widgets.HTML()
        self.list = widgets.Select(options=[], rows=6, layout=widgets.Layout(width="100%"))
        self.fields = {name: widgets.Text(description=name, placeholder=hint) for name, hint in
                       (("prompt", "{} is located in the city of"), ("subject", "The Eiffel Tower"),
                        ("target_new", " Rome"), ("target_true", " Paris (optional)"))}
        self.add_button = widgets.Button(description="Add request")
        self.n_cases = widgets.IntText(value=3, description="cases")
        self.cases_button = widgets.Button(description="Add from data set")
        self.step_notice, self.add_notice = notice(), notice()
        self.cases_notice, self.retrace_notice = notice(), notice()
        self.probs, self.key_fig = figure_widget(height=380), figure_widget(height=10)
        self.acts_fig = figure_widget(height=360)
        self.parts_fig, self.opt_fig = figure_widget(height=300), figure_widget(height=300)
        self.norms_fig, self.trace_fig = figure_widget(height=300), figure_widget(height=420)
        self.shares_fig, self.edit_key_fig = figure_widget(height=10), figure_widget(height=10)
        self.metrics, self.inside = widgets.HTML(), widgets.HTML()
        self.retrace_button = widgets.Button(description="Re-trace (estimate)")
        tabs = widgets.Tab(children=[self.probs, widgets.VBox([self.acts_fig, self.key_fig]), self.metrics,
                                     widgets.VBox([self.parts_fig, self.inside, self.opt_fig, self.shares_fig,
                                                   self.edit_key_fig]), self.norms_fig,
                                     widgets.VBox([widgets.HBox([self.retrace_button, self.retrace_notice]),
                                                   self.trace_fig])])
        for i, title in enumerate(["probabilities", "where the edit acts", "metrics", "inside the edit",
                                   "weight norms", "re-trace"]):
            tabs.set_title(i, title)
        controls = widgets.HBox([self.method, self.back_button, self.next_button, self.all_button,
                                 self.revert_button, self.cancel_button, self.position])
        adder = widgets.VBox([widgets.HBox(list(self.fields.values())[:2]),
                              widgets.HBox([*list(self.fields.values())[2:], self.add_button]), self.add_notice,
                              widgets.HBox([self.n_cases, self.cases_button, self.cases_notice])])
        super().__init__([controls, self.step_notice, self.list, adder, tabs], model=model)
        self.notices += [self.step_notice, self.add_notice, self.cases_notice, self.retrace_notice]
        self.next_button.on_click(lambda _: self.next())
        self.back_button.on_click(lambda _: self.back())
        self.all_button.on_click(lambda _: self.apply_all())
        self.revert_button.on_click(lambda _: self.revert_all())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.add_button.on_click(lambda _: self.add_typed())
        self.cases_button.on_click(lambda _: self.add_from_dataset(self.n_cases.value))
        self.retrace_button.on_click(lambda _: self.retrace())
        if requests:
            self.add(requests)
        self._refresh()

    # ---- the queue ---------------------------------------------------------------------
    def add(self, requests: Any) -> None:
        """Append requests, cases or records to the queue (targets follow the continuation rule)."""
        items = [requests] if isinstance(requests, (EditRequest, EvalCase, dict)) else list(requests)
        cases = [EvalCase(f"typed-{len(self.queue) + i}", r.prompt, r.subject, continuation(r.target_new),
                          None if r.target_true is None else continuation(r.target_true))
                 if isinstance(r, EditRequest) else as_cases(r)[0] for i, r in enumerate(items)]
        for case in cases:
            subject_span(self.model, case.prompt, case.subject)  # fails early on a bad subject
            continuation_ids(self.model, case.target_new)
        self.queue.extend(cases)
        self._refresh()

    def add_typed(self) -> None:
        """Add the request typed in the fields (errors, and what will be scored, shown beside them)."""
        f = {k: w.value for k, w in self.fields.items()}

        def run() -> str:
            for name in ("prompt", "subject", "target_new"):
                if not f[name].strip():
                    raise ValueError(f"{name} is empty: type it in the {name!r} box")
            if "{" not in f["prompt"] and f["subject"] not in f["prompt"]:
                raise ValueError(f"subject {f['subject']!r} is not in the prompt {f['prompt']!r}: write the "
                                 "prompt as a template with '{}' where the subject goes, e.g. "
                                 "'{} is located in the city of'")
            self.add([EditRequest(f["prompt"], f["subject"], f["target_new"], f["target_true"].strip() and
                                  f["target_true"] or None)])
            scored = [f"new target {scored_text(self.model, f['target_new'], EDIT_SCORE)}"]
            if f["target_true"].strip():
                scored.append(f"true target {scored_text(self.model, f['target_true'], EDIT_SCORE)}")
            return "added; scored: " + "; ".join(scored)
        note = self.guard(run, "adding a request", at=self.add_notice)
        if note:
            self.show_note(note, self.add_notice)

    def add_from_dataset(self, n: Any) -> None:
        """Add the next ``n`` cases of the bundled fact set not yet in the queue."""
        def load() -> None:
            cases = load_bundled()
            known = {c.case_id for c in self.queue}
            fresh = [c for c in cases if c.case_id not in known]
            count = check_index(n, "cases", 1, max(1, len(fresh)))
            self.add(fresh[:count])
        self.guard(load, f"loading {n} case(s)", at=self.cases_notice)

    # ---- stepping ----------------------------------------------------------------------
    @property
    def busy_computing(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _key(self, upto: int) -> tuple:
        return tuple((s.label, s.case.case_id) for s in self.steps[:upto])

    def _refuse_while_busy(self) -> bool:
        if self.busy_computing:
            self.show_error("a step is being computed: wait for it, or press Cancel", self.step_notice)
            return True
        return False

    def next(self) -> None:
        """Compute (or reuse) and apply the edit of the next request in the queue."""
        if self._refuse_while_busy():
            return
        if len(self.steps) >= len(self.queue):
            self.clear_error()
            self.show_error("the queue is done: add requests, or go Back", self.step_notice)
            return
        self._start(lambda: self._next_guarded())

    def apply_all(self) -> None:
        """*Next* until the queue is done (stops at the first error or a Cancel)."""
        if self._refuse_while_busy():
            return

        def run() -> None:  # the tabs are drawn once, at the end; the position advances at each step
            while len(self.steps) < len(self.queue) and not self._cancel.is_set():
                if not self._next_guarded(draw=False):
                    break
        self._start(run)

    def _start(self, job: Callable[[], object]) -> None:
        """Run ``job`` now, or in a background thread with the controls locked and Cancel shown."""
        self._cancel.clear()
        if not self.background:
            job()
            return

        def work() -> None:
            try:
                job()
            finally:
                self._lock(False)
                self._refresh()
        self._lock(True)
        self._worker = threading.Thread(target=work, name="kvlens-edit-stepper", daemon=True)
        self._worker.start()

    def _lock(self, busy: bool) -> None:
        for button in (self.next_button, self.back_button, self.all_button, self.revert_button, self.add_button,
                       self.cases_button, self.retrace_button):
            button.disabled = busy
        self.cancel_button.layout.visibility = "visible" if busy else "hidden"
        self.cancel_button.disabled = not busy

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a background computation to end (no-op without one)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def cancel(self) -> None:
        """Stop the computation in progress at its next optimisation step; nothing is applied."""
        self._cancel.set()
        self.say("cancelling at the next optimisation step…")

    def _next_guarded(self, draw: bool = True) -> bool:
        done = self.guard(self._next, f"step {len(self.steps) + 1}", at=self.step_notice) is not None
        if self._cancel.is_set():
            self.show_error("cancelled: nothing was applied, the model is as it was before", self.step_notice)
        if draw:
            self._refresh()
        else:
            self._refresh_position()
        return done

    def _progress(self, label: str, set_fraction: Callable[[float], None]) -> Callable[[EditProgress], None]:
        self.progress_log = []

        def report(p: EditProgress) -> None:
            if self._cancel.is_set():
                raise Cancelled("cancelled by the user")
            self.progress_log.append(p)
            set_fraction(0.05 + 0.55 * min(1.0, p.step / max(1, p.total)))
            self.say(f"computing {label}: {p.stage} step {p.step}/{p.total} (at most), loss {p.loss:.3g}, "
                     f"{p.active} request(s) still optimising")
        return report

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")

    def _next(self) -> bool:
        case, label = self.queue[len(self.steps)], self.method.value
        key = self._key(len(self.steps)) + ((label, case.case_id),)
        step = self._cache.get(key)
        with self.working(f"computing {label} for {case.rewrite_prompt!r}") as progress:
            if step is None:
                target = case.target_new
                progress(0.02)
                readout = layer_readout(self.model, case.prompt, case.subject, target)
                method = self.methods[label]()
                try:
                    delta = method.compute(self.model, requests_of([case]), progress=self._progress(label, progress))
                except TypeError as exc:  # a user's method without the progress hook
                    if "progress" not in str(exc):
                        raise
                    delta = method.compute(self.model, requests_of([case]))
                self._check_cancel()
                self.compute_count += 1
                progress(0.6)
                # neighbours naming a subject edited by an applied step (or this one) are meant to change
                scored = without_edited_neighbours([*(s.case for s in self.steps), case])[-1]
                report = evaluate(self.model, [scored], delta, method=label)
                self._check_cancel()
                progress(0.8)
                step = Step(label, case, delta, report, keys(self.model, case.rewrite_prompt, layers=delta.layers),
                            readout)
            self.history.push(step.delta)
            self.steps.append(step)
            try:
                if step.keys_after is None:
                    step.keys_after = keys(self.model, case.rewrite_prompt, layers=step.delta.layers)
                    step.readout_after = layer_readout(self.model, case.prompt, case.subject, case.target_new)
            except BaseException:
                self.steps.pop()
                self.history.undo()
                raise
            finally:
                refresh_edit_state(self.model)
            self._cache[key] = step
        return True

    def back(self) -> None:
        """Revert the last applied edit (bitwise)."""
        if self._refuse_while_busy():
            return
        if not self.steps:
            self.clear_error()
            self.show_error("nothing to revert: no edit is applied", self.step_notice)
            return
        self.guard(self.history.undo, "reverting the last edit", at=self.step_notice)
        del self.steps[len(self.history):]
        refresh_edit_state(self.model)
        self._refresh()

    def revert_all(self) -> None:
        """Revert every applied edit: the weights are bitwise those before the first."""
        if self._refuse_while_busy():
            return
        self.guard(self.history.undo_all, "reverting all edits", at=self.step_notice)
        del self.steps[len(self.history):]
        refresh_edit_state(self.model)
        self._refresh()

    # ---- views -------------------------------------------------------------------------
    def _refresh(self) -> None:
        self._refresh_position()
        shown = self._key(len(self.steps))
        if getattr(self, "_traced_for", None) != shown:  # the re-trace belonged to another state
            show_figure(self.trace_fig, self._retrace_prompt)
            self._traced_for = None
        if self.steps:
            self._draw(self.steps[-1])
            # the norms of every push and undo so far: redrawn only when the history grew
            if self._norm_fig[0] != len(self.history.norms):
                self._norm_fig = (len(self.history.norms), edit_figures.norm_history_lines(self.history.norms))
            show_figure(self.norms_fig, self._norm_fig[1])
        else:
            self._clear()

    def _refresh_position(self) -> None:
        """The queue's marks, the position, the buttons and the model's edit state (no chart)."""
        marks = ["✓" if i < len(self.steps) else ("▶" if i == len(self.steps) else "·") for i in range(len(self.queue))]
        self.list.options = [f"{m} {i + 1}. {c.rewrite_prompt} → {c.target_new!r}"
                             + (f"  [{self.steps[i].label}]" if i < len(self.steps) else "")
                             for i, (m, c) in enumerate(zip(marks, self.queue))]
        self.position.value = f"<b>{len(self.steps)} / {len(self.queue)}</b> applied"
        if not self.busy_computing:
            self.back_button.disabled = not self.steps
            self.next_button.disabled = len(self.steps) >= len(self.queue)
        self.show_edit_state()

    def _clear(self) -> None:
        """No edit applied: every tab says so (nothing left from a step that is no longer applied)."""
        for widget, name in ((self.probs, "Probabilities"), (self.acts_fig, "Where the edit acts"),
                             (self.parts_fig, "Inside the edit"), (self.norms_fig, "Weight norms")):
            show_figure(widget, self._no_edit[name])
        for widget in (self.key_fig, self.opt_fig, self.shares_fig, self.edit_key_fig):
            show_figure(widget, self._blank)
            widget.layout.height = 10
        self.metrics.value = self.inside.value = NO_EDIT_HTML

    def _draw(self, step: Step) -> None:
        n = len(self.steps)
        title = (f"Step {n} ({step.label}): p(new = {step.case.target_new!r})"
                 + (f" vs p(true = {step.case.target_true!r})" if step.case.target_true else ""))
        show_figure(self.probs, step.figure(f"probs {n}", lambda: edit_figures.target_probability_bars(
            probability_rows(step.report), title=title)))
        if step.readout_after is not None:
            readout_after = step.readout_after
            show_figure(self.acts_fig, step.figure("reach", lambda: edit_figures.edit_reach_lines(
                step.readout_before, readout_after, step.delta.layers, step.label)))
        key_fig = None
        if step.key_side and step.keys_after is not None:
            keys_after = step.keys_after
            span = subject_span(self.model, step.case.prompt, step.case.subject)
            key_fig = step.figure("keys", lambda: edit_figures.key_shift_bars(
                step.keys_before, keys_after, step.delta.layers[0], span.last))
        left_out = len(step.case.neighborhood_prompts) - len(step.report.cases[0].neighborhood_prompts)
        note = (f"<p>{left_out} neighbour prompt(s) name a subject edited in this or an earlier step: left out of NS "
                "(they are meant to change).</p>" if left_out else "")
        self.metrics.value = (f"<p>Step {n} ({html.escape(step.label)}), "
                              f"{html.escape(step.case.rewrite_prompt)} → {html.escape(repr(step.case.target_new))}"
                              "</p>" + note + table_html(report_rows(step.report)))
        show_figure(self.parts_fig, step.figure("parts", lambda: edit_figures.part_norm_bars(step.delta)))
        seconds = float(step.delta.info.get("seconds", 0.0))
        note = f"Step {n}: {step.delta.method} computed in {seconds:.1f} s; per-request optimisation record:"
        self.inside.value = (table_html(outcome_rows(step.delta)) + f"<p>{html.escape(note)}</p>"
                             + table_html(edit_figures.optimisation_rows(step.delta)))
        for widget, fig in ((self.key_fig, key_fig),
                            (self.opt_fig, step.figure("opt", lambda: edit_figures.optimisation_curve(step.delta))),
                            (self.shares_fig, step.figure("shares", lambda: edit_figures.layer_shares(step.delta))),
                            (self.edit_key_fig, step.figure("key", lambda: edit_figures.key_bars(step.delta)))):
            show_figure(widget, fig if fig is not None else self._blank)
            widget.layout.height = fig.layout.height if fig is not None else 10

    def retrace(self, mode: str = "approx") -> None:
        """Trace the last edited fact before and after its edit; show the difference heatmap."""
        if self._refuse_while_busy():
            return
        if not self.steps:
            self.clear_error()
            self.show_error("apply an edit first: the re-trace compares the fact before and after it",
                            self.retrace_notice)
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
            self._traced_for = self._key(len(self.steps))
        self.guard(run, "re-tracing before and after the edit", at=self.retrace_notice)
