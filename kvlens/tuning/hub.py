"""Qiu et al. 2024's six tasks through ``datasets`` (needs the Hugging Face hub or its cache).

Prompt formats follow the released code's ``prompts.py`` layout (``### Field:value`` blocks,
the answer after the last ``###``), with the label set spelled out in each template, as kvlens's
:class:`~kvlens.tuning.Task` requires. Labels are Qiu's strings (``true``/``false``,
``Choice1``/``Choice2``, ``entailment``/``contradiction``/``neutral``, ...). Splits: the
dataset's train split (at most ``train_limit`` examples, Qiu's ``max_samples`` 5000) and its
validation / test split (at most ``test_limit``, Qiu's 1000). Offline these fail fast with
:class:`kvlens.datasets.DatasetUnavailableError`; use :func:`kvlens.tuning.load_bundled_tasks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvlens.datasets import hub_dataset
from kvlens.tuning.tasks import Task, TaskExample

Row = dict[str, Any]


@dataclass(frozen=True)
class HubTask:
    """Where one task lives on the hub and how a row becomes (text, label)."""

    dataset: str
    config: str | None
    train_split: str
    test_split: str
    template: str
    labels: tuple[str, ...]
    convert: Callable[[Row, tuple[str, ...]], tuple[str, str]]


def _boolq(r: Row, labels: tuple[str, ...]) -> tuple[str, str]:
    return f"{r['question']} ### Passage: {r['passage']}", "true" if r["answer"] else "false"


def _copa(r: Row, labels: tuple[str, ...]) -> tuple[str, str]:
    return (f"{r['premise']} ### Choice1:{r['choice1']} ### Choice2:{r['choice2']} ### Question:{r['question']}",
            labels[int(r["label"])])


def _nli(r: Row, labels: tuple[str, ...]) -> tuple[str, str]:
    return f"{r['premise']} ### Hypothesis:{r['hypothesis']}", labels[int(r["label"])]


def _qnli(r: Row, labels: tuple[str, ...]) -> tuple[str, str]:
    return f"{r['question']} ### Sentence:{r['sentence']}", labels[int(r["label"])]


def _race(r: Row, labels: tuple[str, ...]) -> tuple[str, str]:
    options = " ".join(f"### {k}:{o}" for k, o in zip(labels, r["options"]))
    return f"{r['article']} ### Question:{r['question']} {options}", r["answer"]


def _news(r: Row, labels: tuple[str, ...]) -> tuple[str, str]:
    return str(r["text"]), str(r["label"])


NEWSGROUPS = ("alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
              "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
              "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
              "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
              "talk.religion.misc")

HUB_TASKS: dict[str, HubTask] = {
    "boolq": HubTask("google/boolq", None, "train", "validation",
                     "Read the Passage and answer the Question with true or false ### Question:{text} ### Answer:",
                     ("true", "false"), _boolq),
    "COPA": HubTask("aps/super_glue", "copa", "train", "validation",
                    "Pick Choice1 or Choice2 ### Premise:{text} ### Choice:", ("Choice1", "Choice2"), _copa),
    "CB": HubTask("aps/super_glue", "cb", "train", "validation",
                  "### Premise:{text} ### Relationship (entailment, contradiction or neutral):",
                  ("entailment", "contradiction", "neutral"), _nli),
    "race_high": HubTask("ehovy/race", "high", "train", "test",
                         "Answer with A, B, C or D ### Article:{text} ### Answer:", ("A", "B", "C", "D"), _race),
    "QNLI": HubTask("nyu-mll/glue", "qnli", "train", "validation",
                    "### Question:{text} ### Relationship (entailment or not_entailment):",
                    ("entailment", "not_entailment"), _qnli),
    "20_newsgroups": HubTask("rungalileo/20_Newsgroups_Fixed", None, "train", "test",
                             "Classify the sentence into one of: " + ", ".join(NEWSGROUPS)
                             + " ### Sentence:{text} ### Class:", NEWSGROUPS, _news),
}


def load_hub_task(name: str, *, train_limit: int = 5000, test_limit: int = 1000, revision: str | None = None,
                  timeout: float = 10.0) -> Task:
    """One of Qiu's tasks (:data:`HUB_TASKS`) as a :class:`Task`; fails fast without the hub."""
    if name not in HUB_TASKS:
        raise ValueError(f"unknown hub task {name!r}; known: {list(HUB_TASKS)} (or build a Task yourself)")
    if train_limit < 1 or test_limit < 1:
        raise ValueError(f"train_limit and test_limit must be >= 1, got {train_limit} and {test_limit}")
    spec = HUB_TASKS[name]
    hint = ("Offline, tune on the bundled tasks instead: kvlens.tuning.load_bundled_tasks(), or build a "
            "kvlens.tuning.Task from your own files (kvlens.tuning.load_task('task.json')).")
    loaded = hub_dataset(spec.dataset, revision=revision, timeout=timeout, kind=f"task {name!r}", hint=hint,
                         **({"name": spec.config} if spec.config else {}))

    def examples(split: str, limit: int) -> tuple[TaskExample, ...]:
        if split not in loaded:
            raise ValueError(f"{spec.dataset!r} has no split {split!r}; its splits: {list(loaded)}")
        rows = loaded[split].select(range(min(limit, len(loaded[split]))))
        out = []
        for r in rows:
            text, label = spec.convert(r, spec.labels)
            if isinstance(text, str) and text.strip() and label in spec.labels:
                out.append(TaskExample(text, label))  # Qiu's clean_*_data: drop rows without text
        return tuple(out)

    return Task(name, spec.template, spec.labels, examples(spec.train_split, train_limit),
                examples(spec.test_split, test_limit),
                source=f"hub:{spec.dataset}" + (f"/{spec.config}" if spec.config else ""))
