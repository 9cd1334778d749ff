"""The one seam between kvlens and nnsight.

Every forward pass that reads or changes a hidden state goes through :func:`run`: it takes a
tokenized :class:`~kvlens.models.kvmodel.Batch`, the :class:`~kvlens.models.kvmodel.Site` s to
read, and functions that rewrite states at sites, and returns the states read. Sites are
visited in execution order (nnsight 0.8 requires it). Several groups of prompts share one
forward by concatenating their batches (:func:`concat`) — the effect of several nnsight
invokes, with positions that stay where the caller put them. With ``grad=True`` the returned
tensors keep their autograd graph, so a loss built from them can be back-propagated into any
tensor a write function used (e.g. a leaf ``delta``).

Only this module and :mod:`kvlens.models` import nnsight.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping, Sequence

import nnsight
import torch

from kvlens.models.kvmodel import Batch, KVModel, Site

#: A write: receives the state at a site (``[B, T, ...]``) and returns its replacement.
Write = Callable[[torch.Tensor], torch.Tensor]


def run(model: KVModel, batch: Batch, *, read: Iterable[Site] = (),
        write: Mapping[Site, Write] | None = None, grad: bool = False,
        stop: bool = False) -> dict[Site, torch.Tensor]:
    """One forward of ``batch`` that applies ``write`` and returns the states at ``read``.

    Args:
        model: the wrapped model.
        batch: right-padded prompts from :meth:`KVModel.tokenize` or :func:`concat`.
        read: sites whose (post-write) state to return, each ``[B, T, ...]``.
        write: site -> function of the state returning the new state (same shape).
        grad: keep autograd graphs (for losses on the returned states).
        stop: end the forward right after the last site visited (for statistics: layers
            above are not computed; logits are then unavailable).

    Returns:
        ``{site: tensor}`` for every site in ``read``.
    """
    write = dict(write or {})
    read = set(read)
    sites = sorted(read | set(write), key=lambda s: s.order(model.n_layers))
    for site in sites:
        if site.kind not in ("embed", "logits"):
            model.check_layer(site.layer)
    saved: dict[Site, torch.Tensor] = {}
    grad_mode = torch.enable_grad() if grad else torch.no_grad()
    with grad_mode, model.nn.trace(**batch.inputs()) as tracer:
        for site in sites:
            envoy, attr = model.envoy(site)
            value = getattr(envoy, attr)
            head = value[0] if isinstance(value, tuple) else value
            if site in write:
                head = write[site](head)
                setattr(envoy, attr, (head, *value[1:]) if isinstance(value, tuple) else head)
            if site in read:
                saved[site] = nnsight.save(head)
        if stop:
            tracer.stop()
    return saved


def capture(model: KVModel, prompts: str | Sequence[str], sites: Iterable[Site]
            ) -> tuple[Batch, dict[Site, torch.Tensor]]:
    """Tokenize ``prompts`` and return the batch with the states at ``sites``."""
    batch = model.tokenize(prompts)
    return batch, run(model, batch, read=sites)


def concat(batches: Sequence[Batch], pad_id: int) -> Batch:
    """One right-padded batch holding the rows of ``batches`` in order.

    Token ``t`` of every row stays at column ``t``, so positions computed for a part hold
    for the whole; row offsets are the cumulative lengths of ``batches``.
    """
    if not batches:
        raise ValueError("concat needs at least one batch")
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Batch(torch.cat([pad(b.input_ids, pad_id) for b in batches]),
                 torch.cat([pad(b.attention_mask, 0) for b in batches]),
                 tuple(p for b in batches for p in b.prompts))


def at_last_token(batch: Batch, states: torch.Tensor) -> torch.Tensor:
    """``states[b, batch.last[b]]`` for each row: ``[B, T, ...]`` -> ``[B, ...]``."""
    rows = torch.arange(len(batch), device=states.device)
    return states[rows, batch.last.to(states.device)]


def replace_at(rows: torch.Tensor | Sequence[int], cols: torch.Tensor | Sequence[int],
               values: torch.Tensor) -> Write:
    """A write that sets ``state[rows[i], cols[i]] = values[i]`` and keeps the rest."""
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    cols_t = torch.as_tensor(cols, dtype=torch.long)

    def _write(state: torch.Tensor) -> torch.Tensor:
        out = state.clone()
        out[rows_t.to(state.device), cols_t.to(state.device)] = values.to(state.dtype).to(state.device)
        return out

    return _write


def add_at(rows: torch.Tensor | Sequence[int], cols: torch.Tensor | Sequence[int],
           delta: torch.Tensor) -> Write:
    """A write that adds ``delta[i]`` (or one shared ``delta``) at ``state[rows[i], cols[i]]``.

    Differentiable in ``delta``: the basis of target-vector optimisation (MEMIT Eq. 16).
    """
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    cols_t = torch.as_tensor(cols, dtype=torch.long)

    def _write(state: torch.Tensor) -> torch.Tensor:
        index = (rows_t.to(state.device), cols_t.to(state.device))
        d = delta.to(state.dtype).to(state.device).expand(len(rows_t), state.shape[-1])
        return state.index_put(index, state[index] + d)

    return _write


@contextlib.contextmanager
def trainable(*tensors: torch.nn.Parameter):
    """Enable ``requires_grad`` on ``tensors`` for the block, then restore each flag."""
    flags = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)


def layer_outputs(model: KVModel, batch: Batch, upto: int) -> list[object]:
    """What decoder layers ``0..upto`` return for ``batch`` (no grad), to replay with :func:`run_skipping`.

    Each entry is the layer's output as the family returns it (a tensor or a tuple).
    """
    upto = model.check_layer(upto)
    outs: list[object] = []
    with torch.no_grad(), model.nn.trace(**batch.inputs()) as tracer:
        for layer in range(upto + 1):
            envoy, _ = model.envoy(Site("resid", layer))
            outs.append(nnsight.save(envoy.output))
        tracer.stop()
    return list(outs)


def run_skipping(model: KVModel, batch: Batch, outputs: Sequence[object], *, top: Write,
                 read: Iterable[Site] = (), grad: bool = False, stop: bool = False) -> dict[Site, torch.Tensor]:
    """A forward in which layers ``0..len(outputs)-1`` are not computed but return ``outputs``.

    The hidden state of the last skipped layer first goes through ``top`` (e.g. :func:`add_at`
    with a leaf ``delta``), so states above depend on it and can carry gradients. Work below is
    fixed and skipped: MEMIT's z optimisation only needs the layers above its target layer.
    ``read`` must name sites above the skipped layers.
    """
    if not outputs:
        raise ValueError("run_skipping needs the outputs of at least one layer")
    last = len(outputs) - 1
    read = sorted(set(read), key=lambda s: s.order(model.n_layers))
    for site in read:
        if site.kind != "logits" and site.layer <= last:
            raise ValueError(f"cannot read {site}: layers 0..{last} are skipped")
    saved: dict[Site, torch.Tensor] = {}
    grad_mode = torch.enable_grad() if grad else torch.no_grad()
    with grad_mode, model.nn.trace(**batch.inputs()) as tracer:
        for layer, out in enumerate(outputs):
            envoy, _ = model.envoy(Site("resid", layer))
            if layer == last:
                out = (top(out[0]), *out[1:]) if isinstance(out, tuple) else top(out)
            envoy.skip(out)
        for site in read:
            envoy, attr = model.envoy(site)
            value = getattr(envoy, attr)
            saved[site] = nnsight.save(value[0] if isinstance(value, tuple) else value)
        if stop:
            tracer.stop()
    return saved


class _TraceOptions:
    """An nnsight model whose traces all get extra keyword arguments; everything else delegates."""

    def __init__(self, nn_model: object, options: dict[str, object]) -> None:
        self._nn_model = nn_model
        self._options = options

    def trace(self, *args: object, **kwargs: object) -> object:
        return self._nn_model.trace(*args, **{**self._options, **kwargs})

    def __getattr__(self, name: str) -> object:
        return getattr(self._nn_model, name)


def with_trace_options(model: KVModel, **options: object) -> KVModel:
    """A shallow copy of ``model`` whose nnsight traces (in :func:`run`) get ``options``.

    E.g. ``with_trace_options(model, remote=True)`` sends every forward of :func:`run` to NDIF
    (nnsight's remote execution; the model must be one NDIF hosts, and needs an API key set up
    as nnsight documents). The original model is not changed.
    """
    import copy

    view = copy.copy(model)
    view.nn = _TraceOptions(model.nn, dict(options))
    return view
