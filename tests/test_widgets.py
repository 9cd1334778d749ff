"""Widget apps driven programmatically: errors inline in red, figures redrawn in place."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

from kvlens.views import widgets as kw


def test_guard_shows_errors_inline_and_returns_values():
    app = kw.App([])
    assert app.guard(lambda: 41 + 1, "adding") == 42
    assert app.error.value == "" and "adding: done" in app.status.value
    assert app.busy.layout.visibility == "hidden"

    def boom() -> None:
        raise ValueError("subject <b>x</b> is not in the prompt")

    assert app.guard(boom, "tracing") is None
    assert kw.ERROR_COLOR in app.error.value and "&lt;b&gt;" in app.error.value
    assert app.error_text == "⚠ ValueError: subject <b>x</b> is not in the prompt"
    assert "tracing: failed" in app.status.value and app.busy.layout.visibility == "hidden"
    app.guard(lambda: None)
    assert app.error_text == ""


def test_show_figure_replaces_content_in_place():
    target = kw.figure_widget(height=300)
    kw.show_figure(target, go.Figure(go.Bar(y=[1, 2]), layout=dict(title="first")))
    kw.show_figure(target, go.Figure([go.Scatter(y=[3]), go.Scatter(y=[4])], layout=dict(title="second")))
    assert [t.type for t in target.data] == ["scatter", "scatter"] and target.layout.title.text == "second"


def test_notebook_mode_selects_an_offline_renderer():
    before = pio.renderers.default
    try:
        name = kw.notebook_mode()
        bundle = pio.renderers["kvlens_offline"].to_mimebundle(go.Figure(go.Bar(y=[1])).to_dict())
        assert name == "plotly_mimetype+kvlens_offline"
        assert "Plotly.newPlot" in bundle["text/html"] and "<script src=" not in bundle["text/html"]
    finally:
        pio.renderers.default = before
