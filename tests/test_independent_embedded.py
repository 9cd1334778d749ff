"""The independent-edit protocol on the embedded model: batched ROME equals one by one, and edits take."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

import kvlens as kv
from kvlens.editing import ROME, Contexts
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
