"""Tune: LoRA task tuning of keys vs values (Qiu et al. 2024, §4), offline on bundled tasks or from the hub.

    import kvlens as kv
    model = kv.load()
    result = kv.tune_keys_vs_values(model, kv.tuning.load_bundled_tasks(), hparams="cpu-small")
    print(result.table())

``tasks`` (Task, loading and checks), ``hub`` (Qiu's tasks through ``datasets``), ``hparams``
(TuneHParams and its presets), ``train`` (targets, memory, Trainer, adapters), ``score``
(greedy answers, accuracy and macro-F1 with CIs), ``compare`` (the comparison).
"""

from kvlens.tuning.compare import TuningComparison, tune_keys_vs_values
from kvlens.tuning.hparams import TUNE_PRESETS, TuneHParams
from kvlens.tuning.hub import HUB_TASKS, load_hub_task
from kvlens.tuning.score import TaskScore
from kvlens.tuning.tasks import Task, TaskExample, check_tokenization, load_bundled_tasks, load_task
from kvlens.tuning.train import VARIANTS, lora_targets

__all__ = ["HUB_TASKS", "TUNE_PRESETS", "Task", "TaskExample", "TaskScore", "TuneHParams", "TuningComparison",
           "VARIANTS", "check_tokenization", "load_bundled_tasks", "load_hub_task", "load_task", "lora_targets",
           "tune_keys_vs_values"]
