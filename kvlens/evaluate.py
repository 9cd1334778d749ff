"""Evaluate a model, edited or not, on CounterFact-style records: one call, before and after.

The model-side part of the metrics lives here (teacher-forced target log-probabilities and
top-1 hits, batched through :func:`kvlens.tracing.run`); the arithmetic is in
:mod:`kvlens.metrics`. Conventions follow the ROME/MEMIT reference code
(``experiments/py/eval_utils_counterfact.py`` and ``eval_utils_zsre.py``; see
``shared/reference/anchors.md`` §3.7).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from kvlens import tracing
from kvlens.datasets import EvalCase, as_cases, count_edited_neighbours
from kvlens.errors import BadInput, EditedNeighbours
from kvlens.metrics import (
    CONVENTIONS,
    Estimate,
    TfIdf,
    argmax_agreement,
    efficacy_success,
    generation_entropy,
    harmonic_ci,
    magnitude,
    mean_ci,
    neighborhood_success,
    paraphrase_success,
    reference_score,
    token_accuracy,
)
from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.prompts import check_length, continuation_ids
from kvlens.tracing import Write, run


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced scores of one target string after one prompt.

    ``logprobs[j]`` = log P(target token j | prompt, target tokens < j); ``hits[j]`` = whether
    that token is the model's argmax there (zsRE / EasyEdit token accuracy); ``argmax[j]`` is
    that argmax token (EasyEdit locality compares it before and after an edit).
    """

    prompt: str
    target: str
    token_ids: tuple[int, ...]
    logprobs: np.ndarray
    hits: np.ndarray
    argmax: np.ndarray

    @property
    def nll(self) -> float:
        """Length-normalised negative log-likelihood (ROME's comparison quantity)."""
        return float(-self.logprobs.mean())

    @property
    def prob(self) -> float:
        """Geometric-mean token probability, exp(-nll)."""
        return float(np.exp(-self.nll))

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens that are the argmax (teacher-forced)."""
        return float(self.hits.mean())

    @property
    def first_is_top1(self) -> bool:
        return bool(self.hits[0])


#: Per-row trace writes for rows owned by ``owners`` (one owner id per batch row): see ``score_targets``.
RowWrites = Callable[[torch.Tensor], Mapping[Site, Write]]


def score_targets(model: KVModel, prompts: Sequence[str], targets: Sequence[str], *,
                  batch_size: int = 32, owners: Sequence[int] | None = None,
                  writes: RowWrites | None = None) -> list[TargetScore]:
    """Teacher-forced log-probabilities of ``targets[i]`` right after ``prompts[i]``.

    The prompt is tokenized as :meth:`KVModel.tokenize` does (with the model's prefix) and the
    target as it follows the prompt, without special tokens and with a leading space if it has
    none (ROME's convention, :func:`kvlens.prompts.continuation`: ``"Paris"`` and ``" Paris"``
    are both scored as ``" Paris"``, the tokens the model would emit). Pairs whose context
    (prompt + all but the last target token) is the same share one forward row, so
    single-token targets after one prompt cost one row. Rows are sorted by length and run in
    batches of ``batch_size`` right-padded rows through :func:`kvlens.tracing.run`.

    ``owners[i]`` (optional) names who pair i belongs to; rows are shared only within one owner,
    and ``writes(row_owners)`` gives each forward's trace writes from the owner of each of its
    rows: many model states (e.g. independent edits, one per owner) scored in the same forwards.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets: pass one target per prompt")
    if not prompts:
        raise ValueError("no prompts to score: pass at least one (prompt, target) pair")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if owners is not None and len(owners) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(owners)} owners: pass one owner per prompt")
    if writes is not None and owners is None:
        raise ValueError("per-row writes need owners: pass owners (one per prompt) with writes")
    prompt_cache: dict[str, list[int]] = {}
    for p in prompts:
        if p not in prompt_cache:
            prompt_cache[p] = model.tokenize(p).input_ids[0].tolist()
    target_ids = [continuation_ids(model, t) for t in targets]
    contexts: dict[tuple[int, ...], int] = {}
    row_of = []
    for i, (p, t) in enumerate(zip(prompts, target_ids)):
        key = (-1 if owners is None else int(owners[i]), *prompt_cache[p], *t[:-1])
        check_length(model, len(key), f"prompt {p!r} with its {len(t)} target token(s)")
        row_of.append(contexts.setdefault(key, len(contexts)))
    row_owner = torch.tensor([k[0] for k in contexts], dtype=torch.long)
    rows = [list(k[1:]) for k in contexts]
    pairs_of_row: list[list[int]] = [[] for _ in rows]
    for i, r in enumerate(row_of):
        pairs_of_row[r].append(i)
    out: list[TargetScore | None] = [None] * len(prompts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    pad = model.tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = Batch.from_ids([rows[i] for i in chunk], pad, model.device, [str(i) for i in chunk])
        extra = writes(row_owner[torch.tensor(chunk, dtype=torch.long)]) if writes is not None else None
        logits = run(model, batch, read=[Site("logits")], write=extra)[Site("logits")]
        for r, row in enumerate(chunk):
            for i in pairs_of_row[row]:
                n_p, t = len(prompt_cache[prompts[i]]), target_ids[i]
                step = logits[r, n_p - 1: n_p - 1 + len(t)].float().log_softmax(-1)
                tgt = torch.tensor(t, device=step.device)
                lp = step.gather(-1, tgt[:, None])[:, 0]
                argmax = step.argmax(-1)
                out[i] = TargetScore(prompts[i], targets[i], tuple(t), lp.cpu().numpy().astype(np.float64),
                                     (argmax == tgt).cpu().numpy(), argmax.cpu().numpy())
    return [s for s in out if s is not None]


# ---- one model state on many cases ------------------------------------------------------------
TESTS = ("rewrite", "paraphrase", "neighborhood")


def _tests_for(cases: Sequence[EvalCase], tests: Sequence[str] | None) -> tuple[str, ...]:
    """Which prompt groups to score; an error naming the case when one lacks a requested group."""
    if tests is None:
        tests = ["rewrite"] + [t for t in TESTS[1:] if any(getattr(c, f"{t}_prompts") for c in cases)]
    unknown = set(tests) - set(TESTS)
    if unknown:
        raise ValueError(f"unknown tests {sorted(unknown)}; choose from {list(TESTS)}")
    metric = {"paraphrase": "PS (paraphrase success)", "neighborhood": "NS (neighborhood success)"}
    for t in tests:
        if t == "rewrite":
            continue
        for c in cases:
            if not getattr(c, f"{t}_prompts"):
                raise ValueError(
                    f"case {c.case_id!r} ({c.rewrite_prompt!r}) has an empty {t} prompt list, but {metric[t]} "
                    f"is asked for: give every case {t} prompts, or pass tests without {t!r}"
                )
    return tuple(t for t in TESTS if t in tests)


def score_state(model: KVModel, cases: Sequence[EvalCase], tests: Sequence[str], *,
                batch_size: int = 32, writes: RowWrites | None = None) -> list[dict[str, list[TargetScore]]]:
    """Teacher-forced scores of every case's prompts in the model's *current* state.

    Per case: ``rewrite_new``/``rewrite_true``, ``paraphrase_new``/``paraphrase_true`` (one per
    paraphrase), ``neighborhood_new``/``neighborhood_expected``. ``*_true`` lists are empty when the
    true object is unknown (zsRE); ``neighborhood_new`` is empty for zsRE-style neighbours.

    With ``writes``, case i's prompts run with the trace writes ``writes`` gives for owner i (its
    own state, e.g. its own edit; :func:`score_targets`), many cases in one forward.
    """
    prompts: list[str] = []
    targets: list[str] = []
    slots: list[tuple[int, str]] = []

    def add(case_index: int, key: str, prompt: str, target: str | None) -> None:
        if target is not None:
            prompts.append(prompt)
            targets.append(target)
            slots.append((case_index, key))

    for i, c in enumerate(cases):
        if "rewrite" in tests:
            add(i, "rewrite_new", c.rewrite_prompt, c.target_new)
            add(i, "rewrite_true", c.rewrite_prompt, c.target_true)
        if "paraphrase" in tests:
            for p in c.paraphrase_prompts:
                add(i, "paraphrase_new", p, c.target_new)
                add(i, "paraphrase_true", p, c.target_true)
        if "neighborhood" in tests:
            for p, expected in c.neighborhood_pairs():
                add(i, "neighborhood_expected", p, expected)
                if not c.neighborhood_targets:
                    add(i, "neighborhood_new", p, c.target_new)
    keys = ("rewrite_new", "rewrite_true", "paraphrase_new", "paraphrase_true",
            "neighborhood_new", "neighborhood_expected")
    out: list[dict[str, list[TargetScore]]] = [{k: [] for k in keys} for _ in cases]
    owners = [i for i, _ in slots] if writes is not None else None
    scores = score_targets(model, prompts, targets, batch_size=batch_size, owners=owners, writes=writes)
    for (i, key), score in zip(slots, scores):
        out[i][key].append(score)
    return out


def _nll(scores: Sequence[TargetScore]) -> list[float]:
    return [s.nll for s in scores]


def case_metrics(raw: dict[str, list[TargetScore]], before: dict[str, list[TargetScore]] | None = None
                 ) -> dict[str, float]:
    """Per-case metric values (fractions / probabilities, not x100) from :func:`score_state` output.

    Keys: ``ES PS NS EM PM NM`` (counterfact, only with a known true object), ``efficacy_acc
    paraphrase_acc specificity_acc`` (zsre), ``reliability generalization locality`` (easyedit;
    locality needs ``before``).
    """
    m: dict[str, float] = {}
    if raw["rewrite_new"]:
        if raw["rewrite_true"]:
            m["ES"] = efficacy_success(_nll(raw["rewrite_new"]), _nll(raw["rewrite_true"]))
            m["EM"] = magnitude(_nll(raw["rewrite_new"]), _nll(raw["rewrite_true"]))
        m["efficacy_acc"] = token_accuracy(raw["rewrite_new"][0].hits)
        m["reliability"] = m["efficacy_acc"]
    if raw["paraphrase_new"]:
        if raw["paraphrase_true"]:
            m["PS"] = paraphrase_success([_nll(raw["paraphrase_new"])], [_nll(raw["paraphrase_true"])])
            m["PM"] = magnitude(_nll(raw["paraphrase_new"]), _nll(raw["paraphrase_true"]))
        m["paraphrase_acc"] = float(np.mean([token_accuracy(s.hits) for s in raw["paraphrase_new"]]))
        m["generalization"] = m["paraphrase_acc"]
    if raw["neighborhood_expected"]:
        if raw["neighborhood_new"]:
            m["NS"] = neighborhood_success([_nll(raw["neighborhood_new"])], [_nll(raw["neighborhood_expected"])])
            m["NM"] = magnitude(_nll(raw["neighborhood_expected"]), _nll(raw["neighborhood_new"]))
        m["specificity_acc"] = float(np.mean([token_accuracy(s.hits) for s in raw["neighborhood_expected"]]))
        if before is not None:
            m["locality"] = float(np.mean([argmax_agreement(b.argmax, a.argmax) for b, a in
                                           zip(before["neighborhood_expected"], raw["neighborhood_expected"])]))
    return m


# ---- generation (fluency / consistency) --------------------------------------------------------
def generate(model: KVModel, prompts: Sequence[str], *, max_new_tokens: int = 100, top_k: int = 5,
             seed: int = 0, batch_size: int = 16) -> list[str]:
    """Sampled continuations (top-k, as ROME's ``generate_fast``), each returned with its prompt.

    Uses the model's own ``generate`` through the seam (:func:`kvlens.tracing.generate`) on
    left-padded prompts (with the model's prefix, which is not returned), so it sees weight edits
    but not nnsight-only interventions. Seeded: the torch RNG
    is forked, so the caller's RNG state is untouched.
    """
    if not prompts:
        raise ValueError("no generation prompts given")
    tok = model.tokenizer
    pad = tok.pad_token_id
    texts: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            enc = [model.tokenize(p).input_ids[0].tolist() for p in chunk]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for r, e in enumerate(enc):
                ids[r, width - len(e):] = torch.tensor(e)
                mask[r, width - len(e):] = 1
            out = tracing.generate(model, ids, mask, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad)
            for p, row in zip(chunk, out[:, width:]):
                texts.append(p + tok.decode(row.tolist(), skip_special_tokens=True))
    return texts


# ---- the report --------------------------------------------------------------------------------
#: (name in the report, per-case key, convention); all aggregate values are x100 as in the papers.
AGGREGATES: tuple[tuple[str, str, str], ...] = (
    ("ES", "ES", "counterfact"), ("PS", "PS", "counterfact"), ("NS", "NS", "counterfact"),
    ("EM", "EM", "counterfact"), ("PM", "PM", "counterfact"), ("NM", "NM", "counterfact"),
    ("Efficacy", "efficacy_acc", "zsre"), ("Paraphrase", "paraphrase_acc", "zsre"),
    ("Specificity", "specificity_acc", "zsre"),
    ("Reliability", "reliability", "easyedit"), ("Generalization", "generalization", "easyedit"),
    ("Locality", "locality", "easyedit"),
    ("GE", "GE", "generation"), ("RS", "RS", "generation"),
)
SCORES = {"S": (("ES", "PS", "NS"), "counterfact"), "Score": (("efficacy_acc", "paraphrase_acc",
                                                                  "specificity_acc"), "zsre")}


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, Estimate]:
    """Means (x100) with 95 % CIs over cases for every metric all rows have: normal approximation,
    Wilson for a rate whose cases are all 0 or 1 (:func:`~kvlens.metrics.mean_ci`); S/Score by bootstrap."""
    out: dict[str, Estimate] = {}
    for name, key, convention in AGGREGATES:
        if rows and all(key in r for r in rows):
            rate = convention != "generation" and name not in ("EM", "PM", "NM")
            bounds = (0.0, 100.0) if rate else (-100.0, 100.0) if name in ("EM", "PM", "NM") else None
            out[name] = mean_ci([r[key] for r in rows], convention, scale=100.0, bounds=bounds, rate=rate)
    for name, (keys, convention) in SCORES.items():
        if rows and all(k in r for r in rows for k in keys):
            out[name] = harmonic_ci([[r[k] for r in rows] for k in keys], convention, scale=100.0)
    return out


_Report = TypeVar("_Report", bound="EditReport")


@dataclass(frozen=True)
class EditReport:
    """Metrics of a model on a set of cases, before and (optionally) after an edit.

    ``per_case[state][i]`` holds case i's metric values (fractions, bits) for ``state`` in
    ``("before", "after")``; ``aggregate[state][name]`` is an :class:`~kvlens.metrics.Estimate`
    (mean x100 with a 95 % CI and its convention; see :data:`kvlens.metrics.CONVENTIONS`).
    """

    model: str
    method: str
    cases: tuple[EvalCase, ...]
    per_case: dict[str, list[dict[str, float]]]
    aggregate: dict[str, dict[str, Estimate]]
    generations: dict[str, list[list[str]]] = field(default_factory=dict)
    seconds: float = 0.0
    raw: dict[str, list[dict[str, list[TargetScore]]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def states(self) -> tuple[str, ...]:
        return tuple(self.per_case)

    def metric(self, name: str, state: str = "after") -> Estimate:
        """One aggregate, e.g. ``report.metric("ES")``; ``state`` falls back to the only one present."""
        if state not in self.aggregate:
            state = self.states[-1]
        if name not in self.aggregate[state]:
            raise KeyError(f"no metric {name!r} in state {state!r}; available: {list(self.aggregate[state])}")
        return self.aggregate[state][name]

    def table(self) -> list[dict[str, Any]]:
        """Rows ``{metric, convention, <state>: Estimate or None, n}`` for every state present."""
        names = [n for n, _, _ in AGGREGATES] + list(SCORES)
        rows = []
        for name in names:
            cells = {s: self.aggregate.get(s, {}).get(name) for s in self.states}
            present = [c for c in cells.values() if c is not None]
            if present:
                rows.append({"metric": name, "convention": present[0].convention, **cells, "n": present[0].n})
        return rows

    def summary(self) -> str:
        """A plain-text table of every aggregate with its CI and convention."""
        head = f"{self.method or 'unedited'} on {self.model}: {len(self.cases)} cases, {self.seconds:.1f} s"
        lines = [head, f"{'metric':14s} " + " ".join(f"{s:>22s}" for s in self.states) + "  convention"]
        for row in self.table():
            cells = " ".join(f"{'' if row[s] is None else str(row[s]):>22s}" for s in self.states)
            lines.append(f"{row['metric']:14s} {cells}  {row['convention']}")
        lines.append("values x100, 95% CI (normal; Wilson where every case is 0 or 1; S/Score: bootstrap). "
                     "Conventions: " + "; ".join(f"{k} = {v}" for k, v in CONVENTIONS.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, aggregates and per-case values."""
        return {
            "model": self.model, "method": self.method, "seconds": self.seconds,
            "cases": [c.case_id for c in self.cases],
            "aggregate": {s: {k: vars(e) for k, e in a.items()} for s, a in self.aggregate.items()},
            "per_case": self.per_case, "conventions": CONVENTIONS,
        }

    @classmethod
    def from_dict(cls: type[_Report], d: dict[str, Any], cases: Sequence[EvalCase], **extra: Any) -> _Report:
        """The report :meth:`to_dict` wrote, on ``cases`` (the same case ids in the same order).

        The dict holds case ids, not cases, so the caller passes the cases (e.g. from
        :func:`kvlens.datasets.load_bundled`); a mismatch is refused, naming the first difference.
        """
        ids = [c.case_id for c in cases]
        if ids != list(d["cases"]):
            first = next((i for i, (a, b) in enumerate(zip(ids, d["cases"], strict=False)) if a != b),
                         min(len(ids), len(d["cases"])))
            raise BadInput(f"the saved report is on {len(d['cases'])} cases and {len(ids)} were passed; they "
                             f"differ first at position {first}: pass the cases the report was made on")
        aggregate = {s: {k: Estimate(**e) for k, e in a.items()} for s, a in d["aggregate"].items()}
        return cls(model=d["model"], method=d["method"], cases=tuple(cases), per_case=d["per_case"],
                   aggregate=aggregate, seconds=float(d.get("seconds", 0.0)), **extra)


def _applied(delta: Any, model: KVModel) -> contextlib.AbstractContextManager:
    """The context in which ``delta`` is applied: ``delta.applied(model)`` or ``delta(model)``.

    On a model without local weights (remote) a delta runs as interventions: ``delta.intervened(model)``.
    """
    if hasattr(delta, "intervened") and not model.local_weights:
        return delta.intervened(model)
    if hasattr(delta, "applied"):
        return delta.applied(model)
    if callable(delta):
        cm = delta(model)
        if hasattr(cm, "__enter__") and hasattr(cm, "__exit__"):
            return cm
        raise TypeError("a callable delta must return a context manager that applies the edit and reverts it")
    raise TypeError(f"delta must have .applied(model) (a WeightDelta) or be a callable returning a context "
                    f"manager; got {type(delta).__name__}")


def _generation_metrics(model: KVModel, cases: Sequence[EvalCase], references: Mapping[str, Sequence[str]] | None,
                        tfidf: TfIdf | None, max_new_tokens: int, seed: int, batch_size: int
                        ) -> tuple[list[dict[str, float]], list[list[str]]]:
    for c in cases:
        if not c.generation_prompts:
            raise ValueError(f"case {c.case_id!r} has no generation_prompts, but generation metrics (GE/RS) "
                             f"are asked for: pass generation=False or give every case generation prompts")
    if references is not None:
        for c in cases:
            if not references.get(c.target_new.strip()):
                raise ValueError(f"no reference texts for target_new {c.target_new!r} (case {c.case_id!r}); "
                                 f"RS needs texts about every new object")
        if tfidf is None:
            tfidf = TfIdf.fit([t for texts in references.values() for t in texts])
    flat = [p for c in cases for p in c.generation_prompts]
    texts = generate(model, flat, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    rows, groups, k = [], [], 0
    for c in cases:
        own = texts[k:k + len(c.generation_prompts)]
        k += len(c.generation_prompts)
        groups.append(own)
        row = {"GE": generation_entropy(own)}
        if references is not None and tfidf is not None:
            row["RS"] = reference_score(own, references[c.target_new.strip()], tfidf)
        rows.append(row)
    return rows, groups


def warn_edited_neighbours(cases: Sequence[EvalCase], subjects: Sequence[str] | None, edit: str) -> None:
    """Warn (:class:`~kvlens.errors.EditedNeighbours`) when neighbourhood prompts of ``cases`` name a
    subject of ``subjects`` (default: the cases' own), edited by ``edit`` (words for the message)."""
    n, total = count_edited_neighbours(cases, subjects)
    if n:
        warnings.warn(f"{n} of the {total} neighbourhood prompts name a subject edited in {edit}: scored as "
                      "neighbours, their intended change counts as damage to NS. Leave them out with "
                      "kv.datasets.without_edited_neighbours(cases), pick facts of different relations, or "
                      "edit each fact alone (kv.evaluate_each)", EditedNeighbours, stacklevel=3)


def evaluate(model: KVModel, requests: Any, delta: Any = None, *, tests: Sequence[str] | None = None,
             before: bool = True, baseline: EditReport | None = None, generation: bool = False,
             references: Mapping[str, Sequence[str]] | None = None, tfidf: TfIdf | None = None,
             max_new_tokens: int = 100, batch_size: int = 32, seed: int = 0,
             method: str | None = None) -> EditReport:
    """Score ``requests`` on ``model``, before and after ``delta``, in one call.

    Args:
        model: the wrapped model.
        requests: :class:`~kvlens.datasets.EvalCase` s, CounterFact/zsRE records (dicts), or edit
            requests (objects with ``prompt``, ``subject``, ``target_new``, optional ``target_true``).
        delta: the edit: anything with ``.applied(model)`` (a ``WeightDelta``) or a callable
            ``delta(model)`` returning a context manager. ``None`` scores the model as it is now
            (state ``"current"``).
        tests: prompt groups to score (``"rewrite"``, ``"paraphrase"``, ``"neighborhood"``);
            default: those any case has (then every case must have them).
        before: also score the unedited model (state ``"before"``) when a delta is given.
        baseline: an earlier report on the same cases whose ``"before"``/``"current"`` state is
            reused instead of re-scoring the unedited model (e.g. across methods).
        generation: also generate from ``generation_prompts`` and report GE (and RS when
            ``references`` maps each ``target_new.strip()`` to texts about it; the TF-IDF is fitted
            on all reference texts unless ``tfidf`` is given). Slow on CPU: ~100 tokens per prompt.
        max_new_tokens, seed: generation length and sampling seed (top-k 5 as ROME).
        batch_size: rows per forward.
        method: a label for the report (default: the delta's ``method`` attribute or class name).

    Warns (:class:`~kvlens.errors.EditedNeighbours`) when a neighbourhood prompt names a subject
    the delta edits (its ``requests``): NS would count that intended change as damage.

    Returns:
        An :class:`EditReport` with per-case values and aggregates (x100, 95 % CIs), each
        labelled with its convention (counterfact / zsre / easyedit / generation).
    """
    t0 = time.perf_counter()
    cases = as_cases(requests)
    tests = _tests_for(cases, tests)
    edited = getattr(delta, "requests", None)
    if edited and "neighborhood" in tests:
        warn_edited_neighbours(cases, [r.subject for r in edited], "the scored delta")
    if delta is None:
        states = ["current"]
    else:
        states = (["before"] if before or baseline is not None else []) + ["after"]
    raw: dict[str, list] = {}
    per_case: dict[str, list[dict[str, float]]] = {}
    generations: dict[str, list[list[str]]] = {}
    if baseline is not None and delta is not None:
        base_state = next((s for s in ("before", "current") if s in baseline.raw), None)
        if base_state is None or [c.case_id for c in baseline.cases] != [c.case_id for c in cases]:
            raise ValueError("baseline must be a report on the same cases (same case ids, in order) "
                             "with an unedited state ('before' or 'current')")
        raw["before"] = baseline.raw[base_state]
        per_case["before"] = baseline.per_case[base_state]
        if base_state in baseline.generations:
            generations["before"] = baseline.generations[base_state]
    for state in states:
        if state in raw:
            continue
        ctx = _applied(delta, model) if state == "after" else contextlib.nullcontext()
        with ctx:
            raw[state] = score_state(model, cases, tests, batch_size=batch_size)
            if generation:
                gen_rows, generations[state] = _generation_metrics(model, cases, references, tfidf,
                                                                   max_new_tokens, seed, batch_size)
        prior = raw.get("before") if state == "after" else None
        per_case[state] = [case_metrics(r, prior[i] if prior else None) for i, r in enumerate(raw[state])]
        if generation:
            for row, extra in zip(per_case[state], gen_rows):
                row.update(extra)
    label = method if method is not None else (
        "" if delta is None else str(getattr(delta, "method", "") or type(delta).__name__))
    return EditReport(model=model.name, method=label, cases=tuple(cases), per_case=per_case,
                      aggregate={s: aggregate(rows) for s, rows in per_case.items()},
                      generations=generations, seconds=time.perf_counter() - t0, raw=raw)
