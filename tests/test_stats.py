"""Second-moment statistics E[kkᵀ]: value, cache, integrity checks, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny

from kvlens import tracing
from kvlens.corpus import Corpus, batches
from kvlens.memory.stats import (
    StatsCacheError,
    cache_path,
    check_moment,
    load_moment,
    resolve_moments,
    second_moments,
)
from kvlens.models.kvmodel import Site

TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog near river {i * 7}" for i in range(30)]
CORPUS = Corpus("test-texts", lambda: TEXTS)


def moments(model, layers, tmp_path, n=600, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return second_moments(model, layers, CORPUS, n_tokens=n, progress=False, cache_root=tmp_path, window=32, **kw)


def test_matches_direct_computation(tmp_path):
    m = tiny("gpt2")
    C = moments(m, [1], tmp_path, cache=False)[1]
    keys = []
    for b in batches(m, CORPUS, batch_size=8, window=32, max_tokens=600):
        s = tracing.run(m, b, read=[Site("key", 1)])[Site("key", 1)]
        keys.append(s[b.attention_mask.bool()])  # the char tokenizer adds no BOS
    k = torch.cat(keys).double()
    torch.testing.assert_close(C.double(), k.T @ k / len(k), rtol=1e-5, atol=1e-7)
    assert C.shape == (m.d_ff, m.d_ff) and C.dtype == torch.float32
    assert torch.allclose(C, C.T)


def test_cache_round_trip_and_corruption(tmp_path):
    m = tiny("llama")
    first = moments(m, [0, 2], tmp_path)
    path = cache_path(m, 2, CORPUS, 600, torch.float32, tmp_path, window=32)
    assert path.exists() and torch.equal(load_moment(path), first[2])
    again = moments(m, [2], tmp_path)
    assert torch.equal(again[2], first[2])
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\x00\x00\x80\x7f" * 2  # flip the last values: checksum must fail
    path.write_bytes(bytes(raw))
    with pytest.raises(StatsCacheError, match="checksum"):
        moments(m, [2], tmp_path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StatsCacheError, match="unreadable"):
        moments(m, [2], tmp_path)


def test_cache_key_depends_on_weights_and_sample(tmp_path):
    a, b = tiny("llama"), tiny("llama", seed=1)
    ref = cache_path(a, 0, CORPUS, 600, torch.float32, tmp_path)
    assert ref != cache_path(b, 0, CORPUS, 600, torch.float32, tmp_path)
    assert ref != cache_path(a, 0, CORPUS, 700, torch.float32, tmp_path)
    assert ref != cache_path(a, 0, CORPUS.head(3), 600, torch.float32, tmp_path)
    assert ref != cache_path(a, 0, CORPUS, 600, torch.float32, tmp_path, window=64)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_cache_key_covers_exactly_the_weights_the_keys_depend_on(family, tmp_path):
    """C at layer 1 depends on the embedding, layer 0 and layer 1 up to its key: a change there
    (attention and norms included) is a new cache entry; a value edit at 1 or anything above is not."""
    m = tiny(family)
    ref = cache_path(m, 1, CORPUS, 600, torch.float32, tmp_path)

    def key_after(param: torch.Tensor) -> object:
        orig = param.detach().clone()
        with torch.no_grad():
            param.add_(0.5)
        try:
            return cache_path(m, 1, CORPUS, 600, torch.float32, tmp_path)
        finally:
            with torch.no_grad():
                param.copy_(orig)

    kept = [m.projection(1, "value").weight, m.projection(2, "key").weight, next(m.attn(2).parameters()),
            next(m.final_norm.parameters()), m.unembedding.weight]
    changed = [m.embedding.weight, m.projection(0, "value").weight, next(m.attn(1).parameters()),
               m.projection(1, "key").weight]
    changed += [p for n, p in m.layer(1).named_parameters() if "norm" in n or "ln" in n][:1]  # a norm of layer 1
    assert all(key_after(p) == ref for p in kept)
    assert all(key_after(p) != ref for p in changed)
    assert cache_path(m, 1, CORPUS, 600, torch.float32, tmp_path) == ref  # the state restored, the key too


def test_low_sample_warning_and_bad_input(tmp_path):
    m = tiny("gpt2")
    with pytest.warns(UserWarning, match="low-sample"):
        second_moments(m, [0], CORPUS, n_tokens=300, progress=False, cache=False, window=32)
    with pytest.raises(IndexError):
        second_moments(m, [5], CORPUS, n_tokens=300, cache=False)
    C = torch.eye(m.d_ff)
    check_moment(C, m, 0)
    with pytest.raises(ValueError, match="shape"):
        check_moment(torch.eye(3), m, 0)
    bad = C.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        resolve_moments(m, [0], {0: bad}, None, 100)
    with pytest.raises(ValueError, match="missing"):
        resolve_moments(m, [0, 1], {0: C}, None, 100)
