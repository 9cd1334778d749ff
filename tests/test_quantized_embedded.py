"""The embedded model in 4-bit (bitsandbytes NF4 with double quantisation, CPU backend): each editing
method takes the Eiffel Tower -> Rome edit beside the packed weights and reverts bit for bit.

ROME, MEMIT and AlphaEdit deltas are applied as low-rank adapters beside the quantized value
projections; LoRA on keys and on values is QLoRA (adapters trained on the frozen 4-bit model, as Qiu
et al. 2024). Statistics are a low-sample estimate on the 4-bit model's own keys, to keep it short.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import kvlens as kv
from kvlens.editing._shared import target_report
from kvlens.editing.adapters import is_quantized
from kvlens.memory.stats import second_moments

pytest.importorskip("bitsandbytes")  # part of the dev install: runs in CI

REQ = kv.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
CONTROL = kv.EditRequest("{} is", "The capital of France", "Paris")


@pytest.fixture(scope="module")
def m4():
    model = kv.load(load_in_4bit=True)
    assert is_quantized(model.projection(8, "value").weight)
    return model


@pytest.fixture(scope="module")
def stats(m4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low-sample mode, on purpose
        return second_moments(m4, [2, 3, 4, 5, 6, 7, 8], n_tokens=3000, cache=False, progress=False)


@pytest.fixture(scope="module")
def weights(m4):
    return {k: v.clone() for k, v in m4.hf.state_dict().items()}


def unchanged(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.hf.state_dict().items())


EDITORS = {
    "rome": (lambda: kv.ROME(), True),
    "memit": (lambda: kv.MEMIT(), True),
    "alphaedit": (lambda: kv.AlphaEdit(), True),
    "qlora-keys": (lambda: kv.LoRAKeys(), False),
    "qlora-values": (lambda: kv.LoRAValues(), False),
}


def test_the_unedited_4bit_model_knows_the_fact(m4):
    now = target_report(m4, [REQ, CONTROL])
    assert now[0]["top1"] == " Paris" and now[1]["top1"] == " Paris"


@pytest.mark.parametrize("name", list(EDITORS))
def test_eiffel_tower_to_rome_in_4bit_and_back(m4, stats, weights, name):
    factory, needs_stats = EDITORS[name]
    delta = factory().compute(m4, [REQ], **({"stats": stats} if needs_stats else {}))
    assert unchanged(m4, weights), "compute must leave the model bit-identical"
    with delta.applied(m4) as edit:
        assert "adapters" in repr(edit)
        assert unchanged(m4, weights), "the packed 4-bit weights are never written"
        now = target_report(m4, [REQ, CONTROL])
    assert unchanged(m4, weights)
    assert now[0]["top1"] == " Rome" and now[0]["target_is_top1"]
    assert now[1]["top1"] == " Paris", "an unrelated fact must survive"
    assert target_report(m4, [REQ])[0]["top1"] == " Paris", "reverted: the model predicts as before"
