"""Trigger examples: streamed top-n equals brute force, coefficients recompute, cache, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvlens import corpus as kc
from kvlens import tracing
from kvlens.memory import triggers
from kvlens.models.kvmodel import Batch, Site
from tests.conftest import tiny

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.")


@pytest.fixture(scope="module")
def m():
    return tiny("llama", seed=3)


@pytest.fixture()
def small(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT[::-1])
    return kc.from_files(tmp_path)


def _coefficient(m, ids, layer, memory):
    batch = Batch.from_ids([ids], m.tokenizer.pad_token_id)
    return float(tracing.run(m, batch, read=[Site("key", layer)])[Site("key", layer)][0, -1, memory])


def _brute_force(m, corpus, layer, memory, window):
    """Each window's largest coefficient of the memory, highest first (one window at a time)."""
    values = []
    for ids in kc.token_windows(m, corpus, window=window, max_tokens=None):
        batch = Batch.from_ids([ids], m.tokenizer.pad_token_id)
        coef = tracing.run(m, batch, read=[Site("key", layer)])[Site("key", layer)][0, :, memory]
        values.append(float(coef.max()))
    return sorted(values, reverse=True)


def test_streamed_top_n_equals_brute_force(m, small, tmp_cache):
    res = triggers.trigger_examples(m, [(1, 5), (2, 0)], small, n=4, window=16, max_tokens=None,
                                    batch_size=3, progress=False)
    assert res.tokens_seen == 2 * len(TEXT) and not res.from_cache
    for layer, memory in res.memories:
        got = [ex.coefficient for ex in res[(layer, memory)]]
        assert got == pytest.approx(_brute_force(m, small, layer, memory, 16)[:4], rel=1e-5, abs=1e-6)


def test_examples_recompute_independently_in_descending_order(m, small, tmp_cache):
    res = triggers.trigger_examples(m, (2, 7), small, n=5, window=12, progress=False)
    examples = res[(2, 7)]
    assert len(examples) == 5
    coefs = [ex.coefficient for ex in examples]
    assert coefs == sorted(coefs, reverse=True) and len({ex.window for ex in examples}) == 5
    for ex in examples:
        assert len(ex.ids) == ex.position + 1 and ex.token == m.token_strings([ex.ids[-1]])[0]
        assert _coefficient(m, ex.ids, 2, 7) == pytest.approx(ex.coefficient, rel=1e-4, abs=1e-6)


def test_cache_is_reused_and_keyed_by_parameters(m, small, tmp_cache):
    first = triggers.trigger_examples(m, (0, 3), small, n=3, window=16, progress=False)
    again = triggers.trigger_examples(m, [(0, 3), (0, 9)], small, n=3, window=16, progress=False)
    assert again.from_cache and again[(0, 3)] == first[(0, 3)] and len(again[(0, 9)]) == 3
    other = triggers.trigger_examples(m, (0, 3), small, n=3, window=8, progress=False)
    assert not other.from_cache
    files = list(Path(tmp_cache).rglob("*.safetensors"))
    assert len(files) == 2 and all(small.id in str(f) for f in files)


def test_memory_stays_bounded_by_n_times_d_ff(m, small):
    tops, seen = triggers.mine(m, [1], small, n=2, window=8, max_tokens=None, progress=False)
    assert seen == 2 * len(TEXT)
    assert tops[1].values.shape == (2, m.d_ff) and tops[1].window.dtype == torch.long
    assert bool((tops[1].values[0] >= tops[1].values[1]).all())


def test_trigger_errors(m, small):
    with pytest.raises(ValueError, match="n must be a positive"):
        triggers.trigger_examples(m, (0, 0), small, n=0)
    with pytest.raises(ValueError, match="memories is empty"):
        triggers.trigger_examples(m, [], small)
    with pytest.raises(IndexError, match="memory 999 is out of range"):
        triggers.trigger_examples(m, (0, 999), small)
    with pytest.raises(IndexError, match="layer 9 is out of range"):
        triggers.trigger_examples(m, (9, 0), small)
    res = triggers.trigger_examples(m, (0, 0), small, n=1, window=8, max_tokens=20, cache=False,
                                    progress=False)
    with pytest.raises(KeyError, match="was not mined"):
        res[(1, 1)]
