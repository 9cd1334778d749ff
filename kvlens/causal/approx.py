"""Approximate causal tracing by attribution patching (an *estimate*, labelled as such).

A first-order Taylor expansion of the metric around the corrupted run (Syed, Rager & Conmy 2023,
"Attribution Patching Outperforms Automated Circuit Discovery"; Nanda 2023) estimates the effect
of restoring state ``x`` at a cell from one corrupted forward and one backward pass::

    IE(l, t) ≈ Σ_samples (x_clean(l, t) − x_corr(l, t)) · ∂p̄/∂x_corr(l, t)

where ``p̄`` is ``p(target)`` averaged over the noise samples. MLP and attention windows add
the estimates of their layers (the estimate is linear). Every cell of every kind comes from the
same two passes, so the cost does not grow with the grid; the error grows with how non-linear
the restoration is (large for the late hidden states that flip the prediction).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlens.causal.cells import window_layers
from kvlens.causal.setup import Setup, log_probs, target_prob
from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.tracing import run

_SITE = {"hidden": "resid", "mlp": "mlp", "attn": "attn"}


def _gradients(model: KVModel, setup: Setup, sites: list[Site]) -> dict[Site, torch.Tensor]:
    """``∂p̄/∂state`` at ``sites`` in the corrupted runs (zero leaves added to the states)."""
    s, span = setup.samples, setup.span
    shape = (s, setup.ids.shape[1], model.d_model)
    leaves = {site: torch.zeros(shape, device=model.device, dtype=model.dtype, requires_grad=True)
              for site in sites}

    def corrupt(state: torch.Tensor) -> torch.Tensor:
        out = state.clone()
        out[:, span.start:span.end] += setup.noise.to(state.dtype)
        return out

    def add(leaf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda state: state + leaf

    writes = {Site("embed"): corrupt, **{site: add(leaf) for site, leaf in leaves.items()}}
    ones = torch.ones_like(setup.ids)
    batch = Batch(setup.ids.repeat(s, 1), ones.repeat(s, 1), (setup.prompt,) * s)
    out = run(model, batch, read=[Site("logits")], write=writes, grad=True)
    p_mean = target_prob(log_probs(out[Site("logits")][:, setup.positions]), setup.target).mean()
    grads = torch.autograd.grad(p_mean, list(leaves.values()))
    return dict(zip(leaves, grads))


def _states(setup: Setup, kind: str, corrupt: bool) -> list[torch.Tensor]:
    runs = setup.corrupt if corrupt else setup.clean
    return runs.resid if kind == "hidden" else runs.module(kind)


def attribution_scores(model: KVModel, setup: Setup, kinds: tuple[str, ...], window: int
                       ) -> dict[str, torch.Tensor]:
    """Estimated ``p(target)`` per (token, layer) for each kind: ``low + estimated IE``."""
    n, T = model.n_layers, setup.n_prompt
    sites = [Site.parse(_SITE[k], j) for k in kinds for j in range(n)]
    grads = _gradients(model, setup, sites)
    scores = {}
    for kind in kinds:
        clean, corr = _states(setup, kind, False), _states(setup, kind, True)
        # per-layer estimate [L, T]: Σ_samples Σ_d (clean − corr) · grad
        per_layer = torch.stack([((clean[j][:, :T] - corr[j][:, :T]) * grads[Site.parse(_SITE[kind], j)][:, :T])
                                 .sum((0, 2)) for j in range(n)]).double()
        if kind != "hidden":
            per_layer = torch.stack([per_layer[list(window_layers(j, window, n))].sum(0) for j in range(n)])
        scores[kind] = setup.low + per_layer.T.detach().cpu()
    return scores


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two effect maps (ties broken by order; for agreement checks)."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
