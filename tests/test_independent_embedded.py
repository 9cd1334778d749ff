"""The independent-edit protocol on the embedded model: batched equals one by one (ROME, key/gate
fine-tuning, LoRA of every role), and edits take."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

import kvlens as kv
from kvlens.editing import ROME, Contexts, FineTune, LoRA
from kvlens.memory.stats import second_moments


@pytest.fixture(scope="module")
def rome_stats(embedded):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low-sample statistics
        return second_moments(embedded, [8], n_tokens=3000, cache=False, progress=False)


def test_batched_rome_equals_one_by_one_on_the_embedded_model(embedded, rome_stats):
    preset = ROME().hparams_for(embedded)
    hp = replace(preset, opt=replace(preset.opt, steps=8), contexts=Contexts(n=2, tokens=4))
    cases = kv.load_bundled()[:3]
    fp = embedded.fingerprint([8], ["value"])
    batched = kv.evaluate_each(embedded, ROME(hp), cases, stats=rome_stats)
    alone = kv.evaluate_each(embedded, ROME(hp), cases, stats=rome_stats, batched=False)
    assert embedded.fingerprint([8], ["value"]) == fp
    assert batched.protocol["compute"] == batched.protocol["evaluate"] == "batched"
    assert batched.protocol["steps"] == alone.protocol["steps"]
    worst = 0.0
    for a, b in zip(batched.raw["after"], alone.raw["after"]):
        for key in a:
            for s, t in zip(a[key], b[key]):
                worst = max(worst, float(np.abs(s.logprobs - t.logprobs).max()))
    assert worst < 2e-3, worst
    for a, b in zip(batched.per_case["after"], alone.per_case["after"]):
        assert a["ES"] == b["ES"] and a["NS"] == pytest.approx(b["NS"], abs=1e-6)
    assert batched.aggregate["after"]["ES"].mean > batched.aggregate["before"]["ES"].mean  # the edits take


def worst_after(a, b) -> float:
    """The largest difference of any teacher-forced log-probability after the edits, reports a vs b."""
    return max(float(np.abs(s.logprobs - t.logprobs).max()) for x, y in zip(a.raw["after"], b.raw["after"])
               for key in x for s, t in zip(x[key], y[key]))


@pytest.mark.parametrize(("kind", "role"), [("ft", "key"), ("ft", "gate"), ("lora", "key"), ("lora", "value"),
                                            ("lora", "gate")])
def test_batched_ft_and_lora_equal_one_by_one_on_the_embedded_model(embedded, kind, role):
    method = (FineTune(preset="smollm2-135m", role=role, steps=4, contexts=Contexts(n=1, tokens=3)) if kind == "ft"
              else LoRA(preset="smollm2-135m", role=role, steps=4, contexts=Contexts(n=1, tokens=3)))
    cases = kv.load_bundled()[:2]
    fp = embedded.fingerprint([8])
    batched = kv.evaluate_each(embedded, method, cases)
    alone = kv.evaluate_each(embedded, method, cases, batched=False)
    assert embedded.fingerprint([8]) == fp
    assert batched.protocol["compute"] == batched.protocol["evaluate"] == "batched"
    assert batched.protocol["steps"] == alone.protocol["steps"]
    diff = worst_after(batched, alone)
    print(f"embedded {kind} {role}: max |Δlogp| batched vs one by one {diff:.2e}")
    assert diff < 2e-3, diff
    moved = max(float(np.abs(a["rewrite_new"][0].logprobs - b["rewrite_new"][0].logprobs).max())
                for a, b in zip(batched.raw["after"], batched.raw["before"]))
    assert moved > 1e-2, moved  # the edits do something
