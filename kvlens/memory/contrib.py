"""Each memory's contribution to one token's logit, with an exact decomposition check.

The FFN output of layer ``l`` is a sum of sub-updates (Geva et al. 2021, §5.1; Geva et al. 2022)::

    y_l = Σ_i m_i v_i + b_V

so through any *linear* read-out ``r`` of the residual, ``r(y_l) = Σ_i m_i r(v_i) + r(b_V)``
exactly. The contribution of memory ``(l, i)`` to the logit of token ``t`` is ``m_i r(v_i)·E[t]``.
The final norm is not linear; two read-outs are offered, named:

* ``norm="frozen"`` (default) — the final norm with its scale frozen at the actual last residual
  ``x_L`` of the prompt (:class:`~kvlens.memory.vocab.FrozenNorm`): ``r(c) = γ ⊙ P c / s(x_L)``.
  Then *all* parts of the residual (embedding, every attention and FFN output) plus the norm's
  offset ``β·E[t]`` and the unembedding bias sum exactly to the model's logit.
* ``norm="none"`` — ``r(c) = c``: raw ``m_i v_i·E[t]`` (Geva et al. 2021, §4). Memories and
  bias still sum exactly to the FFN output's raw logit ``y_l·E[t]``, but not to the model's logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kvlens import tracing
from kvlens.memory.activations import check_k, check_layers
from kvlens.memory.vocab import frozen_norm, resolve_token, unembedding_bias, unembedding_matrix
from kvlens.models.kvmodel import KVModel, Site

ReadNorm = Literal["frozen", "none"]


@dataclass(frozen=True)
class Contributions:
    """Contributions to the logit of ``target`` at token ``token_index`` of ``prompt``.

    ``memory[l]`` is ``[d_ff]``: ``m_i r(v_i)·E[t]`` for every memory of layer ``l``;
    ``bias[l]`` is ``r(b_V)·E[t]``; ``ffn[l]`` is ``r(y_l)·E[t]`` computed from the FFN output
    itself (not from the memories), so ``Σ memory[l] + bias[l] - ffn[l]`` measures how exact the
    decomposition is. ``components`` split the whole logit (embedding, ``attn l``, ``ffn l``,
    ``offset``): with ``norm="frozen"`` they sum to ``logit``, the model's own logit.
    """

    model_name: str
    prompt: str
    token_index: int
    token: str
    target: str
    target_id: int
    norm: str
    layers: list[int]
    memory: dict[int, torch.Tensor]
    bias: dict[int, float]
    ffn: dict[int, float]
    components: dict[str, float]
    logit: float

    def error(self, layer: int) -> float:
        """``|Σ_i memory[layer]_i + bias[layer] - ffn[layer]|``: ~0 (float error) when exact."""
        return abs(float(self.memory[layer].double().sum()) + self.bias[layer] - self.ffn[layer])

    @property
    def max_error(self) -> float:
        return max(self.error(l) for l in self.layers)

    @property
    def components_error(self) -> float:
        """``|Σ components - logit|`` (~0 with ``norm="frozen"``; meaningless with ``"none"``)."""
        return abs(sum(self.components.values()) - self.logit)

    def top(self, k: int = 10, layers: Sequence[int] | None = None,
            sign: Literal["positive", "negative", "abs"] = "positive") -> list[tuple[int, int, float]]:
        """``(layer, memory, contribution)`` of the ``k`` largest contributions over ``layers``."""
        check_k(k)
        chosen = self.layers if layers is None else [l for l in self.layers if l in set(layers)]
        if not chosen:
            raise ValueError(f"none of layers {layers} were computed; computed layers: {self.layers}")
        flat = torch.cat([self.memory[l] for l in chosen])
        score = {"positive": flat, "negative": -flat, "abs": flat.abs()}[sign]
        idx = score.topk(min(k, flat.numel())).indices.tolist()
        d_ff = self.memory[chosen[0]].numel()
        return [(chosen[i // d_ff], i % d_ff, float(flat[i])) for i in idx]


def _reader(model: KVModel, norm: ReadNorm, last_resid: torch.Tensor,
            tid: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """The linear read-out ``c -> r(c)·E[t]`` and the constant (offset + bias) of the logit."""
    E_t = unembedding_matrix(model)[tid]
    b = unembedding_bias(model)
    const = 0.0 if b is None else float(b[tid])
    if norm == "none":
        return (lambda c: c.float().to(E_t.device) @ E_t), const
    if norm != "frozen":
        raise ValueError(f"norm must be 'frozen' or 'none', got {norm!r}")
    fn = frozen_norm(model, last_resid)
    return (lambda c: fn(c.float().to(E_t.device)) @ E_t), const + float(fn.offset @ E_t)


def contributions(model: KVModel, prompt: str, target: str | int, layers: Sequence[int] | None = None, *,
                  token: int = -1, norm: ReadNorm = "frozen") -> Contributions:
    """Each memory's contribution to the logit of ``target`` at token ``token`` of ``prompt``.

    One forward reads the key activations, attention and FFN outputs of every layer, the last
    residual and the logits. ``target`` is a single-token string or an id.
    """
    if not isinstance(prompt, str):
        raise TypeError("contributions takes one prompt (a string)")
    chosen = check_layers(model, layers)
    tid, target_text = resolve_token(model, target)
    batch = model.tokenize(prompt)
    n = int(batch.lengths[0])
    if not -n <= token < n:
        raise IndexError(f"token {token} is out of range for a prompt of {n} tokens")
    pos, L = token % n, model.n_layers
    sites = [Site(kind, l) for l in range(L) for kind in ("attn", "key", "mlp")]
    states = tracing.run(model, batch, read=[*sites, Site("resid", L - 1), Site("logits")])
    at = {s: v[0, pos].detach() for s, v in states.items()}
    read, const = _reader(model, norm, at[Site("resid", L - 1)], tid)
    memory, bias, ffn = {}, {}, {}
    for l in chosen:
        memory[l] = (at[Site("key", l)].float() * read(model.V(l).detach())).cpu()  # m_i r(v_i)·E[t]
        b_v = model.value_bias(l)
        bias[l] = 0.0 if b_v is None else float(read(b_v.detach()))
        ffn[l] = float(read(at[Site("mlp", l)]))
    return Contributions(model.name, prompt, pos, model.token_strings([batch.input_ids[0, pos]])[0],
                         target_text, tid, norm, chosen, memory, bias, ffn,
                         _components(at, read, const, L), float(at[Site("logits")][tid]))


def _components(at: dict[Site, torch.Tensor], read: Callable[[torch.Tensor], torch.Tensor],
                const: float, n_layers: int) -> dict[str, float]:
    """The logit split over the residual stream: embedding, each attention and FFN output, offset.

    The stream is ``x_L = x_0 + Σ_l (attn_l + ffn_l)`` in families whose blocks add their
    attention and FFN outputs unchanged (every registered family except ones with norms after
    the sublayers, such as Gemma 2); the embedding part ``x_0`` (with position embeddings, if
    any) is the remainder ``x_L - Σ_l (attn_l + ffn_l)``.
    """
    parts = {f"{name} {l}": float(read(at[Site.parse(kind, l)]))
             for l in range(n_layers) for name, kind in (("attn", "attn"), ("ffn", "mlp"))}
    stream = sum(at[Site("attn", l)].float() + at[Site("mlp", l)].float() for l in range(n_layers))
    embed = at[Site("resid", n_layers - 1)].float() - stream
    return {"embedding": float(read(embed)), **parts, "offset": const}
