"""WeightDelta: apply/revert bitwise, context form, double apply, compose, files, interrupts, undo stack."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from kvlens.editing import EditHistory, EditRequest, Part, WeightDelta
from kvlens.editing.delta import AppliedEdit

REQ = EditRequest("{} lives in", "Alice", "Paris")


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def same(model, snap) -> bool:
    now = model.hf.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[k], v) for k, v in snap.items())


def changed(model, snap) -> set[str]:
    now = model.hf.state_dict()
    return {k for k, v in snap.items() if not torch.equal(now[k], v)}


def make_delta(model, layer=1, role="value", rank=2, seed=0, scale=0.1) -> WeightDelta:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(model.d_ff, rank, generator=g) * scale
    right = torch.randn(rank, model.d_model, generator=g)
    return WeightDelta.from_model(model, {(layer, role): Part(left, right)}, method="test",
                                  hparams={"rank": rank}, requests=[REQ])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_apply_revert_is_bitwise_and_touches_only_declared_weight(model_type):
    m = tiny(model_type)
    snap = snapshot(m)
    d = make_delta(m)
    v_before = m.V(1).detach().clone()
    handle = d.apply(m)
    assert changed(m, snap) == {f"{m.spec.layers}.1.{m.spec.mlp}.{m.spec.value}.weight"}
    # the change is the canonical [d_ff, d_model] delta, whatever the stored layout
    torch.testing.assert_close(m.V(1) - v_before, d.parts[(1, "value")].dense(), atol=1e-6, rtol=1e-5)
    assert isinstance(handle, AppliedEdit) and d.is_applied(m)
    d.revert()
    assert same(m, snap) and not d.is_applied(m)


def test_context_manager_and_double_apply_refused():
    m = tiny("llama")
    snap = snapshot(m)
    d = make_delta(m)
    with d.applied(m):
        assert not same(m, snap)
        with pytest.raises(RuntimeError, match="already applied"):
            d.apply(m)
    assert same(m, snap)
    with pytest.raises(RuntimeError, match="not applied"):
        d.revert()


def test_context_manager_reverts_on_error():
    m = tiny("gpt2")
    snap = snapshot(m)
    d = make_delta(m)
    with pytest.raises(ZeroDivisionError), d.applied(m):
        raise ZeroDivisionError
    assert same(m, snap)


def test_keyboard_interrupt_during_apply_leaves_model_as_it_was(monkeypatch):
    m = tiny("llama")
    snap = snapshot(m)
    d = WeightDelta.from_model(m, {(0, "key"): Part(torch.ones(m.d_ff, m.d_model)),
                                   (1, "value"): Part(torch.ones(m.d_ff, m.d_model))},
                               method="test", hparams={}, requests=[REQ])
    calls = []
    original = WeightDelta._write

    def flaky(self, model, key, value):
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, model, key, value)

    monkeypatch.setattr(WeightDelta, "_write", flaky)
    with pytest.raises(KeyboardInterrupt):
        d.apply(m)
    assert len(calls) == 2 and same(m, snap) and not d.is_applied(m)


def test_stale_weights_refused_and_out_of_order_revert_composes():
    m = tiny("llama")
    snap = snapshot(m)
    a, b = make_delta(m, seed=0), make_delta(m, seed=1)
    ha = a.apply(m)
    with pytest.raises(ValueError, match="computed for other weights"):
        b.apply(m)
    hb = b.apply(m, force=True)
    ha.revert()  # out of order: A's change goes, B's stays (tests/test_faults.py checks the bits)
    assert not a.is_applied(m) and b.is_applied(m) and not same(m, snap)
    with pytest.raises(RuntimeError, match="already reverted"):
        ha.revert()
    hb.revert()
    assert same(m, snap)


def test_compose_equals_sequential_application():
    m = tiny("gpt2")
    snap = snapshot(m)
    a = make_delta(m, layer=1, seed=0)
    b = make_delta(m, layer=1, seed=1)
    c = make_delta(m, layer=0, role="key", seed=2)
    ab = a + b + c
    assert ab.parts[(1, "value")].rank == 4 and set(ab.parts) == {(1, "value"), (0, "key")}
    with ab.applied(m):
        composed = snapshot(m)
    with a.applied(m), b.applied(m, force=True), c.applied(m):
        sequential = snapshot(m)
    for k in composed:
        torch.testing.assert_close(composed[k], sequential[k], atol=1e-6, rtol=1e-5)
    assert same(m, snap)


def test_save_load_round_trip_and_refusals(tmp_path):
    m = tiny("llama")
    d = make_delta(m)
    d.info["outcome"] = {"reached": True}
    path = tmp_path / "edit.safetensors"
    d.save(path)
    back = WeightDelta.load(path, m)
    assert back.method == "test" and back.requests == (REQ,) and back.hparams == {"rank": 2}
    assert back.info["outcome"] == {"reached": True} and "torch" in back.info["versions"]
    for key, part in d.parts.items():
        assert torch.equal(back.parts[key].left, part.left) and torch.equal(back.parts[key].right, part.right)
    with pytest.raises(ValueError, match="does not belong"):
        WeightDelta.load(path, tiny("llama", seed=1))
    bad = tmp_path / "pickle.pt"
    torch.save({"x": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not a safetensors file"):
        WeightDelta.load(bad)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a kvlens WeightDelta"):
        WeightDelta.load(other)


def test_history_undo_stack_records_norms():
    m = tiny("llama")
    snap = snapshot(m)
    h = EditHistory(m)
    deltas = [make_delta(m, seed=0)]
    h.push(deltas[0])
    deltas.append(make_delta(m, seed=1))  # computed on the edited model
    h.push(deltas[1])
    assert len(h) == 2 and [r["step"] for r in h.norms] == [0.0, 1.0, 2.0]
    assert all("1.value" in r for r in h.norms) and h.norms[0]["1.value"] != h.norms[2]["1.value"]
    assert h.undo() is deltas[1]
    h.undo_all()
    assert same(m, snap)
    with pytest.raises(IndexError):
        h.undo()


def test_bad_parts_refused():
    m = tiny("gpt2")
    with pytest.raises(ValueError, match="do not chain"):
        Part(torch.zeros(4, 2), torch.zeros(3, 5))
    d = WeightDelta.from_model(m, {(1, "value"): Part(torch.zeros(3, 3))}, method="t", hparams={}, requests=[REQ])
    with pytest.raises(ValueError, match="shape"):
        d.apply(m)
    with pytest.raises(IndexError, match="out of range"):
        WeightDelta.from_model(m, {(7, "value"): Part(torch.zeros(m.d_ff, m.d_model))}, method="t",
                               hparams={}, requests=[REQ])
    with pytest.raises(ValueError, match="no gate"):
        WeightDelta.from_model(m, {(0, "gate"): Part(torch.zeros(m.d_ff, m.d_model))}, method="t",
                               hparams={}, requests=[REQ])


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "llama"])
def test_value_delta_as_trace_intervention_matches_weight_edit(model_type):
    from kvlens import tracing
    from kvlens.models.kvmodel import Site

    m = tiny(model_type)
    snap = snapshot(m)
    d = make_delta(m, layer=1) + make_delta(m, layer=2, seed=3)
    batch = m.tokenize(["Alice lives in", "Bob"])
    logits = Site("logits")
    traced = tracing.run(m, batch, write=d.writes(m), read=[logits])[logits]
    assert same(m, snap)
    with d.applied(m):
        edited = tracing.run(m, batch, read=[logits])[logits]
    torch.testing.assert_close(traced, edited, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="only value parts"):
        make_delta(m, role="key").writes(m)
