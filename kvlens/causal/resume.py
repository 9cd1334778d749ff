"""Forward passes that resume from a cached run: the engine of the fast exact trace.

Restoring a state at (layer ``l``, token ``t``) leaves every layer below the first patched
one, and every position before ``t``, exactly as in the corrupted run (causal attention:
position ``p`` never sees positions ``> p``). So a cell only needs layers ``>= start`` at
positions ``>= t``, given the corrupted run's residual stream entering ``start`` and its
attention keys/values for positions ``< t`` (the ``cache`` of Hugging Face).

:func:`full_run` records a complete run (residual stream, MLP and attention outputs, keys
and values); :func:`resume` continues many rows from it at once, each row from its own start
layer (rows join the batch when their start layer is reached), with module outputs patched
at position ``t``. Layers are called with the keyword arguments the model itself gives them
for that geometry, captured once by a small probe forward, so no family-specific calling
convention is written here. This module drives the Hugging Face modules directly (plain
PyTorch hooks, removed on exit); it never changes weights.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.tracing import Remote, Write, record


@dataclass
class RunStates:
    """Every state of a forward of ``R`` rows of one prompt (``T`` tokens).

    ``resid_in`` is the input of layer 0; ``resid[l]``, ``mlp[l]``, ``attn[l]`` are the outputs
    of layer ``l``, its MLP and its attention (``[R, T, d]``); ``keys[l]``/``values[l]`` are
    the attention cache (``[R, heads, T, head_dim]``); ``logits`` are the model's own logits.
    """

    resid_in: torch.Tensor
    resid: list[torch.Tensor]
    mlp: list[torch.Tensor]
    attn: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor
    head: torch.Tensor  # the unembedding's output (what every trace mode scores)

    def module(self, kind: str) -> list[torch.Tensor]:
        """The per-layer outputs of ``kind`` (``"mlp"`` or ``"attn"``)."""
        return {"mlp": self.mlp, "attn": self.attn}[kind]


@dataclass
class Patch:
    """Set the output of module ``kind`` at ``layer``, position ``t``, rows ``rows`` to ``values``."""

    kind: str
    layer: int
    rows: torch.Tensor  # [n] long
    values: torch.Tensor  # [n, d]


@dataclass
class Rows:
    """Rows resumed together from position ``t``, sorted by ``start`` (ascending)."""

    t: int
    start: torch.Tensor  # [R] long, first layer recomputed for each row
    sample: torch.Tensor  # [R] long, row of the corrupted run each row continues
    inputs: torch.Tensor  # [R, T - t, d]: residual stream entering each row's start layer
    patches: list[Patch] = field(default_factory=list)


def _head(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_head(output: Any, head: torch.Tensor) -> Any:
    return (head, *output[1:]) if isinstance(output, tuple) else head


@contextlib.contextmanager
def _hooks(pairs: list[tuple[torch.nn.Module, Any, bool]]) -> Iterator[None]:
    """Register ``(module, hook, pre)`` pairs for the block; always removed on exit."""
    handles = []
    try:
        for module, hook, pre in pairs:
            if pre:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def full_run(model: KVModel, batch: Batch, write: Mapping[Site, Write] | None = None,
             remote: Remote | None = None) -> RunStates:
    """One complete forward of ``batch`` through the seam (``write`` applied), recording every state."""
    rec = record(model, batch, write=write, remote=remote)
    return RunStates(rec.resid_in, rec.resid, rec.mlp, rec.attn, rec.keys, rec.values, rec.logits, rec.head)


def head_logits(model: KVModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final residual states: the final norm, then the unembedding."""
    return model.unembedding(model.final_norm(hidden))


def check_head(model: KVModel, run: RunStates) -> None:
    """Warn if the model's logits are not final norm + unembedding (e.g. Gemma 2's soft-capping).

    Traces score ``p(target)`` from the unembedding output in every mode (it is what the nnsight
    ``logits`` site reads), so such a model is traced on its logits before that post-processing.
    """
    mine = run.head[:, -1:]
    theirs = run.logits[:, -1:]
    if not torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max())):
        warnings.warn(
            f"{model.spec.model_type} post-processes its logits after the unembedding (scaling or soft-capping); "
            "trace probabilities are computed from the unembedding output, before that step", stacklevel=4)


def _probe(model: KVModel, ids: torch.Tensor, past: RunStates, t: int) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the model passes each decoder layer for ``T - t`` new tokens after ``t``."""
    captured: list[Any] = [None] * model.n_layers

    def grab(layer: int) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            captured[layer] = (args[1:], dict(kwargs))
        return hook

    cache = None
    if t > 0:
        cache = DynamicCache(config=model.config)
        for j in range(model.n_layers):
            cache.update(past.keys[j][:1, :, :t], past.values[j][:1, :, :t], j)
    pairs = [(model.layer(j), grab(j), True) for j in range(model.n_layers)]
    with torch.no_grad(), _hooks(pairs):
        model.hf(input_ids=ids[:1, t:], cache=cache, use_cache=cache is not None)
    return captured


def _fit(value: Any, n: int, cache: Cache | None) -> Any:
    """A probe argument adapted to ``n`` rows: batch-1 tensors expanded, the cache swapped."""
    if isinstance(value, Cache):
        return cache
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_fit(v, n, cache) for v in value)
    return value


def _patch_hooks(model: KVModel, patches: list[Patch]) -> list[tuple[torch.nn.Module, Any, bool]]:
    """Forward hooks writing each patch's values at position 0 (= token ``t``) of its rows."""
    by_module: dict[tuple[str, int], list[Patch]] = {}
    for p in patches:
        by_module.setdefault((p.kind, p.layer), []).append(p)

    def make(group: list[Patch]) -> Any:
        def hook(_m: Any, _i: Any, out: Any) -> Any:
            head = _head(out).clone()
            for p in group:
                head[p.rows, 0] = p.values.to(head.dtype)
            return _replace_head(out, head)
        return hook

    module = {"mlp": model.mlp, "attn": model.attn}
    return [(module[kind](layer), make(group), False) for (kind, layer), group in by_module.items()]


def resume(model: KVModel, ids: torch.Tensor, past: RunStates, rows: Rows,
           positions: list[int]) -> torch.Tensor:
    """Continue ``rows`` from the run ``past``; return their log-probabilities at ``positions``.

    Returns ``[R, len(positions), vocab]`` log-softmax values. Positions must be ``>= rows.t``.
    """
    t, n_layers = rows.t, model.n_layers
    probe = _probe(model, ids, past, t)
    first = int(rows.start[0])
    joined = torch.searchsorted(rows.start, torch.arange(n_layers + 1), right=True)
    h = rows.inputs[:0]
    with torch.no_grad(), _hooks(_patch_hooks(model, rows.patches)):
        for j in range(first, n_layers):
            k = int(joined[j])
            if k > h.shape[0]:
                h = torch.cat([h, rows.inputs[h.shape[0]:k]])
            cache = None
            if t > 0:
                cache = DynamicCache(config=model.config)
                idx = rows.sample[:k]
                cache.update(past.keys[j][idx, :, :t], past.values[j][idx, :, :t], j)
            args, kwargs = probe[j]
            args = tuple(_fit(a, k, cache) for a in args)
            kwargs = {name: _fit(v, k, cache) for name, v in kwargs.items()}
            h = _head(model.layer(j)(h, *args, **kwargs))
        k = int(joined[n_layers])
        if k > h.shape[0]:  # rows that start after the last layer (restored final state)
            h = torch.cat([h, rows.inputs[h.shape[0]:k]])
        rel = [p - t for p in positions]
        logits = head_logits(model, h[:, rel])
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
