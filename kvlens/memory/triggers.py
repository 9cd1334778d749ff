"""What text triggers a key: the corpus prefixes where a memory fires most (Geva et al. 2021, §3).

For a key ``k_i`` of layer ``l``, a trigger example is a prefix ``x_1..x_j`` of the corpus whose
coefficient ``m_i`` at its last token ``x_j`` (Geva et al. 2021, §3: ``m_i = f(x·k_i)``) is among
the ``n`` highest. The corpus is streamed as fixed token windows (:func:`kvlens.corpus.batches`);
a prefix runs from the start of its window (after the model's BOS/prefix ids) to the token.

Mining keeps, for *every* memory of each layer it reads, a running top-``n`` of
``(coefficient, window, position)`` over windows, each at its best position: memory stays flat
however long the corpus is, and one pass answers "what triggers this key" for all keys of that
layer. Results are cached on disk under
``kvlens.cache_dir()/triggers``, keyed by the model fingerprint, the prefix ids, the corpus id
and the mining parameters; the texts are rebuilt by re-tokenizing the windows that are needed.
The cache files are safetensors (never pickles) with a SHA-256 of their tensors, checked with
their format and shapes on load; each writer writes its own temporary file, renamed atomically.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvlens import tracing
from kvlens.corpus import Corpus, batches, bundled, head_ids, token_windows
from kvlens.errors import CorruptCache
from kvlens.fileio import atomic_path
from kvlens.memory.activations import check_k, check_memory
from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.models.loading import cache_dir

MemoryId = tuple[int, int]


@dataclass(frozen=True)
class TriggerExample:
    """One prefix that makes a key fire: ``ids`` are the model inputs up to the trigger token."""

    coefficient: float
    window: int
    position: int
    ids: list[int]
    text: str
    token: str


@dataclass(frozen=True)
class TriggerExamples:
    """Top trigger examples per memory ``(layer, index)``, highest coefficient first."""

    model_name: str
    corpus_id: str
    n: int
    window: int
    tokens_seen: int
    seconds: float
    from_cache: bool
    examples: dict[MemoryId, list[TriggerExample]]

    def __getitem__(self, memory: MemoryId) -> list[TriggerExample]:
        if memory not in self.examples:
            raise KeyError(f"memory {memory} was not mined; mined: {sorted(self.examples)}")
        return self.examples[memory]

    @property
    def memories(self) -> list[MemoryId]:
        return list(self.examples)


@dataclass
class _TopN:
    """Running top-``n`` over positions, for every memory of one layer at once."""

    values: torch.Tensor  # [n, d_ff]
    window: torch.Tensor  # [n, d_ff] long
    position: torch.Tensor  # [n, d_ff] long

    @classmethod
    def empty(cls, n: int, d_ff: int) -> _TopN:
        return cls(torch.full((n, d_ff), -torch.inf), torch.full((n, d_ff), -1), torch.full((n, d_ff), -1))

    def update(self, coef: torch.Tensor, valid: torch.Tensor, first_window: int) -> None:
        """Merge ``coef`` ``[B, T, d_ff]`` at the ``valid`` ``[B, T]`` positions into the top-``n``.

        Each window counts once per memory, at its position of largest coefficient (as Geva et
        al. keep each sentence's maximum over positions), so one passage cannot fill the top-n.
        """
        peak, where = coef.masked_fill(~valid[..., None], -torch.inf).max(dim=1)  # [B, d_ff]
        top = peak.topk(min(self.values.shape[0], peak.shape[0]), dim=0)
        values = torch.cat([self.values, top.values])
        window = torch.cat([self.window, first_window + top.indices])
        position = torch.cat([self.position, where.gather(0, top.indices)])
        best = values.topk(self.values.shape[0], dim=0).indices
        self.values, self.window, self.position = (values.gather(0, best), window.gather(0, best),
                                                   position.gather(0, best))


#: The ``format`` metadata of a trigger cache file.
CACHE_FORMAT = "kvlens.triggers/1"
_FIELDS = ("values", "window", "position")


def _cache_path(model: KVModel, corpus: Corpus, layer: int, n: int, window: int,
                max_tokens: int | None) -> Path:
    key = hashlib.sha256(f"{model.keys_fingerprint(layer)}|{head_ids(model)}".encode()).hexdigest()[:20]
    name = f"layer{layer}-n{n}-w{window}-t{max_tokens or 'all'}.safetensors"
    return cache_dir() / "triggers" / key / corpus.id / name


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def _save(path: Path, top: _TopN, tokens: int) -> None:
    from safetensors import torch as st

    tensors = {"values": top.values.float().contiguous(), "window": top.window.long().contiguous(),
               "position": top.position.long().contiguous()}
    meta = {"format": CACHE_FORMAT, "tokens": str(tokens), "sha256": _digest(tensors)}
    with atomic_path(path, make_parents=True) as tmp:  # atomic: a crash never leaves a half-written file
        st.save_file(tensors, str(tmp), metadata=meta)


def _load(path: Path, n: int, d_ff: int) -> tuple[_TopN, int]:
    """A cached top-``n`` ``[n, d_ff]`` tracker and its token count; :class:`CorruptCache` if untrustworthy."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    def bad(why: str) -> CorruptCache:
        return CorruptCache(f"trigger-example cache {path} {why}; delete it and kvlens mines the corpus again")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise bad(f"is unreadable ({exc})") from None
    if meta.get("format") != CACHE_FORMAT or set(tensors) != set(_FIELDS):
        raise bad(f"is not a kvlens trigger cache (format {meta.get('format')!r}, tensors {sorted(tensors)})")
    for name, t in tensors.items():
        if tuple(t.shape) != (n, d_ff):
            raise bad(f"holds {name} of shape {tuple(t.shape)}, expected [{n}, {d_ff}] (n x d_ff)")
    if meta.get("sha256") != _digest(tensors) or not meta.get("tokens", "").isdigit():
        raise bad("fails its checksum (it was altered or cut)")
    top = _TopN(tensors["values"], tensors["window"].long(), tensors["position"].long())
    return top, int(meta["tokens"])


def _valid(batch: Batch, n_head: int) -> torch.Tensor:
    """Real tokens after the head ids: ``[B, T]`` bool."""
    cols = torch.arange(batch.input_ids.shape[1], device=batch.attention_mask.device)
    return (batch.attention_mask.bool() & (cols >= n_head)).cpu()


def mine(model: KVModel, layers: Sequence[int], corpus: Corpus, *, n: int = 10, window: int = 64,
         max_tokens: int | None = 50_000, batch_size: int = 8,
         progress: bool = True) -> tuple[dict[int, _TopN], int]:
    """Stream ``corpus`` once, keeping the top-``n`` positions of every memory of ``layers``.

    Returns the per-layer trackers and the number of text tokens read. Each forward stops after
    the highest layer read.
    """
    layers = sorted(set(layers))
    tops = {l: _TopN.empty(n, model.d_ff) for l in layers}
    n_head, seen, first = len(head_ids(model)), 0, 0
    bar = tqdm(total=max_tokens, unit="tok", desc=f"trigger examples L{layers}", disable=not progress)
    for batch in batches(model, corpus, batch_size=batch_size, window=window, max_tokens=max_tokens):
        states = tracing.run(model, batch, read=[Site("key", l) for l in layers], stop=True)
        valid = _valid(batch, n_head)
        for l in layers:
            tops[l].update(states[Site("key", l)].detach().float().cpu(), valid, first)
        step = int(valid.sum())
        seen, first = seen + step, first + len(batch)
        bar.update(step)
    bar.close()
    return tops, seen


def _windows(model: KVModel, corpus: Corpus, needed: set[int], window: int,
             max_tokens: int | None) -> dict[int, list[int]]:
    """The token windows with the given stream indices (re-tokenized; stops at the last one)."""
    out: dict[int, list[int]] = {}
    last = max(needed, default=-1)
    for i, ids in enumerate(token_windows(model, corpus, window=window, max_tokens=max_tokens)):
        if i in needed:
            out[i] = ids
        if i >= last:
            break
    return out


def trigger_examples(model: KVModel, memories: MemoryId | Sequence[MemoryId], corpus: Corpus | None = None, *,
                     n: int = 10, window: int = 64, max_tokens: int | None = 50_000, batch_size: int = 8,
                     cache: bool = True, progress: bool = True) -> TriggerExamples:
    """The top-``n`` corpus prefixes for each memory ``(layer, index)``, highest coefficient first.

    Args:
        memories: one ``(layer, index)`` pair or several.
        corpus: the text to mine (default: :func:`kvlens.corpus.bundled`, English Wikipedia).
        n: examples per memory; window: tokens per window (a prefix's longest context);
        max_tokens: text tokens to read (None: the whole corpus).
        cache: read/write the per-layer results under ``kvlens.cache_dir()/triggers``.
    """
    check_k(n, "n")
    check_k(window, "window")
    single = isinstance(memories, tuple) and len(memories) == 2 and isinstance(memories[0], int)
    pairs: list[Any] = [memories] if single else list(memories)  # (layer, index) pairs, checked below
    if not pairs:
        raise ValueError("memories is empty: pass (layer, index) pairs")
    pairs = [(model.check_layer(l), check_memory(model, l, i)) for l, i in pairs]
    corpus = bundled() if corpus is None else corpus
    start = time.perf_counter()
    tops, seen, hit = _load_or_mine(model, corpus, sorted({l for l, _ in pairs}), n, window, max_tokens,
                                    batch_size, cache, progress)
    needed = {int(w) for l, i in pairs for w in tops[l].window[:, i] if w >= 0}
    windows = _windows(model, corpus, needed, window, max_tokens)
    n_head = len(head_ids(model))
    examples = {}
    for l, i in pairs:
        rows = [(float(v), int(w), int(p)) for v, w, p in
                zip(tops[l].values[:, i], tops[l].window[:, i], tops[l].position[:, i]) if w >= 0]
        examples[(l, i)] = [TriggerExample(v, w, p, windows[w][: p + 1],
                                           model.tokenizer.decode(windows[w][n_head: p + 1]),
                                           model.token_strings([windows[w][p]])[0]) for v, w, p in rows]
    return TriggerExamples(model.name, corpus.id, n, window, seen, time.perf_counter() - start, hit, examples)


def _load_or_mine(model: KVModel, corpus: Corpus, layers: list[int], n: int, window: int,
                  max_tokens: int | None, batch_size: int, cache: bool,
                  progress: bool) -> tuple[dict[int, _TopN], int, bool]:
    """Per-layer trackers from the cache where present; the other layers mined in one pass."""
    paths = {l: _cache_path(model, corpus, l, n, window, max_tokens) for l in layers} if cache else {}
    tops, seen = {}, 0
    for l, path in paths.items():
        if path.is_file():
            tops[l], seen = _load(path, n, model.d_ff)
    missing = [l for l in layers if l not in tops]
    if missing:
        mined, seen = mine(model, missing, corpus, n=n, window=window, max_tokens=max_tokens,
                           batch_size=batch_size, progress=progress)
        tops.update(mined)
        for l in missing:
            if cache:
                _save(paths[l], mined[l], seen)
    return tops, seen, not missing
