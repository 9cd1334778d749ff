"""The nnsight seam: capture, patch at (layer, token), batches, gradients, early stop."""

from __future__ import annotations

import pytest
import torch

from kvlens import tracing
from kvlens.models.kvmodel import Site
from tests.conftest import tiny


@pytest.fixture(scope="module")
def m():
    return tiny("llama")


def test_right_padding_keeps_each_prompt_as_if_alone(m):
    batch = m.tokenize(["a longer prompt here", "short"])
    together = tracing.run(m, batch, read=[Site("logits")])[Site("logits")]
    for row, prompt in enumerate(batch.prompts):
        alone_batch = m.tokenize(prompt)
        alone = tracing.run(m, alone_batch, read=[Site("logits")])[Site("logits")]
        n = int(batch.lengths[row])
        torch.testing.assert_close(together[row, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_patch_at_one_token_changes_only_that_token_and_later(m):
    batch = m.tokenize("patch me please")
    clean = tracing.run(m, batch, read=[Site("resid", 2)])[Site("resid", 2)]
    patched = tracing.run(m, batch, read=[Site("resid", 2)],
                          write={Site("mlp", 0): tracing.replace_at([0], [4], torch.zeros(1, m.d_model))}
                          )[Site("resid", 2)]
    torch.testing.assert_close(patched[0, :4], clean[0, :4])
    assert not torch.allclose(patched[0, 4:], clean[0, 4:])


def test_key_site_write_is_the_value_projection_input(m):
    batch = m.tokenize("abc")
    out = tracing.run(m, batch, read=[Site("mlp", 1)], write={Site("key", 1): torch.zeros_like})
    b = m.value_bias(1)
    expected = torch.zeros(1, 3, m.d_model) + (0 if b is None else b)
    torch.testing.assert_close(out[Site("mlp", 1)], expected)


def test_concat_puts_groups_in_one_forward_with_positions_kept(m):
    a, b = m.tokenize(["one", "three"]), m.tokenize(["a much longer second group"])
    both = tracing.concat([a, b], m.tokenizer.pad_token_id)
    assert len(both) == 3 and both.prompts == ("one", "three", "a much longer second group")
    merged = tracing.run(m, both, read=[Site("logits")])[Site("logits")]
    alone = tracing.run(m, a, read=[Site("logits")])[Site("logits")]
    torch.testing.assert_close(merged[0, :3], alone[0, :3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        tracing.concat([], 0)


def test_gradients_flow_through_a_trace_into_a_leaf_delta(m):
    batch = m.tokenize("grad")
    delta = torch.zeros(m.d_model, requires_grad=True)
    out = tracing.run(m, batch, read=[Site("logits")], grad=True,
                      write={Site("mlp", 1): tracing.add_at([0], batch.last, delta)})
    loss = -tracing.at_last_token(batch, out[Site("logits")])[0].log_softmax(-1)[5]
    loss.backward()
    assert delta.grad is not None and delta.grad.norm() > 0
    # no parameter accumulated a gradient: kvlens freezes the weights
    assert all(p.grad is None for p in m.hf.parameters())


def test_stop_returns_early_sites_and_repeat_keeps_rows(m):
    batch = m.tokenize(["x y", "zz"]).repeat(3)
    assert batch.prompts[:3] == ("x y",) * 3
    out = tracing.run(m, batch, read=[Site("key", 0)], stop=True)
    assert out[Site("key", 0)].shape[:2] == (6, 3)


def test_trainable_restores_flags(m):
    w = m.projection(0, "value").weight
    with tracing.trainable(w):
        assert w.requires_grad
    assert not w.requires_grad


CASES = [("gpt2", {}, 0), ("gptj", {}, 1), ("gpt_neox", {}, 0), ("llama", {}, 1), ("qwen2", {}, 0),
         ("mistral", {"sliding_window": 4}, 0),  # a window shorter than the prompts: positions not skipped
         ("mistral", {"sliding_window": 64}, 1)]


@pytest.mark.parametrize(("family", "overrides", "upto"), CASES)
def test_resuming_a_prefix_from_per_row_positions_equals_the_full_forward(family, overrides, upto):
    """Layers above ``upto`` at positions >= start[r], fed from the cache, give the full run's states."""
    m = tiny(family, **overrides)
    batch = m.tokenize(["a longer prompt here", "short", "mid size"])
    start = torch.tensor([6, 0, 3])
    delta = torch.randn(3, m.d_model)
    final = Site("resid", m.n_layers - 1)
    full = tracing.run(m, batch, read=[final],
                       write={Site("resid", upto): tracing.add_at(torch.arange(3), start, delta)})[final]
    prefix = tracing.prefix_run(m, batch, upto, start)
    skipped = [0, 0, 0] if overrides.get("sliding_window") == 4 else start.tolist()
    assert prefix.start.tolist() == skipped
    cols = start - prefix.start  # where the change goes in suffix layout
    resumed = tracing.run_skipping(m, prefix, top=tracing.add_at(torch.arange(3), cols, delta),
                                   read=[final])[final]
    for r, first in enumerate(skipped):
        n = int(batch.lengths[r]) - first
        torch.testing.assert_close(resumed[r, :n], full[r, first:first + n], rtol=1e-4, atol=1e-5)
    sub = prefix.select(torch.tensor([2]))
    again = tracing.run_skipping(m, sub, top=tracing.add_at([0], cols[2:], delta[2:]), read=[final])[final]
    torch.testing.assert_close(again[0, :5], resumed[2, :5], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_a_prefix_of_a_record_resumes_like_prefix_run_with_writes_and_joined_rows(family):
    """prefix_of needs no forward; writes above the top, rows joining at later layers and
    ``upto == -1`` (layer 0's input replayed) all give the full run's states."""
    m = tiny(family)
    batch = m.tokenize(["one prompt", "two prompt"])  # same length: rows may join
    t, final = 3, Site("resid", m.n_layers - 1)
    rec = tracing.record(m, batch)
    made, recorded = tracing.prefix_run(m, batch, 1, torch.tensor([t, t])), tracing.prefix_of(m, rec, batch, 1,
                                                                                             torch.tensor([t, t]))
    for a, b in ((made.top, recorded.top), (made.keys[2], recorded.keys[2]), (made.positions, recorded.positions)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    patch = torch.randn(1, m.d_model)
    full = tracing.run(m, batch, read=[final], write={Site("mlp", 2): tracing.replace_at([1], [t], patch)})[final]
    rows = torch.tensor([1, 0, 1])  # a record row may be resumed several times
    first = tracing.prefix_of(m, rec, batch, -1, torch.full((3,), t), rows=rows)
    joined = tracing.prefix_of(m, rec, batch, 1, torch.full((2,), t), rows=torch.tensor([1, 1]))
    out = tracing.run_skipping(m, first, top=lambda h: h, joins=[joined], read=[final],
                               write={Site("mlp", 2): tracing.replace_at([0, 4], [0, 0], patch.expand(2, -1))})[final]
    assert out.shape[0] == 5
    for r in (0, 4):  # patched rows (one from layer 0's input, one joined after layer 1)
        torch.testing.assert_close(out[r], full[1, t:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], rec.resid[-1][0, t:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="replayed from the prefix"):
        tracing.run_skipping(m, joined, top=lambda h: h, write={Site("mlp", 0): lambda h: h})
    other = tracing.prefix_of(m, rec, batch, 2, torch.tensor([2]), rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="share their positions"):
        tracing.run_skipping(m, first, top=lambda h: h, joins=[other], read=[final])


def test_resumed_forwards_apply_standing_writes_as_the_full_forward_does(m):
    batch = m.tokenize(["standing writes", "here too"])
    final, shift = Site("resid", m.n_layers - 1), torch.ones(m.d_model)
    writes = {Site("mlp", 0): lambda h: h + shift, Site("mlp", 2): lambda h: h - 2 * shift}
    with tracing.standing(m, writes):
        full = tracing.run(m, batch, read=[final])[final]
        made = tracing.prefix_run(m, batch, 1, torch.tensor([2, 2]))
        recorded = tracing.prefix_of(m, tracing.record(m, batch), batch, 1, torch.tensor([2, 2]))
        for prefix in (made, recorded):
            out = tracing.run_skipping(m, prefix, top=lambda h: h, read=[final])[final]
            torch.testing.assert_close(out[:, :4], full[:, 2:6], rtol=1e-4, atol=1e-5)


def test_prefix_start_outside_a_prompt_is_refused(m):
    batch = m.tokenize(["abc", "a"])
    with pytest.raises(ValueError, match="inside each prompt"):
        tracing.prefix_run(m, batch, 0, torch.tensor([0, 5]))


def test_prefix_of_a_prompt_near_the_position_limit():
    """Padded suffix columns of a late-starting row keep positions inside the model's table."""
    m = tiny("gpt2")  # 64 positions
    batch = m.tokenize(["x" * 62, "short"])
    start = torch.tensor([60, 0])
    final = Site("resid", m.n_layers - 1)
    full = tracing.run(m, batch, read=[final])[final]
    resumed = tracing.run_skipping(m, tracing.prefix_run(m, batch, 1, start), top=lambda h: h, read=[final])[final]
    torch.testing.assert_close(resumed[0, :2], full[0, 60:62], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resumed[1, :5], full[1, :5], rtol=1e-4, atol=1e-5)


def test_fingerprint_is_computed_once_per_weight_state_and_follows_in_place_writes():
    m = tiny("llama", seed=5)
    fp0 = m.fingerprint()
    w = m.projection(1, "value").weight
    digest = m._digests[(1, "value")]
    assert m.fingerprint() == fp0 and m._digests[(1, "value")] is digest  # reused, not recomputed
    orig = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)  # an in-place write (as delta.apply does) bumps the tensor's version
    assert m.fingerprint() != fp0
    with torch.no_grad():
        w.copy_(orig)
    assert m.fingerprint() == fp0


def test_the_transformers_cache_api_kvlens_relies_on(m):
    """Pins what the seam reads and builds: ``output.cache`` (not ``past_key_values``), per-layer
    ``cache.layers[j].keys/values`` ``[B, heads, T, head_dim]``, ``DynamicCache(config=).update``."""
    from transformers.cache_utils import DynamicCache

    batch = m.tokenize("pin the cache")
    rec = tracing.record(m, batch)
    heads, head_dim = m.config.num_key_value_heads, m.config.head_dim
    assert len(rec.keys) == m.n_layers and rec.keys[0].shape == (1, heads, batch.input_ids.shape[1], head_dim)
    cache = DynamicCache(config=m.config)
    for j in range(m.n_layers):
        cache.update(rec.keys[j][:, :, :4], rec.values[j][:, :, :4], j)
    assert cache.get_seq_length() == 4 and torch.equal(cache.layers[1].keys, rec.keys[1][:, :, :4])
    out = m.hf(input_ids=batch.input_ids[:, 4:], cache=cache, use_cache=True)
    torch.testing.assert_close(out.logits[0], rec.logits[0, 4:], rtol=1e-5, atol=1e-5)  # resumed = full run
