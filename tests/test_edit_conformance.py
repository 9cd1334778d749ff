"""One conformance suite: every editing method x every registered family, on tiny random models.

compute leaves the weights bit-identical; apply changes only the declared weights; revert is
bitwise; double apply is refused; save/load round-trips; a delta for other weights is refused.
Bad input fails with a clear error before any work, the model untouched.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import tiny

import kvlens
import kvlens.editing
from kvlens import tracing
from kvlens.editing import (
    MEMIT,
    ROME,
    AlphaEdit,
    AlphaEditHparams,
    Contexts,
    EditRequest,
    FineTune,
    LoRA,
    MEMITHparams,
    ROMEHparams,
    TargetOpt,
    WeightDelta,
)
from kvlens.editing._shared import build_rows
from kvlens.editing.memit import target_vectors
from kvlens.models.kvmodel import Batch, Site

# The subject ends each prompt: in a tiny random model attention barely carries a state from one position
# to another, so a change at the subject's last token (ROME/MEMIT's key) reaches the prediction only there.
# One-letter targets (" P" = two byte tokens): a rank-one update also moves every later position whose key
# leans on C⁻¹k*, and in a random model every key does; with a 5-token target such as " Paris" ROME, MEMIT
# and AlphaEdit on several families raise p(target) in their own optimisation but lower it once inserted,
# while with one letter each of the 69 method x family cases raises it (smallest rise 3e-4 in log, FT keys
# under its 1e-2 norm constraint).
REQS = [EditRequest("The home of {}", "Alice", "P"), EditRequest("The boss of {}", "Bob", "A")]
CTX = Contexts(n=1, tokens=2)
OPT = TargetOpt(steps=12, clamp=50.0, weight_decay=0.0)


def editable(family, **kw):
    """A tiny random model whose head is scaled ×30: with the init's std 0.02 its logits span about ±0.1, so
    p(target) is ~1/vocab whatever the residual; scaled, an edit can move it (and the outcome check can fail)."""
    m = tiny(family, **kw)
    with torch.no_grad():
        m.unembedding.weight.mul_(30.0)
    return m


def stats(model, layers):
    """E[kkᵀ] of the model's own keys on random token windows (the scale the updates are solved at)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (16, 24), generator=g)
    batch = Batch(ids, torch.ones_like(ids), ("",) * len(ids))
    keys = tracing.run(model, batch, read=[Site("key", l) for l in layers])

    def moment(k: torch.Tensor) -> torch.Tensor:
        # GELU keys of a 32-wide tiny model span barely more than 32 of their d_ff directions: C is
        # numerically singular (kvlens refuses to invert it). A ridge of 1 % of the mean variance keeps
        # its scale and makes it invertible, as a larger sample would.
        C = k.T @ k / len(k)
        return C + 0.01 * C.diagonal().mean() * torch.eye(len(C), dtype=C.dtype)

    return {l: moment(keys[Site("key", l)].reshape(-1, model.d_ff).double()).float() for l in layers}


def _alphaedit(m):
    C = stats(m, [0, 1])
    eig = torch.cat([torch.linalg.eigvalsh(c.double()) for c in C.values()])
    hp = AlphaEditHparams(layers=(0, 1), opt=OPT, contexts=CTX, nullspace_threshold=float(eig.median()),
                          l2=1e-3 * float(eig.mean()))
    return AlphaEdit(hp), {"stats": C}


METHODS = {
    "rome": lambda m: (ROME(ROMEHparams(layer=1, opt=OPT, contexts=CTX)), {"stats": stats(m, [1])}),
    "memit": lambda m: (MEMIT(MEMITHparams(layers=(0, 1), lam=1.0, opt=OPT, contexts=CTX, z_batch=1)),
                        {"stats": stats(m, [0, 1])}),
    "alphaedit": _alphaedit,
    "ft-key": lambda m: (FineTune(role="key", layers=(1,), steps=3, lr=5e-2, norm_constraint=1e-2), {}),
    "ft-value": lambda m: (FineTune(role="value", layers=(0, 2), steps=3, lr=5e-2, kl_factor=0.1), {}),
    "ft-gate": lambda m: (FineTune(role="gate", layers=(1,), steps=3, lr=5e-2), {}),
    "lora-key": lambda m: (LoRA(role="key", layers=(1,), steps=3, lr=5e-2), {}),
    "lora-value": lambda m: (LoRA(role="value", layers=(1,), steps=3, lr=5e-2, kl_factor=0.1), {}),
}
FAMILIES = kvlens.registered_types()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def changed(model, snap) -> set[str]:
    now = model.hf.state_dict()
    assert set(now) == set(snap)
    return {k for k, v in snap.items() if not torch.equal(now[k], v)}


def param_name(model, layer, role) -> str:
    path = {"key": model.spec.key, "gate": model.spec.gate, "value": model.spec.value}[role]
    return f"{model.spec.layers}.{layer}.{model.spec.mlp}.{path}.weight"


def assert_raises_targets(delta, min_log_rise=1e-4):
    """Each request's p(target_new) on its own prompt rises by at least ``min_log_rise`` (in log) under the
    edit: an outcome check that a method returning a zero, negligible or wrong-signed delta fails."""
    rows = delta.info["outcome"]["requests"]
    assert [r["prompt"] for r in rows] == [q.text for q in delta.requests]
    for r in rows:
        assert 0 < r["p_before"] <= 1 and 0 < r["p_after"] <= 1
        rise = math.log(r["p_after"]) - math.log(r["p_before"])
        assert rise >= min_log_rise, (f"{delta.method} did not raise p({r['target']!r}) on {r['prompt']!r}: "
                                      f"{r['p_before']:.4g} -> {r['p_after']:.4g}")


def compute(method, model, **kw):
    factory = METHODS[method]
    editor, extra = factory(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny random models rarely reach the goal
        return editor.compute(model, REQS, **extra, **kw)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_conformance(family, method, tmp_path):
    m = editable(family)
    if method == "ft-gate" and "gate" not in m.roles():
        with pytest.raises(ValueError, match="no 'gate' projection"):
            compute(method, m)
        return
    snap = snapshot(m)
    delta = compute(method, m)
    assert not changed(m, snap), "compute must leave the model bit-identical"
    assert isinstance(delta, WeightDelta) and delta.requests == tuple(REQS)
    assert_raises_targets(delta)
    declared = {param_name(m, l, r) for l, r in delta.parts}
    delta.apply(m)
    assert changed(m, snap) == declared
    with pytest.raises(RuntimeError, match="already applied"):
        delta.apply(m)
    delta.revert()
    assert not changed(m, snap)
    path = tmp_path / "d.safetensors"
    delta.save(path)
    back = WeightDelta.load(path, m)
    assert set(back.parts) == set(delta.parts) and back.hparams == delta.hparams
    with back.applied(m):
        assert changed(m, snap) == declared
    assert not changed(m, snap)
    with pytest.raises(ValueError, match="does not belong"):
        WeightDelta.load(path, tiny(family, seed=1))


@pytest.mark.parametrize("method", ["rome", "memit", "ft-value", "lora-key"])
def test_layers_outside_the_model_refused_untouched(method):
    m = tiny("llama")
    snap = snapshot(m)
    editor, extra = METHODS[method](m)
    bad = {"rome": {"layer": 7}, "memit": {"layers": (1, 9)}}.get(method, {"layers": (5,)})
    editor = type(editor)(editor.hparams_for(m), **bad)
    with pytest.raises(IndexError, match="out of range"):
        editor.compute(m, REQS, **extra)
    assert not changed(m, snap)


def test_bad_statistics_refused_untouched():
    m = tiny("gpt2")
    snap = snapshot(m)
    editor, extra = METHODS["rome"](m)
    nan = extra["stats"][1].clone()
    nan[3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        editor.compute(m, REQS[:1], stats={1: nan})
    with pytest.raises(ValueError, match="shape"):
        editor.compute(m, REQS[:1], stats={1: torch.eye(5)})
    with pytest.raises(ValueError, match="conflicting"):
        editor.compute(m, [REQS[0], EditRequest("The home of {}", "Alice", "Oslo")], **extra)
    assert not changed(m, snap)


@pytest.mark.parametrize(("family", "overrides"), [("llama", {}), ("gpt2", {}), ("gptj", {}),
                                                   ("mistral", {"sliding_window": 4})])
def test_memit_batched_z_equals_one_by_one(family, overrides):
    """Batched z with cached layers and positions equals the paper's one-by-one full forwards."""
    m = tiny(family, **overrides)
    hp = MEMITHparams(layers=(0, 1), opt=TargetOpt(steps=6, lr=0.5, clamp=4.0, weight_decay=0.0),
                      contexts=CTX, z_batch=None)
    rows = build_rows(m, REQS, ("{}", "Hi. {}"))
    z_all, h, _ = target_vectors(m, rows, hp)
    z_one, _, _ = target_vectors(m, rows, replace(hp, z_batch=1, skip_fixed=False))
    assert (z_all - h).norm() > 0
    torch.testing.assert_close(z_all, z_one, atol=1e-4, rtol=1e-4)


def test_rome_key_fix_switch_changes_only_the_denominator():
    m = tiny("gpt2")
    fixed = ROME(ROMEHparams(layer=1, opt=OPT, contexts=Contexts(n=2, tokens=2)))
    orig = ROME(ROMEHparams(layer=1, opt=OPT, contexts=Contexts(n=2, tokens=2), key_fix=False))
    kw = {"stats": stats(m, [1]), "report": False}
    a, b = fixed.compute(m, REQS[:1], **kw), orig.compute(m, REQS[:1], **kw)
    pa, pb = a.parts[(1, "value")], b.parts[(1, "value")]
    assert torch.equal(pa.right, pb.right)  # same δ (seeded contexts)
    ratio = pa.left / pb.left
    torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4, atol=1e-6)
    assert a.info["contexts"] == b.info["contexts"] and len(a.info["contexts"]) == 3


def test_sequential_requests_record_norm_history():
    m = tiny("llama")
    editor, extra = METHODS["rome"](m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = editor.compute(m, REQS, **extra)
    assert d.parts[(1, "value")].rank == 2
    hist = d.info["norm_history"]
    assert [r["step"] for r in hist] == [0.0, 1.0, 2.0] and all("1.value" in r for r in hist)


def test_memit_sequential_batches_compose_and_record_norms():
    m = tiny("gpt2")
    snap = snapshot(m)
    editor, extra = METHODS["memit"](m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = editor.compute(m, REQS, sequential_batch=1, **extra)
    assert not changed(m, snap)
    assert {k: p.rank for k, p in d.parts.items()} == {(0, "value"): 2, (1, "value"): 2}
    assert len(d.info["chunks"]) == 2 and [r["step"] for r in d.info["norm_history"]] == [0.0, 1.0, 2.0]


def test_registry_and_presets():
    assert {"rome", "memit", "alphaedit", "ft", "lora"} <= set(kvlens.editing.available_methods())
    assert kvlens.editing.get_method("rome") is ROME
    with pytest.raises(KeyError, match="available"):
        kvlens.editing.get_method("nope")
    assert ROME(preset="gpt2-xl").hparams_for(tiny("gpt2")).layer == 17
    assert MEMIT(preset="gpt-j-6b").hparams_for(tiny("gpt2")).lam == 15_000.0
    with pytest.raises(KeyError, match="presets"):
        ROME(preset="nope")
    with pytest.raises(ValueError, match="role"):
        FineTune(role="query").hparams_for(tiny("gpt2"))


def test_target_optimisation_records_curves_shares_and_keys():
    """What the "inside the edit" views draw: per-step terms, ‖δ‖ vs its clamp, layer shares, k*."""
    from kvlens.views import edit_figures

    m = tiny("llama")
    editor, extra = METHODS["memit"](m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = editor.compute(m, REQS, **extra, report=False)
    opt = d.info["opt"]
    for i in range(len(REQS)):
        steps = len(opt["curves"]["nll"][i])
        assert steps >= 1 and all(len(opt["curves"][k][i]) == steps for k in ("kl", "decay", "norm"))
        # the loss recorded last is the sum of the terms of the last step
        last = sum(opt["curves"][k][i][-1] for k in ("nll", "kl", "decay"))
        assert abs(last - opt["loss"][i]) < 1e-4 * max(1.0, abs(last))
        assert max(opt["curves"]["norm"][i]) <= opt["max_norm"][i] * (1 + 1e-5)
    shares = d.info["layer_shares"]
    assert [s["layer"] for s in shares] == [0, 1]
    # Eq. 20: the lowest layer gets 1/|R| of the residual, which is all still to insert
    assert shares[0]["share"] == pytest.approx(0.5, rel=1e-5)
    assert shares[0]["remaining"] == pytest.approx(sum(d.info["delta_norms"]) / 2, rel=1e-5)
    assert list(d.info["keys"]) == ["1"] and len(d.info["keys"]["1"]) == 2 and len(d.info["keys"]["1"][0]) == m.d_ff
    assert len(edit_figures.optimisation_curve(d).data) == 4 * 2 + 2  # 4 panels x 2 requests + 2 clamps
    assert [t.name for t in edit_figures.layer_shares(d).data][0].startswith("assigned")
    assert len(edit_figures.key_bars(d).data) == 2

    rome, extra = METHODS["rome"](m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = rome.compute(m, REQS[:1], **extra, report=False)
    k_star = torch.tensor(r.info["key"])
    u = r.parts[(1, "value")].left[:, 0]
    solved = torch.linalg.solve(extra["stats"][1].double(), k_star.double()).float()
    torch.testing.assert_close(u / u.norm(), solved / solved.norm(), rtol=1e-4, atol=1e-5)  # u ∝ C⁻¹k*
    assert edit_figures.layer_shares(r) is None and edit_figures.key_bars(r) is not None

    # sequential batches: every request's curve, each batch's shares and keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seq = editor.compute(m, REQS, sequential_batch=1, **METHODS["memit"](m)[1], report=False)
        two = rome.compute(m, REQS, **extra, report=False)
    assert len(edit_figures.optimisation_curve(seq).data) == 4 * 2 + 2
    assert "batch 2 of 2" in edit_figures.layer_shares(seq).layout.title.text
    assert "batch 1 of 2" in edit_figures.layer_shares(seq, batch=0).layout.title.text
    second = edit_figures.key_bars(two, request=1)
    assert second is not None and "Bob" in second.layout.title.text
    assert torch.equal(torch.tensor(second.data[0].y), torch.tensor(two.info["chunks"][1]["key"])[
        torch.tensor(two.info["chunks"][1]["key"]).abs().argsort(descending=True)[:20]])
    assert edit_figures.key_bars(two, request=2) is None


def test_lora_interrupted_mid_injection_leaves_the_model_as_it_was(monkeypatch):
    from peft.tuners.lora import LoraModel

    m = tiny("llama")
    m.hf.peft_config = {"mine": "kept"}  # a user's attribute survives the edit
    snap, types = snapshot(m), {n: type(mod) for n, mod in m.hf.named_modules()}
    real, calls = LoraModel._create_and_replace, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_create_and_replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        LoRA(role="value", layers=(0, 1), steps=1).compute(m, REQS[:1], report=False)
    assert len(calls) == 2
    assert {n: type(mod) for n, mod in m.hf.named_modules()} == types and not changed(m, snap)
    assert m.hf.peft_config == {"mine": "kept"}
    monkeypatch.undo()
    d = LoRA(role="value", layers=(0, 1), steps=1).compute(m, REQS[:1], report=False)
    assert m.hf.peft_config == {"mine": "kept"} and not changed(m, snap) and d.layers == [0, 1]


def test_lora_refuses_a_model_that_already_holds_adapters():
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    m = tiny("llama")
    LoraModel(m.hf, LoraConfig(r=2, target_modules=["q_proj"]), "mine")
    snap = snapshot(m)
    with pytest.raises(ValueError, match="already holds peft adapters"):
        LoRA(role="value", layers=(1,), steps=1).compute(m, REQS[:1], report=False)
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not changed(m, snap) and sum(isinstance(x, BaseTunerLayer) for x in m.hf.modules()) == m.n_layers


class _NoEdit(kvlens.editing.base.EditMethod):
    """A method whose delta changes (almost) nothing: ``scale`` fills a rank-one update of one value weight."""

    name = "no-edit-for-tests"
    presets: dict = {}
    scale = 0.0

    def default_hparams(self, model):
        return ROMEHparams(layer=1)

    def check(self, model, hp):
        pass

    def _compute(self, model, requests, hp, **kwargs):
        from kvlens.editing.delta import Part

        part = Part(torch.full((model.d_ff, 1), self.scale), torch.full((1, model.d_model), self.scale))
        return WeightDelta.from_model(model, {(hp.layer, "value"): part}, method=self.name, hparams={},
                                      requests=requests)


@pytest.mark.parametrize("scale", [0.0, 1e-6])
def test_outcome_check_catches_a_method_that_changes_nothing(scale):
    m = tiny("llama")
    method = _NoEdit()
    method.scale = scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = method.compute(m, REQS)
    with pytest.raises(AssertionError, match="did not raise p"):
        assert_raises_targets(delta)


class _Backwards(ROME):
    """ROME with its update negated: a method that moves p(target_new) the wrong way."""

    name = "rome-backwards-for-tests"

    def _compute(self, model, requests, hp, **kwargs):
        from kvlens.editing.delta import Part

        right = super()._compute(model, requests, hp, **kwargs)
        parts = {k: Part(-p.left, p.right) for k, p in right.parts.items()}
        return WeightDelta.from_model(model, parts, method=self.name, hparams={}, requests=requests)


def test_outcome_check_catches_a_method_that_lowers_the_target():
    m = editable("llama")
    editor, extra = METHODS["rome"](m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = _Backwards(editor.hparams_for(m)).compute(m, REQS, **extra)
    with pytest.raises(AssertionError, match="did not raise p"):
        assert_raises_targets(delta)
