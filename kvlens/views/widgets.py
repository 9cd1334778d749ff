"""ipywidgets apps: controls wired to kvlens core calls and to the figure functions.

Every app is an ``ipywidgets.VBox`` (display it as the last expression of a cell). Apps hold
no analysis code: a control change calls a core function (``kvlens.trace``, ``kvlens.keys``,
an editing method...) and redraws a Plotly ``FigureWidget`` from a function in
:mod:`kvlens.views`. Errors are shown inline, in red, and leave the model as it was.

The apps: :class:`~kvlens.views.explorers.TraceExplorer`,
:class:`~kvlens.views.explorers.MemoryBrowser`, :class:`~kvlens.views.stepper.EditStepper`.
"""

from __future__ import annotations

import html
import re
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import ipywidgets as widgets
import plotly.graph_objects as go

from kvlens.editing.delta import applied_edits

T = TypeVar("T")

#: Colour of inline error messages.
ERROR_COLOR = "#b00020"
#: Colour of inline warnings and of the "model edited" line.
WARNING_COLOR = "#b45f06"


def notebook_mode() -> str:
    """Make Plotly figures survive an offline HTML export of the notebook (nbconvert).

    JupyterLab's default renderer emits only Plotly's JSON mimetype, which nbconvert's HTML
    does not draw. This registers and selects ``plotly_mimetype+kvlens_offline``: the JSON
    for JupyterLab plus an HTML rendering that uses plotly.js inlined once per notebook and,
    unlike Plotly's own ``notebook`` renderer, loads no MathJax from a CDN. Returns the name
    of the renderer now in use.
    """
    import plotly.io as pio

    pio.renderers["kvlens_offline"] = _offline_renderer()
    pio.renderers.default = "plotly_mimetype+kvlens_offline"
    return pio.renderers.default


def _offline_renderer() -> Any:
    from plotly.io.base_renderers import NotebookRenderer

    class OfflineNotebookRenderer(NotebookRenderer):
        """Plotly's notebook renderer without the MathJax ``<script src=cdn>`` tag."""

        def to_mimebundle(self, fig_dict: Any) -> dict[str, str]:
            from plotly.io import to_html

            html_text = to_html(fig_dict, config=self.config, include_plotlyjs=False, include_mathjax=False,
                                full_html=False, default_width="100%", default_height=525, validate=False)
            return {"text/html": html_text}

    return OfflineNotebookRenderer(connected=False)


class Cancelled(KeyboardInterrupt):
    """Raised from a progress callback when the user presses *Cancel*.

    A ``KeyboardInterrupt`` on purpose: every editing method restores the model bitwise on one
    (in ``finally`` blocks), and ``except Exception`` handlers do not swallow it.
    """


def edit_state_text(model: Any) -> str:
    """``"model edited: 2 edits applied (ft L1 value, rome L5 value)"`` or ``"model unedited"``.

    Read from :func:`kvlens.editing.delta.applied_edits`, the model's own record: every app and
    report on the same model says the same.
    """
    edits = applied_edits(model)
    if not edits:
        return "model unedited"
    names = ", ".join(f"{h.delta.method} " + "+".join(f"L{l} {r}" for l, r in h.delta.parts) for h in edits[:4])
    more = f", +{len(edits) - 4} more" if len(edits) > 4 else ""
    return f"model edited: {len(edits)} edit{'s' if len(edits) != 1 else ''} applied ({names}{more})"


def refresh_edit_state(model: Any) -> None:
    """Redraw the edit-state line of every app open on ``model`` (after an apply or revert)."""
    for app in list(model.__dict__.get("_kvlens_apps", ())):
        app.show_edit_state()


def notice(min_height: str = "0") -> widgets.HTML:
    """An empty line placed next to a control, where its errors and warnings appear."""
    return widgets.HTML(value="", layout=widgets.Layout(min_height=min_height))


class App(widgets.VBox):
    """Base of kvlens apps: an edit-state line, inline errors, a status line with progress.

    Subclasses build their controls and call :meth:`guard` around each core call, naming the
    :func:`notice` next to the control that caused it: an exception becomes a red message there
    (and warnings an orange one) instead of a traceback. ``self.error`` is the notice of calls
    that name none. Pass ``model`` to show whether it is edited (shared by every app on it).
    """

    def __init__(self, children: list[widgets.Widget], *, model: Any = None, **kwargs: Any) -> None:
        self.error = notice("1.2em")
        self.notices: list[widgets.HTML] = [self.error]
        self.status = widgets.HTML(value="")
        self.busy = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="",
                                          layout=widgets.Layout(width="200px", visibility="hidden"))
        self.edit_state = widgets.HTML(value="")
        footer = widgets.HBox([self.busy, self.status])
        super().__init__(children=[self.edit_state, *children, footer, self.error], **kwargs)
        self._model = model
        if model is not None:
            model.__dict__.setdefault("_kvlens_apps", weakref.WeakSet()).add(self)
            self.show_edit_state()

    def show_edit_state(self) -> None:
        """Redraw the line that says whether the model is edited (orange when it is)."""
        if self._model is None:
            return
        text = edit_state_text(self._model)
        color = WARNING_COLOR if text != "model unedited" else "#2e7d32"
        self.edit_state.value = f"<span style='color:{color};font-weight:600'>● {html.escape(text)}</span>"

    def notice(self) -> widgets.HTML:
        """A new :func:`notice` owned by this app (cleared with the others by :meth:`clear_error`)."""
        box = notice()
        self.notices.append(box)
        return box

    # ---- messages ----------------------------------------------------------------------
    @property
    def error_text(self) -> str:
        """The errors shown, in every notice (plain text; empty when none)."""
        texts = (html.unescape(_strip_tags(re.sub(_SOFT_RE, "", n.value))) for n in self.notices)
        return " ".join(t for t in texts if t)

    @property
    def warning_text(self) -> str:
        """The warnings shown, in every notice (plain text; empty when none)."""
        return " ".join(html.unescape(_strip_tags(m)) for n in self.notices for m in re.findall(_WARNING_RE, n.value))

    def show_error(self, exc: BaseException | str, at: widgets.HTML | None = None) -> None:
        """Show ``exc`` in red (its type and message, escaped) at the notice ``at`` (default: ``error``)."""
        msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        (at or self.error).value = f"<span style='color:{ERROR_COLOR};font-weight:600'>⚠ {html.escape(msg)}</span>"

    def show_warnings(self, messages: list[str], at: widgets.HTML | None = None) -> None:
        """Show warnings in orange at the notice ``at`` (after any error there)."""
        if messages:
            box = at or self.error
            box.value += "".join(f"<div class='kvlens-warning' style='color:{WARNING_COLOR}'>⚠ warning: "
                                 f"{html.escape(m)}</div>"
                                 for m in dict.fromkeys(messages))

    def show_note(self, text: str, at: widgets.HTML | None = None) -> None:
        """Show an informative line (green) at the notice ``at``: not an error."""
        (at or self.error).value += f"<div class='kvlens-note' style='color:#2e7d32'>{html.escape(text)}</div>"

    @property
    def note_text(self) -> str:
        """The informative lines shown, in every notice (plain text)."""
        found = (m for n in self.notices for m in re.findall(r"<div class='kvlens-note'[^>]*>.*?</div>", n.value))
        return " ".join(html.unescape(_strip_tags(m)) for m in found)

    def clear_error(self) -> None:
        for box in self.notices:
            box.value = ""

    def say(self, text: str) -> None:
        """Show ``text`` (escaped) in the status line."""
        self.status.value = f"<span style='color:#555'>{html.escape(text)}</span>"

    # ---- running core calls ------------------------------------------------------------
    @contextmanager
    def working(self, what: str) -> Iterator[Callable[[float], None]]:
        """Show a busy indicator while the block runs; yields a ``progress(fraction)`` setter."""
        self.busy.layout.visibility = "visible"
        self.busy.bar_style = "info"
        self.busy.value = 0.0
        self.say(f"{what}…")
        start = time.perf_counter()

        def progress(fraction: float) -> None:
            self.busy.value = max(0.0, min(1.0, float(fraction)))

        try:
            yield progress
            self.say(f"{what}: done in {time.perf_counter() - start:.2f} s")
        finally:
            self.busy.layout.visibility = "hidden"

    def guard(self, fn: Callable[[], T], what: str = "working", at: widgets.HTML | None = None, *,
              clear: bool = True) -> T | None:
        """Run ``fn`` with the busy indicator; on an exception show it in red at ``at`` and return None.

        Warnings ``fn`` raises are shown in orange at ``at`` too (not only in the kernel log). A
        :class:`Cancelled` is reported as such. ``clear=False`` keeps the messages shown so far
        (a later stage of the same action).
        """
        if clear:
            self.clear_error()
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with self.working(what):
                    return fn()
        except Cancelled:
            self.say(f"{what}: cancelled; the model is as it was before")
            return None
        except Exception as exc:  # noqa: BLE001 - shown to the user in the widget, by design
            self.show_error(exc, at)
            self.say(f"{what}: failed")
            return None
        finally:
            # deprecation notices are about library code, not about the user's result: not shown
            shown = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
            self.show_warnings(shown, at)
            self.show_edit_state()


def scored_text(model: Any, target: str, how: str) -> str:
    """What is scored for a typed target, by the continuation rule of :func:`kvlens.prompts.continuation`
    (a leading space unless the text has one): ``' Rome' (1 token)``, or its pieces and ``how`` the
    tokens of a longer target are combined: ``' New York' = ' New' + ' York' (2 tokens; how)``."""
    from kvlens.prompts import continuation, continuation_ids

    text = continuation(target)
    ids = continuation_ids(model, text)
    if len(ids) == 1:
        return f"{text!r} (1 token)"
    pieces = " + ".join(repr(t) for t in model.token_strings(ids))
    return f"{text!r} = {pieces} ({len(ids)} tokens; {how})"


def check_index(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``low..high``; else a clear error that gives the range (never clamped)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} {value!r} is out of range: choose an integer from {low} to {high}")
    return value


def figure_widget(fig: go.Figure | None = None, height: int | None = None) -> go.FigureWidget:
    """An (empty) ``FigureWidget`` whose content :func:`show_figure` replaces in place."""
    fw = go.FigureWidget(fig) if fig is not None else go.FigureWidget()
    # The default template is set again on every redraw; plotly validates it each time (~0.15 s a
    # chart, most of a cached step's redraw) unless allowed not to: it is plotly's own, valid.
    fw._allow_disable_validation = True
    if height:
        fw.layout.height = height
    return fw


def show_figure(target: go.FigureWidget, fig: go.Figure) -> None:
    """Replace the traces and layout of ``target`` by those of ``fig`` (one redraw; none when
    ``target`` already shows this very figure object, as after a refresh that changed nothing)."""
    if getattr(target, "_kvlens_shown", None) is fig:
        return
    with target.batch_update():
        target.data = []
        target.add_traces(list(fig.data))
        target.layout = _without_template(fig)
    target._kvlens_shown = fig


_WARNING_RE = r"<div class='kvlens-warning'[^>]*>.*?</div>"
_SOFT_RE = r"<div class='kvlens-(?:warning|note)'[^>]*>.*?</div>"


def _without_template(fig: go.Figure) -> dict[str, Any]:
    """``fig``'s layout as data, its template left out when it is the default one (set by the widget)."""
    import plotly.io as pio

    layout = fig.layout.to_plotly_json()
    default = pio.templates[pio.templates.default] if isinstance(pio.templates.default, str) else None
    if default is not None and fig.layout.template == default:
        layout.pop("template", None)
    return layout


def _strip_tags(value: str) -> str:
    return re.sub(r"<[^>]+>", "", value)
