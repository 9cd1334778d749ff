"""Which keys fire: memory coefficients per prompt, layer and token (Geva et al. 2021, §3).

The FFN of layer ``l`` is a key-value memory (Geva et al. 2021, §2, ``FF(x) = f(x·Kᵀ)·V``)::

    FFN(x) = f(x K(l)ᵀ) V(l) + b_V = Σ_i m_i v_i + b_V

The coefficient of memory ``i`` is component ``i`` of the value projection's input,
``m = f(x K(l)ᵀ + b_K)`` (gated families: ``m = f(x Gᵀ) ⊙ (x Kᵀ)``). :func:`keys` reads it for
every token of a batch of prompts in one forward per chunk (no per-prompt loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kvlens import tracing
from kvlens.models.kvmodel import Batch, KVModel, Site

RankBy = Literal["abs", "value"]


@dataclass(frozen=True)
class TopMemories:
    """The ``k`` strongest memories of one layer at one token: indices and coefficients."""

    layer: int
    token_index: int
    token: str
    memories: list[int]
    coefficients: list[float]


def check_k(k: int, name: str = "k") -> int:
    """``k`` if it is a positive int; a clear error otherwise."""
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return k


def check_memory(model: KVModel, layer: int, memory: int) -> int:
    """``memory`` as an index into layer ``layer``'s ``d_ff`` memories; a clear error if out of range."""
    model.check_layer(layer)
    if not isinstance(memory, int) or isinstance(memory, bool):
        raise TypeError(f"memory must be an int, got {type(memory).__name__}")
    if not -model.d_ff <= memory < model.d_ff:
        raise IndexError(f"memory {memory} is out of range: layer {layer} of {model.name} has "
                         f"{model.d_ff} memories (0..{model.d_ff - 1})")
    return memory % model.d_ff


def check_layers(model: KVModel, layers: Sequence[int] | None) -> list[int]:
    """``layers`` as sorted non-negative indices (all if None); errors for empty or out of range."""
    if layers is None:
        return list(range(model.n_layers))
    chosen = sorted({model.check_layer(l) for l in layers})
    if not chosen:
        raise ValueError("layers is empty: pass None for all layers or a list of layer indices")
    return chosen


@dataclass(frozen=True)
class KeyActivations:
    """Memory coefficients: ``coefficients[layer]`` is ``[prompts, tokens, d_ff]`` (right-padded).

    ``tokens[p]`` are the token strings of prompt ``p`` (without padding); positions past
    ``len(tokens[p])`` in ``coefficients`` are padding and hold 0.
    """

    batch: Batch
    tokens: list[list[str]]
    coefficients: dict[int, torch.Tensor]
    model_name: str

    @property
    def layers(self) -> list[int]:
        return sorted(self.coefficients)

    @property
    def d_ff(self) -> int:
        return int(next(iter(self.coefficients.values())).shape[-1])

    def _token(self, prompt: int, token: int) -> int:
        if not 0 <= prompt < len(self.tokens):
            raise IndexError(f"prompt {prompt} is out of range (0..{len(self.tokens) - 1})")
        n = len(self.tokens[prompt])
        if not -n <= token < n:
            raise IndexError(f"token {token} is out of range for prompt {prompt} with {n} tokens")
        return token % n

    def at(self, layer: int, prompt: int = 0, token: int = -1) -> torch.Tensor:
        """Coefficients ``[d_ff]`` of ``layer`` at token ``token`` of prompt ``prompt``."""
        if layer not in self.coefficients:
            raise KeyError(f"layer {layer} was not captured; captured layers: {self.layers}")
        return self.coefficients[layer][prompt, self._token(prompt, token)]

    def top(self, layer: int, k: int = 10, prompt: int = 0, token: int = -1,
            by: RankBy = "abs") -> TopMemories:
        """The ``k`` memories with the largest coefficient (``by="abs"`` or ``"value"``)."""
        check_k(k)
        if by not in ("abs", "value"):
            raise ValueError(f"by must be 'abs' or 'value', got {by!r}")
        coef = self.at(layer, prompt, token)
        score = coef.abs() if by == "abs" else coef
        idx = score.topk(min(k, coef.numel())).indices
        t = self._token(prompt, token)
        return TopMemories(layer, t, self.tokens[prompt][t], idx.tolist(), coef[idx].tolist())

    def top_per_layer(self, k: int = 10, prompt: int = 0, token: int = -1,
                      by: RankBy = "abs") -> list[TopMemories]:
        """:meth:`top` at every captured layer (the rows of a layers × memories heatmap)."""
        return [self.top(layer, k, prompt, token, by) for layer in self.layers]

    def active_fraction(self, layer: int, prompt: int = 0, threshold: float = 0.0) -> torch.Tensor:
        """Per token of ``prompt``, the fraction of memories with coefficient > ``threshold``."""
        self.at(layer, prompt, 0)  # validates layer and prompt
        coef = self.coefficients[layer][prompt, : len(self.tokens[prompt])]
        return (coef > threshold).float().mean(-1)


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]))


def keys(model: KVModel, prompts: str | Sequence[str], layers: Sequence[int] | None = None, *,
         batch_size: int | None = None) -> KeyActivations:
    """Memory coefficients of ``prompts`` at ``layers`` (all if None).

    All prompts go through one batched forward (or one per ``batch_size`` chunk), which stops
    after the last layer read. Coefficients are returned on the CPU in float32.
    """
    chosen = check_layers(model, layers)
    batch = model.tokenize(prompts)
    step = len(batch) if batch_size is None else check_k(batch_size, "batch_size")
    sites = [Site("key", l) for l in chosen]
    width = batch.input_ids.shape[1]
    parts: dict[int, list[torch.Tensor]] = {l: [] for l in chosen}
    for start in range(0, len(batch), step):
        rows = slice(start, start + step)
        n = int(batch.lengths[rows].max())
        chunk = Batch(batch.input_ids[rows, :n], batch.attention_mask[rows, :n], batch.prompts[rows])
        states = tracing.run(model, chunk, read=sites, stop=True)
        mask = chunk.attention_mask.cpu()[..., None].float()
        for l in chosen:  # padding positions are set to 0
            parts[l].append(_pad_to(states[Site("key", l)].detach().float().cpu() * mask, width))
    tokens = [model.token_strings(ids[: int(n)]) for ids, n in zip(batch.input_ids, batch.lengths)]
    coefficients = {l: torch.cat(parts[l]) for l in chosen}
    return KeyActivations(batch, tokens, coefficients, model.name)
