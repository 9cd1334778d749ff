"""The independent-edit protocol on tiny models: batched equals one by one, for every method and family.

Also: reference parity (one update fewer, grouped key averages), per-row writes, bad input.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny

import kvlens as kv
from kvlens import tracing
from kvlens.datasets import EvalCase
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
)
from kvlens.editing._shared import build_rows, context_templates, subject_states
from kvlens.editing.delta import Part
from kvlens.editing.hparams import reference_hparams
from kvlens.editing.per_row import stack_changes
from kvlens.evaluate import score_state
from kvlens.experiments import compare_methods, paired_difference
from kvlens.independent import IndependentReport, _score_applied, _score_rows, evaluate_each
from kvlens.models.kvmodel import Site

CTX = Contexts(n=1, tokens=2)
OPT = TargetOpt(steps=4, lr=1.0, clamp=100.0)  # large steps: the edits move tiny models clearly


def stats(model, layers):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4 * model.d_ff, model.d_ff, generator=g)
    return {l: k.T @ k / len(k) for l in layers}


def cases(n=2):
    subjects = ["Alice", "Bob", "Carol"]
    # the subject ends each prompt: the edit acts right at the predicting position, even in tiny models
    return [EvalCase(i, "The home of {}", s, " Paris", " Rome", paraphrase_prompts=(f"Where lives {s}",),
                     neighborhood_prompts=("The home of Dave",)) for i, s in enumerate(subjects[:n])]


def close_raw(a, b, atol=2e-5):
    """Every teacher-forced log-probability of report a equals report b's."""
    for state in ("before", "after"):
        for x, y in zip(a.raw[state], b.raw[state]):
            assert x.keys() == y.keys()
            for key in x:
                assert len(x[key]) == len(y[key])
                for s, t in zip(x[key], y[key]):
                    assert s.token_ids == t.token_ids
                    np.testing.assert_allclose(s.logprobs, t.logprobs, atol=atol, err_msg=f"{state} {key}")


def worst(a, b) -> float:
    """The largest difference of any teacher-forced log-probability between reports a and b (after)."""
    return max(float(np.abs(s.logprobs - t.logprobs).max()) for x, y in zip(a.raw["after"], b.raw["after"])
               for key in x for s, t in zip(x[key], y[key]))


def moved(report) -> float:
    """How much the edits moved the rewrite log-probabilities (the edits must do something)."""
    return max(float(np.abs(a["rewrite_new"][0].logprobs - b["rewrite_new"][0].logprobs).max())
               for a, b in zip(report.raw["after"], report.raw["before"]))


def both(model, method, n=2, **kw):
    fp = model.fingerprint()
    batched = evaluate_each(model, method, cases(n), **kw)
    alone = evaluate_each(model, method, cases(n), batched=False, **kw)
    assert model.fingerprint() == fp
    assert alone.protocol["compute"] == alone.protocol["evaluate"] == "one-by-one"
    close_raw(batched, alone)
    assert batched.protocol["steps"] == alone.protocol["steps"]
    for x, y in zip(batched.per_case["after"], alone.per_case["after"]):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-4), k
    return batched, alone


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_rome_batched_equals_one_by_one(family):
    model = tiny(family)
    method = ROME(ROMEHparams(layer=1, opt=OPT, contexts=CTX))
    batched, _ = both(model, method, stats=stats(model, [1]))
    assert batched.protocol["compute"] == batched.protocol["evaluate"] == "batched"
    assert batched.protocol["fallback"] is None and moved(batched) > 1e-3
    assert set(batched.aggregate["after"]) >= {"ES", "PS", "NS", "S"}
    assert batched.aggregate["after"]["ES"].n == 2


def test_rome_compute_each_equals_compute():
    model = tiny("llama")
    method = ROME(ROMEHparams(layer=1, opt=OPT, contexts=CTX))
    reqs = [EditRequest("{} lives in", "Alice", "Paris"), EditRequest("{} works for", "Bob", "Acme")]
    st = stats(model, [1])
    each = method.compute_each(model, reqs, batch_size=2, stats=st)
    for r, d in zip(reqs, each):
        one = method.compute(model, [r], report=False, stats=st)
        assert d.requests == (r,) and d.info["batched"] == 2
        torch.testing.assert_close(d.parts[(1, "value")].dense(), one.parts[(1, "value")].dense(),
                                   rtol=1e-4, atol=1e-6)
        assert d.info["opt"]["steps"] == one.info["opt"]["steps"]


@pytest.mark.parametrize(("name", "family"), [("memit", "llama"), ("alphaedit", "gpt_neox")])
def test_memit_and_alphaedit_batched_equal_one_by_one(name, family):
    model = tiny(family)  # tiny keys: a small λ / L2 lets the update show
    if name == "memit":
        method = MEMIT(MEMITHparams(layers=(0, 1), lam=1e-3, opt=OPT, contexts=CTX))
    else:
        method = AlphaEdit(AlphaEditHparams(layers=(0, 1), opt=OPT, contexts=CTX, nullspace_threshold=0.5, l2=1e-3))
    batched, _ = both(model, method, stats=stats(model, [0, 1]))
    assert batched.protocol["compute"] == "batched" and moved(batched) > 1e-4


def test_memit_compute_each_equals_compute_and_alphaedit_keeps_its_keys():
    model = tiny("gpt2")
    st = stats(model, [0, 1])
    # conflict: fine alone
    reqs = [EditRequest("{} lives in", "Alice", "Paris"), EditRequest("{} lives in", "Alice", "Oslo")]
    method = MEMIT(MEMITHparams(layers=(0, 1), lam=1.0, opt=OPT, contexts=CTX))
    each = method.compute_each(model, reqs, stats=st)
    for r, d in zip(reqs, each):
        one = method.compute(model, [r], report=False, stats=st)
        for key in one.parts:
            torch.testing.assert_close(d.parts[key].dense(), one.parts[key].dense(), rtol=1e-3, atol=1e-6)
        assert d.info["remaining_after"] == pytest.approx(one.info["remaining_after"], rel=1e-3, abs=1e-5)
    alpha = AlphaEdit(AlphaEditHparams(layers=(0, 1), opt=OPT, contexts=CTX, nullspace_threshold=0.5, l2=0.1))
    alpha.compute_each(model, reqs, stats=st)
    assert alpha.previous_keys == {}  # independent edits never accumulate keys


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama"])
@pytest.mark.parametrize("kind", ["ft", "lora"])
def test_ft_and_lora_of_every_role_batched_equal_one_by_one(family, kind):
    model = tiny(family)
    for role in model.roles():  # keys and values; gates where the FFN has them
        method = (FineTune(role=role, layers=(1,), steps=3, lr=5e-2) if kind == "ft"
                  else LoRA(role=role, layers=(1,), steps=3, lr=5e-2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batched, alone = both(model, method)
        assert not [w for w in caught if "one by one" in str(w.message)], role
        assert batched.protocol["compute"] == batched.protocol["evaluate"] == "batched", role
        assert batched.protocol["fallback"] is None and moved(batched) > 1e-4, role
        print(f"{family} {kind} {role}: max |Δlogp| batched vs one by one {worst(batched, alone):.2e}")


# early-stop NLLs that some requests reach mid-run and others not (margins >= 2e-3 on these tiny models)
@pytest.mark.parametrize(("family", "kind", "role", "early"), [
    ("gpt2", "ft", "value", 4.645), ("gptj", "ft", "key", 4.655), ("llama", "ft", "gate", 4.866),
    ("gpt_neox", "lora", "key", 4.69), ("llama", "lora", "gate", 4.809), ("gpt2", "lora", "value", 4.66)])
def test_per_row_training_with_constraints_and_early_stop_equals_one_by_one(family, kind, role, early):
    model = tiny(family, initializer_range=0.2)  # larger weights: the edits move the NLL clearly
    if kind == "ft":  # FT+L clamp, FT-W decay, KL, two layers
        method = FineTune(role=role, layers=(0, 2), steps=6, lr=5e-2, norm_constraint=0.05, weight_decay=0.1,
                          kl_factor=0.1, early_stop=early, contexts=CTX)
    else:
        method = LoRA(role=role, layers=(0, 2), rank=2, alpha=3.0, steps=6, lr=0.1, kl_factor=0.1,
                      early_stop=early, contexts=CTX)
    batched, alone = both(model, method, n=3)
    assert batched.protocol["compute"] == "batched" and moved(batched) > 1e-4
    steps = batched.protocol["steps"]
    print(f"{family} {kind} {role}: steps {steps}, max |Δlogp| {worst(batched, alone):.2e}")
    assert len(set(steps)) > 1 and min(steps) < 6, steps  # requests stopped at different steps


def test_lora_with_dropout_is_computed_one_by_one_and_says_why():
    model = tiny("llama")
    with pytest.warns(UserWarning, match="dropout"):
        rep = evaluate_each(model, LoRA(role="key", layers=(1,), steps=2, lr=5e-2, dropout=0.1), cases())
    assert rep.protocol["compute"] == "one-by-one" and "dropout" in rep.protocol["fallback"]
    assert rep.protocol["evaluate"] == "batched"


def test_reference_parity_one_update_fewer():
    model = tiny("llama")
    never = TargetOpt(steps=3, clamp=4.0, early_stop=-1.0)  # loss >= 0: never stops early
    req = EditRequest("{} lives in", "Alice", "Paris")
    st = stats(model, [1])
    ours = ROME(ROMEHparams(layer=1, opt=never, contexts=CTX)).compute(model, [req], report=False, stats=st)
    ref = ROME(ROMEHparams(layer=1, opt=never, contexts=CTX), reference=True).compute(model, [req], report=False,
                                                                                      stats=st)
    assert ours.info["opt"]["steps"] == [3] and ref.info["opt"]["steps"] == [2]
    assert len(ours.info["opt"]["curves"]["nll"][0]) == len(ref.info["opt"]["curves"]["nll"][0]) == 3
    assert ref.hparams["key_fix"] is False and ref.hparams["opt"]["final_update"] is False
    memit = MEMIT(MEMITHparams(layers=(0, 1), lam=1.0, opt=never, contexts=CTX, z_batch=1), reference=True)
    hp = memit.hparams_for(model)
    assert hp.key_average == "groups" and hp.opt.final_update is False and hp.lam == 1.0
    d = memit.compute(model, [req], report=False, stats=stats(model, [0, 1]))
    assert d.info["opt"]["steps"] == [2]
    assert AlphaEdit(reference=True).hparams_for(model).key_average == "groups"
    with pytest.raises(TypeError, match="ROME and MEMIT"):
        reference_hparams(FineTune().hparams_for(model))
    with pytest.raises(ValueError, match="key_average"):
        MEMITHparams(key_average="flat")


def test_grouped_key_average_is_the_mean_of_group_means():
    model = tiny("llama")
    req = EditRequest("{} lives in", "Alice", "Paris")
    templates = context_templates(model, Contexts(n=3, tokens=2))
    rows = build_rows(model, [req], templates)
    site = Site("key", 1)
    states = tracing.run(model, rows.batch, read=[site])[site]
    keep = (rows.context >= 0).nonzero().flatten()
    picked = states[keep, rows.subject[keep]]
    clean, prefixes = picked[rows.context[keep] == 0], picked[rows.context[keep] > 0]
    assert len(clean) == 1 and len(prefixes) == 3
    grouped = subject_states(model, rows, [site], grouped=True)[site][0]
    flat = subject_states(model, rows, [site])[site][0]
    torch.testing.assert_close(grouped, (clean.mean(0) + prefixes.mean(0)) / 2)
    torch.testing.assert_close(flat, picked.mean(0))
    assert not torch.allclose(grouped, flat)
    d_groups = MEMIT(MEMITHparams(layers=(1,), lam=1.0, opt=OPT, contexts=Contexts(n=3, tokens=2),
                                  key_average="groups")).compute(model, [req], report=False, stats=stats(model, [1]))
    torch.testing.assert_close(torch.tensor(d_groups.info["keys"]["1"][0]), grouped)


def owners_parts(model, seed=1):
    """Per owner, parts of every role the family has: dense and low-rank, alone and mixed in one layer."""
    g = torch.Generator().manual_seed(seed)

    def dense(scale=1.0):
        return Part(scale * torch.randn(model.d_ff, model.d_model, generator=g))

    def low(rank=2):
        return Part(torch.randn(model.d_ff, rank, generator=g), torch.randn(rank, model.d_model, generator=g))

    owners = [{(1, "value"): dense()}, {(0, "value"): low()}, {(1, "key"): dense()}, {(0, "key"): low(3)},
              {(0, "key"): low(), (0, "value"): dense(), (2, "key"): dense()}]
    if "gate" in model.roles():
        owners += [{(1, "gate"): dense()}, {(2, "gate"): low()},
                   {(1, "gate"): low(1), (1, "key"): low(), (1, "value"): low()}]
    return owners


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_per_row_writes_of_every_role_match_the_applied_delta(family):
    model = tiny(family)
    owners = owners_parts(model)
    changes = stack_changes(owners + [{}])
    prompts = ["Alice lives in", "Bob lives", "Carol", "Dave is in", "Eve"]
    batch = model.tokenize([prompts[i % len(prompts)] for i in range(len(owners) + 1)])
    logits = tracing.run(model, batch, read=[Site("logits")], write=changes.writes(torch.arange(len(owners) + 1)))
    plain = tracing.run(model, batch, read=[Site("logits")])[Site("logits")]
    worst = 0.0
    for row, parts in enumerate(owners):
        delta = kv.WeightDelta.from_model(model, parts, method="x", hparams={}, requests=[])
        with delta.applied(model):
            ref = tracing.run(model, batch, read=[Site("logits")])[Site("logits")]
        n = int(batch.lengths[row])
        got = logits[Site("logits")][row, :n]
        torch.testing.assert_close(got, ref[row, :n], rtol=1e-4, atol=1e-4)
        assert float((ref[row, :n] - plain[row, :n]).abs().max()) > 1e-4  # the change does something
        worst = max(worst, float((got - ref[row, :n]).abs().max()))
    torch.testing.assert_close(logits[Site("logits")][-1], plain[-1])  # an owner without parts: unchanged
    print(f"{family}: per-row writes vs applied, max |Δlogit| {worst:.2e}")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scoring_key_and_gate_deltas_per_row_equals_applying_them_one_at_a_time(family):
    model = tiny(family)
    fp = model.fingerprint()
    owners = [p for p in owners_parts(model, seed=2) if any(role != "value" for _, role in p)]
    deltas = [kv.WeightDelta.from_model(model, parts, method="x", hparams={}, requests=[]) for parts in owners]
    chunk = [cases(3)[i % 3] for i in range(len(deltas))]
    tests = ["rewrite", "paraphrase", "neighborhood"]
    rows = _score_rows(model, chunk, tests, deltas, 4)  # 4 rows per forward: owners mixed in each
    plain = score_state(model, chunk, tests)
    for case, delta, got, before in zip(chunk, deltas, rows, plain):
        want = _score_applied(model, case, tests, delta, 4)
        assert got.keys() == want.keys()
        for key in got:
            for s, t in zip(got[key], want[key]):
                np.testing.assert_allclose(s.logprobs, t.logprobs, atol=2e-5, err_msg=key)
        assert max(float(np.abs(s.logprobs - b.logprobs).max()) for s, b in zip(got["rewrite_new"],
                                                                                 before["rewrite_new"])) > 1e-4
    assert model.fingerprint() == fp


def test_key_and_gate_sites_are_the_projection_outputs():
    for family in ("gpt2", "llama"):
        model = tiny(family)
        batch = model.tokenize(["Alice lives in"])
        roles = [r for r in ("key", "gate") if r in model.roles()]
        sites = [Site("mlp_in", 1)] + [Site(f"{r}_pre", 1) for r in roles]
        states = tracing.run(model, batch, read=sites)
        x = states[Site("mlp_in", 1)]
        for r in roles:
            bias = model.projection(1, r).bias
            want = x @ model.canonical(model.weight(1, r), r).T + (0 if bias is None else bias)
            torch.testing.assert_close(states[Site(f"{r}_pre", 1)], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no gate projection"):
        tracing.run(tiny("gpt2"), batch, read=[Site("gate_pre", 0)])


def test_stack_changes_refuses_bad_owners():
    model = tiny("gpt2")
    changes = stack_changes([{(1, "key"): Part(torch.zeros(model.d_ff, model.d_model))}])
    with pytest.raises(ValueError, match="owners must lie"):
        changes.writes(torch.tensor([3]))
    with pytest.raises(ValueError, match="at least one"):
        stack_changes([])


def test_bad_input_fails_before_work_and_budget_chooses_the_batch_size():
    model = tiny("llama")
    fp = model.fingerprint()
    method = ROME(ROMEHparams(layer=1, opt=TargetOpt(steps=1), contexts=Contexts(n=0)))
    with pytest.raises(TypeError, match="EditMethod"):
        evaluate_each(model, "rome", cases())
    with pytest.raises(ValueError, match="at least one"):
        evaluate_each(model, method, [])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_each(model, method, cases(), batch_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        evaluate_each(model, method, cases(), memory_budget=0)
    with pytest.raises(IndexError, match="out of range"):
        evaluate_each(model, ROME(layer=7), cases())
    with pytest.raises(ValueError, match="paraphrase"):
        evaluate_each(model, method, [EvalCase(0, "{} is", "Al", " x", " y")], tests=["rewrite", "paraphrase"])
    assert model.fingerprint() == fp
    with pytest.warns(UserWarning, match="exceeds the memory budget"):
        rep = evaluate_each(model, method, cases(3), batch_size=3, memory_budget=1, stats=stats(model, [1]))
    assert rep.protocol["batch_size"] == 1 and len(rep.per_case["after"]) == 3
    assert "independent edits" in rep.summary() and rep.to_dict()["protocol"]["batch_size"] == 1
    back = IndependentReport.from_dict(json.loads(json.dumps(rep.to_dict())), cases(3))
    assert back.protocol == json.loads(json.dumps(rep.protocol)) and back.aggregate == rep.aggregate
    with pytest.raises(ValueError, match="generation"):
        compare_methods(model, cases(), {"ROME": lambda: method}, mode="independent")
    with pytest.raises(ValueError, match="mode must be"):
        compare_methods(model, cases(), {"ROME": lambda: method}, mode="alone", generation=False)


def test_independent_comparison_and_paired_differences():
    model = tiny("llama")
    methods = {"FT keys": (lambda: FineTune(role="key", layers=(1,), steps=2, lr=1e-2), "key"),
               "FT values": (lambda: FineTune(role="value", layers=(1,), steps=2, lr=1e-2), "value")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = compare_methods(model, cases(3), methods, mode="independent", generation=False)
    keys, values = comp.reports["FT keys"], comp.reports["FT values"]
    assert keys.protocol["protocol"] == "independent" and comp.mode == "independent"
    assert keys.per_case["before"] == comp.baseline.per_case["current"]
    for metric in ("ES", "NS", "EM"):
        d = paired_difference(keys, values, metric)
        want = keys.aggregate["after"][metric].mean - values.aggregate["after"][metric].mean
        assert d.mean == pytest.approx(want) and d.low <= d.mean + 1e-9 and d.high >= d.mean - 1e-9
        assert d.method == "paired bootstrap" and d.n == 3
    s = paired_difference(keys, values, "S")
    assert s.mean == pytest.approx(keys.aggregate["after"]["S"].mean - values.aggregate["after"]["S"].mean)
    with pytest.raises(KeyError, match="unknown metric"):
        paired_difference(keys, values, "XX")
    other = evaluate_each(model, methods["FT keys"][0](), cases(2))
    with pytest.raises(ValueError, match="same cases"):
        paired_difference(keys, other, "ES")
