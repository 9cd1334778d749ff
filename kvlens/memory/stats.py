"""Second-moment statistics of keys: C = E[k kᵀ] of the value projection's input (MEMIT Eq. 15).

ROME's u = C⁻¹k* and MEMIT's ΔW = R Kᵀ(λC + K Kᵀ)⁻¹ need C per edited layer. It is streamed over
a text corpus in small batches (memory stays at one ``[d_ff, d_ff]`` float64 accumulator per
layer), with a progress bar and ETA, all requested layers in one pass that stops above the
highest one. Results are cached on disk as safetensors keyed by the model's fingerprint, layer,
corpus id, token count and dtype, with a SHA-256 of the tensor checked on load. Nothing is
downloaded: the default corpus is the bundled Wikipedia sample (:func:`kvlens.corpus.bundled`).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from kvlens import tracing
from kvlens.corpus import Corpus, batches, bundled, head_ids
from kvlens.errors import BadStatistics, CorruptCache
from kvlens.fileio import atomic_path
from kvlens.models.kvmodel import KVModel, Site
from kvlens.models.loading import cache_dir

#: Below this many tokens a warning says the estimate is a low-sample one (ROME used 100k samples).
LOW_SAMPLE_TOKENS = 100_000


class StatsCacheError(CorruptCache):
    """A cached statistics file that cannot be trusted (corrupt, truncated, altered)."""


def check_moment(C: torch.Tensor, model: KVModel, layer: int) -> torch.Tensor:
    """``C`` if it is a finite ``[d_ff, d_ff]`` matrix for ``model``; a clear error otherwise."""
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"statistics for layer {layer} must be a tensor, got {type(C).__name__}")
    if tuple(C.shape) != (model.d_ff, model.d_ff):
        raise BadStatistics(f"statistics for layer {layer} have shape {tuple(C.shape)}; "
                         f"{model.name} needs [{model.d_ff}, {model.d_ff}] (d_ff x d_ff)")
    if not bool(torch.isfinite(C).all()):
        raise BadStatistics(f"statistics for layer {layer} contain NaN or Inf")
    return C


#: Relative tolerances of :func:`check_second_moment`: asymmetry, and negative eigenvalues (rounding).
_ASYMMETRY_TOL = 1e-4
_NEGATIVE_TOL = 1e-6


def check_second_moment(C: torch.Tensor, layer: int, *, invertible: bool = True) -> None:
    """Refuse a C that cannot be E[kkᵀ] (asymmetric, not positive semi-definite) or, when
    ``invertible``, cannot be solved with (ROME's u = C⁻¹k*, Eq. 2; MEMIT's (λC + KKᵀ)⁻¹, Eq. 14).

    A Cholesky factorisation (float64) proves positive definiteness cheaply; only when it fails
    are the eigenvalues computed, to say which property is missing.
    """
    C64 = C.detach().double().cpu()
    scale = float(C64.abs().max())
    asym = float((C64 - C64.T).abs().max())
    if asym > _ASYMMETRY_TOL * max(scale, 1e-30):
        raise BadStatistics(
            f"statistics for layer {layer} are not symmetric (max |C - Cᵀ| = {asym:.3g}, max |C| = {scale:.3g}), "
            "so they cannot be a second moment E[kkᵀ]; pass what kvlens.memory.stats.second_moments "
            "returns (or stats=None to compute them)")
    if int(torch.linalg.cholesky_ex(C64).info) == 0:
        return
    eig = torch.linalg.eigvalsh(C64)
    lo, hi = float(eig[0]), float(eig[-1])
    if lo < -_NEGATIVE_TOL * max(abs(hi), abs(lo)):
        raise BadStatistics(
            f"statistics for layer {layer} are not positive semi-definite (smallest eigenvalue {lo:.3g}, "
            f"largest {hi:.3g}), so they cannot be a second moment E[kkᵀ]; pass what "
            "kvlens.memory.stats.second_moments returns (or stats=None to compute them)")
    if invertible:
        ratio = lo / hi if hi > 0 else 0.0
        raise BadStatistics(
            f"statistics for layer {layer} are singular or nearly so (smallest/largest eigenvalue "
            f"{ratio:.1e}, size {C.shape[0]}): C⁻¹ cannot be computed. Collect them over more tokens "
            f"(n_tokens / the method's stats_tokens, well above d_ff = {C.shape[0]}; ROME used 100k), "
            "or use ROME(mom2_adjustment=False), or AlphaEdit, which accepts a singular C")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def cache_path(model: KVModel, layer: int, corpus: Corpus, n_tokens: int, dtype: torch.dtype,
               root: Path | None = None, window: int = 128) -> Path:
    """Where the statistics of ``layer`` are cached (everything they depend on is in the path:
    the weights its keys depend on (:meth:`KVModel.keys_fingerprint`), prompt prefix, corpus, token
    count, window length and dtype)."""
    fp = model.keys_fingerprint(layer)[:16]
    prefix = hashlib.sha256(model.prefix.encode()).hexdigest()[:8]
    name = str(dtype).replace("torch.", "")
    return (root or cache_dir()) / "stats" / f"{model.spec.model_type}-{fp}-{prefix}" / corpus.id / \
        f"layer{layer}_{name}_{n_tokens}_w{window}.safetensors"


def load_moment(path: Path) -> torch.Tensor:
    """Read a cached C, checking that it is a safetensors file whose checksum matches."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        C = load_file(str(path))["C"]
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise StatsCacheError(f"statistics cache {path} is unreadable ({exc}); delete it to recompute") from None
    if meta.get("sha256") != _digest(C):
        raise StatsCacheError(f"statistics cache {path} fails its checksum; delete it to recompute")
    if not bool(torch.isfinite(C).all()):
        raise StatsCacheError(f"statistics cache {path} contains NaN/Inf; delete it to recompute")
    return C


def _save_moment(path: Path, C: torch.Tensor, n_seen: int, corpus: Corpus) -> None:
    from safetensors import torch as st

    # each writer its own temporary file, renamed atomically: an interrupted or concurrent write
    # never leaves a half file under the real name
    with atomic_path(path, make_parents=True) as tmp:
        st.save_file({"C": C.contiguous()}, str(tmp),
                     metadata={"sha256": _digest(C), "tokens": str(n_seen), "corpus": corpus.name})


def _accumulate(model: KVModel, layers: Sequence[int], corpus: Corpus, n_tokens: int, batch_size: int,
                window: int, progress: bool) -> tuple[dict[int, torch.Tensor], int, float]:
    """Σ k kᵀ (float64) per layer over ``n_tokens`` corpus tokens; returns sums, count, seconds."""
    from tqdm.auto import tqdm

    sites = [Site("key", layer) for layer in layers]
    sums = {l: torch.zeros(model.d_ff, model.d_ff, dtype=torch.float64, device=model.device) for l in layers}
    skip, seen, start = len(head_ids(model)), 0, time.perf_counter()
    bar = tqdm(total=n_tokens, unit="tok", desc=f"E[kkᵀ] layers {list(layers)}", disable=not progress)
    for batch in batches(model, corpus, batch_size=batch_size, window=window, max_tokens=n_tokens):
        states = tracing.run(model, batch, read=sites, stop=True)
        mask = batch.attention_mask.bool().clone()
        mask[:, :skip] = False  # the BOS/prefix tokens are not text
        for site, s in states.items():
            k = s[mask.to(s.device)].to(torch.float64)
            sums[site.layer].addmm_(k.T, k)
        n = int(mask.sum())
        seen += n
        bar.update(n)
    bar.close()
    if seen == 0:
        raise ValueError(f"corpus {corpus.name!r} gave no tokens")
    return sums, seen, time.perf_counter() - start


def second_moments(model: KVModel, layers: Sequence[int], corpus: Corpus | None = None, *,
                   n_tokens: int = LOW_SAMPLE_TOKENS, batch_size: int = 8, window: int = 128,
                   dtype: torch.dtype = torch.float32, cache: bool = True, progress: bool = True,
                   cache_root: Path | None = None) -> dict[int, torch.Tensor]:
    """C_l = E[k kᵀ] (uncentered) of the key activation at each of ``layers``, ``[d_ff, d_ff]``.

    Args:
        model: the model (its current weights: each layer's cache key includes the fingerprint of
            the weights its keys depend on).
        layers: layers to collect; cached ones are loaded, the rest computed in one pass.
        corpus: text to stream (default: the bundled Wikipedia sample; for users, e.g.
            ``kvlens.corpus.from_datasets("wikitext", "wikitext-103-raw-v1")``).
        n_tokens: tokens to average over; fewer than 100k warns (low-sample mode).
        batch_size, window: documents per forward and tokens per document window (memory knobs).
        dtype: storage dtype of C (accumulated in float64).
        cache: read/write the on-disk cache.
    """
    model.require_local("second_moments (statistics over a corpus)")
    layers = sorted({model.check_layer(l) for l in layers})
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    corpus = corpus or bundled()
    if n_tokens < LOW_SAMPLE_TOKENS:
        warnings.warn(f"low-sample statistics: E[kkᵀ] from {n_tokens} tokens (< {LOW_SAMPLE_TOKENS}); "
                      "edits will be noisier than with the usual 100k samples", stacklevel=2)
    out: dict[int, torch.Tensor] = {}
    paths = {l: cache_path(model, l, corpus, n_tokens, dtype, cache_root, window) for l in layers} if cache else {}
    for layer, path in paths.items():
        if path.exists():
            try:
                out[layer] = check_moment(load_moment(path), model, layer)
            except BadStatistics as exc:
                raise StatsCacheError(f"statistics cache {path}: {exc}; delete it to recompute") from None
    todo = [l for l in layers if l not in out]
    if todo:
        sums, seen, _ = _accumulate(model, todo, corpus, n_tokens, batch_size, window, progress)
        for layer in todo:
            out[layer] = check_moment((sums[layer] / seen).to(dtype).cpu(), model, layer)
            if cache:
                _save_moment(paths[layer], out[layer], seen, corpus)
    return out


def throughput(model: KVModel, layers: Sequence[int], corpus: Corpus | None = None, *,
               n_tokens: int = 10_000, batch_size: int = 8) -> dict[str, float]:
    """Tokens per second of statistics collection for ``layers`` (no cache), for benchmarks."""
    _, seen, seconds = _accumulate(model, sorted(layers), corpus or bundled(), n_tokens, batch_size, 128, False)
    return {"tokens": float(seen), "seconds": seconds, "tokens_per_s": seen / seconds}


def resolve_moments(model: KVModel, layers: Sequence[int], stats: Mapping[int, torch.Tensor] | None,
                    corpus: Corpus | None, n_tokens: int, *, invertible: bool = True) -> dict[int, torch.Tensor]:
    """Given statistics or ones computed/cached for ``layers``, each checked by
    :func:`check_second_moment` (``invertible``: ROME and MEMIT solve with C; AlphaEdit does not)."""
    if stats is None:
        out = second_moments(model, layers, corpus, n_tokens=n_tokens)
    else:
        missing = [l for l in layers if l not in stats]
        if missing:
            raise BadStatistics(f"statistics are missing for layers {missing}")
        out = {l: check_moment(stats[l], model, l).float().cpu() for l in layers}
    for layer in layers:
        check_second_moment(out[layer], layer, invertible=invertible)
    return out
