"""Hyperparameters of task tuning, with Qiu et al.'s released settings as the ``qiu2024`` preset.

``qiu2024`` is ``llama2_classification_multi_tasks.py`` of qiuzh20/Tuning-keys-v.s.-values
(README commands; see shared/reference/anchors.md §1.3): LoRA r 8, α 16, dropout 0.1, lr 2e-4,
``constant`` schedule, warmup ratio 0.03, max grad norm 0.3, 5 epochs, per-device batch 4 with
16 accumulation steps (full precision) or 32 × 2 (4-bit), loss on every token (TRL's SFTTrainer
default). Differences, each deliberate:

* transformers' ``constant`` schedule has no warmup (``get_constant_schedule``): the 0.03 is kept
  as Qiu passed it and has no effect there either; ``constant_with_warmup`` would use it.
* no packing: examples are padded per batch (kvlens's tasks are short; packing would mix tasks
  inside one row).
* optimiser ``adamw_torch`` (Qiu: ``paged_adamw_32bit`` for 4-bit, which needs CUDA).

The preset holds only algorithm numbers; the batch size is chosen down from it when a memory
budget requires (the effective batch is kept by more accumulation steps, and a warning says so).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass(frozen=True)
class TuneHParams:
    """LoRA task-tuning settings (peft ``LoraConfig`` + transformers ``TrainingArguments``)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.1
    lr: float = 2e-4
    schedule: str = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    epochs: float = 5.0
    batch_size: int = 4
    grad_accum: int = 16
    weight_decay: float = 0.0
    loss_on: Literal["all", "answer"] = "all"
    max_length: int = 512
    quantize: Literal[None, "nf4"] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "alpha", "batch_size", "grad_accum", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TuneHParams.{name} must be a positive integer, got {v!r}")
        for name in ("lr", "max_grad_norm", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TuneHParams.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TuneHParams.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TuneHParams.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"TuneHParams.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TuneHParams.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.loss_on not in ("all", "answer"):
            raise ValueError(f"TuneHParams.loss_on must be 'all' (every token, as SFTTrainer) or 'answer', "
                             f"got {self.loss_on!r}")
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"TuneHParams.quantize must be None or 'nf4' (4-bit, double quantisation), "
                             f"got {self.quantize!r}")

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @staticmethod
    def preset(name: str, **overrides: Any) -> TuneHParams:
        """A named preset (:data:`TUNE_PRESETS`), with fields overridden by keyword."""
        if name not in TUNE_PRESETS:
            raise ValueError(f"unknown task-tuning preset {name!r}; presets: {sorted(TUNE_PRESETS)}")
        return replace(TUNE_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: ``qiu2024``: the released code's settings (module docstring); ``qiu2024-4bit``: its ``--bnb``
#: run (NF4, double quantisation, batch 32 × 2); ``cpu-small``: a short run for the embedded
#: model on a laptop CPU (2 epochs, batch 8 × 1, loss on the answer tokens, lr 1e-3) — not Qiu's.
TUNE_PRESETS: dict[str, TuneHParams] = {
    "qiu2024": TuneHParams(),
    "qiu2024-4bit": TuneHParams(batch_size=32, grad_accum=2, quantize="nf4"),
    "cpu-small": TuneHParams(epochs=2.0, batch_size=8, grad_accum=1, loss_on="answer", lr=1e-3),
}
