"""What values say in vocabulary space (Geva et al. 2021, §4; Geva et al. 2022).

Value ``v_i`` of layer ``l`` induces a distribution over the vocabulary (Geva et al. 2021,
§4): ``p_i = softmax(v_i · E)``, ``E`` the output embedding (unembedding). Only the ranking
is meaningful, since the coefficient ``m_i`` scales the vector. Two readings, named:

* ``norm="none"`` — ``v · Eᵀ``, the raw dot products with the unembedding rows (Geva et al.
  2021/2022 and LM-Debugger, which project values without the final LayerNorm).
* ``norm="final"`` — the model's own head applied to ``v`` as if it were the last residual:
  ``final_norm(v) · Eᵀ + b_E`` (the logit lens reading).
* ``norm="frozen"`` — the final norm with its scale frozen (:class:`FrozenNorm`): ``(γ ⊙ P v / s) · Eᵀ``
  with ``P`` the mean-centring of LayerNorm (identity for RMSNorm). Linear in ``v``, so the parts
  of a residual add up exactly; for a lone value ``s = 1`` (a positive factor, rankings unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kvlens import tracing
from kvlens.memory.activations import check_k, check_layers, check_memory
from kvlens.models.kvmodel import KVModel

Norm = Literal["none", "final", "frozen"]


def check_norm(norm: str) -> str:
    if norm not in ("none", "final", "frozen"):
        raise ValueError(f"norm must be 'none' (raw v·E), 'final' (final norm + unembedding) or 'frozen' "
                         f"(final norm with a frozen scale), got {norm!r}")
    return norm


@dataclass(frozen=True)
class FrozenNorm:
    """The final norm with its scale frozen at a residual ``x``: ``n(c) = γ ⊙ P c / s(x)``.

    ``P`` centres (LayerNorm) or is the identity (RMSNorm); ``s(x) = sqrt(mean((P x)²) + ε)``.
    Since ``n`` is linear, ``Σ_parts n(c) + offset == final_norm(x)`` for any split of ``x``
    into parts (embedding, attention and FFN outputs, single memories ``m_i v_i``).
    """

    gain: torch.Tensor  # γ, [d_model]
    center: bool
    scale: torch.Tensor  # s(x): a scalar tensor (1 for a lone vector)
    offset: torch.Tensor  # β of LayerNorm, zeros for RMSNorm; [d_model]
    eps: float

    def __call__(self, parts: torch.Tensor) -> torch.Tensor:
        parts = parts.float()
        if self.center:
            parts = parts - parts.mean(-1, keepdim=True)
        return self.gain * parts / self.scale

    def at(self, residual: torch.Tensor) -> FrozenNorm:
        """The same norm with its scale frozen at ``residual`` ``[d_model]``."""
        x = residual.float().to(self.gain.device)
        x = x - x.mean() if self.center else x
        scale = torch.sqrt((x * x).mean() + self.eps)
        return FrozenNorm(self.gain, self.center, scale, self.offset, self.eps)


def frozen_norm(model: KVModel, residual: torch.Tensor | None = None) -> FrozenNorm:
    """The model's final norm as a :class:`FrozenNorm` (scale frozen at ``residual``, else 1).

    The form (LayerNorm or RMSNorm, gain ``γ`` or ``1 + γ`` as in Gemma) is checked against the
    module on a probe vector; a norm of another form raises ``NotImplementedError``.
    """
    module = model.final_norm
    weight = getattr(module, "weight", None)
    if weight is None:
        raise NotImplementedError(f"final norm {type(module).__name__} has no weight; use norm='none'")
    bias = getattr(module, "bias", None)
    names = ("eps", "variance_epsilon", "epsilon")
    eps = next((float(getattr(module, a)) for a in names if hasattr(module, a)), 1e-6)
    gain = weight.detach().float()
    offset = torch.zeros_like(gain) if bias is None else bias.detach().float()
    probe = torch.randn(gain.shape[0], generator=torch.Generator().manual_seed(0)).to(gain.device)
    target = apply_final_norm(model, probe[None])[0].to(gain.device)
    for g in (gain, 1.0 + gain):
        for center in (bias is not None, bias is None):
            norm = FrozenNorm(g, center, torch.tensor(1.0), offset, eps).at(probe)
            if torch.allclose(norm(probe) + offset, target, rtol=1e-3, atol=1e-3 * float(target.abs().max())):
                unit = FrozenNorm(g, center, torch.tensor(1.0, device=g.device), offset, eps)
                return unit if residual is None else unit.at(residual)
    raise NotImplementedError(f"kvlens cannot freeze the final norm {type(module).__name__}: it is neither "
                              f"LayerNorm nor RMSNorm; use norm='none'")


def unembedding_matrix(model: KVModel) -> torch.Tensor:
    """The unembedding ``E``: ``[vocab, d_model]`` float32 (row t = output embedding of token t)."""
    return model.unembedding.weight.detach().float()


def unembedding_bias(model: KVModel) -> torch.Tensor | None:
    bias = getattr(model.unembedding, "bias", None)
    return None if bias is None else bias.detach().float()


def apply_final_norm(model: KVModel, states: torch.Tensor) -> torch.Tensor:
    """The model's final norm applied to ``states`` ``[..., d_model]`` (float32 result)."""
    with torch.no_grad():
        return tracing.final_normed(model, states).float()


def to_vocab(model: KVModel, vectors: torch.Tensor, norm: Norm = "none") -> torch.Tensor:
    """Logits ``[..., vocab]`` of residual-space ``vectors`` ``[..., d_model]`` read with ``norm``."""
    check_norm(norm)
    E = unembedding_matrix(model)
    if norm == "none":
        return vectors.to(E.device).float() @ E.T  # v·E: Geva et al. 2021, §4, before the softmax
    if norm == "frozen":
        return frozen_norm(model)(vectors.to(E.device)) @ E.T
    logits = apply_final_norm(model, vectors) @ E.T
    bias = unembedding_bias(model)
    return logits if bias is None else logits + bias


def resolve_token(model: KVModel, token: str | int) -> tuple[int, str]:
    """``(id, text)`` of a single token given as text or id; a clear error otherwise."""
    if isinstance(token, str):
        tid = model.token_id(token)
        return tid, token
    if isinstance(token, bool) or not isinstance(token, int):
        raise TypeError(f"token must be a string or an int id, got {type(token).__name__}")
    if not 0 <= token < model.vocab_size:
        raise IndexError(f"token id {token} is out of range (vocabulary of {model.vocab_size})")
    return token, model.token_strings([token])[0]


@dataclass(frozen=True)
class VocabProjection:
    """Top-``k`` tokens each value of ``layer`` promotes (highest logits) and suppresses (lowest).

    ``top_ids``/``top_scores`` and ``bottom_ids``/``bottom_scores`` are ``[len(memories), k]``,
    sorted from the strongest; ``norm`` names the reading (see the module docstring).
    """

    model_name: str
    layer: int
    memories: list[int]
    norm: str
    top_ids: torch.Tensor
    top_scores: torch.Tensor
    top_tokens: list[list[str]]
    bottom_ids: torch.Tensor
    bottom_scores: torch.Tensor
    bottom_tokens: list[list[str]]

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    def _row(self, memory: int) -> int:
        if memory not in self.memories:
            raise KeyError(f"memory {memory} was not projected; projected memories: {self.memories}")
        return self.memories.index(memory)

    def promoted(self, memory: int) -> list[tuple[str, float]]:
        """``(token, score)`` of the tokens ``memory`` promotes most, strongest first."""
        r = self._row(memory)
        return list(zip(self.top_tokens[r], self.top_scores[r].tolist()))

    def suppressed(self, memory: int) -> list[tuple[str, float]]:
        """``(token, score)`` of the tokens ``memory`` suppresses most, strongest first."""
        r = self._row(memory)
        return list(zip(self.bottom_tokens[r], self.bottom_scores[r].tolist()))

    def rows(self) -> list[dict[str, object]]:
        """One table row per memory: its top promoted and suppressed tokens."""
        return [{"layer": self.layer, "memory": m, "norm": self.norm,
                 "promotes": ", ".join(repr(t) for t in self.top_tokens[r]),
                 "suppresses": ", ".join(repr(t) for t in self.bottom_tokens[r])}
                for r, m in enumerate(self.memories)]


def values(model: KVModel, layer: int, memories: int | Sequence[int], *, k: int = 10,
           norm: Norm = "none", chunk: int = 256) -> VocabProjection:
    """The tokens the values ``memories`` of ``layer`` promote and suppress (Geva et al. 2021, §4).

    Args:
        memories: one memory index or several (rows of ``V(layer)``).
        k: how many tokens to keep on each side.
        norm: ``"none"`` (raw ``v·E``) or ``"final"`` (final norm + unembedding).
        chunk: values projected at a time (bounds memory to ``chunk × vocab`` floats).
    """
    check_k(k)
    check_norm(norm)
    layer = model.check_layer(layer)
    idx = [memories] if isinstance(memories, int) else list(memories)
    if not idx:
        raise ValueError("memories is empty: pass a memory index or a list of them")
    idx = [check_memory(model, layer, m) for m in idx]
    V = model.V(layer).detach()
    k = min(k, model.vocab_size)
    tops, bottoms = [], []
    for start in range(0, len(idx), check_k(chunk, "chunk")):
        logits = to_vocab(model, V[idx[start: start + chunk]].float(), norm)
        tops.append(logits.topk(k, dim=-1))
        bottoms.append((-logits).topk(k, dim=-1))
    top_ids = torch.cat([t.indices for t in tops]).cpu()
    bottom_ids = torch.cat([b.indices for b in bottoms]).cpu()
    return VocabProjection(
        model.name, layer, idx, norm,
        top_ids, torch.cat([t.values for t in tops]).cpu(), [model.token_strings(r) for r in top_ids],
        bottom_ids, -torch.cat([b.values for b in bottoms]).cpu(),
        [model.token_strings(r) for r in bottom_ids],
    )


@dataclass(frozen=True)
class FoundMemory:
    """One value that promotes the token: its score (logit ``r(v)·E[t]`` or z-score) and the token's
    rank (0 = top) among all logits of ``sign(score)·v``."""

    layer: int
    memory: int
    score: float
    rank: int


@dataclass(frozen=True)
class FoundMemories:
    """The values that most promote ``token`` (``found``, best first) and every value's score.

    ``scores[layer]`` is ``[d_ff]``: the score (``by``) of ``token`` for each value of ``layer``.
    """

    model_name: str
    token: str
    token_id: int
    norm: str
    by: str
    found: list[FoundMemory]
    scores: dict[int, torch.Tensor]

    @property
    def memories(self) -> list[tuple[int, int]]:
        return [(f.layer, f.memory) for f in self.found]


def _token_rank(model: KVModel, vector: torch.Tensor, token_id: int, norm: Norm) -> int:
    logits = to_vocab(model, vector[None], norm)[0]
    return int((logits > logits[token_id]).sum())


def _zscores(model: KVModel, vectors: torch.Tensor, logit: torch.Tensor, norm: Norm) -> torch.Tensor:
    """``(logit - mean) / std`` of the token's logit among all logits of each vector, without
    projecting onto the whole vocabulary: ``mean = r(v)·Ē`` and ``var = r(v)ᵀ Cov(E) r(v)``."""
    E = unembedding_matrix(model)
    read = vectors.to(E.device).float()
    if norm == "frozen":
        read = frozen_norm(model)(read)
    elif norm == "final":  # logits = n(v)·E + b: append b as a column of E read with weight 1
        read, bias = apply_final_norm(model, read), unembedding_bias(model)
        if bias is not None:
            E = torch.cat([E, bias[:, None]], 1)
            read = torch.cat([read, torch.ones_like(read[:, :1])], 1)
    mean, cov = E.mean(0), torch.cov(E.T, correction=0)
    return (logit.to(E.device) - read @ mean) / ((read @ cov) * read).sum(-1).clamp_min(1e-12).sqrt()


def find_memories(model: KVModel, token: str | int, layers: Sequence[int] | None = None, *,
                  k: int = 10, norm: Norm = "none", by: Literal["logit", "zscore"] = "logit",
                  both_signs: bool = False) -> FoundMemories:
    """The ``k`` values (over ``layers``, all if None) whose projection most promotes ``token``.

    Scores every value ``v_i`` of every layer by the logit it gives ``token`` (``v_i · E[t]``
    for ``norm="none"``; Geva et al. 2021, §4) — "which memories write ' Paris'?".
    ``token`` is a single-token string (a multi-token string raises, naming its pieces) or an id.
    ``by="zscore"`` ranks by how many standard deviations the token's logit lies above the
    value's mean logit over the vocabulary (specific values first, large generic ones later).
    With ``both_signs`` values are ranked by ``|score|``: in gated (SwiGLU) FFNs coefficients
    take both signs, and a value with a negative score promotes the token when ``m_i < 0``.
    """
    check_k(k)
    check_norm(norm)
    if by not in ("logit", "zscore"):
        raise ValueError(f"by must be 'logit' or 'zscore', got {by!r}")
    chosen = check_layers(model, layers)
    tid, text = resolve_token(model, token)
    scores: dict[int, torch.Tensor] = {}
    for layer in chosen:
        V = model.V(layer).detach().float()
        scores[layer] = to_vocab_column(model, V, tid, norm)
        if by == "zscore":
            scores[layer] = _zscores(model, V, scores[layer], norm)
        scores[layer] = scores[layer].cpu()
    flat = torch.cat([scores[l] for l in chosen])
    best = (flat.abs() if both_signs else flat).topk(min(k, flat.numel())).indices.tolist()
    found = []
    for i in best:
        layer, memory = chosen[i // model.d_ff], i % model.d_ff
        vector = model.V(layer)[memory].detach().float()
        sign = -1.0 if flat[i] < 0 else 1.0  # the rank the token has when the memory writes s·v
        found.append(FoundMemory(layer, memory, float(flat[i]), _token_rank(model, sign * vector, tid, norm)))
    return FoundMemories(model.name, text, tid, norm, by, found, scores)


def to_vocab_column(model: KVModel, vectors: torch.Tensor, token_id: int,
                    norm: Norm = "none") -> torch.Tensor:
    """The logit of one token read from many vectors ``[n, d_model]`` -> ``[n]`` (cheap: no full vocab)."""
    E = unembedding_matrix(model)
    vectors = vectors.to(E.device).float()
    if norm == "none":
        return vectors @ E[token_id]
    if norm == "frozen":
        return frozen_norm(model)(vectors) @ E[token_id]
    out = apply_final_norm(model, vectors) @ E[token_id]
    bias = unembedding_bias(model)
    return out if bias is None else out + bias[token_id]
