"""Switch memories off or scale them (LM-Debugger's intervention; Geva et al. 2022).

``intervene(model, prompt, {(layer, memory): factor})`` runs the prompt with the coefficients
``m_i`` of those memories multiplied by ``factor`` (0 switches a memory off), so that layer
``l`` writes ``FFN(x) = Σ_i factor_i · m_i v_i + b_V`` (Geva et al. 2021, §5.1). It is a write
on the ``key`` site of the forward (the value projection's input): weights stay untouched.
The clean and the intervened prompt run as two rows of one batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kvlens import tracing
from kvlens.memory.activations import check_k, check_memory
from kvlens.memory.vocab import resolve_token
from kvlens.models.kvmodel import KVModel, Site

MemoryId = tuple[int, int]
Positions = Literal["all", "last"] | Sequence[int]


@dataclass(frozen=True)
class Prediction:
    """The model's top-``k`` next tokens: ids, texts and probabilities (highest first)."""

    ids: list[int]
    tokens: list[str]
    probs: list[float]

    @property
    def top(self) -> str:
        return self.tokens[0]


@dataclass(frozen=True)
class Intervention:
    """The prediction for ``prompt`` before and after scaling the coefficients in ``scales``.

    ``target_before``/``target_after`` are the probabilities of ``target`` (if one was given);
    ``kl`` is ``KL(before ‖ after)`` of the next-token distributions, in nats.
    """

    model_name: str
    prompt: str
    scales: dict[MemoryId, float]
    positions: str | tuple[int, ...]
    before: Prediction
    after: Prediction
    kl: float
    target: str | None = None
    target_before: float | None = None
    target_after: float | None = None

    @property
    def changed(self) -> bool:
        """Whether the top prediction changed."""
        return self.before.ids[0] != self.after.ids[0]


def _check_scales(model: KVModel, scales: Mapping[MemoryId, float]) -> dict[MemoryId, float]:
    if not scales:
        raise ValueError("scales is empty: pass {(layer, memory): factor, ...}")
    out = {}
    for key, factor in scales.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"scale keys must be (layer, memory) pairs, got {key!r}")
        layer = model.check_layer(key[0])
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"the factor for memory {key} must be a finite number, got {factor!r}")
        out[(layer, check_memory(model, layer, key[1]))] = float(factor)
    return out


def _columns(positions: Positions, n: int) -> list[int]:
    if positions == "all":
        return list(range(n))
    if positions == "last":
        return [n - 1]
    if isinstance(positions, str):
        raise ValueError(f"positions must be 'all', 'last' or token indices, got {positions!r}")
    cols = sorted({p % n for p in positions if -n <= p < n})
    if len(cols) != len(set(positions)) or not cols:
        raise IndexError(f"positions {list(positions)} are not valid token indices of a {n}-token prompt")
    return cols


def _scale_write(factors: torch.Tensor, row: int, cols: list[int]) -> tracing.Write:
    """A write multiplying the coefficients of row ``row`` at ``cols`` by ``factors`` ``[d_ff]``."""

    def _write(state: torch.Tensor) -> torch.Tensor:
        mult = torch.ones_like(state)
        mult[row, cols] = factors.to(state.device, state.dtype)
        return state * mult

    return _write


def _prediction(model: KVModel, probs: torch.Tensor, k: int) -> Prediction:
    top = probs.topk(min(k, probs.numel()))
    ids = top.indices.tolist()
    return Prediction(ids, model.token_strings(ids), top.values.tolist())


def predict(model: KVModel, prompt: str, k: int = 10) -> Prediction:
    """The model's top-``k`` next tokens after ``prompt``, as it is now (edits applied included)."""
    if not isinstance(prompt, str):
        raise TypeError("predict takes one prompt (a string)")
    check_k(k)
    batch = model.tokenize(prompt)
    with torch.no_grad():
        logits = tracing.run(model, batch, read=[Site("logits")])[Site("logits")]
    return _prediction(model, tracing.at_last_token(batch, logits)[0].float().softmax(-1), k)


def intervene(model: KVModel, prompt: str, scales: Mapping[MemoryId, float], *, k: int = 10,
              positions: Positions = "all", target: str | int | None = None) -> Intervention:
    """Run ``prompt`` with the coefficients of ``scales``' memories multiplied by their factor.

    Args:
        scales: ``{(layer, memory): factor}``; ``0`` switches a memory off, ``2`` doubles it.
        k: how many top tokens to report before and after.
        positions: where to scale: ``"all"`` tokens (LM-Debugger), the ``"last"`` one, or indices.
        target: a token (single-token string or id) whose probability to report.
    """
    if not isinstance(prompt, str):
        raise TypeError("intervene takes one prompt (a string)")
    check_k(k)
    checked = _check_scales(model, scales)
    tid = None if target is None else resolve_token(model, target)[0]
    batch = model.tokenize(prompt).repeat(2)  # row 0 clean, row 1 intervened
    cols = _columns(positions, int(batch.lengths[0]))
    writes = {}
    for layer in sorted({l for l, _ in checked}):
        factors = torch.ones(model.d_ff)
        for (l, i), f in checked.items():
            if l == layer:
                factors[i] = f
        writes[Site("key", layer)] = _scale_write(factors, 1, cols)
    logits = tracing.run(model, batch, read=[Site("logits")], write=writes)[Site("logits")]
    logp = tracing.at_last_token(batch, logits).float().log_softmax(-1).cpu()
    p0, p1 = logp[0].exp(), logp[1].exp()
    kl = float((p0 * (logp[0] - logp[1])).sum())
    pos_label = positions if isinstance(positions, str) else tuple(cols)
    return Intervention(model.name, prompt, checked, pos_label, _prediction(model, p0, k),
                        _prediction(model, p1, k), kl,
                        None if tid is None else model.token_strings([tid])[0],
                        None if tid is None else float(p0[tid]), None if tid is None else float(p1[tid]))
