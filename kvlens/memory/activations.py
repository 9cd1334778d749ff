"""Which keys fire: memory coefficients per prompt, layer and token (Geva et al. 2021, §3).

The coefficient of memory ``i`` at layer ``l`` is component ``i`` of the value projection's
input, ``m = f(x K(l)ᵀ)`` (gated: ``f(x Gᵀ) ⊙ x Kᵀ``), so that ``FFN(x) = m V(l) + b_V``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvlens import tracing
from kvlens.models.kvmodel import Batch, KVModel, Site


@dataclass(frozen=True)
class TopMemories:
    """The ``k`` strongest memories of one layer at one token: indices and coefficients."""

    layer: int
    token_index: int
    token: str
    memories: list[int]
    coefficients: list[float]


@dataclass(frozen=True)
class KeyActivations:
    """Memory coefficients: ``coefficients[layer]`` is ``[prompts, tokens, d_ff]`` (right-padded)."""

    batch: Batch
    tokens: list[list[str]]
    coefficients: dict[int, torch.Tensor]
    model_name: str

    @property
    def layers(self) -> list[int]:
        return sorted(self.coefficients)

    def at(self, layer: int, prompt: int = 0, token: int = -1) -> torch.Tensor:
        """Coefficients ``[d_ff]`` of ``layer`` at token ``token`` of prompt ``prompt``."""
        if layer not in self.coefficients:
            raise KeyError(f"layer {layer} was not captured; captured layers: {self.layers}")
        if not 0 <= prompt < len(self.tokens):
            raise IndexError(f"prompt {prompt} is out of range (0..{len(self.tokens) - 1})")
        n = len(self.tokens[prompt])
        if not -n <= token < n:
            raise IndexError(f"token {token} is out of range for prompt {prompt} with {n} tokens")
        return self.coefficients[layer][prompt, token % n]

    def top(self, layer: int, k: int = 10, prompt: int = 0, token: int = -1,
            by: str = "abs") -> TopMemories:
        """The ``k`` memories with the largest coefficient (``by="abs"`` or ``"value"``)."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if by not in ("abs", "value"):
            raise ValueError(f"by must be 'abs' or 'value', got {by!r}")
        coef = self.at(layer, prompt, token)
        score = coef.abs() if by == "abs" else coef
        idx = score.topk(min(k, coef.numel())).indices
        n = len(self.tokens[prompt])
        return TopMemories(layer, token % n, self.tokens[prompt][token % n],
                           idx.tolist(), coef[idx].tolist())


def keys(model: KVModel, prompts: str | Sequence[str], layers: Sequence[int] | None = None) -> KeyActivations:
    """Memory coefficients of ``prompts`` at ``layers`` (all layers if None), one forward."""
    chosen = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    if not chosen:
        raise ValueError("layers is empty: pass None for all layers or a list of layer indices")
    batch = model.tokenize(prompts)
    states = tracing.run(model, batch, read=[Site("key", l) for l in chosen], stop=True)
    tokens = [model.token_strings(ids[: int(n)]) for ids, n in zip(batch.input_ids, batch.lengths)]
    coefficients = {l: states[Site("key", l)].detach().float().cpu() for l in chosen}
    return KeyActivations(batch, tokens, coefficients, model.name)
