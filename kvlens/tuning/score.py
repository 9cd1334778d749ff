"""Evaluation of task tuning: generate the answer greedily, compare it with the label.

As Qiu et al.'s ``llama2_classification_multi_tasks_inference.py`` (which samples at temperature
1e-3, i.e. greedy): the model generates a short answer after the prompt and the answer is compared
with the gold label as a string. Here the answer is ``len(longest label's tokens)`` greedy tokens
through :func:`kvlens.tracing.run`, and it *predicts* a label when it starts with that label
(case-insensitive, at a word boundary: ``"positive."`` is ``positive``, ``"positively"`` is
nothing). An answer that names no label is wrong for accuracy and a miss for its gold class.

Metrics, per task and overall: accuracy with a Wilson score 95 % interval; macro-F1 (the mean
over labels of ``F1 = 2TP / (2TP + FP + FN)``, labels that are neither gold nor predicted left
out) with a percentile bootstrap 95 % interval over examples (seeded). Overall accuracy pools
every test example; overall macro-F1 is the mean of the tasks' macro-F1, bootstrapped within
each task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvlens.metrics import Estimate, wilson
from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.prompts import continuation_ids
from kvlens.tracing import run
from kvlens.tuning.hparams import TuneHParams
from kvlens.tuning.tasks import Task, TaskExample

CONVENTION = "task tuning: greedy answer == label (Qiu et al. 2024 inference script)"


def match_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label ``answer`` starts with (longest first, case-insensitive, word boundary), else None."""
    text = answer.strip().lower()
    for lab in sorted(labels, key=len, reverse=True):
        low = lab.strip().lower()
        if text.startswith(low) and (len(text) == len(low) or not text[len(low)].isalnum()):
            return lab
    return None


def greedy_answers(model: KVModel, task: Task, examples: Sequence[TaskExample], *, hp: TuneHParams,
                   batch_size: int = 32) -> list[str]:
    """The model's greedy continuation of each example's prompt, as many tokens as the longest label."""
    from kvlens.tuning.train import encode

    steps = max(len(continuation_ids(model, lab)) for lab in task.labels)
    pad = model.tokenizer.pad_token_id
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows = [encode(model, task, e.text, None, hp)["input_ids"] for e in chunk]
        gen: list[list[int]] = [[] for _ in chunk]
        for _ in range(steps):
            batch = Batch.from_ids([r + g for r, g in zip(rows, gen)], pad, model.device)
            logits = run(model, batch, read=[Site("logits")])[Site("logits")]
            nxt = logits[torch.arange(len(chunk), device=logits.device), batch.last].argmax(-1).tolist()
            for g, t in zip(gen, nxt):
                g.append(int(t))
        out += [model.tokenizer.decode(g, skip_special_tokens=True) for g in gen]
    return out


# ---- metrics --------------------------------------------------------------------------------------
def macro_f1(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> float:
    """Macro-F1 of integer labels (``pred`` -1 = no label) over labels that are gold or predicted."""
    k = n_labels
    tp = np.bincount(gold[gold == pred], minlength=k)[:k]
    gold_n = np.bincount(gold, minlength=k)[:k]
    pred_n = np.bincount(pred[pred >= 0], minlength=k)[:k]
    denom = gold_n + pred_n  # = 2TP + FP + FN
    used = denom > 0
    return float(np.mean(2 * tp[used] / denom[used])) if used.any() else 0.0


def _percentile(boots: Sequence[float] | np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(np.asarray(boots), [2.5, 97.5])
    return float(low), float(high)


@dataclass
class TaskScore:
    """One task's test predictions and their metrics."""

    task: str
    labels: tuple[str, ...]
    gold: list[str]
    predicted: list[str | None]
    answers: list[str]
    accuracy: Estimate
    macro_f1: Estimate
    f1: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.gold)

    @property
    def invalid(self) -> int:
        """Answers that named no label."""
        return sum(p is None for p in self.predicted)

    def codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Gold and predicted labels as indices into ``labels`` (-1: the answer named no label)."""
        return _codes(self.labels, self.gold, self.predicted)


def _codes(labels: Sequence[str], gold: Sequence[str], pred: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    index = {lab: i for i, lab in enumerate(labels)}
    return (np.array([index[g] for g in gold], dtype=np.int64),
            np.array([-1 if p is None else index[p] for p in pred], dtype=np.int64))


def score_task(task: Task, answers: Sequence[str], *, n_boot: int = 1000, seed: int = 0) -> TaskScore:
    """Accuracy (Wilson CI) and macro-F1 (bootstrap CI) of ``answers`` to ``task.test``."""
    if len(answers) != len(task.test):
        raise ValueError(f"task {task.name!r}: {len(answers)} answers for {len(task.test)} test examples")
    pred = [match_label(a, task.labels) for a in answers]
    gold = [e.label for e in task.test]
    g, p = _codes(task.labels, gold, pred)
    k = len(task.labels)
    idx = np.random.default_rng(seed).integers(0, len(g), size=(n_boot, len(g)))
    low, high = _percentile([macro_f1(g[i], p[i], k) for i in idx])
    f1 = {}
    for j, lab in enumerate(task.labels):  # F1 of each label as the positive class
        tp, fp = int(((g == j) & (p == j)).sum()), int(((g != j) & (p == j)).sum())
        fn = int(((g == j) & (p != j)).sum())
        f1[lab] = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
    accuracy = wilson(int((g == p).sum()), len(g), CONVENTION)
    return TaskScore(task.name, task.labels, gold, pred, list(answers), accuracy,
                     Estimate(100 * macro_f1(g, p, k), 100 * low, 100 * high, len(g), CONVENTION, "bootstrap"), f1)


def overall(scores: Sequence[TaskScore], *, n_boot: int = 1000, seed: int = 0) -> tuple[Estimate, Estimate]:
    """Pooled accuracy (Wilson) and the mean of the tasks' macro-F1 (bootstrap within each task)."""
    if not scores:
        raise ValueError("no task scores to pool")
    codes = [s.codes() for s in scores]
    hits = sum(int((g == p).sum()) for g, p in codes)
    n = sum(len(g) for g, _ in codes)
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for (g, p), s in zip(codes, scores):
        idx = rng.integers(0, len(g), size=(n_boot, len(g)))
        boots += np.array([macro_f1(g[i], p[i], len(s.labels)) for i in idx])
    boots /= len(scores)
    point = float(np.mean([s.macro_f1.mean for s in scores]))
    low, high = _percentile(boots)
    return wilson(hits, n, CONVENTION), Estimate(point, 100 * low, 100 * high, n, CONVENTION, "bootstrap")


def evaluate_tasks(model: KVModel, tasks: Sequence[Task], *, hp: TuneHParams, batch_size: int = 32,
                   n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{task name: TaskScore, "overall": (accuracy, macro-F1)}`` of the model as it is now."""
    scores = {t.name: score_task(t, greedy_answers(model, t, t.test, hp=hp, batch_size=batch_size),
                                 n_boot=n_boot, seed=seed) for t in tasks}
    return {"tasks": scores, "overall": overall(list(scores.values()), n_boot=n_boot, seed=seed)}
