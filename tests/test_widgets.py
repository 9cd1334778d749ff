"""Widget apps driven programmatically: errors inline in red, figures redrawn in place."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
import pytest

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


def test_guard_shows_errors_and_warnings_at_the_control_that_caused_them():
    import warnings

    app = kw.App([])
    box = app.notice()

    def warns() -> int:
        warnings.warn("the clean run gives the target ' Paris' probability 3e-06", stacklevel=1)
        return 1

    assert app.guard(warns, "tracing", at=box) == 1
    assert "probability 3e-06" in box.value and app.error.value == ""  # beside its control, not at the bottom
    assert app.error_text == "" and "3e-06" in app.warning_text
    app.guard(lambda: 1 / 0, "dividing", at=box)
    assert "ZeroDivisionError" in box.value and app.error.value == "" and "ZeroDivisionError" in app.error_text


def test_check_index_says_the_range_and_never_clamps():
    assert kw.check_index(3, "layer", 0, 29) == 3
    for bad in (-1, 30, 2.0, True, None):
        with pytest.raises(ValueError, match=r"out of range: choose an integer from 0 to 29"):
            kw.check_index(bad, "layer", 0, 29)


def test_edit_state_is_read_from_the_model_and_redrawn_in_every_app():
    import torch

    from kvlens.editing.delta import Part, WeightDelta, applied_edits
    from tests.conftest import tiny

    model = tiny("gpt2")
    apps = [kw.App([], model=model), kw.App([], model=model)]
    assert all("model unedited" in a.edit_state.value for a in apps)
    delta = WeightDelta.from_model(model, {(1, "value"): Part(torch.ones(model.d_ff, model.d_model) * 1e-3)},
                                   method="by-hand", hparams={}, requests=[])
    handle = delta.apply(model)
    kw.refresh_edit_state(model)
    assert len(applied_edits(model)) == 1
    assert all("model edited: 1 edit applied (by-hand L1 value)" in a.edit_state.value for a in apps)
    handle.revert()
    kw.refresh_edit_state(model)
    assert applied_edits(model) == [] and all("model unedited" in a.edit_state.value for a in apps)
