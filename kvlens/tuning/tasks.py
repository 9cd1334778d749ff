"""Classification tasks for task tuning (Qiu et al. 2024, §4: LoRA on a multi-task mix).

A :class:`Task` is a prompt template with ``{text}`` for the input, its label set (spelled out
in the template, so the model is told what it may answer), and train / test splits of
:class:`TaskExample`. The answer to an example is the label as it follows the prompt, with a
leading space (:func:`kvlens.prompts.continuation`, the ROME convention for targets).

Checks run in two places, both before any training:

* :class:`Task` itself (model-free): non-empty splits, distinct labels, every example's label in
  the label set, every label named in the template, every label seen in training; a warning
  for unbalanced splits (macro-F1 then differs from accuracy, and says more).
* :func:`check_tokenization` (on a model): each label tokenizes the same after the prompt as on
  its own (else the trained answer and the scored answer differ), and no label's tokens are a
  prefix of another's (else a greedy answer cannot be told apart).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlens.bundled_data import data_dir
from kvlens.prompts import continuation, continuation_ids

#: a split is called unbalanced when its largest class is this many times its smallest
IMBALANCE_RATIO = 5.0


@dataclass(frozen=True)
class TaskExample:
    """One input text and its gold label."""

    text: str
    label: str


@dataclass(frozen=True)
class Task:
    """A classification task: template, labels, train and test examples (validated on creation)."""

    name: str
    template: str
    labels: tuple[str, ...]
    train: tuple[TaskExample, ...]
    test: tuple[TaskExample, ...]
    source: str = ""
    licence: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "train", tuple(_example(e) for e in self.train))
        object.__setattr__(self, "test", tuple(_example(e) for e in self.test))
        where = f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a task needs a non-empty name, got {self.name!r}")
        if self.template.count("{text}") != 1:
            raise ValueError(f"{where}: the template must hold '{{text}}' exactly once (where the input goes), "
                             f"got {self.template!r}")
        check_labels(self.name, self.labels, self.template)
        for split in ("train", "test"):
            examples = getattr(self, split)
            if not examples:
                raise ValueError(f"{where}: the {split} split is empty; give it at least one example per label")
            unknown = sorted({e.label for e in examples} - set(self.labels))
            if unknown:
                raise ValueError(f"{where}: {split} examples have labels {unknown} outside the label set "
                                 f"{list(self.labels)}; fix the examples or add the labels (and name them in the "
                                 f"template)")
        missing = [lab for lab in self.labels if lab not in {e.label for e in self.train}]
        if missing:
            raise ValueError(f"{where}: labels {missing} never occur in the train split, so tuning cannot learn "
                             f"them; add train examples for them or drop them from the label set")
        for split in ("train", "test"):
            counts = Counter(e.label for e in getattr(self, split))
            low = min(counts.get(lab, 0) for lab in self.labels)
            if low == 0 or max(counts.values()) >= IMBALANCE_RATIO * low:
                warnings.warn(f"{where}: the {split} split is unbalanced ({dict(counts)}); accuracy then favours "
                              f"the large classes: read macro-F1, which weighs every class equally",
                              stacklevel=3)

    def prompt(self, text: str) -> str:
        """The template filled with ``text`` (what the model sees before its answer)."""
        return self.template.replace("{text}", text)

    def answer(self, label: str) -> str:
        """The label as the model should emit it after the prompt (with a leading space)."""
        return continuation(label)

    def counts(self, split: str = "train") -> dict[str, int]:
        """Examples per label in ``split``."""
        c = Counter(e.label for e in getattr(self, split))
        return {lab: c.get(lab, 0) for lab in self.labels}

    def subset(self, train: int | None = None, test: int | None = None) -> Task:
        """The first ``train`` / ``test`` examples of each split, label balance kept round-robin."""
        return Task(self.name, self.template, self.labels, _take(self.train, self.labels, train),
                    _take(self.test, self.labels, test), self.source, self.licence, self.extra)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "template": self.template, "labels": list(self.labels), "source": self.source,
                "licence": self.licence, "train": [e.__dict__ for e in self.train],
                "test": [e.__dict__ for e in self.test]}


def _example(e: Any) -> TaskExample:
    if isinstance(e, TaskExample):
        return e
    if isinstance(e, dict) and {"text", "label"} <= set(e):
        return TaskExample(str(e["text"]), str(e["label"]))
    if isinstance(e, (tuple, list)) and len(e) == 2:
        return TaskExample(str(e[0]), str(e[1]))
    raise TypeError(f"a task example is a TaskExample, a dict with text/label or a (text, label) pair; got {e!r}")


def _take(examples: tuple[TaskExample, ...], labels: tuple[str, ...], n: int | None) -> tuple[TaskExample, ...]:
    """Up to ``n`` examples, taking one of each label in turn (the order within a label is kept)."""
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ValueError(f"a subset needs at least one example, got {n}")
    queues = {lab: [e for e in examples if e.label == lab] for lab in labels}
    out: list[TaskExample] = []
    while len(out) < n:
        for lab in labels:
            if queues[lab] and len(out) < n:
                out.append(queues[lab].pop(0))
    return tuple(out)


def named_in(label: str, template: str) -> bool:
    """Whether ``label`` occurs in ``template`` as a whole word or phrase (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(label.strip())}(?!\w)", template, re.IGNORECASE) is not None


def check_labels(name: str, labels: Sequence[str], template: str) -> None:
    """Labels are non-empty, distinct (ignoring case and spaces) and each named in the template."""
    where = f"task {name!r}"
    if len(labels) < 2:
        raise ValueError(f"{where}: a classification task needs at least two labels, got {list(labels)}")
    for lab in labels:
        if not isinstance(lab, str) or not lab.strip():
            raise ValueError(f"{where}: labels must be non-empty strings, got {lab!r}")
    norm = Counter(lab.strip().lower() for lab in labels)
    dup = sorted(k for k, v in norm.items() if v > 1)
    if dup:
        raise ValueError(f"{where}: labels {dup} occur more than once (ignoring case and spaces); labels must "
                         "be distinct answers")
    absent = [lab for lab in labels if not named_in(lab, template)]
    if absent:
        raise ValueError(f"{where}: labels {absent} are not named in the prompt template {template!r}; the model "
                         f"must be told the label set: list it in the template (e.g. 'Answer with "
                         f"{' or '.join(labels)}.')")


# ---- tokenization (needs a model) ---------------------------------------------------------------
@dataclass(frozen=True)
class LabelTokens:
    """How one label tokenizes on its own and after the task's prompt."""

    label: str
    alone: tuple[int, ...]
    in_prompt: tuple[int, ...]

    @property
    def consistent(self) -> bool:
        return self.alone == self.in_prompt


def label_tokens(model: Any, task: Task, text: str | None = None) -> list[LabelTokens]:
    """Each label's answer tokens alone and as the tokenizer splits ``prompt + answer``."""
    prompt = task.prompt(task.train[0].text if text is None else text)
    base = model.tokenize(prompt).input_ids[0].tolist()
    out = []
    for lab in task.labels:
        joined = model.tokenize(prompt + task.answer(lab)).input_ids[0].tolist()
        rest = tuple(joined[len(base):]) if joined[:len(base)] == base else tuple(joined)
        out.append(LabelTokens(lab, tuple(continuation_ids(model, lab)), rest))
    return out


def check_tokenization(model: Any, task: Task) -> list[LabelTokens]:
    """Raise if a label tokenizes differently after the prompt, or is a token prefix of another."""
    toks = label_tokens(model, task)
    show = lambda ids: [model.tokenizer.decode([i]) for i in ids]  # noqa: E731
    bad = [t for t in toks if not t.consistent]
    if bad:
        t = bad[0]
        raise ValueError(
            f"task {task.name!r}: label {t.label!r} tokenizes as {show(t.alone)} on its own but as "
            f"{show(t.in_prompt)} after the prompt (the tokenizer merges it with the prompt's end); "
            f"{len(bad)} label(s) affected: {[b.label for b in bad]}. End the template with a word or "
            f"punctuation, not a space (the answer brings its own leading space), e.g. '... ### Answer:'")
    for a in toks:
        for b in toks:
            if a is not b and b.alone[:len(a.alone)] == a.alone:
                raise ValueError(f"task {task.name!r}: label {a.label!r} ({show(a.alone)}) is a token prefix of "
                                 f"{b.label!r} ({show(b.alone)}), so a greedy answer cannot tell them apart; "
                                 "rename one of them")
    return toks


# ---- loading -------------------------------------------------------------------------------------
BUNDLED_TASKS = ("sentiment", "continent", "parity", "animal_class")


def load_task(path: str | os.PathLike[str]) -> Task:
    """A task from a JSON file ``{name, template, labels, train: [{text, label}], test: [...]}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    need = {"name", "template", "labels", "train", "test"}
    if not isinstance(data, dict) or not need <= set(data):
        raise ValueError(f"{path}: a task file is a JSON object with fields {sorted(need)}; "
                         f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    return Task(data["name"], data["template"], tuple(data["labels"]), tuple(data["train"]), tuple(data["test"]),
                data.get("source", str(path)), data.get("licence", ""))


def load_bundled_tasks(names: Sequence[str] | None = None) -> list[Task]:
    """The offline mix shipped in ``data/tasks`` (CC0-1.0; ``data/README.md``)."""
    names = BUNDLED_TASKS if names is None else tuple(names)
    unknown = [n for n in names if n not in BUNDLED_TASKS]
    if unknown:
        raise ValueError(f"unknown bundled tasks {unknown}; the bundled ones are {list(BUNDLED_TASKS)}")
    return [load_task(data_dir() / "tasks" / f"{n}.json") for n in names]
