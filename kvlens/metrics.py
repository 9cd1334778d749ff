"""Model-editing metrics as pure functions on numbers and strings (no model here).

Conventions, each named by a label carried into every :class:`~kvlens.evaluate.EditReport` number:

``counterfact``  ROME/MEMIT (Meng et al. 2022, 2023, Appendix C; reference code
                 ``experiments/py/eval_utils_counterfact.py`` + ``summarize.py``). A prompt is a
                 *success* when the length-normalised teacher-forced NLL of one object is lower
                 than the other's: ES (Eq. 24), PS (Eq. 25), NS (Eq. 26), S = harmonic mean;
                 magnitudes EM/PM/NM are mean probability differences (exp(-NLL)).
``zsre``         MEMIT's zsRE table (``eval_utils_zsre.py``): teacher-forced token-level top-1
                 accuracy of the target (Eqs. 21-23 generalised to multi-token answers).
``easyedit``     EasyEdit (zjunlp/EasyEdit ``evaluate_utils.py``): Reliability / Generalization are
                 token-level teacher-forced accuracy of ``target_new``; Locality is the fraction
                 of neighbourhood target tokens whose argmax is *unchanged* from before the edit.
``generation``   GE (Eq. 27, as the reference code computes it) and RS (TF-IDF cosine).

EasyEdit's token accuracy and ROME's probability comparison disagree, sometimes a lot
(EasyEdit #125, #434: 98.9/88.6/73.7 vs 96.0/54.9/11.8 on the same MEMIT run), so never compare
numbers across conventions.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

CONVENTIONS: dict[str, str] = {
    "counterfact": "ROME/MEMIT CounterFact: length-normalised teacher-forced NLL of target_new vs target_true",
    "zsre": "MEMIT zsRE: teacher-forced token-level top-1 accuracy of the target tokens",
    "easyedit": "EasyEdit: token-level top-1 accuracy (Reliability/Generalization), "
                "argmax unchanged from before the edit (Locality)",
    "generation": "ROME/MEMIT generation tests: n-gram entropy (Eq. 27, reference-code mean) and TF-IDF cosine",
}


def _array(values: Iterable[float] | float, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"{name}: no values given")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: values must be finite, got {a}")
    return a


# ---- CounterFact probability tests (Appendix C.2) ---------------------------------------------
def new_beats_true(nll_new: Sequence[float] | float, nll_true: Sequence[float] | float) -> np.ndarray:
    """Per prompt: P[o*] > P[o^c], i.e. NLL_new < NLL_true (the indicator inside Eqs. 24-25)."""
    return _array(nll_new, "nll_new") < _array(nll_true, "nll_true")


def efficacy_success(nll_new: Sequence[float], nll_true: Sequence[float]) -> float:
    """ES (Eq. 24): fraction of rewrite prompts (one per case) where the new object wins."""
    return float(new_beats_true(nll_new, nll_true).mean())


def paraphrase_success(nll_new: Sequence[Sequence[float]], nll_true: Sequence[Sequence[float]]) -> float:
    """PS (Eq. 25): per case the fraction of its paraphrases the new object wins, then the mean.

    ``nll_new[i]`` holds case i's paraphrase NLLs; a case with no paraphrase is an error.
    """
    return float(np.mean([new_beats_true(n, t).mean() for n, t in _cases(nll_new, nll_true, "paraphrase")]))


def neighborhood_success(nll_new: Sequence[Sequence[float]], nll_true: Sequence[Sequence[float]]) -> float:
    """NS (Eq. 26): per case the fraction of neighbourhood prompts the *true* object still wins."""
    return float(np.mean([(~new_beats_true(n, t)).mean() for n, t in _cases(nll_new, nll_true, "neighborhood")]))


def magnitude(nll_new: Sequence[float], nll_true: Sequence[float]) -> float:
    """EM/PM (ROME ``summarize.py``): mean of P[o*] - P[o^c], probabilities exp(-NLL).

    For NM pass the arguments swapped (true minus new).
    """
    n, t = _array(nll_new, "nll_new"), _array(nll_true, "nll_true")
    return float(np.mean(np.exp(-n) - np.exp(-t)))


def _cases(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], what: str
           ) -> Iterator[tuple[Sequence[float], Sequence[float]]]:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} cases of new-object NLLs but {len(b)} of true-object NLLs")
    if len(a) == 0:
        raise ValueError(f"{what}: no cases given")
    for i, (x, y) in enumerate(zip(a, b)):
        if len(x) == 0:
            raise ValueError(f"{what}: case {i} has no {what} prompts")
        yield x, y


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (the limit), an error for negative values.

    The editing Score S = harmonic_mean(ES, PS, NS) (Appendix C.2), zsRE Score likewise.
    """
    a = _array(values, "harmonic_mean")
    if np.any(a < 0):
        raise ValueError(f"harmonic_mean needs non-negative values, got {a}")
    if np.any(a == 0):
        return 0.0
    return float(len(a) / np.sum(1.0 / a))


# ---- zsRE / EasyEdit token accuracy ----------------------------------------------------------
def token_accuracy(hits: Sequence[bool] | np.ndarray) -> float:
    """Teacher-forced top-1 accuracy over one target's tokens (zsRE, EasyEdit Reliability)."""
    return float(_array(np.asarray(hits, dtype=float), "token_accuracy").mean())


def argmax_agreement(before: Sequence[int] | np.ndarray, after: Sequence[int] | np.ndarray) -> float:
    """EasyEdit Locality of one prompt: fraction of positions whose argmax token is unchanged."""
    b, a = np.asarray(before), np.asarray(after)
    if b.shape != a.shape or b.size == 0:
        raise ValueError(f"argmax_agreement needs two equal non-empty token lists, got {b.shape} and {a.shape}")
    return float((b == a).mean())


# ---- Generation: GE (Eq. 27) and RS -----------------------------------------------------------
_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens: runs of letters/digits (with an inner apostrophe) and single punctuation marks.

    A dependency-free stand-in for ``nltk.word_tokenize`` used by the reference code; it agrees
    on plain prose and splits contractions differently (``don't`` stays one token).
    """
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Generation entropy of one text in bits (Eq. 27 as the reference code computes it).

    ``H_n = -sum_k f_n(k) log2 f_n(k)`` over the n-gram frequency distribution; the result is the
    *mean* of ``w_n H_n`` (``compute_n_gram_entropy`` with ``agg="arith"``), i.e. half of Eq. 27's
    printed sum. Papers print it x100 (GPT-2 XL ~ 626). A text with fewer than n words
    contributes H_n = 0; a repeated single word has entropy 0.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"ns {ns} and weights {weights} must be non-empty and the same length")
    tokens = words(text)
    terms = []
    for n, w in zip(ns, weights):
        counts = np.array(list(Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)).values()),
                          dtype=np.float64)
        h = 0.0 if counts.size == 0 else float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
        terms.append(w * h)
    return float(np.mean(terms))


def generation_entropy(texts: Sequence[str]) -> float:
    """GE of a set of generations: mean of :func:`ngram_entropy` (``n_gram_entropy``, arith)."""
    if not texts:
        raise ValueError("generation_entropy: no texts given")
    return float(np.mean([ngram_entropy(t) for t in texts]))


_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class TfIdf:
    """A TF-IDF vectoriser with scikit-learn's defaults (lower-case, 2+ character words,
    smooth idf = ln((1 + n) / (1 + df)) + 1, raw term counts, L2-normalised rows).

    Fit it on a reference corpus (ROME fits on Wikipedia) with :meth:`fit`.
    """

    vocabulary: dict[str, int]
    idf: np.ndarray

    @staticmethod
    def fit(corpus: Sequence[str]) -> TfIdf:
        if not corpus:
            raise ValueError("TfIdf.fit needs a non-empty corpus of documents")
        docs = [set(_TFIDF_TOKEN.findall(d.lower())) for d in corpus]
        vocab = {w: i for i, w in enumerate(sorted(set().union(*docs)))}
        if not vocab:
            raise ValueError("TfIdf.fit: the corpus holds no words of 2+ characters")
        df = np.zeros(len(vocab))
        for d in docs:
            for w in d:
                df[vocab[w]] += 1
        return TfIdf(vocab, np.log((1 + len(docs)) / (1 + df)) + 1.0)

    def transform(self, text: str) -> np.ndarray:
        v = np.zeros(len(self.vocabulary))
        for w in _TFIDF_TOKEN.findall(text.lower()):
            i = self.vocabulary.get(w)
            if i is not None:
                v[i] += 1
        v *= self.idf
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v


def tfidf_similarity(text_a: str, text_b: str, tfidf: TfIdf) -> float:
    """Cosine of the TF-IDF vectors of two texts (``tfidf_similarity`` in the reference code).

    0 when either text has no word in the vocabulary (the reference code would give NaN).
    """
    return float(np.dot(tfidf.transform(text_a), tfidf.transform(text_b)))


def reference_score(generations: Sequence[str], references: Sequence[str], tfidf: TfIdf) -> float:
    """RS: TF-IDF cosine between all generations joined and all reference texts joined."""
    if not generations or not references:
        raise ValueError("reference_score needs at least one generation and one reference text")
    return tfidf_similarity(" ".join(generations), " ".join(references), tfidf)


# ---- confidence intervals ---------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % confidence interval, the sample size and the convention it follows."""

    mean: float
    low: float
    high: float
    n: int
    convention: str
    method: str = "normal"

    def __str__(self) -> str:
        return f"{self.mean:.1f} [{self.low:.1f}, {self.high:.1f}]"


Z95 = 1.959964  # two-sided 95 % normal quantile


def mean_half_width(x: torch.Tensor, z: float = Z95) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over dim 0 and the CI half-width ``z · sd / sqrt(n)`` (sd with ddof=1), NaN ignored.

    Half-width 0 where one value is present; mean NaN where none is.
    """
    ok = ~x.isnan()
    n = ok.sum(0).clamp(min=1)
    mean = torch.where(ok, x, 0).sum(0) / n
    var = torch.where(ok, (x - mean) ** 2, 0).sum(0) / (n - 1).clamp(min=1)
    return torch.where(ok.any(0), mean, math.nan), z * var.sqrt() / n.sqrt()


def wilson(hits: int, n: int, convention: str, z: float = Z95) -> Estimate:
    """A rate ``hits / n`` (x100) with the Wilson score 95 % interval (Wilson 1927): unlike the
    normal approximation it does not collapse to a point at 0/n or n/n (10/10 gives [72.2, 100])."""
    if n <= 0:
        raise ValueError("a rate of no cases")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if hits == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends, not 1 - 1e-16
    high = 1.0 if hits == n else min(1.0, centre + half)
    return Estimate(100 * p, 100 * low, 100 * high, n, convention, "wilson")


def mean_ci(values: Sequence[float], convention: str, *, scale: float = 1.0, z: float = Z95,
            bounds: tuple[float, float] | None = None, rate: bool = False) -> Estimate:
    """Mean and normal-approximation 95 % CI, ``mean ± z · sd / sqrt(n)`` (:func:`mean_half_width`).

    ``bounds`` (after scaling) clip the interval to the metric's range, e.g. (0, 100) for rates.
    With ``rate`` (per-case values in [0, 1]), a rate whose every case is 0 or 1 (e.g. ES of one
    prompt per case) gets the Wilson interval instead (:func:`wilson`, method ``"wilson"``), which
    stays honest at 0/n and n/n where the normal one collapses to a point.
    """
    raw = _array(values, "mean_ci")
    if rate and bool(np.isin(raw, (0.0, 1.0)).all()):
        return wilson(int(raw.sum()), int(raw.size), convention, z)
    a = raw * scale
    mean_t, half_t = mean_half_width(torch.as_tensor(a, dtype=torch.float64), z)
    mean, half = float(mean_t), float(half_t)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Estimate(mean, low, high, int(a.size), convention)


def harmonic_ci(columns: Sequence[Sequence[float]], convention: str, *, scale: float = 1.0,
                n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Harmonic mean of the column means with a percentile-bootstrap 95 % CI over cases.

    ``columns[k][i]`` is metric k of case i (e.g. ES, PS, NS per case); cases are resampled.
    """
    m = np.stack([_array(c, "harmonic_ci") for c in columns])  # [k, n]
    point = harmonic_mean(m.mean(1)) * scale
    n = m.shape[1]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = [harmonic_mean(m[:, i].mean(1)) * scale for i in idx]
    low, high = np.percentile(boots, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high), int(n), convention, "bootstrap")
