"""Where the prediction forms: the logit lens and layer composition (Geva et al. 2021, §5).

Layer ``l`` adds its FFN output ``y_l = Σ_i m_i v_i + b_V`` (§5.1) to the residual ``r_l`` it
receives: ``o_l = r_l + y_l`` (§5.2; here ``r_l := o_l - y_l``, which also covers parallel
attention/FFN blocks). Reading residuals through the model's head (final norm + unembedding)
is the logit lens. :func:`composition` compares, at each prompt's last token,

* the FFN's prediction ``argmax r(y_l)·E`` with the predictions of its top memories
  ``argmax r(sign(m_i) v_i)·E`` (§5.1: is the layer's prediction a single memory's, or a composition?);
* the residual's prediction before and after the FFN and the model's final prediction (§5.2: at
  which layer is the final prediction first reached; when the FFN changes the residual's top
  token, is the new token the FFN's own top token or a compromise?).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvlens import tracing
from kvlens.memory.activations import check_k, check_layers
from kvlens.memory.vocab import Norm, check_norm, to_vocab
from kvlens.models.kvmodel import KVModel, Site


@dataclass(frozen=True)
class LogitLens:
    """Top-``k`` tokens of the residual after each layer, at every token of every prompt.

    ``top_ids[p]``/``top_probs[p]`` are ``[layers, tokens_p, k]`` (final norm + unembedding,
    softmax); ``final_ids[p]`` is the model's own prediction at each token.
    """

    model_name: str
    prompts: tuple[str, ...]
    tokens: list[list[str]]
    layers: list[int]
    top_ids: list[torch.Tensor]
    top_probs: list[torch.Tensor]
    final_ids: list[torch.Tensor]
    vocab: dict[int, str] = field(repr=False)

    def prediction(self, layer: int, prompt: int = 0, token: int = -1) -> str:
        """The top token of the residual after ``layer`` at ``token`` of ``prompt``."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not read; read layers: {self.layers}")
        return self.vocab[int(self.top_ids[prompt][self.layers.index(layer), token, 0])]

    def first_layer(self, prompt: int = 0, token: int = -1) -> int | None:
        """The first layer whose residual already predicts the model's final token (None: never)."""
        final = int(self.final_ids[prompt][token])
        hits = (self.top_ids[prompt][:, token, 0] == final).nonzero()
        return None if len(hits) == 0 else self.layers[int(hits[0])]


def logit_lens(model: KVModel, prompts: str | Sequence[str], layers: Sequence[int] | None = None, *,
               k: int = 5) -> LogitLens:
    """Read the residual after each of ``layers`` (all if None) through the model's head, in one forward."""
    check_k(k)
    chosen = check_layers(model, layers)
    batch = model.tokenize(prompts)
    states = tracing.run(model, batch, read=[*(Site("resid", l) for l in chosen), Site("logits")])
    valid = batch.attention_mask.bool().cpu()
    per_layer = [_top_of(model, states[Site("resid", l)].detach().cpu()[valid], k) for l in chosen]
    lengths = batch.lengths.tolist()
    ids = torch.stack([i for i, _ in per_layer]).split(lengths, dim=1)  # per prompt [L, n, k]
    probs = torch.stack([p for _, p in per_layer]).split(lengths, dim=1)
    final = states[Site("logits")].detach().cpu()[valid].argmax(-1).split(lengths)
    top_ids, top_probs, final_ids = list(ids), list(probs), list(final)
    ids_seen = set(torch.cat([t.flatten() for t in top_ids]).tolist()) | set(torch.cat(final_ids).tolist())
    tokens = [model.token_strings(ids[: int(n)]) for ids, n in zip(batch.input_ids, batch.lengths)]
    vocab = dict(zip(sorted(ids_seen), model.token_strings(sorted(ids_seen))))
    return LogitLens(model.name, batch.prompts, tokens, chosen, top_ids, top_probs, final_ids, vocab)


def _top_of(model: KVModel, residuals: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` ids and probabilities of residuals ``[n, d_model]`` read through the head."""
    logits = to_vocab(model, residuals, "final")
    top = logits.topk(k, dim=-1)
    return top.indices.cpu(), (top.values - logits.logsumexp(-1, keepdim=True)).exp().cpu()


@dataclass(frozen=True)
class LayerStep:
    """One layer at one prompt's last token: top-token ids of each reading (Geva et al. 2021, §5)."""

    layer: int
    before: int  # residual entering the FFN, r_l (logit lens)
    ffn: int  # FFN output y_l (read with ``norm``)
    after: int  # residual after the layer, o_l (logit lens)
    p_final: float  # probability the residual r_l gives the model's final token (§5.2, Fig. 10)
    memories: list[int]  # the top-|m_i| memories of the layer (or all with m_i > 0)
    coefficients: list[float]
    memory_tokens: list[int]  # argmax of r(sign(m_i) v_i)·E for each of them


@dataclass(frozen=True)
class Composition:
    """Layer composition over prompts: ``steps[p][j]`` is layer ``layers[j]`` at prompt ``p``."""

    model_name: str
    prompts: tuple[str, ...]
    layers: list[int]
    norm: str
    final: list[int]
    steps: list[list[LayerStep]]
    vocab: dict[int, str] = field(repr=False)

    def first_layer(self, prompt: int) -> int | None:
        """First layer whose residual (after it) predicts the final token (None: never)."""
        return next((s.layer for s in self.steps[prompt] if s.after == self.final[prompt]), None)

    def stats(self) -> list[dict[str, float]]:
        """Per layer, fractions over prompts (and a mean probability), as in Geva et al. 2021, §5.

        §5.1: ``top1_agreement`` — the FFN's top token ``top(y_l)`` is its strongest memory's;
        ``memory_agreement`` — some read memory's; ``no_memory_agreement`` — none's (Fig. 8).
        §5.2: ``residual_predicts_final`` — ``top(r_l) = top(o_L)`` (Fig. 9); ``after_predicts_final``
        — ``top(o_l) = top(o_L)``; ``p_final`` — mean probability of the final token under ``r_l``
        (Fig. 10); the cases of Fig. 11: ``residual`` (``top(o_l) = top(r_l) ≠ top(y_l)``), ``ffn``
        (``top(o_l) = top(y_l) ≠ top(r_l)``), ``agreement`` (all three equal) and ``composition``
        (``top(o_l)`` equals neither).
        """
        rows = []
        for j, layer in enumerate(self.layers):
            col = [steps[j] for steps in self.steps]
            n = len(col)
            agree = sum(s.ffn in s.memory_tokens for s in col) / n
            rows.append({
                "layer": layer,
                "top1_agreement": sum(bool(s.memory_tokens) and s.ffn == s.memory_tokens[0] for s in col) / n,
                "memory_agreement": agree, "no_memory_agreement": 1.0 - agree,
                "residual_predicts_final": sum(s.before == f for s, f in zip(col, self.final)) / n,
                "after_predicts_final": sum(s.after == f for s, f in zip(col, self.final)) / n,
                "p_final": sum(s.p_final for s in col) / n,
                "residual": sum(s.after == s.before != s.ffn for s in col) / n,
                "ffn": sum(s.after == s.ffn != s.before for s in col) / n,
                "agreement": sum(s.after == s.before == s.ffn for s in col) / n,
                "composition": sum(s.after != s.before and s.after != s.ffn for s in col) / n,
            })
        return rows


def _memory_tokens(model: KVModel, layer: int, memories: list[int], signs: list[float], norm: Norm,
                   memo: dict[tuple[int, int, float], int]) -> list[int]:
    """Top token of ``sign · v_i`` for each memory (memoised across prompts)."""
    todo = [(m, s) for m, s in zip(memories, signs) if (layer, m, s) not in memo]
    if todo:
        flips = torch.tensor([s for _, s in todo])[:, None]
        V = model.V(layer).detach()[[m for m, _ in todo]].float() * flips
        for (m, s), t in zip(todo, to_vocab(model, V, norm).argmax(-1).tolist()):
            memo[(layer, m, s)] = t
    return [memo[(layer, m, s)] for m, s in zip(memories, signs)]


def _read_memories(coef: torch.Tensor, k: int | None) -> list[int]:
    """The ``k`` memories with the largest ``|m_i|``, or (``k=None``) all with ``m_i > 0`` (§5.1)."""
    if k is None:
        return (coef > 0).nonzero().flatten().tolist()
    return coef.abs().topk(min(k, coef.numel())).indices.tolist()


def composition(model: KVModel, prompts: str | Sequence[str], layers: Sequence[int] | None = None, *,
                k: int | None = 10, norm: Norm = "frozen") -> Composition:
    """How each layer's prediction composes from its memories and the residual (Geva et al. 2021, §5).

    One batched forward reads, at every prompt's last token, the residual after each layer, the
    FFN outputs and the key activations. Residuals are read with the model's head; FFN outputs
    and memories with ``norm`` (default ``"frozen"``: final norm gain, unit scale — the same
    ranking as the head gives that part of the residual; ``"none"``: raw ``·E`` as in the paper).
    The memories read are the ``k`` largest ``|m_i|`` of each layer; ``k=None`` reads every memory
    with ``m_i > 0`` as the paper does for ReLU models (costly: one vocabulary projection each).
    """
    if k is not None:
        check_k(k)
    check_norm(norm)
    chosen = check_layers(model, layers)
    batch = model.tokenize(prompts)
    sites = [Site(kind, l) for l in chosen for kind in ("key", "mlp", "resid")]
    states = {s: tracing.at_last_token(batch, v).detach().float()
              for s, v in tracing.run(model, batch, read=[*sites, Site("logits")]).items()}
    final = states[Site("logits")].argmax(-1).tolist()
    memo: dict[tuple[int, int, float], int] = {}
    steps: list[list[LayerStep]] = [[] for _ in range(len(batch))]
    for l in chosen:
        after, ffn = states[Site("resid", l)], states[Site("mlp", l)]
        top_after = to_vocab(model, after, "final").argmax(-1).tolist()
        logp_before = to_vocab(model, after - ffn, "final").log_softmax(-1)
        top_before = logp_before.argmax(-1).tolist()
        p_final = logp_before.gather(-1, torch.tensor(final, device=logp_before.device)[:, None]).exp()
        top_ffn = to_vocab(model, ffn, norm).argmax(-1).tolist()
        coef = states[Site("key", l)].cpu()
        for p in range(len(batch)):
            idx = _read_memories(coef[p], k)
            c = coef[p, idx].tolist()
            toks = _memory_tokens(model, l, idx, [1.0 if x >= 0 else -1.0 for x in c], norm, memo)
            steps[p].append(LayerStep(l, top_before[p], top_ffn[p], top_after[p], float(p_final[p]), idx, c,
                                      toks))
    ids = sorted({t for row in steps for s in row for t in (s.before, s.ffn, s.after, *s.memory_tokens)}
                 | set(final))
    return Composition(model.name, batch.prompts, chosen, norm, final, steps,
                       dict(zip(ids, model.token_strings(ids))))
