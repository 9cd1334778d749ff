"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvlens import metrics as M


def test_efficacy_paraphrase_neighborhood_by_hand():
    # new wins when its NLL is lower (Eq. 24)
    assert M.efficacy_success([0.5, 2.0, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(1 / 3)
    # PS (Eq. 25): per-case fraction, then mean: case 0 wins 1/2, case 1 wins 1/1 -> 0.75
    assert M.paraphrase_success([[0.1, 3.0], [0.2]], [[1.0, 1.0], [1.0]]) == pytest.approx(0.75)
    # NS (Eq. 26): true still wins (NLL_new > NLL_true) in 2 of 3 prompts of one case
    assert M.neighborhood_success([[2.0, 3.0, 0.1]], [[1.0, 1.0, 1.0]]) == pytest.approx(2 / 3)


def test_magnitude_is_probability_difference():
    value = M.magnitude([math.log(2)], [math.log(4)])  # p_new 0.5, p_true 0.25
    assert value == pytest.approx(0.25)


def test_harmonic_mean_by_hand_and_with_zero():
    assert M.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert M.harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        M.harmonic_mean([0.5, -0.1])
    with pytest.raises(ValueError, match="no values"):
        M.harmonic_mean([])


def test_ngram_entropy_of_repeated_string_is_zero():
    assert M.ngram_entropy("the the the the the the") == 0.0
    assert M.generation_entropy(["a a a a", "b b b"]) == 0.0


def test_ngram_entropy_by_hand():
    # "a b c d": 3 distinct bigrams (H2 = log2 3), 2 distinct trigrams (H3 = 1 bit);
    # reference code: mean(2/3 * H2, 4/3 * H3)
    expected = np.mean([2 / 3 * math.log2(3), 4 / 3 * 1.0])
    assert M.ngram_entropy("a b c d") == pytest.approx(expected)
    # punctuation is its own token: "a, b" -> a , b
    assert M.words("Hello, world! Don't.") == ["Hello", ",", "world", "!", "Don't", "."]


def test_token_accuracy_and_argmax_agreement():
    assert M.token_accuracy([True, False, True]) == pytest.approx(2 / 3)
    assert M.argmax_agreement([29, 234, 334], [29, 234, 333]) == pytest.approx(2 / 3)  # EasyEdit README
    with pytest.raises(ValueError, match="equal"):
        M.argmax_agreement([1, 2], [1])


def test_tfidf_matches_sklearn_formula_by_hand():
    tfidf = M.TfIdf.fit(["paris france", "rome italy", "paris city"])
    # idf = ln((1+n)/(1+df)) + 1 with n=3: paris df=2
    assert tfidf.idf[tfidf.vocabulary["paris"]] == pytest.approx(math.log(4 / 3) + 1)
    assert M.tfidf_similarity("paris france", "paris france", tfidf) == pytest.approx(1.0)
    assert M.tfidf_similarity("paris", "rome", tfidf) == 0.0
    w_p, w_f = math.log(4 / 3) + 1, math.log(4 / 2) + 1
    cos = w_p * w_p / (math.hypot(w_p, w_f) * w_p)  # "paris france" vs "paris"
    assert M.tfidf_similarity("paris france", "paris", tfidf) == pytest.approx(cos)
    assert M.reference_score(["paris"], ["paris france"], tfidf) == pytest.approx(cos)


def test_confidence_intervals():
    e = M.mean_ci([1, 0, 1, 0], "counterfact", scale=100)
    half = 1.959964 * np.std([100, 0, 100, 0], ddof=1) / 2
    assert (e.mean, e.low, e.high, e.n) == pytest.approx((50, 50 - half, 50 + half, 4))
    clipped = M.mean_ci([1, 1, 0.5, 1], "counterfact", scale=100, bounds=(0, 100), rate=True)
    assert clipped.high == 100 and clipped.method == "normal"
    # every case 0 or 1: Wilson, which does not collapse at 10/10 (the normal interval is [100, 100])
    ten = M.mean_ci([1] * 10, "counterfact", scale=100, bounds=(0, 100), rate=True)
    assert ten.method == "wilson" and ten.mean == 100 and ten.high == 100
    assert ten.low == pytest.approx(100 * 10 / (10 + 1.959964**2), abs=1e-6)  # n / (n + z²)
    assert M.mean_ci([1] * 10, "counterfact", scale=100, bounds=(0, 100)).low == 100  # without rate: normal
    w = M.wilson(3, 4, "counterfact")
    assert w.low < 75 < w.high < 100
    s = M.harmonic_ci([[1, 1, 1], [1, 0, 1], [1, 1, 1]], "counterfact", scale=100)
    assert s.mean == pytest.approx(100 * M.harmonic_mean([1, 2 / 3, 1]))
    assert s.low <= s.mean <= s.high and s.method == "bootstrap"


def test_bad_inputs():
    with pytest.raises(ValueError, match="case 1 has no paraphrase"):
        M.paraphrase_success([[0.1], []], [[1.0], []])
    with pytest.raises(ValueError, match="cases"):
        M.neighborhood_success([[0.1]], [])
    with pytest.raises(ValueError, match="finite"):
        M.efficacy_success([float("nan")], [1.0])
    with pytest.raises(ValueError, match="non-empty corpus"):
        M.TfIdf.fit([])


def test_repetition_lowers_ge_of_the_bundled_fluency_sample():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "data" / "fluency_sample.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 3
    for p in paragraphs:
        first = p.split(". ")[0] + ". "
        assert M.ngram_entropy(p) > M.ngram_entropy(first * 5) > 0


def test_mean_half_width_ignores_nan_per_column():
    x = torch.tensor([[1.0, math.nan], [3.0, 2.0]], dtype=torch.float64)
    mean, half = M.mean_half_width(x)
    assert mean.tolist() == [2.0, 2.0]
    assert half[0] == pytest.approx(M.Z95 * math.sqrt(2) / math.sqrt(2)) and half[1] == 0
    assert math.isnan(float(M.mean_half_width(torch.tensor([[math.nan]]))[0][0]))
