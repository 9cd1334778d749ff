"""Shared fixtures: tiny random models of every registered family, and the real embedded model."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kvlens  # noqa: E402
from kvlens.models.registry import LLAMA_LIKE  # noqa: E402

VOCAB = 128

_BASE = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)
TINY_CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_layer=3, n_embd=32, n_head=4, n_positions=64),
    "gptj": dict(n_layer=3, n_embd=32, n_head=4, n_positions=64, rotary_dim=4),
    "gpt_neox": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=80,
                     use_parallel_residual=True),
    "llama": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=80, head_dim=8),
}
for _name in LLAMA_LIKE:
    TINY_CONFIGS[_name] = TINY_CONFIGS["llama"]


class CharTokenizer:
    """A tiny deterministic tokenizer for tiny models: one token per byte (mod the vocab)."""

    pad_token_id = 1
    eos_token = "<eos>"
    pad_token = "<eos>"
    eos_token_id = 1
    padding_side = "right"

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, **_):
        ids = [2 + (b % (VOCAB - 2)) for b in text.encode()]
        out = {"input_ids": ids}
        if return_offsets_mapping:  # one token per byte: exact for ASCII text
            out["offset_mapping"] = [(i, i + 1) for i in range(len(ids))]
        return out

    def decode(self, ids, **_):
        return "".join(chr(int(i)) for i in ids)


def tiny_hf(model_type: str, seed: int = 0, **overrides):
    """A tiny random HF causal LM of ``model_type`` (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{**_BASE, **TINY_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    for p in model.parameters():  # make biases non-zero so orientation tests see them
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.1)
    return model


def tiny(model_type: str, seed: int = 0, validate: bool = False, **overrides) -> kvlens.KVModel:
    """A tiny random model wrapped; load-time validation is off (tests/test_registry.py runs it per family)."""
    return kvlens.wrap(tiny_hf(model_type, seed, **overrides), CharTokenizer(), validate=validate)


@pytest.fixture(scope="session")
def embedded() -> kvlens.KVModel:
    """The real embedded default model (SmolLM2-135M-Instruct), loaded once per session."""
    torch.manual_seed(0)
    return kvlens.load()


@pytest.fixture()
def tmp_cache(monkeypatch):
    with tempfile.TemporaryDirectory() as d:
        monkeypatch.setenv("KVLENS_CACHE", d)
        yield d
