"""Cells of a causal trace and the two ways of computing them: exact-fast and plain.

A cell restores one state of the clean run inside the corrupted runs (ROME's
``trace_with_patch``) and scores ``p(target)``, averaged over the noise samples:

* ``hidden`` (l, t): the output of layer ``l`` (the residual stream) at token ``t``;
* ``mlp`` / ``attn`` (l, t): the MLP (attention) outputs at token ``t`` of the ``window`` layers
  ``max(0, l - w//2) <= j < min(L, l + ceil(w/2))`` (ROME's window centred on ``l``);
* ``sever_mlp`` / ``sever_attn`` (l, t): ``hidden`` (l, t) with the MLP (attention) outputs at
  token ``t`` frozen to their corrupted values (ROME's ``trace_with_repatch``; MEMIT App. A).
  ROME freezes every layer; layers ``<= l`` cannot change the restored state, so the fast
  mode freezes only ``> l`` (the plain mode freezes all, and the tests check they agree).

:func:`plain_scores` is the reference: full forwards through the nnsight seam, ``cells`` cells
stacked on the batch axis per forward (1 = ROME's one forward per cell). :func:`exact_scores`
computes the same numbers from the cached corrupted run, recomputing only layers ``>= start``
at positions ``>= t``, with cells × samples batched up to a memory budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvlens.causal.resume import Patch, Rows, resume
from kvlens.causal.setup import Setup, add_noise, log_probs, target_prob
from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.tracing import Remote, replace_at, run

KINDS = ("hidden", "mlp", "attn")
SEVERED = ("sever_mlp", "sever_attn")


@dataclass(frozen=True)
class Cell:
    """One restoration: ``kind`` at (``layer``, ``token``)."""

    kind: str
    layer: int
    token: int


@dataclass(frozen=True)
class Plan:
    """What a cell does: the first layer it changes and the states it overwrites at its token.

    ``restore_input``: the state entering ``start`` (the output of layer ``start - 1``) is the
    clean one; ``patches``: ``(module kind, layer, clean?)`` outputs overwritten (clean, or
    frozen to the corrupted value).
    """

    start: int
    restore_input: bool
    patches: tuple[tuple[str, int, bool], ...]


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window: ``range(max(0, l - w // 2), min(L, l - (-w // 2)))``."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def plan(cell: Cell, window: int, n_layers: int, *, freeze_all: bool = False) -> Plan:
    """The :class:`Plan` of ``cell`` (``freeze_all``: severed cells freeze every layer, as ROME)."""
    if cell.kind == "hidden":
        return Plan(cell.layer + 1, True, ())
    if cell.kind in ("mlp", "attn"):
        layers = window_layers(cell.layer, window, n_layers)
        return Plan(layers[0], False, tuple((cell.kind, j, True) for j in layers))
    if cell.kind in SEVERED:
        module = cell.kind.removeprefix("sever_")
        first = 0 if freeze_all else cell.layer + 1
        return Plan(cell.layer + 1, True, tuple((module, j, False) for j in range(first, n_layers)))
    raise ValueError(f"unknown cell kind {cell.kind!r}; choose one of {KINDS + SEVERED}")


# ---- plain: full forwards through the nnsight seam ---------------------------------------------
def _writes(model: KVModel, setup: Setup, cells: Sequence[Cell], window: int) -> dict[Site, Callable]:
    """Writes for ``cells`` stacked on the batch axis, ``samples`` rows each."""
    s, span = setup.samples, setup.span
    n = len(cells) * s
    corrupt = add_noise(span.start, span.end, setup.noise.repeat(len(cells), 1, 1))
    rows_all = torch.arange(n)

    parts: dict[Site, list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
    for c, cell in enumerate(cells):
        rows = rows_all[c * s:(c + 1) * s]
        p = plan(cell, window, model.n_layers, freeze_all=True)
        if p.restore_input:
            value = setup.clean.resid[p.start - 1][0, cell.token].expand(s, -1)
            parts.setdefault(Site("resid", p.start - 1), []).append((rows, cell.token, value))
        for kind, layer, clean in p.patches:
            states = setup.clean if clean else setup.corrupt
            src = states.module(kind)[layer]
            value = src[0, cell.token].expand(s, -1) if clean else src[:, cell.token]
            parts.setdefault(Site.parse(kind, layer), []).append((rows, cell.token, value))
    writes: dict[Site, Callable] = {Site("embed"): corrupt}
    for site, items in parts.items():
        rows = torch.cat([r for r, _, _ in items])
        cols = torch.cat([torch.full((len(r),), t) for r, t, _ in items])
        writes[site] = replace_at(rows, cols, torch.cat([v for _, _, v in items]))
    return writes


def plain_scores(model: KVModel, setup: Setup, cells: Sequence[Cell], window: int,
                 per_forward: int = 1, remote: Remote | None = None) -> torch.Tensor:
    """``p(target)`` per cell (mean over samples) by full forwards, ``per_forward`` cells each.

    ``remote`` says where every forward runs (:data:`kvlens.tracing.Remote`; ``None``: ``model.remote``).
    """
    out = []
    ones = torch.ones_like(setup.ids)
    for i in range(0, len(cells), per_forward):
        chunk = cells[i:i + per_forward]
        n = len(chunk) * setup.samples
        batch = Batch(setup.ids.repeat(n, 1), ones.repeat(n, 1), (setup.prompt,) * n)
        logits = run(model, batch, read=[Site("logits")], write=_writes(model, setup, chunk, window), remote=remote)
        lp = log_probs(logits[Site("logits")][:, setup.positions])
        out.append(target_prob(lp, setup.target).view(len(chunk), setup.samples).mean(1))
    return torch.cat(out)


# ---- exact: resume from the cached corrupted run -----------------------------------------------
def _rows(model: KVModel, setup: Setup, t: int, cells: Sequence[Cell], plans: Sequence[Plan]) -> Rows:
    """Rows (cells × samples, cells sorted by start) resumed from token ``t``."""
    s = setup.samples
    corr_in = [setup.corrupt.resid_in, *setup.corrupt.resid]  # index = start layer
    clean_in = [setup.clean.resid_in, *setup.clean.resid]
    inputs, patches = [], []
    for c, p in enumerate(plans):
        x = corr_in[p.start][:, t:].clone()
        if p.restore_input:
            x[:, 0] = clean_in[p.start][0, t]
        inputs.append(x)
        rows = torch.arange(c * s, (c + 1) * s)
        for kind, layer, clean in p.patches:
            src = (setup.clean if clean else setup.corrupt).module(kind)[layer]
            value = src[0, t].expand(s, -1) if clean else src[:, t]
            patches.append(Patch(kind, layer, rows, value))
    start = torch.tensor([p.start for p in plans]).repeat_interleave(s)
    sample = torch.arange(s).repeat(len(plans))
    return Rows(t, start, sample, torch.cat(inputs), patches)


def rows_per_chunk(model: KVModel, setup: Setup, memory: int | None) -> int:
    """How many rows one resumed forward may hold within ``memory`` bytes (a rough estimate)."""
    if memory is None:
        memory = model.memory_budget(cpu_bytes=256 * 2**20)
    t, d = setup.ids.shape[1], model.d_model
    kv = setup.corrupt.keys[0].shape[1] * setup.corrupt.keys[0].shape[3]
    per_row = 4 * (t * (4 * d + 4 * model.d_ff + t * 32) + 6 * kv * t + 2 * len(setup.target) * model.vocab_size)
    return max(setup.samples, memory // per_row)


def exact_scores(model: KVModel, setup: Setup, cells: Sequence[Cell], window: int,
                 memory: int | None = None, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``p(target)`` per cell, exactly as :func:`plain_scores`, from the cached corrupted run.

    Cells before the subject need no forward at all: the noise only touches subject tokens, so
    there the clean and corrupted states are the same, and restoring one changes nothing (their
    score is the corrupted probability).
    """
    scores = torch.empty(len(cells), dtype=torch.float64)
    per_chunk = max(1, rows_per_chunk(model, setup, memory) // setup.samples)
    by_token: dict[int, list[int]] = {}
    for i, cell in enumerate(cells):
        if cell.token < setup.span.start:
            scores[i] = setup.low
        else:
            by_token.setdefault(cell.token, []).append(i)
    if progress is not None and len(cells) > sum(map(len, by_token.values())):
        progress(len(cells) - sum(map(len, by_token.values())))
    for t, idx in by_token.items():
        plans = {i: plan(cells[i], window, model.n_layers) for i in idx}
        idx = sorted(idx, key=lambda i: plans[i].start)
        for k in range(0, len(idx), per_chunk):
            chunk = idx[k:k + per_chunk]
            rows = _rows(model, setup, t, [cells[i] for i in chunk], [plans[i] for i in chunk])
            lp = resume(model, setup.ids, setup.corrupt, rows, setup.positions)
            p = target_prob(lp, setup.target).view(len(chunk), setup.samples).mean(1)
            scores[chunk] = p.double().cpu()
            if progress is not None:
                progress(len(chunk))
    return scores
