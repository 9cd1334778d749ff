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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import ipywidgets as widgets
import plotly.graph_objects as go

T = TypeVar("T")

#: Colour of inline error messages.
ERROR_COLOR = "#b00020"


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


class App(widgets.VBox):
    """Base of kvlens apps: a red error line, a status line with a busy indicator.

    Subclasses build their controls and call :meth:`guard` around each core call: an
    exception becomes a red message in the app (``self.error``) instead of a traceback.
    """

    def __init__(self, children: list[widgets.Widget], **kwargs: Any) -> None:
        self.error = widgets.HTML(value="", layout=widgets.Layout(min_height="1.2em"))
        self.status = widgets.HTML(value="")
        self.busy = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="",
                                          layout=widgets.Layout(width="200px", visibility="hidden"))
        footer = widgets.HBox([self.busy, self.status])
        super().__init__(children=[*children, footer, self.error], **kwargs)

    # ---- messages ----------------------------------------------------------------------
    @property
    def error_text(self) -> str:
        """The error shown (plain text; empty when none)."""
        return html.unescape(_strip_tags(self.error.value))

    def show_error(self, exc: BaseException | str) -> None:
        """Show ``exc`` in red (its type and message, escaped)."""
        msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.error.value = f"<span style='color:{ERROR_COLOR};font-weight:600'>⚠ {html.escape(msg)}</span>"

    def clear_error(self) -> None:
        self.error.value = ""

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

    def guard(self, fn: Callable[[], T], what: str = "working") -> T | None:
        """Run ``fn`` with the busy indicator; on an exception show it in red and return None."""
        self.clear_error()
        try:
            with self.working(what):
                return fn()
        except Exception as exc:  # noqa: BLE001 - shown to the user in the widget, by design
            self.show_error(exc)
            self.say(f"{what}: failed")
            return None


def figure_widget(fig: go.Figure | None = None, height: int | None = None) -> go.FigureWidget:
    """An (empty) ``FigureWidget`` whose content :func:`show_figure` replaces in place."""
    fw = go.FigureWidget(fig) if fig is not None else go.FigureWidget()
    if height:
        fw.layout.height = height
    return fw


def show_figure(target: go.FigureWidget, fig: go.Figure) -> None:
    """Replace the traces and layout of ``target`` by those of ``fig`` (one redraw)."""
    with target.batch_update():
        target.data = []
        target.add_traces(list(fig.data))
        target.layout = fig.layout


def _strip_tags(value: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", value)
