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
    steps = _steps(model, sites, read, write)
    options = trace_options(model, remote)
    if grad and options:
        raise ValueError("gradients through a remote trace are not supported: run grad=True locally")
    grad_mode = torch.enable_grad() if grad else torch.no_grad()
    with remote_errors(options), grad_mode, model.nn.trace(**batch.inputs(), **options) as tracer:
        saved = nnsight.save([])
        for envoy, attr, fn, keep in steps:
            value = getattr(envoy, attr)
            head = value[0] if isinstance(value, tuple) else value
            if fn is not None:
                head = fn(head)
                setattr(envoy, attr, (head, *value[1:]) if isinstance(value, tuple) else head)
            if keep:
                saved.append(head)
        if stop:
            tracer.stop()
    kept = [site for site in sites if site in read]
    return dict(zip(kept, saved))


@dataclass
class Record:
    """Every state of one forward: layer 0's input, per-layer attention / MLP / layer outputs,
    the unembedding output (``head``), the model's logits and its attention cache.

    ``keys[l]``/``values[l]`` are ``[B, heads, T, head_dim]``.
    """

    resid_in: torch.Tensor
    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    resid: list[torch.Tensor]
    head: torch.Tensor
    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def record(model: KVModel, batch: Batch, *, write: Mapping[Site, Write] | None = None,
           remote: Remote | None = None) -> Record:
    """One forward of ``batch`` (with ``write`` applied) recording every state and the cache."""
    n = model.n_layers
    write = with_standing(model, write)
    sites = [Site(k, j) for j in range(n) for k in ("attn", "mlp", "resid")] + [Site("logits")]
    sites = sorted(set(sites) | set(write), key=lambda s: s.order(n))
    first = next(i for i, s in enumerate(sites) if s.kind != "embed")  # layer 0's input comes just before
    steps = _steps(model, sites, set(sites), write)
    layer0 = model.envoy(Site("resid", 0))[0]
    root, options = model.nn, trace_options(model, remote)
    with remote_errors(options), torch.no_grad(), root.trace(**batch.inputs(), use_cache=True, **options):
        saved = nnsight.save([])
        for i, (envoy, attr, fn, _keep) in enumerate(steps):
            if i == first:
                resid_in = nnsight.save(layer0.input)
            value = getattr(envoy, attr)
            head = value[0] if isinstance(value, tuple) else value
            if fn is not None:
                head = fn(head)
                setattr(envoy, attr, (head, *value[1:]) if isinstance(value, tuple) else head)
            saved.append(head)
        out = nnsight.save(root.output)
    states = dict(zip(sites, saved))
    cache = out.cache
    attn, mlp, resid = ([states[Site(k, j)] for j in range(n)] for k in ("attn", "mlp", "resid"))
    return Record(resid_in, attn, mlp, resid, states[Site("logits")], out.logits,
                  [cache.layers[j].keys for j in range(n)], [cache.layers[j].values for j in range(n)])


def final_normed(model: KVModel, states: torch.Tensor) -> torch.Tensor:
    """The model's final norm applied to residual ``states`` ``[..., d_model]`` (in the model's dtype).

    A module of the model applied on its own, here in the seam like every other forward; it keeps
    autograd graphs (the z-stage loss back-propagates through it). On a model without local weights
    the module is the local copy :meth:`KVModel.module` reads through a trace.
    """
    return model.final_norm(states.to(model.device, model.dtype))


def logits_of(model: KVModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from last-layer residual states: the final norm, then the unembedding (what the
    ``logits`` site reads, before any post-processing a family adds, e.g. Gemma 2's soft-capping)."""
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
    attention keys/values, left-padded to a common length ``P`` (``past_mask``).

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

        def pick(x: Any) -> Any:  # the other outputs of the layer (e.g. GPT-J's attention weights)
            return x[rows.to(x.device)] if isinstance(x, torch.Tensor) and x.shape[0] == len(self.start) else x

        def past(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows.to(x.device)]

        b = self.batch
        top = (cut(self.top[0]), *map(pick, self.top[1:])) if isinstance(self.top, tuple) else cut(self.top)
        return Prefix(self.upto, self.start[rows], Batch(cut(b.input_ids), cut(b.attention_mask),
                                                          tuple(b.prompts[i] for i in rows.tolist())),
                      cut(self.positions), top, self.past_mask[rows.to(self.past_mask.device)],
                      tuple(map(past, self.keys)), tuple(map(past, self.values)))

    def inputs(self, model: KVModel) -> dict[str, Any]:
        """Forward keyword arguments: suffix ids, past + suffix mask, true positions, a fresh cache."""
        b = self.batch
        dev = b.input_ids.device
        out: dict[str, Any] = {"input_ids": b.input_ids,
                               "attention_mask": torch.cat([self.past_mask.to(dev), b.attention_mask], 1),
                               "position_ids": self.positions.to(dev)}
        if self.keys:
            k0, v0 = self.keys[0], self.values[0]
            if k0 is None or v0 is None:  # prefix_run always keeps layer 0's past
                raise ValueError("this prefix holds no cached keys/values for layer 0: build it with prefix_run")
            cache = DynamicCache(config=model.config)
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                # skipped layers hold layer 0's past: never read, but the cache reports its length
                cache.update(k0 if k is None else k, v0 if v is None else v, layer)
            out["cache"] = cache
            out["use_cache"] = True
        return out


def attention_window(model: KVModel) -> int | None:
    """The smallest sliding attention window of any layer (None: every layer attends to all)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def prefix_run(model: KVModel, batch: Batch, upto: int, start: torch.Tensor | None = None) -> Prefix:
    """Run ``batch`` once (no grad) and keep what a change after layer ``upto`` at ``start`` leaves fixed.

    ``start[r]`` (default 0: only the layers are skipped) must lie inside row ``r``'s prompt. With
    a sliding attention window no longer than the batch, positions are not skipped (the cached
    keys/values would be cut to the window): only the layers are.
    """
    upto = model.check_layer(upto)
    lengths = batch.lengths.cpu()
    start = torch.zeros(len(batch), dtype=torch.long) if start is None else torch.as_tensor(start).long().cpu()
    if len(start) != len(batch) or bool((start < 0).any()) or bool((start >= lengths).any()):
        raise ValueError(f"prefix start positions must lie inside each prompt (lengths {lengths.tolist()}), "
                         f"got {start.tolist()}")
    window = attention_window(model)
    if window is not None and window <= batch.input_ids.shape[1] + 1:
        start = torch.zeros_like(start)
    past_len, width = int(start.max()), int((lengths - start).max())
    cache = DynamicCache(config=model.config) if past_len > 0 else None
    last = Site("resid", model.n_layers - 1)
    with torch.no_grad(), model.nn.trace(**batch.inputs(), cache=cache, use_cache=cache is not None) as tracer:
        envoy, _ = model.envoy(Site("resid", upto))
        top = nnsight.save(envoy.output)
        if cache is not None and upto < last.layer:  # every layer fills the cache; the head is not needed
            model.envoy(last)[0].output  # noqa: B018 (reading it makes nnsight run every layer and fill the cache)
        tracer.stop()
    dev = batch.input_ids.device
    suffix = (start.view(-1, 1) + torch.arange(width)).to(dev)
    suffix_mask = (suffix < lengths.to(dev).view(-1, 1)).long()
    suffix = torch.minimum(suffix, (lengths - 1).to(dev).view(-1, 1))
    past = (start.view(-1, 1) - past_len + torch.arange(past_len)).to(dev)
    past_mask = (past >= 0).long()
    keys: tuple[torch.Tensor | None, ...] = ()
    values: tuple[torch.Tensor | None, ...] = ()
    if cache is not None:
        index = past.clamp_min(0).view(len(batch), 1, past_len, 1)

        def gather(layer: object, name: str, j: int) -> torch.Tensor:
            x = getattr(layer, name, None)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"layer {j}'s attention cache holds no {name} tensor "
                                f"({type(layer).__name__}): its prefix cannot be kept")
            return x.gather(2, index.expand(-1, x.shape[1], -1, x.shape[3]))

        kept = [j == 0 or j > upto for j in range(model.n_layers)]
        keys = tuple(gather(cache.layers[j], "keys", j) if kept[j] else None for j in range(model.n_layers))
        values = tuple(gather(cache.layers[j], "values", j) if kept[j] else None for j in range(model.n_layers))
    ids = batch.input_ids.gather(1, suffix) * suffix_mask
    rows = torch.arange(len(batch), device=dev).view(-1, 1)
    top = (top[0][rows, suffix], *top[1:]) if isinstance(top, tuple) else top[rows, suffix]
    return Prefix(upto, start, Batch(ids, suffix_mask, batch.prompts), suffix, top, past_mask, keys, values)


def run_skipping(model: KVModel, prefix: Prefix, *, top: Write, read: Iterable[Site] = (),
                 grad: bool = False, stop: bool = False) -> dict[Site, torch.Tensor]:
    """Resume ``prefix``: layers ``0..prefix.upto`` replay its cached output, the rest computes.

    The replayed state first goes through ``top`` (e.g. :func:`add_at` with a leaf ``delta``; in
    suffix layout, so position ``p`` of row ``r`` is column ``p - start[r]``), so states above
    depend on it and can carry gradients.
    MEMIT's z optimisation needs only this part. ``read`` must name sites above ``prefix.upto``;
    the states returned are in suffix layout.
    """
    last = prefix.upto
    read = sorted(set(read), key=lambda s: s.order(model.n_layers))
    for site in read:
        if site.kind != "logits" and site.layer <= last:
            raise ValueError(f"cannot read {site}: layers 0..{last} are skipped")
    out = prefix.top
    out = (top(out[0]), *out[1:]) if isinstance(out, tuple) else top(out)
    saved: dict[Site, torch.Tensor] = {}
    grad_mode = torch.enable_grad() if grad else torch.no_grad()
    with grad_mode, model.nn.trace(**prefix.inputs(model)) as tracer:
        for layer in range(last + 1):  # below the top nothing reads them: all replay the top output
            envoy, _ = model.envoy(Site("resid", layer))
            envoy.skip(out)
        for site in read:
            envoy, attr = model.envoy(site)
            value = getattr(envoy, attr)
            saved[site] = nnsight.save(value[0] if isinstance(value, tuple) else value)
        if stop:
            tracer.stop()
    return saved


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
