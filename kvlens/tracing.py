"""The one seam between kvlens and nnsight.

Every forward pass that reads or changes a hidden state goes through :func:`run`: it takes a
tokenized :class:`~kvlens.models.kvmodel.Batch`, the :class:`~kvlens.models.kvmodel.Site` s to
read, and functions that rewrite states at sites, and returns the states read. Sites are
visited in execution order (nnsight 0.8 requires it). Several groups of prompts share one
forward by concatenating their batches (:func:`concat`) — the effect of several nnsight
invokes, with positions that stay where the caller put them. With ``grad=True`` the returned
tensors keep their autograd graph, so a loss built from them can be back-propagated into any
tensor a write function used (e.g. a leaf ``delta``). :func:`record` keeps every state of one
forward and its attention cache.

Resuming: a change after layer ``l`` at position ``t`` leaves layers ``0..l`` and positions
before ``t`` as they were (causal attention). A :class:`Prefix` keeps that fixed part, made by
one forward (:func:`prefix_run`) or out of a recorded one (:func:`prefix_of`, no forward);
:func:`run_skipping` replays it with nnsight's ``skip`` and computes the rest, with writes.
MEMIT/ROME's target optimisation and the exact causal trace both resume this way. All these
forwards are one trace body (:func:`_forward`); :func:`logits_of` decodes states without one.

Only this module and :mod:`kvlens.models` import nnsight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import torch
from transformers.cache_utils import DynamicCache

from kvlens.models.kvmodel import Batch, KVModel, Site

#: A write: receives the state at a site (``[B, T, ...]``) and returns its replacement.
Write = Callable[[torch.Tensor], torch.Tensor]


#: Where a trace runs: ``False`` here; ``True`` on NDIF (nnsight's remote execution, the host set
#: in nnsight's config); ``"local"`` nnsight's local dry run of the remote protocol (the request is
#: serialised and deserialised with every module an NDIF server lacks hidden, then run here); any
#: other string: the URL of an NDIF host (e.g. a local NDIF server, ``"http://localhost:5001"``).
Remote = bool | str


def trace_options(model: KVModel, remote: Remote | None = None) -> dict[str, Any]:
    """nnsight ``trace`` keyword arguments for ``remote`` (``None``: the model's own ``model.remote``)."""
    where = model.remote if remote is None else remote
    if where is False or where is None:
        return {}
    if not (where is True or isinstance(where, str)):
        raise TypeError(f"remote must be False, True, 'local' or an NDIF host URL, got {where!r}")
    return {"remote": where}


@contextlib.contextmanager
def remote_errors(options: Mapping[str, Any]) -> Iterator[None]:
    """Name nnsight's own message when a remote (NDIF) request fails: model not served, no API key,
    host unreachable, or a model whose identity is a local folder NDIF cannot know."""
    where = options.get("remote")
    if not where or where == "local":
        yield
        return
    try:
        yield
    except Exception as exc:
        raise RuntimeError(
            f"nnsight's remote execution (remote={where!r}) failed: {type(exc).__name__}: {exc}\n"
            "Check that NDIF serves this model by its Hugging Face id (nnsight.status(); kv.load('org/name', "
            "remote=True), not a local folder), that an API key is set (nnsight.CONFIG.set_default_api_key(...) or "
            "$NDIF_API_KEY), and the host (nnsight.CONFIG.API.HOST, or remote='http://host:port')") from exc


def _then(first: Write, second: Write) -> Write:
    """``second(first(state))`` (torch only: shipped by value to a remote server)."""

    def both(state: torch.Tensor) -> torch.Tensor:
        return second(first(state))

    return both


def with_standing(model: KVModel, write: Mapping[Site, Write] | None) -> dict[Site, Write]:
    """``write`` after the model's standing interventions (:func:`standing`): theirs run first."""
    out: dict[Site, Write] = {}
    for layer in getattr(model, "standing", ()):
        for site, fn in layer.items():
            out[site] = _then(out[site], fn) if site in out else fn
    for site, fn in (write or {}).items():
        out[site] = _then(out[site], fn) if site in out else fn
    return out


@contextlib.contextmanager
def standing(model: KVModel, writes: Mapping[Site, Write]) -> Iterator[None]:
    """Within the block every forward through this seam (:func:`run`, :func:`record`) applies
    ``writes`` before its own: an edit seen as part of the model, weights untouched (so it works
    on remote and quantized models). Nested blocks stack in order.
    """
    layers = list(getattr(model, "standing", ()))
    model.standing = (*layers, dict(writes))
    try:
        yield
    finally:
        model.standing = tuple(layers)


def _steps(model: KVModel, sites: Sequence[Site], read: set[Site], write: Mapping[Site, Write]
           ) -> list[tuple[Any, str, Write | None, bool]]:
    """``(envoy, "output"/"input", write or None, keep?)`` per site: plain data for a trace body.

    A trace body may use torch and nnsight only (a remote server has no kvlens), so every kvlens
    object is resolved here, outside it; write functions are closures over tensors (cloudpickle
    ships them by value).
    """
    steps = []
    for site in sites:
        if site.kind not in ("embed", "logits"):
            model.check_layer(site.layer)
        envoy, attr = model.envoy(site)
        steps.append((envoy, attr, write.get(site), site in read))
    return steps


def run(model: KVModel, batch: Batch, *, read: Iterable[Site] = (),
        write: Mapping[Site, Write] | None = None, grad: bool = False,
        stop: bool = False, remote: Remote | None = None) -> dict[Site, torch.Tensor]:
    """One forward of ``batch`` that applies ``write`` and returns the states at ``read``.

    Args:
        model: the wrapped model.
        batch: right-padded prompts from :meth:`KVModel.tokenize` or :func:`concat`.
        read: sites whose (post-write) state to return, each ``[B, T, ...]``.
        write: site -> function of the state returning the new state (same shape); it runs
            inside the trace, so on a remote model it may use torch only.
        grad: keep autograd graphs (for losses on the returned states; local only).
        stop: end the forward right after the last site visited (for statistics: layers
            above are not computed; logits are then unavailable).
        remote: where the forward runs (:data:`Remote`); ``None``: ``model.remote``.

    Returns:
        ``{site: tensor}`` for every site in ``read``.
    """
    write = with_standing(model, write)
    read = set(read)
    sites = sorted(read | set(write), key=lambda s: s.order(model.n_layers))
    options = trace_options(model, remote)
    if grad and options:
        raise ValueError("gradients through a remote trace are not supported: run grad=True locally")
    heads, _, _ = _forward(model, batch.inputs(), _steps(model, sites, read, write), grad=grad, stop=stop,
                           options=options)
    kept = [site for site in sites if site in read]
    return dict(zip(kept, heads))


def _forward(model: KVModel, inputs: Mapping[str, Any], steps: Sequence[tuple[Any, str, Write | None, bool]], *,
             skips: Sequence[tuple[Any, Any]] = (), grad: bool = False, stop: bool = False, output: bool = False,
             options: Mapping[str, Any] | None = None
             ) -> tuple[list[torch.Tensor], list[tuple[Any, ...] | None], Any]:
    """The one trace body of this module: every forward of :func:`run`, :func:`record`,
    :func:`prefix_run` and :func:`run_skipping` is this ``model.nn.trace``.

    ``skips``: ``(envoy, replacement)``: the module is not run, ``replacement`` is its output.
    ``steps`` (:func:`_steps`, in execution order): each site's state is rewritten by its write
    and, if kept, saved: its head (the state itself) and its tail (what the module returns after
    it, ``None`` when it returns a tensor). ``stop`` ends the forward after the last step; ``output``
    also saves the model's own output (logits, cache). The body uses torch and nnsight only, so it
    also runs remotely (``options``: :func:`trace_options`). Returns ``(heads, tails, output)``.
    """
    options = dict(options or {})
    root = model.nn
    grad_mode = torch.enable_grad() if grad else torch.no_grad()
    with remote_errors(options), grad_mode, root.trace(**inputs, **options) as tracer:
        heads, tails, out = nnsight.save([]), nnsight.save([]), nnsight.save([])
        for envoy, replacement in skips:
            envoy.skip(replacement)
        for envoy, attr, fn, keep in steps:
            value = getattr(envoy, attr)
            head = value[0] if isinstance(value, tuple) else value
            if fn is not None:
                head = fn(head)
                setattr(envoy, attr, (head, *value[1:]) if isinstance(value, tuple) else head)
            if keep:
                heads.append(head)
                tails.append(tuple(value[1:]) if isinstance(value, tuple) else None)
        if output:
            out.append(root.output)
        if stop:
            tracer.stop()
    return heads, tails, out[0] if out else None


@dataclass
class Record:
    """Every state of one forward: layer 0's input, per-layer attention / MLP / layer outputs,
    the unembedding output (``head``), the model's logits and its attention cache.

    ``keys[l]``/``values[l]`` are ``[B, heads, T, head_dim]``; ``tails[l]`` is what layer ``l``
    returns after its output state (``None``: it returns a tensor, as every registered family
    does in transformers 5), kept so a forward resumed from the record (:func:`prefix_of`) can replay
    the layer exactly as it returns.
    """

    resid_in: torch.Tensor
    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    resid: list[torch.Tensor]
    head: torch.Tensor
    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    tails: list[tuple[Any, ...] | None]

    def module(self, kind: str) -> list[torch.Tensor]:
        """The per-layer outputs of ``kind``: ``"mlp"``, ``"attn"`` or ``"resid"`` (the layer's own)."""
        return {"mlp": self.mlp, "attn": self.attn, "resid": self.resid}[kind]


def record(model: KVModel, batch: Batch, *, write: Mapping[Site, Write] | None = None,
           remote: Remote | None = None) -> Record:
    """One forward of ``batch`` (with ``write`` applied) recording every state and the cache."""
    n = model.n_layers
    write = with_standing(model, write)
    layers = [Site(k, j) for j in range(n) for k in ("attn", "mlp", "resid")]
    sites = sorted({Site("resid_pre", 0), *layers, Site("logits")} | set(write), key=lambda s: s.order(n))
    steps = _steps(model, sites, set(sites), write)
    inputs = {**batch.inputs(), "use_cache": True}
    heads, tails, out = _forward(model, inputs, steps, output=True, options=trace_options(model, remote))
    states, tail = dict(zip(sites, heads)), dict(zip(sites, tails))
    cache = out.cache
    attn, mlp, resid = ([states[Site(k, j)] for j in range(n)] for k in ("attn", "mlp", "resid"))
    return Record(states[Site("resid_pre", 0)], attn, mlp, resid, states[Site("logits")], out.logits,
                  [cache.layers[j].keys for j in range(n)], [cache.layers[j].values for j in range(n)],
                  [tail[Site("resid", j)] for j in range(n)])


def add_beside(module: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """From now on every forward of ``module`` (a projection of the model) adds ``change(input)``
    to its output, until the returned handle's ``remove()``: how an edit lives beside weights it
    cannot write (4-bit, offloaded), seen by every forward, generation included."""

    def hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + change(args[0]).to(output.dtype)

    return module.register_forward_hook(hook)


def final_normed(model: KVModel, states: torch.Tensor) -> torch.Tensor:
    """The model's final norm applied to residual ``states`` ``[..., d_model]`` (in the model's dtype).

    A module of the model applied on its own, here in the seam like every other forward; it keeps
    autograd graphs (the z-stage loss back-propagates through it). The states go to the device the
    norm computes on (:meth:`KVModel.device_of`: the last one of a split model). On a model without
    local weights the module is the local copy :meth:`KVModel.module` reads through a trace.
    """
    norm = model.final_norm
    return norm(states.to(model.device_of(norm), model.dtype))


def logits_of(model: KVModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of last-layer residual states ``[..., d_model]``: the final norm, then the unembedding.

    What the ``logits`` site reads (before any post-processing a family adds, e.g. Gemma 2's
    soft-capping), for only the states given (e.g. the scored positions of a forward read at the
    last layer and stopped there), without running any layer.
    """
    return model.unembedding(final_normed(model, hidden))


def generate(model: KVModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             remote: Remote | None = None, **kwargs: Any) -> torch.Tensor:
    """Token ids (prompt + completion, ``[B, T + new]``) from the model's own ``generate``, run
    through nnsight (``kwargs`` go to transformers' ``generate``: ``max_new_tokens``, ``do_sample``,
    ``top_k``, ...). Weight edits are seen; the standing interventions of :func:`standing` are not
    (they are written for one forward, not for every step of a decode loop)."""
    options = trace_options(model, remote)
    with remote_errors(options), torch.no_grad(), \
            model.nn.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                              **kwargs, **options) as tracer:
        ids = nnsight.save(tracer.result)
    return ids


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
def trainable(*tensors: torch.nn.Parameter) -> Iterator[None]:
    """Enable ``requires_grad`` on ``tensors`` for the block, then restore each flag."""
    flags = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)


@dataclass(frozen=True)
class Prefix:
    """What a batch computes before a change at layer ``upto``, kept so later forwards can resume.

    A change made after layer ``upto`` at position ``start[r]`` of row ``r`` cannot alter layers
    ``0..upto`` nor any position before ``start[r]`` (causal attention). So a resumed forward
    (:func:`run_skipping`) replays layer ``upto``'s output and computes only layers above it at
    positions ``>= start[r]``; those positions attend to the earlier ones through the cached
    attention keys/values, left-padded to a common length ``P`` (``past_mask``). ``upto == -1``
    (from :func:`prefix_of`): no layer is skipped, ``top`` is layer 0's input.

    States are in *suffix layout*: column ``i`` of row ``r`` is position ``start[r] + i``.
    ``batch`` holds the suffix tokens (right padded), ``top`` layer ``upto``'s output there.
    """

    upto: int
    start: torch.Tensor  # [R] long
    batch: Batch
    positions: torch.Tensor  # [R, W] true position of each suffix column (padding: the row's last)
    # layer ``upto``'s output as it returns it (tensor or tuple), its states in suffix layout
    top: torch.Tensor | tuple[Any, ...]
    past_mask: torch.Tensor  # [R, P]
    # per layer [R, heads, P, head_dim]; None for layers 1..upto (skipped: never read); () when P == 0
    keys: tuple[torch.Tensor | None, ...]
    values: tuple[torch.Tensor | None, ...]

    def select(self, rows: torch.Tensor) -> Prefix:
        """The prefix of ``rows`` only (suffix width trimmed to them)."""
        width = int(self.batch.attention_mask[rows.to(self.batch.attention_mask.device)].sum(-1).max())

        def cut(x: torch.Tensor) -> torch.Tensor:
            return x[rows.to(x.device), :width]

        def past(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows.to(x.device)]

        b, n = self.batch, len(self.start)
        top = (cut(self.top[0]), *(_pick_rows(x, rows, n) for x in self.top[1:])) \
            if isinstance(self.top, tuple) else cut(self.top)
        return Prefix(self.upto, self.start[rows], Batch(cut(b.input_ids), cut(b.attention_mask),
                                                          tuple(b.prompts[i] for i in rows.tolist())),
                      cut(self.positions), top, self.past_mask[rows.to(self.past_mask.device)],
                      tuple(map(past, self.keys)), tuple(map(past, self.values)))

    def inputs(self, model: KVModel, joins: Sequence[Prefix] = ()) -> dict[str, Any]:
        """Forward keyword arguments: suffix ids, past + suffix mask, true positions, a fresh cache.

        With ``joins`` (:func:`run_skipping`), ids, mask and positions are one row (every row shares
        them; they broadcast over the states, whose rows grow as joined rows enter), and the cache
        of each layer holds the past of the rows computed there: this prefix's, then each join's
        above its top.
        """
        b = self.batch
        dev = b.input_ids.device
        rows = slice(0, 1) if joins else slice(None)
        out: dict[str, Any] = {"input_ids": b.input_ids[rows],
                               "attention_mask": torch.cat([self.past_mask[rows].to(dev), b.attention_mask[rows]], 1),
                               "position_ids": self.positions[rows].to(dev)}
        if self.keys:
            k0, v0 = self.keys[0], self.values[0]
            if k0 is None or v0 is None:  # prefix_run and prefix_of always keep layer 0's past
                raise ValueError("this prefix holds no cached keys/values for layer 0: build it with prefix_run "
                                 "or prefix_of")
            cache = DynamicCache(config=model.config)
            for layer in range(len(self.keys)):
                computed = [p for p in (self, *joins) if p.upto < layer]  # their past there is kept
                keys = [k for p in computed if (k := p.keys[layer]) is not None]
                values = [v for p in computed if (v := p.values[layer]) is not None]
                # skipped layers hold layer 0's past: never read, but the cache reports its length
                cache.update(torch.cat(keys) if keys else k0, torch.cat(values) if values else v0, layer)
            out["cache"] = cache
            out["use_cache"] = True
        return out


def _pick_rows(x: Any, rows: torch.Tensor, n: int) -> Any:
    """``x[rows]`` if ``x`` is a tensor over the ``n`` rows of a batch, else ``x`` (e.g. ``None``)."""
    return x[rows.to(x.device)] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n else x


def attention_window(model: KVModel) -> int | None:
    """The smallest sliding attention window of any layer (None: every layer attends to all)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _starts(model: KVModel, batch: Batch, rows: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """Resume positions of ``batch``'s rows ``rows`` (default 0), checked to lie inside each prompt.

    With a sliding attention window no longer than the batch they are all 0 (the cached
    keys/values would be cut to the window): only the layers are skipped.
    """
    lengths = batch.lengths.cpu()[rows]
    start = torch.zeros(len(rows), dtype=torch.long) if start is None else torch.as_tensor(start).long().cpu()
    if len(start) != len(rows) or bool((start < 0).any()) or bool((start >= lengths).any()):
        raise ValueError(f"prefix start positions must lie inside each prompt (lengths {lengths.tolist()}), "
                         f"got {start.tolist()}")
    window = attention_window(model)
    if window is not None and window <= batch.input_ids.shape[1] + 1:
        return torch.zeros_like(start)
    return start


def _cut(batch: Batch, rows: torch.Tensor, upto: int, start: torch.Tensor, top: torch.Tensor,
         tail: tuple[Any, ...] | None, keys: Sequence[torch.Tensor] | None,
         values: Sequence[torch.Tensor] | None) -> Prefix:
    """The :class:`Prefix` of rows ``rows`` of ``batch`` from positions ``start``, out of one forward of ``batch``.

    ``top`` ``[B, T, d]`` is layer ``upto``'s output state and ``tail`` what the layer returns after
    it (``None``: the layer returns a tensor); ``keys``/``values`` the attention cache per layer
    (``[B, heads, T, head_dim]``; ``None`` when no position precedes ``start``).
    """
    dev = batch.input_ids.device
    lengths = batch.lengths.cpu()[rows]
    past_len, width = int(start.max()), int((lengths - start).max())
    suffix = (start.view(-1, 1) + torch.arange(width)).to(dev)
    suffix_mask = (suffix < lengths.to(dev).view(-1, 1)).long()
    suffix = torch.minimum(suffix, (lengths - 1).to(dev).view(-1, 1))
    past = (start.view(-1, 1) - past_len + torch.arange(past_len)).to(dev)
    index = past.clamp_min(0).view(len(rows), 1, past_len, 1)

    def gather(x: torch.Tensor, j: int) -> torch.Tensor | None:
        if 0 < j <= upto:  # a skipped layer: never read
            return None
        x = x[rows.to(x.device)]
        return x.gather(2, index.to(x.device).expand(-1, x.shape[1], -1, x.shape[3]))

    kept_keys: tuple[torch.Tensor | None, ...] = ()
    kept_values: tuple[torch.Tensor | None, ...] = ()
    if past_len > 0 and keys is not None and values is not None:
        kept_keys = tuple(gather(x, j) for j, x in enumerate(keys))
        kept_values = tuple(gather(x, j) for j, x in enumerate(values))
    src = rows.to(dev).view(-1, 1)
    ids = batch.input_ids[src, suffix] * suffix_mask
    head = top[src.to(top.device), suffix.to(top.device)]
    kept_top = head if tail is None else (head, *(_pick_rows(x, rows, len(batch)) for x in tail))
    return Prefix(upto, start, Batch(ids, suffix_mask, tuple(batch.prompts[i] for i in rows.tolist())), suffix,
                  kept_top, (past >= 0).long(), kept_keys, kept_values)


def _cached(layer: object, name: str, j: int) -> torch.Tensor:
    """The ``keys``/``values`` tensor of one layer of a transformers cache (a clear error if none)."""
    x = getattr(layer, name, None)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer {j}'s attention cache holds no {name} tensor "
                        f"({type(layer).__name__}): its prefix cannot be kept")
    return x


def prefix_run(model: KVModel, batch: Batch, upto: int, start: torch.Tensor | None = None) -> Prefix:
    """Run ``batch`` once (no grad) and keep what a change after layer ``upto`` at ``start`` leaves fixed.

    ``start[r]`` (default 0: only the layers are skipped) must lie inside row ``r``'s prompt. With
    a sliding attention window no longer than the batch, positions are not skipped (the cached
    keys/values would be cut to the window): only the layers are. The model's standing writes
    (:func:`standing`) up to the top are applied; :func:`run_skipping` applies those above.
    """
    upto, n = model.check_layer(upto), model.n_layers
    rows = torch.arange(len(batch))
    start = _starts(model, batch, rows, start)
    cache = DynamicCache(config=model.config) if int(start.max()) > 0 else None
    top_site = Site("resid", upto)
    write = {s: fn for s, fn in with_standing(model, None).items() if s.order(n) <= top_site.order(n)}
    sites = set(write) | {top_site}
    if cache is not None:  # reading the last layer makes nnsight run every layer and fill the cache
        sites.add(Site("resid", n - 1))
    steps = _steps(model, sorted(sites, key=lambda s: s.order(n)), {top_site}, write)
    inputs = {**batch.inputs(), "cache": cache, "use_cache": cache is not None}
    heads, tails, _ = _forward(model, inputs, steps, stop=True)
    keys = values = None
    if cache is not None:
        keys = [_cached(cache.layers[j], "keys", j) for j in range(n)]
        values = [_cached(cache.layers[j], "values", j) for j in range(n)]
    return _cut(batch, rows, upto, start, heads[0], tails[0], keys, values)


def prefix_of(model: KVModel, rec: Record, batch: Batch, upto: int, start: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> Prefix:
    """The :class:`Prefix` :func:`prefix_run` would make, out of a recorded forward of ``batch``: no forward.

    Row ``r`` of the prefix continues row ``rows[r]`` of ``rec`` (:func:`record` of ``batch``;
    default: each row once, repeat a row to resume it under several changes) from position
    ``start[r]`` (default 0), replaying the output of layer ``upto`` (``-1``: nothing is skipped,
    the top is layer 0's input). Layers up to the top hold what the record computed, its writes
    and standing writes included.
    """
    if isinstance(upto, bool) or not isinstance(upto, int) or not -1 <= upto < model.n_layers:
        raise IndexError(f"upto must be a layer (-1..{model.n_layers - 1}), got {upto!r}")
    rows = torch.arange(len(batch)) if rows is None else torch.as_tensor(rows).long().cpu()
    start = _starts(model, batch, rows, start)
    top, tail = (rec.resid_in, None) if upto < 0 else (rec.resid[upto], rec.tails[upto])
    return _cut(batch, rows, upto, start, top, tail, rec.keys, rec.values)


def _check_joins(prefix: Prefix, joins: Sequence[Prefix]) -> None:
    """Joined rows must enter above the top and share every row's positions and masks."""
    ref = (prefix.positions[:1], prefix.past_mask[:1], prefix.batch.attention_mask[:1])
    for p in (prefix, *joins):
        same = [torch.equal(x, r.expand_as(x)) for x, r in zip((p.positions, p.past_mask, p.batch.attention_mask), ref)
                if x.shape[1:] == r.shape[1:]]
        if len(same) < 3 or not all(same):
            raise ValueError("joined rows must share their positions with every row of the prefix "
                             "(prefix_of with one start position for all rows)")
        if p is not prefix and p.upto <= prefix.upto:
            raise ValueError(f"a joined prefix must replay a layer above the prefix's ({prefix.upto}), got {p.upto}")


def _concat(first: torch.Tensor | tuple[Any, ...], *more: torch.Tensor | tuple[Any, ...]) -> Write:
    """A write appending the rows of ``more`` (prefix tops: tensors or layer outputs) to the state (torch only)."""
    heads = [m[0] if isinstance(m, tuple) else m for m in (first, *more)]

    def join(state: torch.Tensor) -> torch.Tensor:
        return torch.cat([state, *(h.to(state.device, state.dtype) for h in heads)])

    return join


def run_skipping(model: KVModel, prefix: Prefix, *, top: Write, write: Mapping[Site, Write] | None = None,
                 read: Iterable[Site] = (), joins: Sequence[Prefix] = (), grad: bool = False,
                 stop: bool = False) -> dict[Site, torch.Tensor]:
    """Resume ``prefix``: layers ``0..prefix.upto`` replay its cached output, the rest computes.

    The replayed state first goes through ``top`` (e.g. :func:`add_at` with a leaf ``delta``, or
    :func:`replace_at` restoring a state), so states above depend on it and can carry gradients.
    ``write`` rewrites states above the top as in :func:`run` (after the model's standing writes
    there; those below are part of the prefix). Writes see states in suffix layout: position ``p``
    of row ``r`` is column ``p - start[r]``. ``read`` names sites above the top (or the top
    itself: the replayed state); the states returned are in suffix layout.

    ``joins``: prefixes of more rows with the same positions (:func:`prefix_of` with one start
    position) and tops above ``prefix.upto``. A join's rows are appended to the batch at the
    output of its ``upto`` layer (before any write there), so every row computes only the layers
    above its own top: rows resumed from different layers share one forward. Row order: the
    prefix's, then each join's; writes and reads see the rows present at their site.
    """
    n = model.n_layers
    first = Site("resid", prefix.upto) if prefix.upto >= 0 else Site("resid_pre", 0)
    read, writes = set(read), dict(write or {})
    for site, verb in [*((s, "read") for s in read), *((s, "write") for s in writes)]:
        if site.order(n) < first.order(n) or (verb == "write" and site == first):
            raise ValueError(f"cannot {verb} {site}: layers 0..{prefix.upto} are replayed from the prefix "
                             "(change the replayed state with top)")
    above = {s: fn for s, fn in with_standing(model, writes).items() if s.order(n) > first.order(n)}
    joins = sorted(joins, key=lambda p: p.upto)
    if joins:
        _check_joins(prefix, joins)
    for upto in sorted({p.upto for p in joins}):
        site, join = Site("resid", upto), _concat(*(p.top for p in joins if p.upto == upto))
        above[site] = _then(join, above[site]) if site in above else join
    state = prefix.top[0] if isinstance(prefix.top, tuple) else prefix.top
    replayed = top(state)
    skips: list[tuple[Any, Any]] = []
    if prefix.upto >= 0:  # below the top nothing reads them: all replay the top output
        out = (replayed, *prefix.top[1:]) if isinstance(prefix.top, tuple) else replayed
        skips = [(model.envoy(Site("resid", j))[0], out) for j in range(prefix.upto + 1)]
    else:
        above[first] = lambda _state: replayed  # layer 0's input is the replayed state
    sites = sorted(read | set(above), key=lambda s: s.order(n))
    heads, _, _ = _forward(model, prefix.inputs(model, joins), _steps(model, sites, read, above), skips=skips,
                           grad=grad, stop=stop)
    return dict(zip([s for s in sites if s in read], heads))


def with_trace_options(model: KVModel, *, remote: Remote) -> KVModel:
    """A shallow copy of ``model`` whose forwards through this seam run at ``remote`` (:data:`Remote`).

    E.g. ``with_trace_options(model, remote=True)`` sends every forward of :func:`run` to NDIF
    (the model must be one NDIF hosts, with an API key set up as nnsight documents). The
    original model is not changed.
    """
    import copy

    trace_options(model, remote)  # checks the value
    view = copy.copy(model)
    view.remote = remote
    return view
