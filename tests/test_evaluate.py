"""kvlens.evaluate: teacher-forced scoring, the report, deltas, bad input; the unedited embedded model."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import tiny

from kvlens.datasets import EvalCase, load_bundled
from kvlens.errors import KVLensError
from kvlens.evaluate import EditReport, evaluate, score_targets
from kvlens.experiments import paired_difference


def _case(i=0, **kw):
    base = dict(case_id=i, prompt="{} is in", subject="abc", target_new=" xy", target_true=" zw",
                paraphrase_prompts=("abc lies in", "abc: in"), neighborhood_prompts=("def is in",),
                generation_prompts=("abc is",))
    return EvalCase(**{**base, **kw})


class ShiftDelta:
    """A stand-in WeightDelta: adds ``scale * direction`` to every value row of one layer."""

    method = "shift"

    def __init__(self, layer, direction, scale):
        self.layer, self.direction, self.scale = layer, direction, scale

    @contextlib.contextmanager
    def applied(self, model):
        V = model.V(self.layer)
        saved = V.detach().clone()
        with torch.no_grad():
            V.add_(self.scale * self.direction.to(V.dtype))
        try:
            yield self
        finally:
            with torch.no_grad():
                V.copy_(saved)


def test_score_targets_matches_a_plain_forward():
    model = tiny("llama")
    scores = score_targets(model, ["abc", "abc", "hello there"], [" xy", " x", "!"])
    ids = model.tokenize("abc xy").input_ids
    logp = model.hf(ids).logits[0].float().log_softmax(-1)
    n = len(model.tokenize("abc").input_ids[0])
    expected = [logp[n - 1 + j, ids[0, n + j]].item() for j in range(3)]
    assert scores[0].logprobs.tolist() == pytest.approx(expected, abs=1e-5)
    # a target without a leading space gets one (the same rule as edit and trace targets)
    assert list(scores[2].token_ids) == model.tokenizer(" !", add_special_tokens=False)["input_ids"]
    assert scores[1].logprobs[0] == pytest.approx(expected[0], abs=1e-5)  # shares the row
    assert scores[0].nll == pytest.approx(-sum(expected) / 3)
    assert scores[0].hits.tolist() == [int(logp[n - 1 + j].argmax()) == int(ids[0, n + j]) for j in range(3)]


def test_report_with_delta_restores_weights_and_reuses_baseline():
    model = tiny("llama")
    cases = [_case(0), _case(1, subject="abd", target_new=" qq")]
    before_w = model.V(2).detach().clone()
    delta = ShiftDelta(2, torch.randn(model.d_model), 0.5)
    report = evaluate(model, cases, delta)
    assert isinstance(report, EditReport) and report.states == ("before", "after")
    assert torch.equal(model.V(2), before_w)
    assert report.method == "shift"
    assert report.metric("ES", "before").convention == "counterfact"
    assert "Locality" in report.aggregate["after"] and "Locality" not in report.aggregate["before"]
    again = evaluate(model, cases, delta, baseline=report)
    assert again.per_case["before"] == report.per_case["before"]
    assert again.per_case["after"] == report.per_case["after"]
    rows = {r["metric"]: r for r in report.table()}
    assert set(rows["S"]) >= {"before", "after", "convention"}
    assert "counterfact" in report.summary() and report.to_dict()["method"] == "shift"
    saved = json.loads(json.dumps(report.to_dict()))
    back = EditReport.from_dict(saved, cases)
    assert back.per_case == report.per_case and back.aggregate == report.aggregate and back.cases == tuple(cases)
    assert paired_difference(back, report, "S") == paired_difference(report, report, "S")
    with pytest.raises(KVLensError, match="differ first at position 0"):
        EditReport.from_dict(saved, cases[::-1])
    with pytest.raises(ValueError, match="on 2 cases and 1 were passed"):
        EditReport.from_dict(saved, cases[:1])


def test_generation_metrics_on_tiny_model():
    model = tiny("gpt2")
    refs = {"xy": ["xy is a place"], "qq": ["qq"]}
    report = evaluate(model, [_case(0)], generation=True, references=refs, max_new_tokens=8)
    ge = report.metric("GE")
    assert ge.convention == "generation" and ge.mean >= 0
    assert 0 <= report.metric("RS").mean <= 100
    assert len(report.generations["current"][0]) == 1


def test_bad_inputs():
    model = tiny("llama")
    with pytest.raises(ValueError, match="no requests"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="empty paraphrase prompt list"):
        evaluate(model, [_case(0), _case(1, paraphrase_prompts=())])
    with pytest.raises(ValueError, match="empty paraphrase prompt list"):
        evaluate(model, [_case(0, paraphrase_prompts=())], tests=["rewrite", "paraphrase"])
    with pytest.raises(ValueError, match="equals the true object"):
        evaluate(model, [dict(prompt="{} is", subject="a", target_new=" b", target_true=" b")])
    with pytest.raises(TypeError, match="applied"):
        evaluate(model, [_case(0)], delta=42)
    with pytest.raises(ValueError, match="generation_prompts"):
        evaluate(model, [_case(0, generation_prompts=())], generation=True)
    with pytest.raises(ValueError, match="reference texts"):
        evaluate(model, [_case(0)], generation=True, references={"other": ["x"]})


def test_unedited_embedded_model_on_bundled_sample(embedded):
    """ES and PS low, NS high: the model knows the true objects (every 19th bundled fact)."""
    cases = load_bundled()[::19]
    report = evaluate(embedded, cases, batch_size=64)
    es, ps, ns = (report.metric(k).mean for k in ("ES", "PS", "NS"))
    assert es == 0.0  # each bundled fact passed its check: true beats new on the rewrite prompt
    assert ps < 20 and ns > 85, report.summary()
    assert report.metric("S").mean < 5


def test_delta_moves_efficacy_on_embedded(embedded):
    """A delta that pushes every value row of the last layer toward the new object raises ES/EM."""
    case = load_bundled()[0]
    direction = embedded.unembedding.weight[embedded.tokenizer(case.target_new)["input_ids"][0]]
    delta = ShiftDelta(embedded.n_layers - 1, direction / direction.norm(), 0.3)
    report = evaluate(embedded, [case], delta, tests=["rewrite"])
    assert report.metric("EM", "after").mean > report.metric("EM", "before").mean
    assert report.metric("ES", "before").mean == 0.0


@pytest.mark.filterwarnings("ignore:low-sample statistics")
def test_rome_edit_raises_efficacy_on_its_request(embedded):
    """After a ROME edit (5k-token statistics, cached), ES and EM rise on the edited request."""
    from kvlens.editing import ROME
    from kvlens.experiments import requests_of

    case = next(c for c in load_bundled() if c.subject == "The Eiffel Tower")
    delta = ROME(stats_tokens=5000).compute(embedded, requests_of([case]), report=False)
    report = evaluate(embedded, [case], delta, tests=["rewrite"])
    assert report.metric("ES", "before").mean == 0.0
    assert report.metric("ES", "after").mean == 100.0, report.summary()
    assert report.metric("EM", "after").mean > report.metric("EM", "before").mean + 20
    assert report.method == "rome"
