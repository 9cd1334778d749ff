"""Experiments (keys vs values, scaling) on a tiny model: structure, shared baseline, figures."""

from __future__ import annotations

import warnings

import pytest
from conftest import tiny

from kvlens.datasets import EvalCase, without_edited_neighbours
from kvlens.editing import KeyFT, ValueFT
from kvlens.errors import EditedNeighbours
from kvlens.evaluate import evaluate
from kvlens.experiments import compare_methods, requests_of, scaling
from kvlens.views import eval_figures as F

METHODS = {"FT keys": (lambda: KeyFT(layers=(1,), steps=3, lr=1e-2), "key"),
           "FT values": (lambda: ValueFT(layers=(1,), steps=3, lr=1e-2), "value")}


def _cases(n=4):
    return [EvalCase(i, "{} is in", s, " xy", " zw", paraphrase_prompts=(f"{s} lies in",),
                     neighborhood_prompts=("def is in",), generation_prompts=(f"{s} is", f"{s} was"))
            for i, s in enumerate(["abc", "abd", "abe", "abf"][:n])]


def test_compare_methods_shares_the_baseline_and_leaves_model_unchanged():
    model = tiny("llama")
    fp = model.fingerprint()
    comp = compare_methods(model, _cases(3), METHODS, generation=True, max_new_tokens=4)
    assert model.fingerprint() == fp
    assert list(comp.reports) == ["FT keys", "FT values"] and comp.sides["FT keys"] == "key"
    for r in comp.reports.values():
        assert r.per_case["before"] == comp.baseline.per_case["current"]
        assert all(len(c.generation_prompts) == 1 for c in r.cases)  # GE on the first prompt only
    rows = comp.table()
    assert [r["method"] for r in rows] == ["unedited", "FT keys", "FT values"]
    assert rows[1]["Efficacy"] == comp.reports["FT keys"].aggregate["after"]["ES"]
    assert rows[0]["Fluency"] is not None and "Specificity" in comp.summary()
    fig = F.comparison_figure(comp)
    assert [t.name for t in fig.data] == ["unedited", "FT keys (key)", "FT values (value)"]
    assert fig.layout.xaxis.title.text == ("Score = S, Efficacy = ES, Generalization = PS, Specificity = NS "
                                           "(counterfact convention)")


def test_requests_edited_together_that_are_each_others_neighbours_are_warned_of():
    model = tiny("llama")
    cases = _cases(2)
    cases[1] = EvalCase(1, "{} is in", "abd", " xy", " zw", paraphrase_prompts=("abd lies in",),
                        neighborhood_prompts=("abc is in", "def is in"))
    with pytest.warns(EditedNeighbours, match=r"1 of the 3 neighbourhood prompts name a subject edited in the same "
                                              r"batch") as said:
        compare_methods(model, cases, {"FT values": METHODS["FT values"], "FT keys": METHODS["FT keys"]},
                        generation=False)
    assert sum(w.category is EditedNeighbours for w in said) == 1  # once, before the edits, not once per method
    # evaluate itself warns for the delta it scores: here one that edits only "abc"
    delta = METHODS["FT values"][0]().compute(model, requests_of(cases[:1]))
    with pytest.warns(EditedNeighbours, match="1 of the 3 neighbourhood prompts name a subject edited in the "
                                              "scored delta"):
        evaluate(model, cases, delta)
    with pytest.warns(UserWarning, match="same sequential edit"):
        scaling(model, cases, {"FT values": METHODS["FT values"]}, ns=[2], mode="sequential")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # edited alone, or with the neighbours left out: nothing to warn of
        compare_methods(model, cases, {"FT values": METHODS["FT values"]}, mode="independent", generation=False)
        compare_methods(model, without_edited_neighbours(cases), {"FT values": METHODS["FT values"]}, generation=False)
        evaluate(model, without_edited_neighbours(cases), delta)
        evaluate(model, cases[:1], delta)  # abc's own neighbours do not name abc


def test_scaling_grid_and_sequential_mode():
    model = tiny("llama")
    sc = scaling(model, _cases(4), {"FT values": METHODS["FT values"]}, mode="sequential")
    assert [n for n, _ in sc.points["FT values"]] == [1, 2, 4]
    assert [len(r.cases) for _, r in sc.points["FT values"]] == [1, 2, 4]
    assert len(sc.table()) == 3 and "sequential" in sc.summary()
    fig = F.scaling_figure(sc, "ES")
    assert list(fig.data[0].x) == [1, 2, 4]
    with pytest.raises(ValueError, match="ns must lie"):
        scaling(model, _cases(2), {"FT values": METHODS["FT values"]}, ns=[4])
    with pytest.raises(KeyError, match="unknown methods"):
        compare_methods(model, _cases(1), ["nope"])


def test_requests_of_cases():
    (req,) = requests_of(_cases(1))
    assert (req.prompt, req.subject, req.target_new.strip(), req.target_true.strip()) == ("{} is in", "abc", "xy", "zw")
