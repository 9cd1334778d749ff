"""Severed paths (MEMIT, Meng et al. 2023, Fig. 3 / App. A; ROME's ``trace_with_repatch``).

At one token (ROME: the last subject token) the hidden state of layer ``l`` is restored in the
corrupted run three ways: normally; with the MLP outputs at that token frozen to their corrupted
values (the MLP path *severed*); with the attention outputs frozen. Where the MLP-severed curve
falls below the normal one, the effect of the restored state needed later MLPs to reach the
output: those MLPs are where the fact is recalled, and what MEMIT edits.

:func:`suggest_edit_layers` turns the gap into a layer range (rule documented there).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlens.causal.cells import Cell
from kvlens.causal.setup import check_args, prepare
from kvlens.causal.trace import check_mode, run_cells
from kvlens.models.kvmodel import KVModel

CURVES = ("normal", "mlp_severed", "attn_severed")
_CELL_KIND = {"normal": "hidden", "mlp_severed": "sever_mlp", "attn_severed": "sever_attn"}


@dataclass
class SeveredTrace:
    """Restored ``p(target)`` per layer at one token, normal and with MLP / attention severed."""

    prompt: str
    subject: str
    token: int
    token_text: str
    target: str
    curves: dict[str, torch.Tensor]  # name -> [layers] p(target)
    high: float
    low: float
    params: dict[str, Any] = field(default_factory=dict)

    def effect(self, curve: str = "normal") -> torch.Tensor:
        """Indirect effect per layer of ``curve`` (one of ``CURVES``)."""
        return self.curves[curve] - self.low

    @property
    def gap(self) -> torch.Tensor:
        """``IE_normal − IE_mlp_severed`` per layer: the share of the effect that needs later MLPs."""
        return self.curves["normal"] - self.curves["mlp_severed"]

    @property
    def n_layers(self) -> int:
        return int(self.curves["normal"].shape[0])


def _token(span_start: int, span_end: int, n_prompt: int, token: str | int) -> int:
    if token == "last_subject":
        return span_end - 1
    if token == "last":
        return n_prompt - 1
    if isinstance(token, int) and not isinstance(token, bool) and -n_prompt <= token < n_prompt:
        return token % n_prompt
    raise ValueError(f"token must be 'last_subject', 'last' or a position in 0..{n_prompt - 1}, got {token!r}")


def sever(model: KVModel, prompt: str, subject: str, target: str | int | Sequence[int] | None = None, *,
          token: str | int = "last_subject", noise: float | None = None, samples: int = 10, seed: int = 1,
          mode: str = "exact", memory: int | None = None, per_forward: int = 32, remote: bool | str | None = None,
          progress: bool = True) -> SeveredTrace:
    """The three severed-path curves at ``token`` (default: the last subject token, as ROME).

    Arguments are those of :func:`kvlens.trace`; ``mode`` is ``"exact"`` or ``"plain"``.
    """
    if mode == "approx":
        raise ValueError("severed paths have no attribution-patching estimate: use mode='exact' or 'plain'")
    check_args(model, samples, 1)
    check_mode(mode, remote, model)
    setup = prepare(model, prompt, subject, target, noise=noise, samples=samples, seed=seed, remote=remote)
    t = _token(setup.span.start, setup.span.end, setup.n_prompt, token)
    cells = [Cell(_CELL_KIND[c], layer, t) for c in CURVES for layer in range(model.n_layers)]
    flat = run_cells(model, setup, cells, 1, mode=mode, memory=memory, per_forward=per_forward, remote=remote,
                     progress=progress, desc=f"severed paths {subject!r}")
    grid = flat.view(len(CURVES), model.n_layers)
    params = dict(mode=mode, noise_std=setup.noise_std, samples=samples, seed=seed, model=model.name,
                  token=token)
    return SeveredTrace(setup.prompt, subject, t, model.token_strings(setup.ids[0, t:t + 1])[0],
                        model.tokenizer.decode(setup.target), {c: grid[i] for i, c in enumerate(CURVES)},
                        setup.high, setup.low, params)


def mlp_contribution(gap: torch.Tensor) -> torch.Tensor:
    """Per MLP layer ``j``: ``max(0, gap[j-1] − gap[j])`` (0 for layer 0, which is not measured).

    Restoring ``h_{j-1}`` with MLPs ``>= j`` severed loses MLP ``j`` more than restoring ``h_j``
    with MLPs ``> j`` severed; the difference is what MLP ``j`` adds to the restored effect.
    """
    drop = torch.zeros_like(gap)
    drop[1:] = (gap[:-1] - gap[1:]).clamp(min=0)
    return drop


def suggest_edit_layers(severed: SeveredTrace | Sequence[SeveredTrace], size: int | None = None,
                        share: float = 0.6) -> range:
    """The critical MLP range ``R`` to edit (MEMIT's R), from the severed-MLP gap.

    Rule: average the gap ``IE_normal − IE_mlp_severed`` over the given traces; attribute to MLP
    ``j`` the drop of the gap from layer ``j-1`` to ``j`` (:func:`mlp_contribution`); return the
    contiguous window of ``size`` layers with the largest total contribution, or, with ``size``
    None, the shortest window holding at least ``share`` of the total (ties: the earliest).
    ``size=1`` gives a single ROME layer.

    One fact's range varies a lot between facts of the same model (issue 15: from 1–15 to
    15–19 on facts of one model): pool many facts with :func:`pool_edit_layers` (or
    :func:`kvlens.causal.choose_edit_layers`), which also gives a bootstrap interval.
    """
    traces = [severed] if isinstance(severed, SeveredTrace) else list(severed)
    if not traces:
        raise ValueError("suggest_edit_layers needs at least one SeveredTrace")
    check_window(size, share, traces[0].n_layers)
    drop = mlp_contribution(torch.stack([t.gap for t in traces]).mean(0))
    if float(drop.sum()) <= 0:
        warnings.warn("the MLP-severed curve never falls below the normal one: no MLP range stands out; "
                      "the suggestion is arbitrary (trace more facts, or facts the model knows)", stacklevel=2)
    return best_window(drop, size, share)


def check_window(size: int | None, share: float, n_layers: int) -> None:
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if size is not None and not 1 <= size <= n_layers:
        raise ValueError(f"size must be between 1 and the model's {n_layers} layers, got {size}")


def best_window(drop: torch.Tensor, size: int | None, share: float) -> range:
    """The window rule of :func:`suggest_edit_layers` on per-layer contributions ``drop``."""
    n = drop.shape[0]
    csum = torch.cat([torch.zeros(1, dtype=drop.dtype), drop.cumsum(0)])
    total = float(csum[-1])
    for width in ([size] if size is not None else range(1, n + 1)):
        sums = csum[width:] - csum[:-width]
        best = int(sums.argmax())
        if size is not None or total <= 0 or float(sums[best]) >= share * total:
            return range(best, best + width)
    return range(0, n)


@dataclass
class LayerChoice:
    """An edit range pooled over many facts, its bootstrap interval, and every fact's own range.

    ``layers`` is :func:`suggest_edit_layers` on all facts together. The bootstrap resamples the
    facts with replacement ``n_boot`` times and applies the same rule to each resample:
    ``start_ci`` / ``stop_ci`` are the 2.5 and 97.5 percentiles of the first and last layer of
    the range, ``agreement`` the share of resamples that give exactly ``layers``, and
    ``per_fact`` each fact's own range (its spread is what pooling removes). ``peak`` is the
    single layer a one-layer method (ROME) would edit: the MLP layer of largest pooled
    contribution, with ``peak_ci`` the 2.5 and 97.5 percentiles of the resamples' peaks.
    """

    layers: range
    start_ci: tuple[float, float]
    stop_ci: tuple[float, float]
    agreement: float
    per_fact: list[range]
    contribution: torch.Tensor  # [layers] pooled MLP contribution (mlp_contribution of the mean gap)
    per_fact_contribution: torch.Tensor  # [facts, layers]
    boot_ranges: list[range]
    subjects: list[str]
    peak: int
    peak_ci: tuple[float, float]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_facts(self) -> int:
        return len(self.per_fact)

    @property
    def last(self) -> int:
        return self.layers.stop - 1

    def __str__(self) -> str:
        return (f"MLP edit layers {self.layers.start}–{self.last} pooled over {self.n_facts} facts "
                f"(bootstrap 95 %: first layer {self.start_ci[0]:g}–{self.start_ci[1]:g}, last layer "
                f"{self.stop_ci[0]:g}–{self.stop_ci[1]:g}; {100 * self.agreement:.0f} % of resamples agree); "
                f"one layer: {self.peak} (95 % {self.peak_ci[0]:g}–{self.peak_ci[1]:g}); "
                f"single facts range from {min(r.start for r in self.per_fact)} to "
                f"{max(r.stop for r in self.per_fact) - 1}")


def pool_edit_layers(severed: Sequence[SeveredTrace], size: int | None = None, share: float = 0.6, *,
                     n_boot: int = 1000, seed: int = 0) -> LayerChoice:
    """The edit range of :func:`suggest_edit_layers` over all ``severed`` traces, with a bootstrap over facts."""
    traces = list(severed)
    if len(traces) < 2:
        raise ValueError(f"pooling needs at least two facts' severed traces, got {len(traces)}; "
                         "trace more facts (kvlens.causal.choose_edit_layers)")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    layers = {t.n_layers for t in traces}
    if len(layers) != 1:
        raise ValueError(f"the traces come from models with different layer counts {sorted(layers)}")
    check_window(size, share, traces[0].n_layers)
    gaps = torch.stack([t.gap for t in traces]).double()  # [facts, layers]
    per_fact_drop = torch.stack([mlp_contribution(g) for g in gaps])
    pooled = mlp_contribution(gaps.mean(0))
    if float(pooled.sum()) <= 0:
        warnings.warn("over these facts the MLP-severed curve never falls below the normal one: no MLP range "
                      "stands out; the suggestion is arbitrary (use facts the model knows)", stacklevel=2)
    idx = torch.randint(0, len(traces), (n_boot, len(traces)), generator=torch.Generator().manual_seed(seed))
    curves = [mlp_contribution(gaps[i].mean(0)) for i in idx]
    boots = [best_window(c, size, share) for c in curves]
    chosen = best_window(pooled, size, share)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)

    def ci(values: Sequence[float]) -> tuple[float, float]:
        lo, hi = torch.quantile(torch.tensor(values, dtype=torch.float64), q).tolist()
        return lo, hi

    return LayerChoice(chosen, ci([r.start for r in boots]), ci([r.stop - 1 for r in boots]),
                       sum(r == chosen for r in boots) / n_boot,
                       [best_window(d, size, share) for d in per_fact_drop], pooled, per_fact_drop, boots,
                       [t.subject for t in traces], int(pooled.argmax()), ci([int(c.argmax()) for c in curves]),
                       {**traces[0].params, "size": size, "share": share, "n_boot": n_boot, "boot_seed": seed})
