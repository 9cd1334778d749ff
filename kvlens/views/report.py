"""Self-contained HTML reports: plotly.js inlined once, no CDN, all user text escaped."""

from __future__ import annotations

import datetime as _dt
import html
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import plotly.graph_objects as go
import plotly.offline


@dataclass
class Section:
    """One titled part of a report: escaped text, an optional table and figure, parameters."""

    title: str
    text: str = ""
    table: list[Mapping[str, Any]] | None = None
    figure: go.Figure | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("kvlens", "torch", "transformers", "nnsight", "plotly"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _table_html(rows: list[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p><em>(empty table)</em></p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}details{margin:.5em 0;color:#555}pre{background:#f7f7f7;padding:.5em;overflow-x:auto}
.text{white-space:pre-wrap}
"""


class Report:
    """An HTML report assembled from sections: ``Report(title).add(...).save(path)``."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.sections: list[Section] = []

    def add(self, *sections: Section) -> "Report":
        """Append sections (returns self, for chaining)."""
        for section in sections:
            if not isinstance(section, Section):
                raise TypeError(f"Report.add takes Section objects, got {type(section).__name__}")
            self.sections.append(section)
        return self

    def to_html(self) -> str:
        """The whole report as one HTML string (plotly.js inlined once if any figure)."""
        if not self.sections:
            raise ValueError("this report has no sections: add results with Report.add(...) before saving")
        needs_plotly = any(s.figure is not None for s in self.sections)
        head_js = f"<script>{plotly.offline.get_plotlyjs()}</script>" if needs_plotly else ""
        parts = [f"<h1>{html.escape(self.title)}</h1>",
                 f"<p>Written {_dt.datetime.now().isoformat(timespec='seconds')} by kvlens.</p>"]
        for s in self.sections:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
            if s.text:
                parts.append(f"<div class='text'>{html.escape(s.text)}</div>")
            if s.table is not None:
                parts.append(_table_html(list(s.table)))
            if s.figure is not None:
                parts.append(s.figure.to_html(full_html=False, include_plotlyjs=False))
            if s.params:
                dump = json.dumps(dict(s.params), indent=1, default=str)
                parts.append(f"<details><summary>parameters</summary><pre>{html.escape(dump)}</pre></details>")
        dump = json.dumps(_versions(), indent=1)
        parts.append(f"<details><summary>versions</summary><pre>{html.escape(dump)}</pre></details>")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style>{head_js}</head><body>{''.join(parts)}</body></html>")

    def save(self, path: str | Path) -> Path:
        """Write the report to ``path`` (folders created); a clear error if it cannot be written."""
        path = Path(path).expanduser()
        text = self.to_html()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OSError(f"cannot write the report to {path}: {exc.strerror or exc}") from exc
        return path.resolve()
