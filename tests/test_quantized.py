"""Editing 4-bit (bitsandbytes NF4, CPU backend) models: deltas applied as low-rank adapters beside the
packed layers (compute -> apply -> evaluate -> revert, revert exact), QLoRA on keys, full-matrix
fine-tuning refused before it starts, and deltas refused across precisions unless transferred."""

from __future__ import annotations

import warnings

import pytest
import torch

import kvlens as kv
from kvlens import tracing
from kvlens.editing.adapters import is_quantized
from kvlens.editing.hparams import Contexts, TargetOpt
from kvlens.memory.stats import second_moments
from kvlens.models.kvmodel import Site

pytest.importorskip("bitsandbytes")  # part of the dev install: runs in CI
# a random tiny model does not learn Eiffel -> Rome in 3 steps; these tests check the mechanics
pytestmark = pytest.mark.filterwarnings("ignore:.*did not reach its goal")

REQ = kv.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, vocab_size=embedded.vocab_size,
                               head_dim=16)
    path = tmp_path_factory.mktemp("tiny-llama-4bit")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def m4(tiny_dir):
    model = kv.load(tiny_dir, load_in_4bit=True)
    assert is_quantized(model.projection(1, "value").weight)
    return model


@pytest.fixture(scope="module")
def stats(m4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low-sample mode, on purpose
        return second_moments(m4, [1], n_tokens=300, cache=False, progress=False)


def _state(model):
    return {k: v.clone() for k, v in model.hf.state_dict().items()}


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.hf.state_dict().items())


FAST = dict(opt=TargetOpt(steps=3), contexts=Contexts(n=2, tokens=3))


@pytest.mark.parametrize("method", [lambda: kv.ROME(layer=1, **FAST), lambda: kv.MEMIT(layers=(1,), **FAST),
                                    lambda: kv.AlphaEdit(layers=(1,), **FAST)], ids=["rome", "memit", "alphaedit"])
def test_value_edits_apply_beside_4bit_weights_and_revert_exactly(m4, stats, method):
    state = _state(m4)
    batch = m4.tokenize(REQ.prompt.format(REQ.subject))
    sites = [Site("key", 1), Site("mlp", 1), Site("logits")]
    before = tracing.run(m4, batch, read=sites)
    delta = method().compute(m4, [REQ], stats=stats)
    assert _same(m4, state)
    with delta.applied(m4) as edit:
        assert "adapters" in repr(edit)
        after = tracing.run(m4, batch, read=sites)
        with pytest.raises(RuntimeError, match="already applied"):
            delta.apply(m4)
    # the adapter adds exactly k ΔV beside the packed projection (FFN(x) = k V + b)
    expected = before[Site("mlp", 1)] + after[Site("key", 1)] @ delta.parts[(1, "value")].dense()
    torch.testing.assert_close(after[Site("mlp", 1)], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after[Site("logits")], before[Site("logits")])
    assert _same(m4, state)
    again = tracing.run(m4, batch, read=sites)
    for site in sites:
        torch.testing.assert_close(again[site], before[site], rtol=0, atol=0)


def test_qlora_on_keys_of_a_4bit_model_applies_beside_and_reverts(m4):
    state = _state(m4)
    batch = m4.tokenize(REQ.prompt.format(REQ.subject))
    before = tracing.run(m4, batch, read=[Site("logits")])[Site("logits")]
    delta = kv.LoRAKeys(layers=(0,), steps=3).compute(m4, [REQ])
    assert _same(m4, state) and delta.parts[(0, "key")].rank == 8
    with delta.applied(m4):
        after = tracing.run(m4, batch, read=[Site("logits")])[Site("logits")]
    assert not torch.allclose(after, before)
    assert _same(m4, state)
    torch.testing.assert_close(tracing.run(m4, batch, read=[Site("logits")])[Site("logits")], before, rtol=0, atol=0)


def test_full_matrix_finetuning_of_4bit_weights_is_refused_before_it_starts(m4, monkeypatch):
    from kvlens.editing import finetune

    def no_optimisation(*_args, **_kwargs):
        raise AssertionError("the optimisation started before the refusal")

    monkeypatch.setattr(finetune, "fit", no_optimisation)
    for method, role in ((kv.KeyFT(layers=(0,)), "key"), (kv.ValueFT(layers=(1,)), "value")):
        with pytest.raises(TypeError, match=f"quantized .*{role} weights.*LoRA"):
            method.compute(m4, [REQ])


def test_a_delta_crosses_precisions_only_when_asked(tiny_dir, m4, stats):
    full = kv.load(tiny_dir)
    delta4 = kv.ROME(layer=1, **FAST).compute(m4, [REQ], stats=stats)
    with pytest.raises(ValueError, match="force=True"):
        delta4.apply(full)
    state = _state(full)
    with delta4.applied(full, force=True):  # the user asks to transfer it
        assert not _same(full, state)
    assert _same(full, state)
    delta_full = kv.ROME(layer=1, **FAST).compute(full, [REQ], stats={1: stats[1]})
    with pytest.raises(ValueError, match="4-bit and a full-precision.*force=True"):
        delta_full.apply(m4)


def test_a_dtype_bitsandbytes_cannot_handle_is_refused_before_loading(tiny_dir):
    with pytest.raises(ValueError, match="dtype=torch.float64 is not one bitsandbytes can handle"):
        kv.load(tiny_dir, load_in_4bit=True, dtype=torch.float64, device_map="auto")
