"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): a rank-one update of V.

In canonical orientation the FFN output is ``k V`` (k the key activation, row vector), so
inserting the association k* → v* = V-output(k*) + δ with minimal disturbance of other keys
(ROME Eq. 2, with C = E[k kᵀ]) is::

    u  = C⁻¹ k*                         (compute_u; u = k* without mom2 adjustment)
    ΔV = u δᵀ / (uᵀ k*)                 (compute_v + the closed-form insertion)

so that ``k* (V + ΔV) = k* V + δ``. k* is the key at the subject's last token averaged over
random-prefix contexts; δ is found by gradient descent on the target NLL with the essence KL
term (:func:`kvlens.editing._shared.optimise_targets`). The original code divides by ``uᵀk``
with the *clean-prompt* key k instead of k*; r-ROME (Gupta et al. 2024) showed that this
mismatch causes disabling edits and collapse under sequential editing. ``key_fix=True``
(default) uses k* throughout; ``False`` reproduces the original.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvlens.corpus import Corpus
from kvlens.editing._shared import build_rows, context_templates, optimise_targets, subject_states
from kvlens.editing.base import EditMethod, register_method, sequentially
from kvlens.editing.delta import Part, WeightDelta
from kvlens.editing.hparams import ROME_PRESETS, ROMEHparams
from kvlens.editing.request import EditRequest
from kvlens.memory.stats import resolve_moments
from kvlens.models.kvmodel import KVModel, Site


def rank_one(C: torch.Tensor | None, k_star: torch.Tensor, k_denominator: torch.Tensor,
             delta: torch.Tensor) -> Part:
    """ΔV = u δᵀ / (uᵀ k) with u = C⁻¹ k* (float64 solve), as low-rank factors ``[d_ff,1] @ [1,d_model]``."""
    k64 = k_star.double()
    u = torch.linalg.solve(C.double(), k64) if C is not None else k64
    denom = u @ k_denominator.double()
    if not torch.isfinite(denom) or float(denom.abs()) < 1e-12:
        raise ValueError("the key is (numerically) orthogonal to C⁻¹k*: cannot insert a rank-one memory")
    return Part((u / denom).float().unsqueeze(1), delta.float().unsqueeze(0))


@register_method
class ROME(EditMethod):
    """Rank-One Model Editing at one layer (hyperparameters: :class:`ROMEHparams`).

    Several requests are inserted one after another (each on top of the previous), as
    sequential ROME; their deltas are composed and ``info["norm_history"]`` records ‖V‖.
    """

    name = "rome"
    presets = ROME_PRESETS

    def default_hparams(self, model: KVModel) -> ROMEHparams:
        return ROMEHparams(layer=max(0, model.n_layers // 4))

    def check(self, model: KVModel, hp: ROMEHparams) -> None:
        model.check_layer(hp.layer)

    def _compute(self, model: KVModel, requests: tuple[EditRequest, ...], hp: ROMEHparams, *,
                 stats: Mapping[int, torch.Tensor] | None = None, corpus: Corpus | None = None,
                 **_: Any) -> WeightDelta:
        layer = model.check_layer(hp.layer)
        C = resolve_moments(model, [layer], stats, corpus, hp.stats_tokens)[layer] if hp.mom2_adjustment else None
        templates = context_templates(model, hp.contexts)
        return sequentially(model, requests, lambda r: self._one(model, r, hp, layer, C, templates))

    def _one(self, model: KVModel, request: EditRequest, hp: ROMEHparams, layer: int,
             C: torch.Tensor | None, templates: tuple[str, ...]) -> WeightDelta:
        rows = build_rows(model, [request], templates)
        key, mlp = Site("key", layer), Site("mlp", layer)
        k_star = subject_states(model, rows, [key])[key][0]
        clean = subject_states(model, rows.select([0], clean=True), [key, mlp])
        delta, log = optimise_targets(model, rows, layer, clean[mlp], hp.opt)
        part = rank_one(C, k_star, k_star if hp.key_fix else clean[key][0], delta[0].cpu())
        info = {"contexts": list(templates), "opt": log, "delta_norm": float(delta.norm()),
                "reference_norm": float(clean[mlp].norm()), "key": k_star.tolist()}
        return WeightDelta.from_model(model, {(layer, "value"): part}, method=self.name,
                                      hparams=hp.to_dict(), requests=[request], info=info)
