"""Inspect on the real embedded model (SmolLM2-135M): Paris memories, trigger examples, interventions."""

from __future__ import annotations

import pytest

from kvlens import corpus as kc
from kvlens import tracing
from kvlens.memory import activations, contrib, intervene, lens, triggers, vocab
from kvlens.models.kvmodel import Batch, Site

PROMPT = "The capital of France is"
TOP_LAYERS = list(range(22, 30))


@pytest.fixture(scope="module")
def paris(embedded):
    return contrib.contributions(embedded, PROMPT, " Paris", TOP_LAYERS, norm="frozen")


def test_contributions_decompose_the_paris_logit_exactly(embedded, paris):
    assert paris.max_error < 1e-3 and paris.components_error < 1e-3
    assert paris.token == " is" and paris.target_id == embedded.token_id(" Paris")
    logits = tracing.run(embedded, embedded.tokenize(PROMPT), read=[Site("logits")])[Site("logits")]
    assert int(logits[0, -1].argmax()) == paris.target_id  # the model does answer " Paris"


def test_find_memories_finds_top_paris_contributors(embedded, paris):
    """The top-10 contributors of the top layers are mostly strongly firing memories whose values are
    not specific to " Paris" (Geva et al. 2021, §5: predictions are compositions); still, several of
    them are among the 100 of 12,288 values that write " Paris" most (chance: ~0.08 of 10)."""
    found = vocab.find_memories(embedded, " Paris", TOP_LAYERS, k=100, norm="frozen", both_signs=True)
    top = paris.top(10, sign="positive")
    both = [(l, i) for l, i, _ in top if (l, i) in set(found.memories)]
    assert len(both) >= 2
    acts = activations.keys(embedded, PROMPT, TOP_LAYERS)
    for l, i in both:  # a positive contribution: the coefficient has the sign of the value's score
        assert float(acts.at(l)[i]) * float(found.scores[l][i]) > 0


def test_zscore_ranking_finds_values_specific_to_paris(embedded):
    found = vocab.find_memories(embedded, " Paris", TOP_LAYERS, k=10, norm="frozen", by="zscore",
                                both_signs=True)
    assert all(f.rank < 1000 for f in found.found)  # " Paris" is in the top 2% of each value's tokens
    assert [abs(f.score) for f in found.found] == sorted((abs(f.score) for f in found.found), reverse=True)


def test_switching_off_paris_contributors_lowers_paris(embedded, paris):
    scales = {(l, i): 0.0 for l, i, _ in paris.top(10)}
    off = intervene.intervene(embedded, PROMPT, scales, target=" Paris", k=5)
    assert off.before.top == " Paris" and off.target_before > 0.5
    assert off.target_after < off.target_before / 2 and off.kl > 0.1


def test_trigger_examples_recompute_in_descending_order(embedded, tmp_cache):
    memory = (2, 100)
    res = triggers.trigger_examples(embedded, memory, kc.bundled().head(2), n=5, window=32, max_tokens=384,
                                    batch_size=4, progress=False)
    examples = res[memory]
    coefs = [ex.coefficient for ex in examples]
    assert len(examples) == 5 and coefs == sorted(coefs, reverse=True) and res.tokens_seen == 384
    head = kc.head_ids(embedded)
    for ex in examples:
        assert ex.ids[: len(head)] == head and ex.text.endswith(ex.token.strip())
        batch = Batch.from_ids([ex.ids], embedded.tokenizer.pad_token_id)
        coef = tracing.run(embedded, batch, read=[Site("key", 2)], stop=True)[Site("key", 2)][0, -1, 100]
        assert float(coef) == pytest.approx(ex.coefficient, rel=1e-3, abs=1e-4)


def test_logit_lens_and_composition_reach_paris(embedded):
    ll = lens.logit_lens(embedded, PROMPT, layers=TOP_LAYERS, k=3)
    assert ll.prediction(29) == " Paris" and ll.first_layer() in TOP_LAYERS
    comp = lens.composition(embedded, [PROMPT, "The Eiffel Tower is located in the city of"],
                            layers=TOP_LAYERS[-3:], k=3)
    assert [comp.vocab[f] for f in comp.final] == [" Paris", " Paris"]
    assert comp.stats()[-1]["after_predicts_final"] == 1.0
    assert comp.first_layer(0) in TOP_LAYERS


def test_multi_token_target_names_its_pieces(embedded):
    with pytest.raises(ValueError, match="is not a single token: it splits into .*; the first is"):
        vocab.find_memories(embedded, " Parisian capital")
