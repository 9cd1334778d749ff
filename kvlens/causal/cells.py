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
computes the same numbers from the recorded corrupted run, recomputing only layers ``>= start``
at positions ``>= t``: one forward per token (cells × samples up to a memory budget) resumed
through the seam (:func:`kvlens.tracing.prefix_of`, :func:`kvlens.tracing.run_skipping`), each
cell's rows joining it at their start layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvlens import tracing
from kvlens.causal.setup import Setup, add_noise, log_probs, target_prob
from kvlens.models.kvmodel import KVModel, Site
from kvlens.tracing import Remote, Write, replace_at, run

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


def _state(setup: Setup, kind: str, layer: int, clean: bool, token: int) -> torch.Tensor:
    """A state a plan writes at ``token``, one row per sample ``[samples, d]``: the clean run's
    (the same for every sample) or each corrupted run's own."""
    src = (setup.clean if clean else setup.corrupt).module(kind)[layer]
    return src[0, token].expand(setup.samples, -1) if clean else src[:, token]


def _overwrites(setup: Setup, cells: Sequence[Cell], plans: Sequence[Plan], shift: int = 0) -> dict[Site, Write]:
    """Writes doing ``plans`` for ``cells`` stacked on the batch axis, ``samples`` rows each.

    Cell ``c`` owns rows ``c·s .. (c+1)·s``; its states go to column ``token - shift`` (``shift``:
    the first position a resumed forward computes): the clean input of its start layer (the
    output of layer ``start - 1``) if it restores one, and its patched module outputs.
    """
    s = setup.samples
    parts: dict[Site, list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
    for c, (cell, p) in enumerate(zip(cells, plans)):
        restored = (("resid", p.start - 1, True),) if p.restore_input else ()
        for kind, layer, clean in (*restored, *p.patches):
            value = _state(setup, kind, layer, clean, cell.token)
            parts.setdefault(Site.parse(kind, layer), []).append((torch.arange(c * s, (c + 1) * s),
                                                                  cell.token - shift, value))
    return {site: replace_at(torch.cat([r for r, _, _ in items]),
                             torch.cat([torch.full((len(r),), col) for r, col, _ in items]),
                             torch.cat([v for _, _, v in items]))
            for site, items in parts.items()}


# ---- plain: full forwards through the nnsight seam ---------------------------------------------
def plain_scores(model: KVModel, setup: Setup, cells: Sequence[Cell], window: int,
                 per_forward: int = 1, remote: Remote | None = None) -> torch.Tensor:
    """``p(target)`` per cell (mean over samples) by full forwards, ``per_forward`` cells each.

    Severed cells freeze every layer, as ROME does. ``remote`` says where every forward runs
    (:data:`kvlens.tracing.Remote`; ``None``: ``model.remote``).
    """
    out = []
    span = setup.span
    for i in range(0, len(cells), per_forward):
        chunk = cells[i:i + per_forward]
        plans = [plan(cell, window, model.n_layers, freeze_all=True) for cell in chunk]
        noise = add_noise(span.start, span.end, setup.noise.repeat(len(chunk), 1, 1))
        writes = {Site("embed"): noise, **_overwrites(setup, chunk, plans)}
        logits = run(model, setup.batch(len(chunk) * setup.samples), read=[Site("logits")], write=writes,
                     remote=remote)
        lp = log_probs(logits[Site("logits")][:, setup.positions])
        out.append(target_prob(lp, setup.target).view(len(chunk), setup.samples).mean(1))
    return torch.cat(out)


# ---- exact: resume from the cached corrupted run -----------------------------------------------
def _resumed(model: KVModel, setup: Setup, t: int, cells: Sequence[Cell], window: int) -> torch.Tensor:
    """``p(target)`` of ``cells`` at token ``t``, sorted by start layer (mean over samples), by one
    forward resumed from the corrupted runs at positions ``>= t``.

    The forward replays the output of layer ``first - 1`` (``first``: the earliest start layer);
    the rows of cells that start later join it at their start layer (:func:`tracing.run_skipping`
    ``joins``), so each row computes only the layers ``>= start`` its cell can change.
    """
    s = setup.samples
    plans = [plan(cell, window, model.n_layers) for cell in cells]
    starts = sorted({p.start for p in plans})
    prefixes = [tracing.prefix_of(model, setup.corrupt, setup.batch(s), start - 1,
                                  torch.full((n * s,), t), rows=torch.arange(s).repeat(n))  # row c·s + i: sample i
                for start in starts for n in [sum(p.start == start for p in plans)]]
    shift = int(prefixes[0].start[0])  # t (0 where a short sliding window keeps every position)
    writes = _overwrites(setup, cells, plans, shift)
    restore = writes.pop(Site("resid", starts[0] - 1), None) if starts[0] > 0 else None
    final = Site("resid", model.n_layers - 1)
    states = tracing.run_skipping(model, prefixes[0], top=restore or (lambda h: h), write=writes,
                                  joins=prefixes[1:], read=[final], stop=True)[final]
    lp = log_probs(tracing.logits_of(model, states[:, [p - shift for p in setup.positions]]))
    return target_prob(lp, setup.target).view(len(cells), s).mean(1)


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
    score is the corrupted probability). The others are grouped by token and start layer (the
    rows of one resumed forward replay the same layer), ``samples`` rows per cell, as many cells
    per forward as ``memory`` allows.
    """
    scores = torch.empty(len(cells), dtype=torch.float64)
    per_chunk = max(1, rows_per_chunk(model, setup, memory) // setup.samples)
    by_token: dict[int, list[int]] = {}
    for i, cell in enumerate(cells):
        if cell.token < setup.span.start:
            scores[i] = setup.low
        else:
            by_token.setdefault(cell.token, []).append(i)
    skipped = len(cells) - sum(map(len, by_token.values()))
    if progress is not None and skipped:
        progress(skipped)
    for t, idx in by_token.items():
        idx = sorted(idx, key=lambda i: plan(cells[i], window, model.n_layers).start)
        for k in range(0, len(idx), per_chunk):
            chunk = idx[k:k + per_chunk]
            scores[chunk] = _resumed(model, setup, t, [cells[i] for i in chunk], window).double().cpu()
            if progress is not None:
                progress(len(chunk))
    return scores
