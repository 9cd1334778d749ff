"""EditStepper driven programmatically: Next / Back / Apply all / Revert all, bitwise undo, views."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from kvlens.editing import KeyFT, ValueFT
from kvlens.editing.request import EditRequest
from kvlens.views.stepper import EditStepper, probability_rows
from tests.conftest import tiny


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.hf.named_parameters()}


def same(model, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(saved[n], p) for n, p in model.hf.named_parameters())


@pytest.fixture()
def app():
    warnings.simplefilter("ignore")
    model = tiny("llama")
    methods = {"FT values": lambda: ValueFT(layers=(1,), lr=0.05, steps=10, norm_constraint=None),
               "FT keys": lambda: KeyFT(layers=(1,), lr=0.05, steps=10, norm_constraint=None)}
    reqs = [EditRequest("{} lives in", "Bob", " Rome", " Oslo"), EditRequest("{} works at", "Alice", " Acme", " Zeta")]
    return EditStepper(model, reqs, methods=methods)


def test_next_back_are_bitwise_and_cached(app):
    original = weights(app.model)
    app.next()
    assert app.error_text == "" and len(app.steps) == 1 and app.compute_count == 1
    after_one = weights(app.model)
    assert not same(app.model, original)
    rows = probability_rows(app.steps[0].report)
    assert rows[0]["group"] == "edited" and rows[0]["p_new_after"] > rows[0]["p_new_before"]
    bars = {t.name: t for t in app.probs.data}
    assert set(bars) == {"p(new) before", "p(new) after", "p(true) before", "p(true) after"}
    assert all(t.orientation == "h" for t in app.probs.data)  # prompt texts on the left, never rotated
    assert list(bars["p(new) after"].x) == [rows[0]["p_new_after"]]  # the figure shows the measured values

    app.method.value = "FT keys"
    app.next()
    assert [s.label for s in app.steps] == ["FT values", "FT keys"] and "2 / 2" in app.position.value
    assert app.list.options[1].startswith("✓ 2.") and app.next_button.disabled
    app.back()
    assert same(app.model, after_one) and len(app.steps) == 1
    start = time.perf_counter()
    app.next()  # the same step again: reused, not recomputed
    assert time.perf_counter() - start < 1.0 and app.compute_count == 2
    app.revert_all()
    assert same(app.model, original) and app.steps == [] and app.back_button.disabled
    app.method.value = "FT values"
    app.apply_all()  # step 1 as before (cached), step 2 now with FT values (computed)
    assert [s.label for s in app.steps] == ["FT values", "FT values"] and app.compute_count == 3
    app.revert_all()
    assert same(app.model, original)


def test_views_show_keys_metrics_inside_and_norms(app):
    app.next()
    app.method.value = "FT keys"
    app.next()
    step = app.steps[-1]
    assert step.delta.layers == [1] and step.keys_after is not None
    assert app.key_fig.layout.title.text.startswith("Key activations at layer 1")
    # key-side edit: the key activations at the edited layer change
    assert not torch.equal(step.keys_before.at(1, 0, -1), step.keys_after.at(1, 0, -1))
    assert "ES" in app.metrics.value and "counterfact" in app.metrics.value
    assert "computed in" in app.inside.value and app.parts_fig.data[0].x == ("L1 key",)
    assert len(app.opt_fig.data) == 1  # fine-tuning records its loss per step
    assert {t.name for t in app.norms_fig.data} == {"L1 value", "L1 key"}


def test_errors_are_inline_and_leave_the_model_untouched(app):
    original = weights(app.model)
    app.back()
    assert "nothing to revert" in app.error_text
    app.fields["prompt"].value = "no placeholder here"
    app.fields["subject"].value = "Bob"
    app.fields["target_new"].value = " Rome"
    app.add_typed()
    assert "write the prompt as a template" in app.error_text and len(app.queue) == 2
    app.fields["prompt"].value = "{} is in"
    app.fields["subject"].value = "Carol"
    app.add_typed()
    assert app.error_text == "" and len(app.queue) == 3

    def broken():
        raise RuntimeError("optimiser diverged")

    app.methods["broken"] = lambda: type("Broken", (), {"compute": lambda self, m, r: broken()})()
    app.method.options = list(app.methods)
    app.method.value = "broken"
    app.next()
    assert "RuntimeError: optimiser diverged" in app.error_text and app.steps == []
    assert same(app.model, original)
    app.retrace()
    assert "apply an edit first" in app.error_text


def test_inside_the_edit_shows_the_target_optimisation_layer_shares_and_key():
    from kvlens.editing import MEMIT, Contexts, MEMITHparams, TargetOpt

    warnings.simplefilter("ignore")
    hp = MEMITHparams(layers=(0, 1), lam=1.0, opt=TargetOpt(steps=4, clamp=4.0), contexts=Contexts(n=1, tokens=2),
                      stats_tokens=2000)
    app = EditStepper(tiny("llama"), [EditRequest("{} lives in", "Bob", " Rome", " Oslo")],
                      methods={"MEMIT": lambda: MEMIT(hp)})
    app.next()
    assert app.error_text == ""
    steps = len(app.steps[0].delta.info["opt"]["curves"]["nll"][0])
    names = [t.name for t in app.opt_fig.data]
    assert len(names) == 5 and len(app.opt_fig.data[0].y) == steps  # NLL, KL, penalty, ‖δ‖ and its clamp
    assert "share of the residual" in app.shares_fig.layout.title.text
    assert app.shares_fig.data[0].x == ("L0", "L1")
    assert app.edit_key_fig.data[0].name.startswith("k*") and app.edit_key_fig.layout.height > 10
