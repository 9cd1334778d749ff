"""The renderer registry: kvlens results -> report sections.

:func:`to_sections` is a :func:`functools.singledispatch` function. Each views module that
draws a result type registers how that result appears in a report, with the parameters
that produced it; :meth:`kvlens.views.report.Report.add` calls it for anything that is not
already a :class:`~kvlens.views.report.Section`. Add your own type with::

    from kvlens.views.renderers import to_sections

    @to_sections.register
    def _(result: MyResult) -> list[Section]:
        return [Section("My result", text=str(result))]

The core never imports this module (results are data; views are functions of results).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Mapping
from typing import Any

import plotly.graph_objects as go

from kvlens.views.report import Section


@functools.singledispatch
def to_sections(result: Any) -> list[Section]:
    """The report sections showing ``result`` (a clear error for types with no renderer)."""
    if not load_renderers.cache_info().currsize:  # first call: the renderer modules register
        load_renderers()
        impl = to_sections.dispatch(type(result))
        if impl is not to_sections.registry[object]:
            return impl(result)
    raise TypeError(
        f"Report.add cannot show a {type(result).__module__}.{type(result).__qualname__}: no renderer is "
        "registered for it. Pass a Section, a plotly Figure, a string, a kvlens result, or register one "
        "with kvlens.views.renderers.to_sections.register"
    )


@to_sections.register
def _section(result: Section) -> list[Section]:
    return [result]


@to_sections.register
def _figure(result: go.Figure) -> list[Section]:
    title = result.layout.title.text if result.layout.title and result.layout.title.text else "Figure"
    return [Section(str(title), figure=result)]


@to_sections.register
def _text(result: str) -> list[Section]:
    return [Section("Notes", text=result)]


@to_sections.register(list)
@to_sections.register(tuple)
def _many(result: Iterable[Any]) -> list[Section]:
    return [s for item in result for s in to_sections(item)]


@to_sections.register(dict)
def _mapping(result: Mapping[str, Any]) -> list[Section]:
    """A plain mapping is shown as a two-column table titled by its ``"title"`` key, if any."""
    rows = [{"name": str(k), "value": v} for k, v in result.items() if k != "title"]
    return [Section(str(result.get("title", "Values")), table=rows)]


#: Views modules that register renderers for the results they draw (imported on first use, so
#: that importing the report does not import every verb).
RENDERER_MODULES: tuple[str, ...] = ("kvlens.views.render_memory", "kvlens.views.render_edit",
                                     "kvlens.views.render_causal", "kvlens.views.render_tuning")


@functools.cache
def load_renderers() -> tuple[str, ...]:
    """Import the modules in :data:`RENDERER_MODULES`; the names that imported."""
    loaded = []
    for name in RENDERER_MODULES:
        importlib.import_module(name)
        loaded.append(name)
    return tuple(loaded)
