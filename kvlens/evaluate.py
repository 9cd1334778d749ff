"""Evaluate a model, edited or not, on CounterFact-style records: one call, before and after.

The model-side part of the metrics lives here (teacher-forced target log-probabilities and
top-1 hits, batched through :func:`kvlens.tracing.run`); the arithmetic is in
:mod:`kvlens.metrics`. Conventions follow the ROME/MEMIT reference code
(``experiments/py/eval_utils_counterfact.py`` and ``eval_utils_zsre.py``; see
``shared/reference/anchors.md`` §3.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.tracing import run


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced scores of one target string after one prompt.

    ``logprobs[j]`` = log P(target token j | prompt, target tokens < j); ``hits[j]`` = whether
    that token is the model's argmax there (zsRE / EasyEdit token accuracy).
    """

    prompt: str
    target: str
    token_ids: tuple[int, ...]
    logprobs: np.ndarray
    hits: np.ndarray

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


def _target_ids(model: KVModel, target: str) -> list[int]:
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"empty target {target!r}: give the object string, e.g. ' Paris'")
    ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to no tokens")
    return list(ids)


def score_targets(model: KVModel, prompts: Sequence[str], targets: Sequence[str], *,
                  batch_size: int = 32) -> list[TargetScore]:
    """Teacher-forced log-probabilities of ``targets[i]`` right after ``prompts[i]``.

    The prompt is tokenized as :meth:`KVModel.tokenize` does (with the model's prefix) and
    the target on its own (no special tokens), so a target written with its leading space
    (``" Paris"``) is scored on exactly the tokens the model would emit. Rows are sorted by
    length and run in batches of ``batch_size`` right-padded rows.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets: pass one target per prompt")
    if not prompts:
        raise ValueError("no prompts to score: pass at least one (prompt, target) pair")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_ids = [model.tokenize(p).input_ids[0].tolist() for p in prompts]
    target_ids = [_target_ids(model, t) for t in targets]
    rows = [p + t for p, t in zip(prompt_ids, target_ids)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[TargetScore | None] = [None] * len(rows)
    pad = model.tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, : len(rows[i])] = torch.tensor(rows[i])
            mask[r, : len(rows[i])] = 1
        batch = Batch(ids.to(model.device), mask.to(model.device), tuple(prompts[i] for i in chunk))
        logits = run(model, batch, read=[Site("logits")])[Site("logits")]
        for r, i in enumerate(chunk):
            n_p, tgt = len(prompt_ids[i]), target_ids[i]
            pos = torch.arange(n_p - 1, n_p - 1 + len(tgt), device=logits.device)
            step = logits[r, pos].float().log_softmax(-1)
            tgt_t = torch.tensor(tgt, device=logits.device)
            lp = step.gather(-1, tgt_t[:, None])[:, 0]
            hits = step.argmax(-1) == tgt_t
            out[i] = TargetScore(prompts[i], targets[i], tuple(tgt), lp.cpu().numpy().astype(np.float64),
                                 hits.cpu().numpy())
    return [s for s in out if s is not None]
