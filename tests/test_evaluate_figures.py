"""Evaluation figures from reports on a tiny model: traces, values and error bars match the report."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from test_evaluate import ShiftDelta

from kvlens.datasets import EvalCase
from kvlens.errors import KVLensError
from kvlens.evaluate import evaluate
from kvlens.views import eval_figures as F


@pytest.fixture(scope="module")
def reports():
    model = tiny("llama")
    cases = [EvalCase(i, "{} is in", s, " xy", " zw", paraphrase_prompts=(f"{s} lies in",),
                      neighborhood_prompts=("def is in",)) for i, s in enumerate(["abc", "abd", "abe"])]
    torch.manual_seed(0)
    small = evaluate(model, cases, ShiftDelta(1, torch.randn(model.d_model), 0.2))
    big = evaluate(model, cases, ShiftDelta(1, torch.randn(model.d_model), 2.0), baseline=small)
    return small, big


def test_metrics_bars_match_report(reports):
    small, _ = reports
    fig = F.metrics_bars(small, ["ES", "NS", "EM"])
    assert [t.name for t in fig.data] == ["before", "after"]
    after = fig.data[1]
    assert list(after.y) == [small.aggregate["after"][m].mean for m in ["ES", "NS", "EM"]]
    em = small.aggregate["after"]["EM"]
    assert after.error_y.array[2] == pytest.approx(em.high - em.mean)
    assert "counterfact" in fig.layout.xaxis.title.text


def test_method_comparison_and_scaling(reports):
    small, big = reports
    fig = F.method_comparison({"small": small, "big": big}, ["ES", "Locality"], baseline=small)
    assert [t.name for t in fig.data] == ["unedited", "small", "big"]
    assert fig.data[0].y[1] is None  # no locality for the unedited model
    many = F.method_comparison({f"m{i}": big for i in range(12)}, ["ES"], baseline=small)
    colours = [t.marker.color for t in many.data[1:]]
    assert len(set(colours)) == 12  # more methods than Plotly's 10 default colours: still one colour each
    curve = F.scaling_curve({"shift": [(10, big), (1, small)]}, "EM", baseline=small)
    assert list(curve.data[0].x) == [1, 10]
    assert curve.layout.xaxis.type == "log"
    assert curve.layout.shapes[0].line.dash == "dot"
    with pytest.raises(ValueError, match="no series"):
        F.scaling_curve({})


def test_case_shift(reports):
    small, _ = reports
    fig = F.case_shift(small, "EM")
    assert len(fig.data[1].x) == 3
    assert list(fig.data[1].x) == [row["EM"] for row in small.per_case["before"]]
    with pytest.raises(ValueError, match="not in every case"):
        F.case_shift(small, "GE")


def test_difference_figure_draws_each_pair_with_its_interval():
    from kvlens.metrics import Estimate

    diffs = {"FT keys − FT values": {"S": Estimate(-4.0, -9.5, 1.0, 200, "counterfact", "paired bootstrap"),
                                     "NS": Estimate(-8.0, -12.0, -3.5, 200, "counterfact", "paired bootstrap")},
             "LoRA keys − LoRA values": {"NS": Estimate(2.0, -1.0, 5.0, 200, "counterfact", "paired bootstrap")}}
    fig = F.difference_figure(diffs)
    first, second = fig.data
    assert list(first.y) == ["S", "NS"] and list(first.x) == [-4.0, -8.0]
    assert list(first.error_x.array) == [5.0, 4.5] and list(first.error_x.arrayminus) == [5.5, 4.0]
    assert list(second.x) == [None, 2.0] and "n/a" in second.hovertext[0] and "+2.0 [-1.0, +5.0]" in second.hovertext[1]
    assert fig.layout.shapes[0].x0 == 0  # the zero line
    # the pairs' markers of one metric sit side by side, not on one another
    assert fig.layout.scattermode == "group" and {t.orientation for t in fig.data} == {"h"}
    with pytest.raises(KVLensError, match="no differences"):
        F.difference_figure({})
    with pytest.raises(KVLensError, match="no differences"):
        F.difference_figure({"a − b": {}})
