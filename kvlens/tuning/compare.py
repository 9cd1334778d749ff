"""``tune_keys_vs_values``: Qiu et al. 2024's task-tuning comparison (their Table 2's protocol).

For each variant (``q,v``; ``+keys``; ``+gate``; ``+values``, :data:`~kvlens.tuning.train.VARIANTS`)
fresh LoRA adapters are trained on the union of the tasks' train splits and the tuned model
answers every test example (greedy); accuracy and macro-F1 with 95 % CIs per task and overall.
The untuned model is scored the same way as a baseline row. Everything that can be checked is
checked before the first training step (tasks, label tokenization, variants, adapters already
present, the memory budget); the user's model is left bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvlens.metrics import Estimate
from kvlens.models.kvmodel import KVModel
from kvlens.tuning.hparams import TuneHParams
from kvlens.tuning.score import TaskScore, evaluate_tasks
from kvlens.tuning.tasks import Task, check_tokenization, load_bundled_tasks
from kvlens.tuning.train import (
    check_no_adapters,
    check_variants,
    lora_targets,
    plan_batch,
    train,
    training_rows,
    tuned_model,
)

BASELINE = "untuned"


@dataclass
class TuningComparison:
    """Scores per variant (and the untuned baseline) per task, with the settings that made them."""

    variants: tuple[str, ...]
    tasks: tuple[str, ...]
    scores: dict[str, dict[str, TaskScore]]  # variant -> task -> score
    overall: dict[str, tuple[Estimate, Estimate]]  # variant -> (accuracy, macro-F1)
    targets: dict[str, list[str]]
    logs: dict[str, dict[str, Any]]
    hparams: TuneHParams
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> tuple[str, ...]:
        """Variants in table order, the baseline first when it was scored."""
        return tuple(v for v in (BASELINE, *self.variants) if v in self.scores)

    def table(self) -> list[dict[str, Any]]:
        """One row per (variant, task) and per variant ``overall``: accuracy and macro-F1 with CIs (x100)."""
        out = []
        for v in self.rows:
            for t in (*self.tasks, "overall"):
                acc, f1 = (self.overall[v] if t == "overall"
                           else (self.scores[v][t].accuracy, self.scores[v][t].macro_f1))
                invalid = (sum(s.invalid for s in self.scores[v].values()) if t == "overall"
                           else self.scores[v][t].invalid)
                out.append({"variant": v, "task": t, "n": acc.n, "accuracy": acc.mean, "accuracy_low": acc.low,
                            "accuracy_high": acc.high, "macro_f1": f1.mean, "macro_f1_low": f1.low,
                            "macro_f1_high": f1.high, "no_label_answers": invalid})
        return out

    def summary(self) -> str:
        """The overall row of each variant, as text."""
        lines = [f"Task tuning on {', '.join(self.tasks)} ({self.params.get('model', '')}); accuracy and macro-F1 "
                 "x100 with 95 % CIs:"]
        for v in self.rows:
            acc, f1 = self.overall[v]
            lines.append(f"  {v:9s} accuracy {acc}  macro-F1 {f1}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {"variants": list(self.variants), "tasks": list(self.tasks), "table": self.table(),
                "targets": self.targets, "logs": self.logs, "hparams": self.hparams.to_dict(), "params": self.params}


def _check_tasks(model: KVModel, tasks: Sequence[Task] | None) -> list[Task]:
    tasks = load_bundled_tasks() if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("no tasks given: pass kvlens.tuning.load_bundled_tasks() or your own Task objects")
    for t in tasks:
        if not isinstance(t, Task):
            raise TypeError(f"tasks must be kvlens.tuning.Task objects, got {type(t).__name__}; load files with "
                            "kvlens.tuning.load_task(path) or hub tasks with kvlens.tuning.load_hub_task(name)")
        check_tokenization(model, t)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}; give each task its own name")
    return tasks


def tune_keys_vs_values(model: KVModel, tasks: Sequence[Task] | None = None, *,
                        variants: Sequence[str] | None = None, hparams: TuneHParams | str = "qiu2024",
                        baseline: bool = True, memory: int | None = None, eval_batch_size: int = 32,
                        n_boot: int = 1000, progress: bool = True, **overrides: Any) -> TuningComparison:
    """Tune LoRA variants on ``tasks`` (default: the bundled offline mix) and score each on the test splits.

    Args:
        model: the model to tune; it is left bit-identical (adapters are removed afterwards, or a
            4-bit copy is trained with ``quantize="nf4"``).
        tasks: :class:`~kvlens.tuning.Task` objects (train and test splits).
        variants: any of ``"q,v"``, ``"+keys"``, ``"+gate"``, ``"+values"`` (default: all the model has).
        hparams: a :class:`TuneHParams` or a preset name (``"qiu2024"``, ``"qiu2024-4bit"``, ``"cpu-small"``);
            ``overrides`` replace its fields (e.g. ``epochs=1``).
        baseline: also score the untuned model.
        memory: bytes the training activations may take (default: half the free GPU memory, or
            4 GiB on the CPU); a batch that would exceed it is chosen down, with a warning.
        eval_batch_size: prompts per forward when answering.
        n_boot: bootstrap resamples for the macro-F1 intervals.
    """
    hp = TuneHParams.preset(hparams, **overrides) if isinstance(hparams, str) else hparams
    if overrides and not isinstance(hparams, str):
        from dataclasses import replace

        hp = replace(hp, **overrides)
    if not isinstance(hp, TuneHParams):
        raise TypeError(f"hparams must be a TuneHParams or a preset name, got {type(hp).__name__}")
    if eval_batch_size < 1 or n_boot < 1:
        raise ValueError(f"eval_batch_size and n_boot must be >= 1, got {eval_batch_size} and {n_boot}")
    tasks = _check_tasks(model, tasks)
    variants = check_variants(model, variants)
    check_no_adapters(model)
    targets = {v: lora_targets(model, v) for v in variants}
    rows = training_rows(model, tasks, hp)
    plan = plan_batch(model, hp, max(len(r["input_ids"]) for r in rows), memory)
    scores: dict[str, dict[str, TaskScore]] = {}
    overall: dict[str, tuple[Estimate, Estimate]] = {}
    logs: dict[str, dict[str, Any]] = {}
    ev: dict[str, Any] = {"hp": hp, "batch_size": eval_batch_size, "n_boot": n_boot, "seed": hp.seed}
    if baseline:
        t0 = time.perf_counter()
        res = evaluate_tasks(model, tasks, **ev)
        scores[BASELINE], overall[BASELINE] = res["tasks"], res["overall"]
        logs[BASELINE] = {"eval_s": time.perf_counter() - t0}
    for v in variants:
        t0 = time.perf_counter()
        with tuned_model(model, targets[v], hp) as (target, trainee):
            log = train(target, rows, hp, plan, trainee=trainee, progress=progress)
            t1 = time.perf_counter()
            res = evaluate_tasks(target, tasks, **ev)
        scores[v], overall[v] = res["tasks"], res["overall"]
        logs[v] = {**log, "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}
    params = {"model": model.name, "n_train": len(rows), "n_test": sum(len(t.test) for t in tasks),
              "batch_size": plan.batch_size, "grad_accum": plan.grad_accum, "batch_note": plan.note,
              "task_sizes": {t.name: {"train": len(t.train), "test": len(t.test)} for t in tasks}}
    return TuningComparison(variants, tuple(t.name for t in tasks), scores, overall, targets, logs, hp, params)
