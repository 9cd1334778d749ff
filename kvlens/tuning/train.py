"""LoRA task tuning on transformers' ``Trainer``: which modules, how much memory, adapters that leave.

Variants (Qiu et al. 2024, README of their code): standard LoRA on the attention query and value
projections (``q,v``), plus one FFN matrix: the key projection (``+keys``: ``up_proj`` /
``c_fc`` / ``fc_in`` / ``dense_h_to_4h``), the gate (``+gate``: ``gate_proj``, gated families
only) or the value projection (``+values``: ``down_proj`` / ``c_proj`` / ``fc_out`` /
``dense_4h_to_h``). Every module name comes from the architecture spec (``attn_lora``, ``key``,
``gate``, ``value``), none is written here.

The user's model is never changed: in full precision the adapters are injected into it for the
training and evaluation only and peft's ``unload()`` removes them in a ``finally`` (base weights
stay bit-identical, train/eval mode and ``requires_grad`` are restored); with ``quantize="nf4"``
a 4-bit copy is loaded from a temporary ``save_pretrained`` of the model and discarded after.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlens.editing.lora import peft_lora, target_modules
from kvlens.models.kvmodel import KVModel, wrap
from kvlens.prompts import continuation_ids
from kvlens.tuning.hparams import TuneHParams
from kvlens.tuning.tasks import Task

#: variant name -> FFN roles added to the attention targets
VARIANTS: dict[str, tuple[str, ...]] = {"q,v": (), "+keys": ("key",), "+gate": ("gate",), "+values": ("value",)}


def available_variants(model: KVModel) -> tuple[str, ...]:
    """The variants this architecture has (``+gate`` only for gated FFNs)."""
    return tuple(v for v in VARIANTS if v != "+gate" or model.spec.gated)


def check_variants(model: KVModel, variants: Sequence[str] | None) -> tuple[str, ...]:
    """``variants`` (default: all the model has), each known and available; a clear error otherwise."""
    if variants is None:
        return available_variants(model)
    variants = tuple(variants)
    if not variants:
        raise ValueError(f"no variants given; choose from {list(VARIANTS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown tuning variant {v!r}; choose from {list(VARIANTS)}")
        if v == "+gate" and not model.spec.gated:
            raise ValueError(f"variant '+gate' needs a gated FFN; {model.spec.model_type} has none "
                             f"(its variants: {list(available_variants(model))})")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants repeat: {list(variants)}")
    return variants


def lora_targets(model: KVModel, variant: str) -> list[str]:
    """Full module names LoRA adapts for ``variant`` at every layer (from the architecture spec)."""
    spec = model.spec
    if not spec.attn_lora:
        raise ValueError(f"the architecture spec of {spec.model_type!r} names no attention projections for "
                         "standard LoRA: register it with ArchSpec(..., attn_lora=('q_proj', 'v_proj'))")
    layers = tuple(range(model.n_layers))
    names = [f"{spec.layers}.{l}.{spec.attn}.{a}" for l in layers for a in spec.attn_lora]
    for role in VARIANTS[variant]:
        names += target_modules(model, role, layers)
    return names


# ---- memory ---------------------------------------------------------------------------------------
def bytes_per_example(model: KVModel, tokens: int) -> int:
    """A rough upper estimate of the training activations of one ``tokens``-long example.

    Per layer and token the saved tensors of a pre-norm block (about ``10·d_model + 4·d_ff``
    floats, plus ``2·heads·tokens`` for attention probabilities), and the logits with their
    softmax and gradient (``3·vocab`` floats per token).
    """
    heads = int(getattr(model.hf.config, "num_attention_heads", getattr(model.hf.config, "n_head", 8)))
    per_token = model.n_layers * (10 * model.d_model + 4 * model.d_ff + 2 * heads * tokens) + 3 * model.vocab_size
    return 4 * tokens * per_token


def default_memory(model: KVModel) -> int:
    """Half the free memory of the tightest GPU the model computes on, else 4 GiB on the CPU."""
    return model.memory_budget(cpu_bytes=4 * 2**30)


@dataclass(frozen=True)
class BatchPlan:
    """The per-device batch and accumulation steps used, and why."""

    batch_size: int
    grad_accum: int
    note: str = ""


def plan_batch(model: KVModel, hp: TuneHParams, max_tokens: int, memory: int | None) -> BatchPlan:
    """``hp``'s batch, or a smaller one (more accumulation, same effective batch) within ``memory``."""
    budget = default_memory(model) if memory is None else int(memory)
    if budget <= 0:
        raise ValueError(f"memory must be a positive number of bytes, got {memory}")
    per = bytes_per_example(model, max_tokens)
    if per > budget:
        raise ValueError(f"one training example of {max_tokens} tokens needs about {per / 2**30:.2f} GiB, more "
                         f"than the memory budget of {budget / 2**30:.2f} GiB: raise memory=, lower "
                         f"TuneHParams.max_length, or use quantize='nf4'")
    if hp.batch_size * per <= budget:
        return BatchPlan(hp.batch_size, hp.grad_accum)
    bs = max(1, budget // per)
    accum = math.ceil(hp.effective_batch / bs)
    note = (f"batch {hp.batch_size} x {max_tokens} tokens needs about {hp.batch_size * per / 2**30:.2f} GiB, over "
            f"the memory budget of {budget / 2**30:.2f} GiB: using batch {bs} with {accum} accumulation steps "
            f"(effective batch {bs * accum}, asked {hp.effective_batch})")
    warnings.warn(note, stacklevel=3)
    return BatchPlan(bs, accum, note)


# ---- data -----------------------------------------------------------------------------------------
def encode(model: KVModel, task: Task, text: str, label: str | None, hp: TuneHParams) -> dict[str, list[int]]:
    """Token ids of the prompt (+ answer + EOS when ``label`` is given), left-truncated to ``max_length``.

    With ``loss_on="answer"`` the prompt positions are masked (-100) in ``labels``.
    """
    prompt = model.tokenize(task.prompt(text)).input_ids[0].tolist()
    if label is None:
        return {"input_ids": prompt[-hp.max_length:]}
    answer = continuation_ids(model, task.answer(label))
    eos = model.tokenizer.eos_token_id
    answer = answer + ([eos] if eos is not None else [])
    ids = (prompt + answer)[-hp.max_length:]
    n_answer = min(len(answer), len(ids))
    labels = list(ids) if hp.loss_on == "all" else [-100] * (len(ids) - n_answer) + ids[-n_answer:]
    return {"input_ids": ids, "labels": labels}


def training_rows(model: KVModel, tasks: Sequence[Task], hp: TuneHParams) -> list[dict[str, list[int]]]:
    """Every train example of every task, encoded (the Trainer shuffles them, seeded)."""
    return [encode(model, t, e.text, e.label, hp) for t in tasks for e in t.train]


class Collate:
    """Right-pad ``input_ids`` with the pad id and ``labels`` with -100; attention mask 1 on tokens."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---- adapters -------------------------------------------------------------------------------------
def check_no_adapters(model: KVModel) -> None:
    """Refuse models that already hold peft adapters (unloading ours would remove theirs)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [n for n, m in model.hf.named_modules() if isinstance(m, BaseTunerLayer)]
    if adapted:
        raise ValueError(f"the model already holds peft adapters ({adapted[:3]}{' ...' if len(adapted) > 3 else ''}); "
                         "task tuning would remove them when it unloads its own: merge them first "
                         "(peft: model.merge_and_unload()) or tune a model without adapters")


def lora_config(names: list[str], hp: TuneHParams, model: KVModel) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=names,
                      bias="none", task_type="CAUSAL_LM", fan_in_fan_out=model.spec.conv1d)


@contextlib.contextmanager
def adapters(model: KVModel, names: list[str], hp: TuneHParams) -> Iterator[KVModel]:
    """Fresh LoRA adapters on ``names`` inside the model; removed (bitwise) on exit (:func:`peft_lora`)."""
    with peft_lora(model, lora_config(names, hp, model), hp.seed):
        yield model


@contextlib.contextmanager
def quantized_copy(model: KVModel) -> Iterator[KVModel]:
    """A 4-bit NF4 copy (double quantisation) of ``model``, prepared for k-bit training; then freed."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise RuntimeError(f"quantize='nf4' needs bitsandbytes, which cannot run here ({type(exc).__name__}: "
                           f"{exc}); install it or tune in full precision (quantize=None)") from exc
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kvlens.models.loading import keep_4bit_layout

    compute = torch.bfloat16 if model.device.type == "cuda" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    source: Any = model.hf
    with tempfile.TemporaryDirectory(prefix="kvlens-nf4-") as tmp:
        source.save_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=compute,
                                                  device_map={"": model.device})
    keep_4bit_layout(hf)
    hf = prepare_model_for_kbit_training(hf, use_gradient_checkpointing=model.device.type == "cuda")
    copy = wrap(hf, model.tokenizer, name=f"{model.name} (nf4 copy)", prefix=model.prefix)
    try:
        yield copy
    finally:
        del copy, hf
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def tuned_model(model: KVModel, names: list[str], hp: TuneHParams) -> Iterator[tuple[KVModel, Any]]:
    """``(model to score, module to train)`` with fresh adapters on ``names``; cleaned up on exit.

    Full precision: the user's model with adapters injected (:func:`adapters`). ``quantize="nf4"``:
    a 4-bit copy wrapped by peft's ``get_peft_model`` (transformers' Trainer trains quantized
    weights only through a ``PeftModel``), discarded on exit.
    """
    if hp.quantize is None:
        with adapters(model, names, hp):
            yield model, model.hf
        return
    from peft import get_peft_model

    with quantized_copy(model) as copy:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            peft_model = get_peft_model(copy.hf, lora_config(names, hp, copy))
        yield copy, peft_model


def train(model: KVModel, rows: list[dict[str, list[int]]], hp: TuneHParams, plan: BatchPlan, *,
          trainee: Any = None, progress: bool = True) -> dict[str, Any]:
    """Train the adapters of ``trainee`` (default ``model.hf``, adapters injected) on ``rows`` with Trainer.

    Returns the Trainer's log (loss per logging step, runtime) for the record.
    """
    module: Any = model.hf if trainee is None else trainee
    from transformers import PrinterCallback, Trainer, TrainingArguments

    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)
    cpu = model.device.type != "cuda"
    steps = math.ceil(hp.epochs * math.ceil(len(rows) / (plan.batch_size * plan.grad_accum)))
    with tempfile.TemporaryDirectory(prefix="kvlens-tune-") as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=hp.epochs, per_device_train_batch_size=plan.batch_size,
            gradient_accumulation_steps=plan.grad_accum, learning_rate=hp.lr, lr_scheduler_type=hp.schedule,
            warmup_steps=hp.warmup_ratio, max_grad_norm=hp.max_grad_norm, weight_decay=hp.weight_decay,
            optim="adamw_torch", seed=hp.seed, data_seed=hp.seed, logging_steps=max(1, steps // 10),
            save_strategy="no", report_to="none", disable_tqdm=not progress, use_cpu=cpu,
            remove_unused_columns=False, dataloader_num_workers=0,
            bf16=(not cpu) and hp.quantize is not None)
        trainer = Trainer(model=module, args=args, train_dataset=rows,  # a list is a map-style dataset
                          data_collator=Collate(model.tokenizer.pad_token_id))
        if not progress:
            trainer.remove_callback(PrinterCallback)  # its per-step log lines
        result = trainer.train()
    module.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": float(result.training_loss), "losses": losses, "steps": int(result.global_step),
            "runtime_s": float(result.metrics.get("train_runtime", math.nan))}
