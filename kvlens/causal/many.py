"""``trace_many``: average causal traces over a set of facts (ROME Fig. 2 / its averaged plots).

Each fact's effects are pooled into ROME's token groups: the first, middle and last subject
tokens, the first token after the subject, further tokens, and the last token. The summary holds
per-fact curves (``NaN`` where a fact has no such token, e.g. no middle token) and, per group and
layer, the mean with a 95 % confidence interval ``1.96 · s / √n`` (normal approximation, ``s``
the sample standard deviation over the ``n`` facts that have the group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlens.causal.severed import LayerChoice, SeveredTrace, pool_edit_layers, sever
from kvlens.causal.trace import CausalTrace, check_kinds, trace
from kvlens.memory.intervene import predict
from kvlens.metrics import mean_half_width
from kvlens.models.kvmodel import KVModel
from kvlens.prompts import fill

GROUPS = ("first subject token", "middle subject tokens", "last subject token",
          "first subsequent token", "further tokens", "last token")

Fact = tuple[str, str, str | None]


def as_fact(fact: Any) -> Fact:
    """``(prompt, subject, target)`` from a CounterFact record, a dict or a tuple."""
    if isinstance(fact, Mapping) and "requested_rewrite" in fact:
        rw = fact["requested_rewrite"]
        return rw["prompt"], rw["subject"], rw["target_true"]["str"]
    if isinstance(fact, Mapping):
        return fact["prompt"], fact["subject"], fact.get("target")
    if isinstance(fact, (tuple, list)) and len(fact) in (2, 3):
        return fact[0], fact[1], fact[2] if len(fact) == 3 else None
    raise TypeError(f"a fact is a CounterFact record, a dict with prompt/subject[/target] or a tuple; got {fact!r}")


def group_effects(tr: CausalTrace, kind: str) -> torch.Tensor:
    """``[len(GROUPS), layers]``: the effect of ``kind`` pooled per token group (NaN if empty)."""
    eff = tr.effect(kind)
    start, end = tr.subject_range
    last = eff.shape[0] - 1
    spans = [range(start, start + 1), range(start + 1, end - 1), range(end - 1, end),
             range(end, min(end + 1, last)), range(end + 1, last), range(last, last + 1)]
    nan = torch.full((eff.shape[1],), math.nan, dtype=eff.dtype)
    return torch.stack([eff[list(s)].mean(0) if len(s) else nan for s in spans])


@dataclass
class TraceSummary:
    """Effects of many traces: per fact, and averaged per token group with 95 % CIs."""

    kinds: tuple[str, ...]
    groups: tuple[str, ...]
    per_fact: dict[str, torch.Tensor]  # kind -> [facts, groups, layers]
    mean: dict[str, torch.Tensor]  # kind -> [groups, layers]
    ci: dict[str, torch.Tensor]  # kind -> [groups, layers] half-width
    facts: list[Fact]
    skipped: list[tuple[Fact, str]]
    traces: list[CausalTrace]
    severed: list[SeveredTrace] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_facts(self) -> int:
        return len(self.facts)

    def severed_mean(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Mean and CI half-width per layer of each severed-path effect curve."""
        if not self.severed:
            raise ValueError("no severed paths in this summary: call trace_many(..., sever_paths=True)")
        stats = {c: mean_half_width(torch.stack([s.effect(c) for s in self.severed])) for c in self.severed[0].curves}
        return {c: m for c, (m, _) in stats.items()}, {c: h for c, (_, h) in stats.items()}

    def edit_layers(self, size: int | None = None, share: float = 0.6, *, n_boot: int = 1000,
                    seed: int = 0) -> LayerChoice:
        """The MLP edit range pooled over this summary's severed paths, with its bootstrap interval."""
        if not self.severed:
            raise ValueError("no severed paths in this summary: call trace_many(..., sever_paths=True)")
        return pool_edit_layers(self.severed, size, share, n_boot=n_boot, seed=seed)


def _known(model: KVModel, prompt: str, target: str | None) -> bool:
    """Whether the clean top-1 token is the target's first token (ROME skips other facts)."""
    if target is None:
        return True
    from kvlens.causal.setup import target_ids

    return predict(model, prompt, 1).ids[0] == target_ids(model, target)[0]


def trace_many(model: KVModel, facts: Iterable[Any], *, kind: str | Sequence[str] = "all",
               only_correct: bool = True, sever_paths: bool = False, progress: bool = True,
               **options: Any) -> TraceSummary:
    """Trace every fact and average the effects per token group (with 95 % CIs and a progress bar).

    Args:
        facts: CounterFact records, dicts ``{prompt, subject, target}`` or tuples.
        kind: kinds to trace (default all three).
        only_correct: skip facts whose clean top-1 token is not the target's first token (ROME).
        sever_paths: also compute severed-path curves at the last subject token
            (for :func:`suggest_edit_layers`).
        options: passed to :func:`trace` / :func:`sever` (samples, seed, noise, window, mode, ...).
    """
    from tqdm.auto import tqdm

    kinds = check_kinds(kind)
    facts = [as_fact(f) for f in facts]
    kept, skipped, traces, severed = [], [], [], []
    sever_opts = {k: v for k, v in options.items() if k != "window"}
    for prompt, subject, target in tqdm(facts, desc="facts", disable=not progress):
        text = fill(prompt, subject) if "{}" in prompt else prompt
        if only_correct and not _known(model, text, target):
            skipped.append(((prompt, subject, target), "clean top-1 token is not the target"))
            continue
        traces.append(trace(model, prompt, subject, target, kind=kinds, progress=False, **options))
        if sever_paths:
            severed.append(sever(model, prompt, subject, target, progress=False, **sever_opts))
        kept.append((prompt, subject, target))
    if not traces:
        raise ValueError(f"no fact was traced: all {len(facts)} were skipped (the model does not predict "
                         "their targets; pass only_correct=False to trace them anyway)")
    per_fact = {k: torch.stack([group_effects(t, k) for t in traces]) for k in kinds}
    stats = {k: mean_half_width(v) for k, v in per_fact.items()}
    return TraceSummary(kinds, GROUPS, per_fact, {k: m for k, (m, _) in stats.items()},
                        {k: h for k, (_, h) in stats.items()}, kept, skipped, traces, severed,
                        dict(options, only_correct=only_correct, model=model.name))


def choose_edit_layers(model: KVModel, facts: Iterable[Any], size: int | None = None, share: float = 0.6, *,
                       n_boot: int = 1000, boot_seed: int = 0, only_correct: bool = True, progress: bool = True,
                       **options: Any) -> LayerChoice:
    """The recommended way to pick MEMIT's layer range: severed paths of many facts, pooled.

    Runs :func:`sever` on every fact the model knows (``only_correct``, as :func:`trace_many`)
    and applies :func:`~kvlens.causal.severed.pool_edit_layers`: the range of the pooled gap,
    a bootstrap interval over facts, and each fact's own range. ``options`` go to :func:`sever`
    (samples, noise, seed of the noise, mode, ...); ``boot_seed`` seeds the bootstrap.
    """
    from tqdm.auto import tqdm

    facts = [as_fact(f) for f in facts]
    if len(facts) < 2:
        raise ValueError(f"choose_edit_layers pools facts: give at least two (ideally 20 or more), got {len(facts)}")
    severed, skipped = [], 0
    for prompt, subject, target in tqdm(facts, desc="severed paths", disable=not progress):
        text = fill(prompt, subject) if "{}" in prompt else prompt
        if only_correct and not _known(model, text, target):
            skipped += 1
            continue
        severed.append(sever(model, prompt, subject, target, progress=False, **options))
    if len(severed) < 2:
        raise ValueError(f"only {len(severed)} of {len(facts)} facts are known by the model (clean top-1 = target); "
                         "pooling needs two or more: give more facts or pass only_correct=False")
    choice = pool_edit_layers(severed, size, share, n_boot=n_boot, seed=boot_seed)
    choice.params.update(skipped=skipped, only_correct=only_correct)
    return choice
