"""Inspect on tiny random models of every family: exact sums and manual matrix products."""

from __future__ import annotations

import math

import pytest
import torch

from kvlens import tracing
from kvlens.memory import activations, contrib, intervene, lens, vocab
from kvlens.models.kvmodel import Site
from tests.conftest import TINY_CONFIGS, tiny

FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "gemma"]
PROMPTS = ["hello world", "a b", "the key fires here"]


@pytest.fixture(scope="module", params=FAMILIES)
def m(request):
    return tiny(request.param)


def test_families_cover_registry_shapes():
    assert set(FAMILIES) <= set(TINY_CONFIGS)


def test_keys_batched_equals_chunked_and_alone(m):
    full = activations.keys(m, PROMPTS)
    chunked = activations.keys(m, PROMPTS, batch_size=2)
    for l in full.layers:
        torch.testing.assert_close(full.coefficients[l], chunked.coefficients[l], rtol=1e-5, atol=1e-6)
    alone = activations.keys(m, PROMPTS[2], layers=[1])
    n = len(alone.tokens[0])
    torch.testing.assert_close(full.coefficients[1][2, :n], alone.coefficients[1][0], rtol=1e-5, atol=1e-6)
    assert [len(t) for t in full.tokens] == [len(p) for p in PROMPTS]  # one token per byte


def test_coefficients_times_values_give_the_ffn_output(m):
    batch = m.tokenize(PROMPTS[0])
    out = tracing.run(m, batch, read=[Site("mlp", 2)])[Site("mlp", 2)][0].float()
    coef = activations.keys(m, PROMPTS[0], layers=[2]).coefficients[2][0]
    b = m.value_bias(2)
    manual = coef @ m.V(2).float() + (0 if b is None else b.float())  # Geva et al. 2021, §2
    torch.testing.assert_close(manual, out, rtol=1e-4, atol=1e-5)


def test_top_and_top_per_layer_are_sorted(m):
    acts = activations.keys(m, PROMPTS)
    top = acts.top(1, k=5, prompt=2, token=3)
    coef = acts.at(1, 2, 3)
    assert top.coefficients == sorted(top.coefficients, key=abs, reverse=True)
    assert abs(top.coefficients[0]) == pytest.approx(float(coef.abs().max()))
    assert top.token == acts.tokens[2][3] and top.token_index == 3
    assert [t.layer for t in acts.top_per_layer(3)] == [0, 1, 2]
    frac = acts.active_fraction(0, prompt=1)
    assert frac.shape == (3,) and bool(((frac >= 0) & (frac <= 1)).all())


def test_key_errors(m):
    acts = activations.keys(m, PROMPTS, layers=[0])
    with pytest.raises(ValueError, match="k must be a positive"):
        acts.top(0, k=0)
    with pytest.raises(KeyError, match="not captured"):
        acts.at(2)
    with pytest.raises(IndexError, match="prompt 5"):
        acts.at(0, prompt=5)
    with pytest.raises(IndexError, match="out of range"):
        activations.keys(m, "x", layers=[7])
    with pytest.raises(ValueError, match="no prompts"):
        activations.keys(m, [])
    with pytest.raises(ValueError, match="layers is empty"):
        activations.keys(m, "x", layers=[])


def test_values_equal_manual_projection(m):
    E = m.unembedding.weight.float()
    b = m.unembedding.bias
    proj = vocab.values(m, 1, [3, 0, 7], k=4)
    manual = m.V(1)[[3, 0, 7]].float() @ E.T  # Geva et al. 2021, §4 (logits)
    torch.testing.assert_close(proj.top_scores, manual.topk(4).values)
    torch.testing.assert_close(proj.bottom_scores, -(-manual).topk(4).values)
    assert proj.top_ids[1].tolist() == manual[1].topk(4).indices.tolist()
    final = vocab.values(m, 1, 3, k=4, norm="final")
    head = m.final_norm(m.V(1)[3][None].float()) @ E.T + (0 if b is None else b)
    torch.testing.assert_close(final.top_scores[0], head[0].topk(4).values, rtol=1e-5, atol=1e-5)
    frozen = vocab.values(m, 1, [3], k=4, norm="frozen")
    fn = vocab.frozen_norm(m)
    v = m.V(1)[3].float()
    v = v - v.mean() if fn.center else v
    manual_frozen = ((fn.gain * v) @ E.T).topk(4).values
    torch.testing.assert_close(frozen.top_scores[0], manual_frozen, rtol=1e-5, atol=1e-5)
    assert proj.promoted(3)[0][1] == pytest.approx(float(manual[0].max()))
    assert len(proj.rows()) == 3 and proj.k == 4


def test_frozen_norm_reproduces_the_final_norm(m):
    x = torch.randn(m.d_model)
    fn = vocab.frozen_norm(m, x)
    torch.testing.assert_close(fn(x) + fn.offset, vocab.apply_final_norm(m, x[None])[0], rtol=1e-5, atol=1e-5)
    parts = torch.randn(4, m.d_model)
    torch.testing.assert_close(fn(parts).sum(0), fn(parts.sum(0)), rtol=1e-4, atol=1e-5)  # linear


def test_find_memories_scores_and_ranks(m):
    tid = 2 + (ord("e") % 126)
    found = vocab.find_memories(m, "e", k=5)
    E = m.unembedding.weight.float()
    for l in range(m.n_layers):
        torch.testing.assert_close(found.scores[l], m.V(l).float() @ E[tid])
    flat = torch.cat([found.scores[l] for l in range(m.n_layers)])
    assert [f.score for f in found.found] == pytest.approx(flat.topk(5).values.tolist())
    best = found.found[0]
    logits = m.V(best.layer)[best.memory].float() @ E.T
    assert best.rank == int((logits > logits[tid]).sum())
    both = vocab.find_memories(m, tid, layers=[0], k=3, both_signs=True)
    assert [abs(f.score) for f in both.found] == pytest.approx(found.scores[0].abs().topk(3).values.tolist())


@pytest.mark.parametrize("norm", ["none", "frozen", "final"])
def test_find_memories_zscore_equals_full_projection(m, norm):
    found = vocab.find_memories(m, 5, layers=[2], k=3, norm=norm, by="zscore")
    logits = vocab.to_vocab(m, m.V(2).float(), norm)
    z = (logits[:, 5] - logits.mean(-1)) / logits.std(-1, correction=0)
    torch.testing.assert_close(found.scores[2], z, rtol=1e-3, atol=1e-3)
    assert [f.memory for f in found.found] == z.topk(3).indices.tolist()


def test_vocab_errors(m):
    with pytest.raises(ValueError, match="not a single token: it splits into \\[.*\\]; the first is"):
        vocab.find_memories(m, "ab")
    with pytest.raises(IndexError, match="memory 999 is out of range"):
        vocab.values(m, 0, [999])
    with pytest.raises(IndexError, match="layer 3 is out of range"):
        vocab.values(m, 3, [0])
    with pytest.raises(ValueError, match="k must be a positive"):
        vocab.values(m, 0, [0], k=0)
    with pytest.raises(ValueError, match="memories is empty"):
        vocab.values(m, 0, [])
    with pytest.raises(ValueError, match="norm must be"):
        vocab.values(m, 0, [0], norm="ln")
    with pytest.raises(IndexError, match="token id"):
        vocab.find_memories(m, 10_000)
    with pytest.raises(ValueError, match="by must be"):
        vocab.find_memories(m, 5, by="rank")


@pytest.mark.parametrize("norm", ["frozen", "none"])
def test_contributions_sum_exactly_to_the_ffn_logit(m, norm):
    c = contrib.contributions(m, "hello world", "o", norm=norm)
    scale = max(abs(v) for v in c.ffn.values())
    assert c.max_error <= 1e-5 * max(scale, 1e-3)
    if norm == "frozen":  # every part of the residual plus offset and bias: the model's logit
        assert c.components_error <= 1e-5 * max(abs(c.logit), 1.0)
    else:  # raw products: m_i (v_i · E[t])
        tid = m.token_id("o")
        coef = activations.keys(m, "hello world", layers=[1]).at(1)
        manual = coef * (m.V(1).float() @ m.unembedding.weight.float()[tid])
        torch.testing.assert_close(c.memory[1], manual, rtol=1e-4, atol=1e-7)
    top = c.top(4, sign="abs")
    assert [abs(x) for *_, x in top] == sorted((abs(x) for *_, x in top), reverse=True)


def test_contribution_embedding_part_matches_the_embedding():
    m = tiny("llama")  # no position embeddings: the embedding part is the embedding itself
    c = contrib.contributions(m, "hello", "l", norm="frozen")
    batch = m.tokenize("hello")
    states = tracing.run(m, batch, read=[Site("embed"), Site("resid", m.n_layers - 1)])
    fn = vocab.frozen_norm(m, states[Site("resid", m.n_layers - 1)][0, -1])
    manual = float(fn(states[Site("embed")][0, -1]) @ m.unembedding.weight.float()[m.token_id("l")])
    assert c.components["embedding"] == pytest.approx(manual, rel=1e-4, abs=1e-6)


def test_contribution_errors(m):
    with pytest.raises(ValueError, match="not a single token"):
        contrib.contributions(m, "hello", "lo")
    with pytest.raises(IndexError, match="token 9"):
        contrib.contributions(m, "hello", "l", token=9)
    with pytest.raises(ValueError, match="norm must be"):
        contrib.contributions(m, "hello", "l", norm="final")


def test_intervention_identity_and_switch_off(m):
    same = intervene.intervene(m, "hello world", {(1, 0): 1.0}, k=3)
    assert same.before == same.after and same.kl == pytest.approx(0.0, abs=1e-6) and not same.changed
    off = intervene.intervene(m, "hello world", {(2, i): 0.0 for i in range(m.d_ff)}, k=3, target="d")
    batch = m.tokenize("hello world")
    writes = {Site("key", 2): torch.zeros_like}
    logits = tracing.run(m, batch, read=[Site("logits")], write=writes)[Site("logits")]
    probs = logits[0, -1].float().softmax(-1)
    assert off.after.probs == pytest.approx(probs.topk(3).values.tolist(), rel=1e-4)
    assert off.target_after == pytest.approx(float(probs[m.token_id("d")]), rel=1e-4)
    clean = tracing.run(m, batch, read=[Site("logits")])[Site("logits")][0, -1].float().log_softmax(-1)
    kl = float((clean.exp() * (clean - probs.log())).sum())
    assert off.kl == pytest.approx(kl, rel=1e-3, abs=1e-6) and off.scales[(2, 0)] == 0.0


def test_intervention_positions_and_errors(m):
    last = intervene.intervene(m, "abc", {(0, 1): 5.0}, positions="last")
    some = intervene.intervene(m, "abc", {(0, 1): 5.0}, positions=[-1])
    assert last.after == some.after and some.positions == (2,)
    with pytest.raises(ValueError, match="scales is empty"):
        intervene.intervene(m, "abc", {})
    with pytest.raises(IndexError, match="memory"):
        intervene.intervene(m, "abc", {(0, m.d_ff): 0.0})
    with pytest.raises(IndexError, match="layer"):
        intervene.intervene(m, "abc", {(5, 0): 0.0})
    with pytest.raises(ValueError, match="finite"):
        intervene.intervene(m, "abc", {(0, 0): math.nan})
    with pytest.raises(IndexError, match="positions"):
        intervene.intervene(m, "abc", {(0, 0): 0.0}, positions=[7])


def test_logit_lens_last_layer_is_the_model(m):
    ll = lens.logit_lens(m, PROMPTS, k=3)
    for p in range(len(PROMPTS)):
        assert ll.top_ids[p].shape == (m.n_layers, len(PROMPTS[p]), 3)
        assert torch.equal(ll.top_ids[p][-1, :, 0], ll.final_ids[p])
        assert ll.first_layer(p) is not None and bool((ll.top_probs[p] <= 1).all())
    assert ll.prediction(m.n_layers - 1, 1) == ll.vocab[int(ll.final_ids[1][-1])]


def test_composition_readings_and_stats(m):
    comp = lens.composition(m, PROMPTS, k=3)
    E = m.unembedding.weight.float()
    step = comp.steps[0][1]
    coef = activations.keys(m, PROMPTS[0], layers=[1]).at(1)
    assert step.memories == coef.abs().topk(3).indices.tolist()
    fn = vocab.frozen_norm(m)
    i, sign = step.memories[0], 1.0 if step.coefficients[0] >= 0 else -1.0
    assert step.memory_tokens[0] == int((fn(sign * m.V(1)[i].float()) @ E.T).argmax())
    for row in comp.stats():  # the four cases of Geva et al. 2021, Fig. 11 partition the prompts
        assert row["residual"] + row["ffn"] + row["agreement"] + row["composition"] == pytest.approx(1.0)
        assert row["memory_agreement"] >= row["top1_agreement"]
        assert row["memory_agreement"] + row["no_memory_agreement"] == pytest.approx(1.0)
        assert 0 <= row["p_final"] <= 1
    assert comp.stats()[-1]["after_predicts_final"] == 1.0  # the last residual read by the head is the model
    assert comp.first_layer(0) is not None
    logits = vocab.to_vocab(m, step_residual(m, PROMPTS[0], 1), "final")
    assert step.before == int(logits.argmax())
    active = lens.composition(m, PROMPTS[:1], layers=[1], k=None)
    assert active.steps[0][0].memories == (coef > 0).nonzero().flatten().tolist()


def step_residual(m, prompt, layer):
    """r_l = o_l - y_l at the last token, computed from the states directly."""
    batch = m.tokenize(prompt)
    states = tracing.run(m, batch, read=[Site("resid", layer), Site("mlp", layer)])
    return (states[Site("resid", layer)] - states[Site("mlp", layer)])[0, -1]
