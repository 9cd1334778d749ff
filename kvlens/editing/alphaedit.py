"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with the update projected on the null space of old keys.

Same target vectors and residual spread as MEMIT; only the per-layer solve changes (paper
Eqs. 11-15, code ``AlphaEdit_main.py``). With P = U₀U₀ᵀ, U₀ the eigenvectors of C = E[kkᵀ] whose
eigenvalue is below ``nullspace_threshold`` (so Δ P leaves preserved keys' outputs alone), in
canonical orientation::

    ΔV = (P (K Kᵀ + K_p K_pᵀ) + L2·I)⁻¹ P K Rᵀ

where K_p are the keys of *earlier* edits: within one ``compute`` they accumulate over
sequential batches, and ``previous_keys`` carries them across calls (AlphaEdit's ``cache_c``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvlens.editing.base import register_method
from kvlens.editing.delta import Part, WeightDelta
from kvlens.editing.hparams import Contexts, MEMITHparams, TargetOpt
from kvlens.editing.memit import MEMIT, alone_left
from kvlens.editing.request import EditRequest
from kvlens.models.kvmodel import KVModel


@dataclass(frozen=True)
class AlphaEditHparams(MEMITHparams):
    """MEMIT's hyperparameters plus the null-space threshold and the L2 term (``lam`` is unused)."""

    nullspace_threshold: float = 2e-2
    l2: float = 10.0


ALPHAEDIT_PRESETS: dict[str, AlphaEditHparams] = {
    "gpt2-xl": AlphaEditHparams(layers=(13, 14, 15, 16, 17), opt=TargetOpt(steps=20, clamp=0.75)),
    "gpt-j-6b": AlphaEditHparams(layers=(3, 4, 5, 6, 7, 8), opt=TargetOpt(steps=25, clamp=0.75)),
    "llama3-8b": AlphaEditHparams(layers=(4, 5, 6, 7, 8), opt=TargetOpt(steps=25, lr=0.1, clamp=0.75)),
    "smollm2-135m": AlphaEditHparams(layers=(4, 5, 6, 7, 8), opt=TargetOpt(steps=20, weight_decay=1e-3, clamp=0.75),
                                     contexts=Contexts(n=4, tokens=5), l2=1.0),
}


def null_space_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ over the eigenvectors of C with eigenvalue < ``threshold`` (float64)."""
    values, vectors = torch.linalg.eigh(C.double())
    U0 = vectors[:, values < threshold]
    return U0 @ U0.T


@register_method
class AlphaEdit(MEMIT):
    """Null-space constrained MEMIT (hyperparameters: :class:`AlphaEditHparams`)."""

    name = "alphaedit"
    presets = ALPHAEDIT_PRESETS
    invertible_moments = False  # the null space of C is what AlphaEdit projects on

    def __init__(self, hparams: AlphaEditHparams | None = None, *, preset: str | None = None,
                 previous_keys: Mapping[int, torch.Tensor] | None = None, reference: bool = False,
                 **overrides: Any) -> None:
        super().__init__(hparams, preset=preset, reference=reference, **overrides)
        self.previous_keys = {l: k.detach().double().cpu() for l, k in (previous_keys or {}).items()}
        self._projectors: dict[int, torch.Tensor] = {}

    def default_hparams(self, model: KVModel) -> AlphaEditHparams:
        top = max(1, model.n_layers // 4)
        return AlphaEditHparams(layers=tuple(range(max(0, top - 2), top + 1)))

    def _compute(self, model: KVModel, requests: tuple[EditRequest, ...], hp: MEMITHparams,
                 **kwargs: Any) -> WeightDelta:
        self._projectors = {}
        committed = dict(self.previous_keys)
        try:
            return super()._compute(model, requests, hp, **kwargs)
        except BaseException:  # a failed compute leaves the accumulated keys as they were
            self.previous_keys = committed
            raise
        finally:
            self._projectors = {}

    def compute_each(self, model: KVModel, requests: Any, **kwargs: Any) -> list[WeightDelta]:
        """MEMIT's :meth:`~MEMIT.compute_each` with AlphaEdit's solve; ``previous_keys`` are read, never grown."""
        self._projectors = {}
        try:
            return super().compute_each(model, requests, **kwargs)
        finally:
            self._projectors = {}

    def alone_update(self, layer: int, C: torch.Tensor, keys: torch.Tensor, hp: MEMITHparams) -> torch.Tensor:
        """Each request's own (P(kkᵀ + K_pK_pᵀ) + L2·I)⁻¹ P k: B = P K_pK_pᵀ + L2·I, a = P k (Sherman–Morrison)."""
        assert isinstance(hp, AlphaEditHparams)
        if layer not in self._projectors:
            self._projectors[layer] = null_space_projector(C, hp.nullspace_threshold)
        P = self._projectors[layer]
        previous = self.previous_keys.get(layer, torch.zeros_like(P))
        base = P @ previous + hp.l2 * torch.eye(len(P), dtype=P.dtype)
        return alone_left(base, keys, (P @ keys.double().T).T)

    def layer_update(self, layer: int, C: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor,
                     hp: MEMITHparams) -> Part:
        """ΔV = (P(KKᵀ + K_pK_pᵀ) + L2·I)⁻¹ P K Rᵀ; then K Kᵀ joins K_p for later batches."""
        assert isinstance(hp, AlphaEditHparams)
        if layer not in self._projectors:
            self._projectors[layer] = null_space_projector(C, hp.nullspace_threshold)
        P = self._projectors[layer]
        K = keys.double().T  # [d_ff, n]
        previous = self.previous_keys.get(layer, torch.zeros_like(P))
        A = P @ (K @ K.T + previous) + hp.l2 * torch.eye(len(P), dtype=P.dtype)
        left = torch.linalg.solve(A, P @ K)
        self.previous_keys[layer] = previous + K @ K.T
        return Part(left.float(), resid.float())
