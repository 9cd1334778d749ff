"""EditStepper driven programmatically: Next / Back / Apply all / Revert all, bitwise undo, views."""

from __future__ import annotations

import html
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
    app.next()  # the same step again: reused, not recomputed (its latency: benchmarks/live_latency.py)
    assert app.compute_count == 2
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


def test_neighbours_edited_in_an_earlier_step_are_left_out_and_said(app):
    from kvlens.datasets import EvalCase

    bob = EvalCase("bob", "{} lives in", "Bob", " Rome", " Oslo", neighborhood_prompts=("Carl lives in",))
    ann = EvalCase("ann", "{} lives in", "Ann", " Lima", " Oslo",
                   neighborhood_prompts=("Bob lives in", "Dora lives in"))
    stepper = EditStepper(app.model, [bob, ann], methods=app.methods)
    stepper.next()
    assert "left out" not in stepper.metrics.value
    stepper.next()
    assert stepper.steps[-1].report.cases[0].neighborhood_prompts == ("Dora lives in",)  # Bob was edited in step 1
    assert [r["prompt"] for r in probability_rows(stepper.steps[-1].report) if r["group"] == "neighbour"] == [
        "Dora lives in"]
    assert "1 neighbour prompt(s) name a subject edited in this or an earlier step" in stepper.metrics.value
    stepper.revert_all()


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
    assert [p.step for p in app.progress_log] == list(range(1, steps + 1))  # the z loop reported every step
    assert {p.stage for p in app.progress_log} == {"target vectors"}
    names = [t.name for t in app.opt_fig.data]
    assert len(names) == 5 and len(app.opt_fig.data[0].y) == steps  # NLL, KL, penalty, ‖δ‖ and its clamp
    assert "share of the residual" in app.shares_fig.layout.title.text
    assert app.shares_fig.data[0].x == ("L0", "L1")
    assert app.edit_key_fig.data[0].name.startswith("k*") and app.edit_key_fig.layout.height > 10


def test_views_never_show_a_step_that_is_not_applied(app):
    app.next()
    assert "Step 1" in app.metrics.value and app.probs.layout.title.text.startswith("Step 1")
    app.method.value = "FT keys"
    app.next()
    assert "Step 2 (FT keys)" in app.metrics.value
    app.back()  # back to step 1: every tab shows step 1 again
    assert "Step 1 (FT values)" in app.metrics.value and app.probs.layout.title.text.startswith("Step 1")
    assert "Step 1:" in app.inside.value and app.key_fig.layout.height == 10  # FT values: no key chart
    app.revert_all()  # nothing applied: nothing from a step is left on screen
    assert "No edit is applied" in app.metrics.value and "No edit is applied" in app.inside.value
    for fig in (app.probs, app.acts_fig, app.parts_fig, app.norms_fig):
        assert "no edit is applied" in fig.layout.title.text and len(fig.data) == 0
    assert len(app.opt_fig.data) == 0 and len(app.trace_fig.data) == 0


def test_every_app_on_the_model_says_whether_it_is_edited(app):
    from kvlens.editing.delta import applied_edits
    from kvlens.views.explorers import MemoryBrowser

    browser = MemoryBrowser(app.model, "Bob lives in", layer=1, k=3)
    assert "model unedited" in browser.edit_state.value and "model unedited" in app.edit_state.value
    app.next()
    assert len(applied_edits(app.model)) == 1
    for shown in (app.edit_state.value, browser.edit_state.value):
        assert "model edited: 1 edit applied (ft L1 value)" in shown
    delta = app.steps[0].delta
    app.revert_all()
    assert applied_edits(app.model) == [] and "model unedited" in browser.edit_state.value
    with delta.applied(app.model):  # an edit applied by hand is seen too: the record is the model's
        assert len(applied_edits(app.model)) == 1
    assert applied_edits(app.model) == []


def test_value_edit_shows_where_it_acts_not_unchanged_keys(app):
    app.next()  # FT values at layer 1
    step = app.steps[0]
    change = step.readout_before.change(step.readout_after)
    assert change["mlp_subject"][0] == 0.0 and change["mlp_subject"][1] > 0  # acts at layer 1, not below
    assert change["resid_last"][0] == 0.0 and change["resid_last"][-1] > 0  # and on every layer above
    assert "where the edit acts" in app.acts_fig.layout.title.text
    assert list(app.acts_fig.data[0].y) == change["mlp_subject"]
    assert app.key_fig.layout.height == 10  # the key activations at layer 1 did not move: not drawn


def test_background_step_shows_progress_and_cancel_leaves_the_model_bit_identical():
    warnings.simplefilter("ignore")
    model = tiny("llama")
    slow = {"FT values": lambda: ValueFT(layers=(1,), lr=1e-6, steps=2000, early_stop=0.0, norm_constraint=None)}
    app = EditStepper(model, [EditRequest("{} lives in", "Bob", " Rome", " Oslo")], methods=slow, background=True)
    original = weights(model)
    app.next_button.click()
    deadline = time.monotonic() + 120
    while len(app.progress_log) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(app.progress_log) >= 3 and app.busy_computing  # steps advance while the kernel is free
    assert app.progress_log[-1].step > app.progress_log[0].step and app.busy.value > 0.05
    assert "fine-tuning step" in app.status.value and app.next_button.disabled
    assert app.cancel_button.layout.visibility == "visible"
    app.back()  # refused while computing, not queued
    assert "being computed" in app.error_text
    app.cancel_button.click()
    app.wait(60)
    assert not app.busy_computing and app.steps == [] and len(app.history) == 0
    assert same(model, original) and "cancelled" in app.error_text
    assert not app.next_button.disabled and app.cancel_button.layout.visibility == "hidden"


def test_typed_targets_follow_one_continuation_rule_and_say_what_is_scored(app):
    app.fields["prompt"].value = "{} is in"
    app.fields["subject"].value = "Carol"
    app.fields["target_new"].value = "Rome"  # no leading space: scored as " Rome", like everywhere else
    app.add_typed()
    assert app.error_text == "" and app.queue[-1].target_new == " Rome"
    assert "new target ' Rome'" in app.note_text and "geometric mean" in app.note_text  # multi-token here
    assert app.list.options[-1].endswith("→ ' Rome'")


def test_bad_input_is_refused_beside_its_box_and_leaves_everything_untouched(app):
    original, queued = weights(app.model), len(app.queue)
    cases = [({"prompt": "", "subject": "Bob", "target_new": "Rome"}, "prompt is empty"),
             ({"prompt": "{} is in", "subject": " ", "target_new": "Rome"}, "subject is empty"),
             ({"prompt": "{} is in", "subject": "Bob", "target_new": ""}, "target_new is empty"),
             ({"prompt": "Alice is in", "subject": "Bob", "target_new": "Rome"}, "is not in the prompt"),
             ({"prompt": "{} and {} are in", "subject": "Bob", "target_new": "Rome"}, "exactly one '{}'")]
    for typed, message in cases:
        for name, w in app.fields.items():
            w.value = typed.get(name, "")
        app.add_typed()
        assert message in html.unescape(app.add_notice.value) and message in app.error_text, typed
        assert len(app.queue) == queued and same(app.model, original)
    for bad in (0, -3, 10_000):
        app.n_cases.value = bad
        app.cases_button.click()
        assert "out of range: choose an integer from 1 to" in app.cases_notice.value
        assert app.n_cases.value == bad and len(app.queue) == queued  # said, never clamped
    empty = EditStepper(app.model, methods=app.methods)
    empty.next()  # nothing queued: said beside Next, nothing changes
    assert "the queue is done" in empty.step_notice.value and empty.steps == [] and same(app.model, original)
