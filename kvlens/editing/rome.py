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

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvlens.corpus import Corpus
from kvlens.editing._shared import (
    build_rows,
    context_templates,
    optimise_targets,
    request_log,
    subject_states,
)
from kvlens.editing.base import EditMethod, register_method, sequentially
from kvlens.editing.delta import Part, WeightDelta
from kvlens.editing.hparams import ROME_PRESETS, ReferenceOption, ROMEHparams
from kvlens.editing.request import EditRequest, check_each
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
class ROME(ReferenceOption, EditMethod):
    """Rank-One Model Editing at one layer (hyperparameters: :class:`ROMEHparams`).

    Several requests are inserted one after another (each on top of the previous), as
    sequential ROME; their deltas are composed and ``info["norm_history"]`` records ‖V‖.
    :meth:`compute_each` edits each request alone (from the unedited model), many at once.
    ``reference=True`` reproduces the released code (:func:`~kvlens.editing.hparams.reference_hparams`).
    """

    name = "rome"
    presets = ROME_PRESETS

    def default_hparams(self, model: KVModel) -> ROMEHparams:
        return ROMEHparams(layer=max(0, model.n_layers // 4))

    def check(self, model: KVModel, hp: ROMEHparams) -> None:
        model.check_layer(hp.layer)

    def _setup(self, model: KVModel, hp: ROMEHparams, stats: Mapping[int, torch.Tensor] | None,
               corpus: Corpus | None) -> tuple[int, torch.Tensor | None, tuple[str, ...]]:
        layer = model.check_layer(hp.layer)
        C = resolve_moments(model, [layer], stats, corpus, hp.stats_tokens)[layer] if hp.mom2_adjustment else None
        return layer, C, context_templates(model, hp.contexts)

    def _compute(self, model: KVModel, requests: tuple[EditRequest, ...], hp: ROMEHparams, *,
                 stats: Mapping[int, torch.Tensor] | None = None, corpus: Corpus | None = None,
                 **_: Any) -> WeightDelta:
        layer, C, templates = self._setup(model, hp, stats, corpus)
        return sequentially(model, requests, lambda r: self._alone(model, [r], hp, layer, C, templates)[0])

    def compute_each(self, model: KVModel, requests: Sequence[EditRequest], *, batch_size: int = 32,
                     stats: Mapping[int, torch.Tensor] | None = None, corpus: Corpus | None = None,
                     ) -> list[WeightDelta]:
        """One delta per request, each computed alone from the current model, ``batch_size`` at a time.

        Equal (to float tolerance) to ``[self.compute(model, [r], report=False) for r in requests]``:
        the δ optimisation is per row (:func:`optimise_targets`) and the keys are per request.
        """
        reqs = check_each(requests, batch_size)
        hp = self.hparams_for(model)
        self.check(model, hp)
        layer, C, templates = self._setup(model, hp, stats, corpus)
        out: list[WeightDelta] = []
        for lo in range(0, len(reqs), batch_size):
            start = time.perf_counter()
            chunk = self._alone(model, list(reqs[lo: lo + batch_size]), hp, layer, C, templates)
            for d in chunk:
                d.info["seconds"] = (time.perf_counter() - start) / len(chunk)
                d.info["batched"] = len(chunk)
            out.extend(chunk)
        return out

    def _alone(self, model: KVModel, requests: Sequence[EditRequest], hp: ROMEHparams, layer: int,
               C: torch.Tensor | None, templates: tuple[str, ...]) -> list[WeightDelta]:
        """A delta for each request as if it were inserted alone (their δ optimised together)."""
        rows = build_rows(model, requests, templates)
        key, mlp = Site("key", layer), Site("mlp", layer)
        k_star = subject_states(model, rows, [key])[key]
        clean = subject_states(model, rows.select(range(len(requests)), clean=True), [key, mlp])
        delta, log = optimise_targets(model, rows, layer, clean[mlp], hp.opt)
        out = []
        for i, request in enumerate(requests):
            part = rank_one(C, k_star[i], k_star[i] if hp.key_fix else clean[key][i], delta[i].cpu())
            info = {"contexts": list(templates), "opt": request_log(log, i), "delta_norm": float(delta[i].norm()),
                    "reference_norm": float(clean[mlp][i].norm()), "key": k_star[i].tolist()}
            out.append(WeightDelta.from_model(model, {(layer, "value"): part}, method=self.name,
                                              hparams=hp.to_dict(), requests=[request], info=info))
        return out
