"""Report renderers for the inspect verb: key activations, values, triggers, lenses, interventions.

Each function turns one result of :mod:`kvlens.memory` into report sections, with the figure
from :mod:`kvlens.views.figures` and the parameters that produced it. Registered on import
(:data:`kvlens.views.renderers.RENDERER_MODULES`).
"""

from __future__ import annotations

from typing import Any

from kvlens.memory.activations import KeyActivations, TopMemories
from kvlens.memory.contrib import Contributions
from kvlens.memory.intervene import Intervention
from kvlens.memory.lens import Composition, LogitLens
from kvlens.memory.triggers import TriggerExamples
from kvlens.memory.vocab import FoundMemories, VocabProjection
from kvlens.views import figures
from kvlens.views.renderers import to_sections
from kvlens.views.report import Section

#: At most this many per-memory figures are drawn for one result (the table lists all).
MAX_FIGURES = 4


def top_memories_rows(top: TopMemories) -> list[dict[str, Any]]:
    """Rows of a table of the strongest memories at one token."""
    return [{"rank": r + 1, "memory": m, "coefficient": c}
            for r, (m, c) in enumerate(zip(top.memories, top.coefficients))]


@to_sections.register
def _top_memories(result: TopMemories) -> list[Section]:
    return [Section(f"Inspect: strongest memories at layer {result.layer}, token {result.token!r}",
                    table=top_memories_rows(result),
                    params={"layer": result.layer, "token_index": result.token_index, "k": len(result.memories)})]


@to_sections.register
def _key_activations(result: KeyActivations, k: int = 10) -> list[Section]:
    out = []
    for p, prompt in enumerate(result.batch.prompts):
        for layer in result.layers:
            top = result.top(layer, k=k, prompt=p)
            text = (f"Memory coefficients (input of the value projection) at layer {layer} for {prompt!r}. "
                    f"At the last token {top.token!r} the strongest memories are "
                    + ", ".join(f"m{m} ({c:+.2f})" for m, c in zip(top.memories, top.coefficients)) + ".")
            out.append(Section(f"Inspect: key activations at layer {layer}", text=text,
                               table=top_memories_rows(top),
                               figure=figures.key_activation_heatmap(result, layer, prompt=p),
                               params={"model": result.model_name, "prompt": prompt, "layer": layer,
                                       "k": k, "heatmap_k": 20}))
    return out


@to_sections.register
def _values(result: VocabProjection) -> list[Section]:
    shown = result.memories[:MAX_FIGURES]
    return [Section(f"Inspect: values of layer {result.layer} in vocabulary space",
                    text=(f"The tokens each value promotes (highest logits) and suppresses (lowest), read "
                          f"with norm={result.norm!r}." + (f" Bars for the first {len(shown)} of "
                                                           f"{len(result.memories)} memories."
                                                           if len(shown) < len(result.memories) else "")),
                    table=result.rows(), figures=[figures.value_token_bars(result, m) for m in shown],
                    params={"model": result.model_name, "layer": result.layer, "memories": result.memories,
                            "k": result.k, "norm": result.norm})]


@to_sections.register
def _found(result: FoundMemories) -> list[Section]:
    rows = [{"rank": r + 1, "layer": f.layer, "memory": f.memory, "score": f.score, "token rank": f.rank}
            for r, f in enumerate(result.found)]
    score = ("how many standard deviations the token's logit r(v)·E[t] lies above the mean over the vocabulary"
             if result.by == "zscore" else "the token's logit r(v)·E[t] from the value vector v")
    text = (f"Value vectors (rows of the FFN's output matrix) of layers {min(result.scores)}–{max(result.scores)} "
            f"ranked by their score for {result.token!r}: {score} (r = "
            + ("the final norm" if result.norm == "final" else "no norm" if result.norm == "none" else "a frozen norm")
            + ", Geva et al. 2021 §4). 'token rank' is where the token stands among all of that value's logits "
              "(0 = its top token): a high score with a large rank means the value writes many tokens more strongly.")
    return [Section(f"Inspect: memories whose value writes {result.token!r}", text=text, table=rows,
                    figure=figures.found_memories_bars(result),
                    params={"model": result.model_name, "token": result.token, "token_id": result.token_id,
                            "norm": result.norm, "by": result.by, "layers": sorted(result.scores),
                            "k": len(result.found)})]


@to_sections.register
def _triggers(result: TriggerExamples) -> list[Section]:
    params = {"model": result.model_name, "corpus": result.corpus_id, "n": result.n, "window": result.window,
              "tokens_seen": result.tokens_seen, "from_cache": result.from_cache}
    return [Section(f"Inspect: trigger examples of L{layer}.m{memory}",
                    text=f"The corpus prefixes on which the key of memory {memory} at layer {layer} fires most.",
                    figure=figures.trigger_table(result, (layer, memory)),
                    params={**params, "memory": [layer, memory]})
            for layer, memory in result.memories]


@to_sections.register
def _lens(result: LogitLens) -> list[Section]:
    return [Section(f"Inspect: logit lens, {prompt!r}",
                    text=(f"The top token of the residual after each layer. The model's prediction at the last "
                          f"token first appears after layer {result.first_layer(p)}."),
                    figure=figures.logit_lens_grid(result, p),
                    params={"model": result.model_name, "prompt": prompt, "layers": result.layers})
            for p, prompt in enumerate(result.prompts)]


@to_sections.register
def _composition(result: Composition) -> list[Section]:
    return [Section("Inspect: layer composition", table=result.stats(), figure=figures.composition_lines(result),
                    params={"model": result.model_name, "prompts": list(result.prompts), "layers": result.layers,
                            "norm": result.norm})]


@to_sections.register
def _contributions(result: Contributions, k: int = 10) -> list[Section]:
    rows = [{"layer": l, "memory": m, "contribution": c} for l, m, c in result.top(k)]
    return [Section(f"Inspect: memory contributions to {result.target!r}",
                    text=(f"Logit of {result.target!r} after {result.token!r}: {result.logit:.3f}; the largest "
                          f"memory contributions m_i r(v_i)·E[t]. Decomposition error {result.max_error:.2e}."),
                    table=rows, figure=figures.contribution_waterfall(result, k),
                    params={"model": result.model_name, "prompt": result.prompt, "target": result.target,
                            "token_index": result.token_index, "norm": result.norm, "layers": result.layers,
                            "k": k})]


@to_sections.register
def _intervention(result: Intervention) -> list[Section]:
    rows = [{"rank": r + 1, "before": b, "p before": pb, "after": a, "p after": pa}
            for r, (b, pb, a, pa) in enumerate(zip(result.before.tokens, result.before.probs,
                                                   result.after.tokens, result.after.probs))]
    text = f"Top prediction {result.before.top!r} -> {result.after.top!r}; KL(before‖after) = {result.kl:.4f} nats."
    if result.target is not None:
        text += f" p({result.target!r}): {result.target_before:.4f} -> {result.target_after:.4f}."
    return [Section("Inspect: intervention on memories", text=text, table=rows,
                    params={"model": result.model_name, "prompt": result.prompt, "positions": result.positions,
                            "scales": {f"L{l}.m{m}": f for (l, m), f in result.scales.items()}})]
