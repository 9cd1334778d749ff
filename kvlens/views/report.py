"""Self-contained HTML reports: plotly.js inlined once, no CDN, all user text escaped.

``Report(title).add(...)`` takes :class:`Section` objects or any kvlens result (traces, key
activations, projections, weight deltas, evaluation reports, Plotly figures, plain text):
results are turned into sections by :func:`kvlens.views.renderers.to_sections`, a registry
that views modules extend. ``save(path)`` writes one HTML file that needs no network.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.offline

from kvlens.version import versions


@dataclass
class Section:
    """One titled part of a report: escaped text, an optional table and figures, parameters.

    ``params`` records what produced the section (prompt, layers, method hyperparameters, the
    model's name...); it is shown under the section. ``figures`` holds further figures drawn
    after ``figure``.
    """

    title: str
    text: str = ""
    table: Sequence[Mapping[str, Any]] | None = None
    figure: go.Figure | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    figures: list[go.Figure] = field(default_factory=list)

    def all_figures(self) -> list[go.Figure]:
        """``figure`` (if any) followed by ``figures``."""
        return ([self.figure] if self.figure is not None else []) + list(self.figures)


_versions = versions  # backwards-compatible private name


def table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """An HTML table of ``rows`` (columns: the union of their keys), every cell escaped."""
    if not rows:
        return "<p><em>(empty table)</em></p>"
    cols: list[str] = []
    for r in rows:  # union of keys, in first-seen order
        cols.extend(c for c in r if c not in cols)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plain(value: Any) -> Any:
    """``value`` with every mapping key turned into a string (tuples of layer/role...), for JSON."""
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else ".".join(map(str, k)) if isinstance(k, tuple) else str(k): plain(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _anchor(index: int, title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    return f"s{index}-{slug}" if slug else f"s{index}"


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}details{margin:.5em 0;color:#555}pre{background:#f7f7f7;padding:.5em;overflow-x:auto}
.text{white-space:pre-wrap}nav ol{columns:2}
"""


def write_page(path: str | Path, text: str, what: str) -> Path:
    """Write ``text`` to ``path`` (folders created); a clear error naming ``what`` if it cannot."""
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OSError(f"cannot write {what} to {target}: {exc.strerror or exc}") from exc
    return target.resolve()


class Report:
    """An HTML report assembled from results: ``Report(title).add(trace, delta, scores).save(path)``."""

    def __init__(self, title: str) -> None:
        self.title = str(title)
        self.sections: list[Section] = []

    def add(self, *results: Any, params: Mapping[str, Any] | None = None) -> Report:
        """Append results or sections (returns self, for chaining).

        Args:
            results: :class:`Section` objects, Plotly figures, strings, or kvlens results
                (anything :func:`~kvlens.views.renderers.to_sections` has a renderer for).
            params: extra parameters recorded with every section these results produce.
        """
        from kvlens.views.renderers import load_renderers, to_sections  # they import Section

        load_renderers()
        new: list[Section] = []
        for result in results:
            new.extend(to_sections(result))
        if params:
            for s in new:
                s.params = {**dict(s.params), **dict(params)}
        self.sections.extend(new)
        return self

    def __len__(self) -> int:
        return len(self.sections)

    def _section_html(self, index: int, s: Section) -> str:
        parts = [f"<section id='{_anchor(index, s.title)}'><h2>{html.escape(s.title)}</h2>"]
        if s.text:
            parts.append(f"<div class='text'>{html.escape(s.text)}</div>")
        if s.table is not None:
            parts.append(table_html(list(s.table)))
        for fig in s.all_figures():
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False,
                                     config={"displaylogo": False, "responsive": True}))
        if s.params:
            dump = json.dumps(plain(dict(s.params)), indent=1, default=str)
            parts.append(f"<details><summary>parameters</summary><pre>{html.escape(dump)}</pre></details>")
        parts.append("</section>")
        return "".join(parts)

    def to_html(self) -> str:
        """The whole report as one HTML string (plotly.js inlined once if any figure)."""
        if not self.sections:
            raise ValueError("this report has no sections: add results with Report.add(...) before saving")
        needs_plotly = any(s.all_figures() for s in self.sections)
        head_js = f"<script>{plotly.offline.get_plotlyjs()}</script>" if needs_plotly else ""
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        parts = [f"<h1>{html.escape(self.title)}</h1>", f"<p>Written {stamp} by kvlens.</p>"]
        if len(self.sections) > 3:
            items = "".join(f"<li><a href='#{_anchor(i, s.title)}'>{html.escape(s.title)}</a></li>"
                            for i, s in enumerate(self.sections))
            parts.append(f"<nav><ol>{items}</ol></nav>")
        parts.extend(self._section_html(i, s) for i, s in enumerate(self.sections))
        dump = json.dumps(versions(), indent=1)
        parts.append("<details><summary>versions (every section above was produced with these)</summary>"
                     f"<pre>{html.escape(dump)}</pre></details>")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style>{head_js}</head><body>{''.join(parts)}</body></html>")

    def save(self, path: str | Path) -> Path:
        """Write the report to ``path`` (folders created); a clear error if it cannot be written."""
        return write_page(path, self.to_html(), "the report")

    def _repr_html_(self) -> str:  # a notebook shows the section list, not the whole page
        items = "".join(f"<li>{html.escape(s.title)}</li>" for s in self.sections)
        return f"<b>Report {html.escape(self.title)!s}</b>: {len(self.sections)} sections<ol>{items}</ol>"
