"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"), Algorithm 1.

1. Target vectors (Eq. 16): z_i = h^L_i + δ_i at the top layer L = max(R), for *all* requests in
   one batched optimisation (``z_batch`` requests per batch; the paper did them one by one).
   Layers ≤ L, and positions before each row's last subject token, do not depend on δ: they
   are computed once and replayed (``skip_fixed``), and only target positions are decoded.
2. For each l ∈ R in ascending order, with the updates of the layers below already in place:
   keys k_i^l averaged over contexts (Eq. 19), residual r_i^l = (z_i − h^L_i) / (L − l + 1)
   (Eq. 20, spread over the remaining layers), and (canonical orientation, C_l = E[kkᵀ])::

       ΔV_l = (λ C_l + K Kᵀ)⁻¹ K Rᵀ        ⇔   ΔW = R Kᵀ (λ C_l + K Kᵀ)⁻¹   (Eqs. 14-15)

   solved in float64 and kept as low-rank factors ``[d_ff, n] @ [n, d_model]``.
3. ``sequential_batch``: requests are inserted in sequential batches, each on top of the last.

Stage 1 depends only on the requests, the top layer L, the optimisation (``opt``) and the
contexts; stage 2 adds λ, the statistics and the lower layers of R. :meth:`MEMIT.targets`
returns stage 1's result (:class:`Targets`) and ``compute(..., targets=t)`` reuses it, so a sweep
over λ, statistics size or the start of R optimises z once (the released code caches z to disk
for the same reason, ``compute_z`` ``cache_fname``).

``info`` records, for the views: the z optimisation per request and step (``opt``), each layer's
share of the residual (``layer_shares``: mean ‖z − h‖ still to insert before the layer, the mean
‖r^l‖ assigned to it, and that as a share of ‖z − h^L‖), the mean ‖z − h‖ left after the edit,
and the keys of the first requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlens.corpus import Corpus
from kvlens.editing._shared import (
    Rows,
    build_rows,
    context_templates,
    optimise_targets,
    request_log,
    subject_states,
)
from kvlens.editing.base import EditMethod, check_layers, register_method, sequentially
from kvlens.editing.delta import Part, PartKey, WeightDelta
from kvlens.editing.hparams import MEMIT_PRESETS, MEMITHparams, ReferenceOption
from kvlens.editing.per_row import stack_changes
from kvlens.editing.request import EditRequest, check_each, check_requests
from kvlens.memory.stats import resolve_moments
from kvlens.models.kvmodel import KVModel, Site

#: ``info["keys"]`` keeps the top layer's keys k_i^L (Eq. 19) of the first SHOWN_KEYS requests, for views.
SHOWN_KEYS = 8


def layer_update(C: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, lam: float) -> Part:
    """ΔV = (λC + KKᵀ)⁻¹ K Rᵀ (Eq. 14) in float64; ``keys`` ``[n, d_ff]``, ``resid`` ``[n, d_model]``."""
    K = keys.double().T  # [d_ff, n], columns are keys as in the paper
    A = lam * C.double().to(K.device) + K @ K.T
    left = torch.linalg.solve(A, K)  # [d_ff, n]
    if not bool(torch.isfinite(left).all()):
        raise ValueError("the MEMIT system (λC + KKᵀ) is singular; check the statistics and λ")
    return Part(left.float(), resid.float())


def target_vectors(model: KVModel, rows: Rows, hp: MEMITHparams) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(z, h^L, log): z_i = h^L_i + δ_i for every request, optimised ``hp.z_batch`` requests at a time."""
    top = hp.layers[-1]
    site = Site("resid", top)
    h = subject_states(model, rows.select(range(rows.n_requests), clean=True), [site])[site]
    size = hp.z_batch or rows.n_requests
    n = rows.n_requests
    # batch requests of similar suffix length (from the subject on) together: less padding, same
    # result (rows are independent)
    width = torch.zeros(n, dtype=torch.long).scatter_reduce_(
        0, rows.request, rows.batch.attention_mask.sum(-1).cpu() - rows.subject, "amax", include_self=False)
    order = torch.argsort(width, stable=True)
    delta = torch.zeros(n, model.d_model)
    per_request: dict[str, list[Any]] = {}
    start = time.perf_counter()
    for lo in range(0, n, size):
        idx = order[lo: lo + size]
        d, part = optimise_targets(model, rows.select(idx), top, h[idx], hp.opt, skip_fixed=hp.skip_fixed)
        delta[idx] = d.cpu()
        for name, values in [*((k, v) for k, v in part.items() if k != "curves"),
                             *((f"curves.{k}", v) for k, v in part["curves"].items())]:
            merged = per_request.setdefault(name, [None] * n)
            for i, v in zip(idx.tolist(), values):
                merged[i] = v
    log: dict[str, Any] = {k: v for k, v in per_request.items() if not k.startswith("curves.")}
    log["curves"] = {k.removeprefix("curves."): v for k, v in per_request.items() if k.startswith("curves.")}
    log["z_seconds"] = time.perf_counter() - start
    return h + delta, h, log


@dataclass(frozen=True)
class Targets:
    """Stage 1 of MEMIT for some requests: z_i = h^L_i + δ_i (Eq. 16) at the top layer L.

    Made by :meth:`MEMIT.targets`; ``MEMIT.compute(model, requests, targets=t)`` inserts them
    with any λ, statistics or lower layers of R whose top layer is ``top``. ``made_with`` holds
    what z depends on (the optimisation and contexts hyperparameters, the model's FFN-weight
    fingerprint) so a stale or mismatched reuse is refused.
    """

    requests: tuple[EditRequest, ...]
    z: torch.Tensor
    h: torch.Tensor
    log: dict[str, Any]
    made_with: dict[str, Any]

    @property
    def top(self) -> int:
        """The layer L whose output the z are."""
        return int(self.made_with["top"])


def _made_with(model: KVModel, hp: MEMITHparams) -> dict[str, Any]:
    return {"top": hp.layers[-1], "opt": hp.opt, "contexts": hp.contexts, "model": model.fingerprint()}


def alone_left(base: torch.Tensor, keys: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """Each request's own ``(B + a kᵀ)⁻¹ a`` = ``B⁻¹a / (1 + kᵀB⁻¹a)`` (Sherman–Morrison), ``[n, d_ff]``.

    With one request the MEMIT system (λC + kkᵀ) is B = λC plus the rank one a kᵀ (a = k), so one
    factorisation of B serves every request edited alone. ``keys``/``projected``: k and a, ``[n, d_ff]``.
    """
    a = projected.double().T  # [d_ff, n]
    solved = torch.linalg.solve(base.double(), a)
    denom = 1.0 + (keys.double().T * solved).sum(0)
    left = solved / denom
    if not bool(torch.isfinite(left).all()):
        raise ValueError("the per-request MEMIT system is singular; check the statistics and λ")
    return left.T


@register_method
class MEMIT(ReferenceOption, EditMethod):
    """Mass-Editing Memory in a Transformer (hyperparameters: :class:`MEMITHparams`).

    :meth:`compute_each` edits each request alone (from the unedited model), many at once.
    ``reference=True`` reproduces the released code (:func:`~kvlens.editing.hparams.reference_hparams`).
    """

    name = "memit"
    presets: ClassVar[Mapping[str, MEMITHparams]] = MEMIT_PRESETS
    #: MEMIT solves with λC + KKᵀ (Eq. 14), so C must be invertible; AlphaEdit projects instead.
    invertible_moments = True

    def default_hparams(self, model: KVModel) -> MEMITHparams:
        top = max(1, model.n_layers // 4)
        return MEMITHparams(layers=tuple(range(max(0, top - 2), top + 1)))

    def check(self, model: KVModel, hp: MEMITHparams) -> None:
        check_layers(model, hp.layers)
        if any(l < 0 for l in hp.layers):
            raise ValueError(f"MEMIT layers must be given as non-negative indices, got {hp.layers}")

    def layer_update(self, layer: int, C: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor,
                     hp: MEMITHparams) -> Part:
        """The change of V at ``layer`` for these keys and residuals (MEMIT: Eq. 14)."""
        return layer_update(C, keys, resid, hp.lam)

    def alone_update(self, layer: int, C: torch.Tensor, keys: torch.Tensor, hp: MEMITHparams) -> torch.Tensor:
        """Left factors ``[n, d_ff]`` of each request's own update at ``layer`` (Eq. 14 with n = 1)."""
        return alone_left(hp.lam * C.double(), keys, keys)

    def targets(self, model: KVModel, requests: EditRequest | Iterable[EditRequest]) -> Targets:
        """Stage 1 alone (Eq. 16): the z of ``requests`` at the top layer of this method's range."""
        model.require_local(f"{type(self).__name__}.targets")
        reqs = check_requests(requests)
        hp = self.hparams_for(model)
        self.check(model, hp)
        rows = build_rows(model, reqs, context_templates(model, hp.contexts))
        z, h, log = target_vectors(model, rows, hp)
        return Targets(reqs, z, h, log, _made_with(model, hp))

    def compute_each(self, model: KVModel, requests: Sequence[EditRequest], *, batch_size: int = 32,
                     stats: Mapping[int, torch.Tensor] | None = None, corpus: Corpus | None = None,
                     ) -> list[WeightDelta]:
        """One delta per request, each computed alone from the current model, ``batch_size`` at a time.

        Equal (to float tolerance) to ``[self.compute(model, [r], report=False) for r in requests]``:
        z is optimised per row; keys and h^L above the first layer are measured with each row's own
        lower-layer updates in place (:mod:`kvlens.editing.per_row`); each request's update is its
        n = 1 solve (:meth:`alone_update`).
        """
        reqs = check_each(requests, batch_size)
        hp = self.hparams_for(model)
        self.check(model, hp)
        moments = resolve_moments(model, hp.layers, stats, corpus, hp.stats_tokens)
        templates = context_templates(model, hp.contexts)
        out: list[WeightDelta] = []
        for lo in range(0, len(reqs), batch_size):
            start = time.perf_counter()
            chunk = self._alone(model, reqs[lo: lo + batch_size], hp, moments, templates)
            for d in chunk:
                d.info["seconds"] = (time.perf_counter() - start) / len(chunk)
                d.info["batched"] = len(chunk)
            out.extend(chunk)
        return out

    def _alone(self, model: KVModel, requests: Sequence[EditRequest], hp: MEMITHparams,
               moments: Mapping[int, torch.Tensor], templates: tuple[str, ...]) -> list[WeightDelta]:
        """Each request's MEMIT delta as if it were edited alone (all rows in the same forwards)."""
        n = len(requests)
        rows = build_rows(model, requests, templates)
        z, h, log = target_vectors(model, rows, hp)
        top = Site("resid", hp.layers[-1])
        clean = rows.select(range(n), clean=True)
        grouped = hp.key_average == "groups"
        parts: list[dict[PartKey, Part]] = [{} for _ in range(n)]
        shares: list[list[dict[str, float]]] = [[] for _ in range(n)]
        for i, layer in enumerate(hp.layers):
            key = Site("key", layer)
            if i:
                changes = stack_changes(parts, model.device)
                keys = subject_states(model, rows, [key], grouped=grouped, write=changes.writes(rows.request))[key]
                h_now = subject_states(model, clean, [top], write=changes.writes(clean.request))[top]
            else:
                keys, h_now = subject_states(model, rows, [key], grouped=grouped)[key], h
            resid = (z - h_now) / (len(hp.layers) - i)  # Eq. 20
            left = self.alone_update(layer, moments[layer], keys, hp).float()
            for r in range(n):
                parts[r][(layer, "value")] = Part(left[r].unsqueeze(1), resid[r].float().unsqueeze(0))
                shares[r].append({"layer": layer, "remaining": float((z[r] - h_now[r]).norm()),
                                  "assigned": float(resid[r].norm())})
        h_after = subject_states(model, clean, [top],
                                 write=stack_changes(parts, model.device).writes(clean.request))[top]
        out = []
        for r, request in enumerate(requests):
            total = float((z[r] - h[r]).norm())
            for row in shares[r]:
                row["share"] = row["assigned"] / total if total else 0.0
            info = {"contexts": list(templates), "opt": request_log(log, r), "z": z[r: r + 1],
                    "delta_norms": [total], "layer_shares": shares[r],
                    "remaining_after": float((z[r] - h_after[r]).norm()),
                    "keys": {str(hp.layers[-1]): keys[r: r + 1].tolist()}}
            out.append(WeightDelta.from_model(model, parts[r], method=self.name, hparams=hp.to_dict(),
                                              requests=[request], info=info))
        return out

    def _partial(self, model: KVModel, parts: dict[PartKey, Part],
                 requests: tuple[EditRequest, ...]) -> WeightDelta:
        """The layers updated so far, to measure keys and h^L with them in place."""
        return WeightDelta.from_model(model, dict(parts), method=self.name, hparams={}, requests=requests)

    def _compute(self, model: KVModel, requests: tuple[EditRequest, ...], hp: MEMITHparams, *,
                 stats: Mapping[int, torch.Tensor] | None = None, corpus: Corpus | None = None,
                 sequential_batch: int | None = None, targets: Targets | None = None, **_: Any) -> WeightDelta:
        if targets is not None:
            self._check_targets(model, requests, hp, targets, sequential_batch)
        moments = resolve_moments(model, hp.layers, stats, corpus, hp.stats_tokens,
                                  invertible=self.invertible_moments)
        templates = context_templates(model, hp.contexts)
        size = sequential_batch or len(requests)
        chunks = [requests[i: i + size] for i in range(0, len(requests), size)]
        return sequentially(model, chunks, lambda c: self._batch(model, c, hp, moments, templates, targets))

    @staticmethod
    def _check_targets(model: KVModel, requests: tuple[EditRequest, ...], hp: MEMITHparams, targets: Targets,
                       sequential_batch: int | None) -> None:
        """Refuse a reuse of z that would not give what computing them anew gives."""
        if targets.requests != requests:
            raise ValueError("targets were computed for other requests: pass the requests given to "
                             "MEMIT.targets, in the same order")
        if sequential_batch is not None and sequential_batch < len(requests):
            raise ValueError("targets cannot be reused with sequential_batch: each batch's z depends on the "
                             "batches inserted before it")
        now = _made_with(model, hp)
        for name in ("top", "opt", "contexts"):
            if targets.made_with[name] != now[name]:
                raise ValueError(f"targets were optimised with {name} {targets.made_with[name]!r}, this method "
                                 f"has {now[name]!r}: z depends on it; compute them again with MEMIT.targets")
        if targets.made_with["model"] != now["model"]:
            raise ValueError("the model's FFN weights changed since these targets were optimised (an edit was "
                             "applied or reverted): compute them again with MEMIT.targets")

    def _batch(self, model: KVModel, requests: tuple[EditRequest, ...], hp: MEMITHparams,
               moments: Mapping[int, torch.Tensor], templates: tuple[str, ...],
               targets: Targets | None = None) -> WeightDelta:
        rows = build_rows(model, requests, templates)
        z, h, log = (targets.z, targets.h, targets.log) if targets is not None else target_vectors(model, rows, hp)
        top = Site("resid", hp.layers[-1])
        clean = rows.select(range(rows.n_requests), clean=True)
        parts: dict[PartKey, Part] = {}
        shares = []
        for i, layer in enumerate(hp.layers):
            key = Site("key", layer)
            grouped = hp.key_average == "groups"
            if parts:
                with self._partial(model, parts, requests).applied(model):
                    keys = subject_states(model, rows, [key], grouped=grouped)[key]
                    h_now = subject_states(model, clean, [top])[top]
            else:
                keys, h_now = subject_states(model, rows, [key], grouped=grouped)[key], h
            resid = (z - h_now) / (len(hp.layers) - i)  # Eq. 20
            parts[(layer, "value")] = self.layer_update(layer, moments[layer], keys, resid, hp)
            shares.append({"layer": layer, "remaining": (z - h_now).norm(dim=-1).mean().item(),
                           "assigned": resid.norm(dim=-1).mean().item()})

        keys_shown = {str(hp.layers[-1]): keys[:SHOWN_KEYS].tolist()}  # the top layer's, as drawn
        with self._partial(model, parts, requests).applied(model):
            h_after = subject_states(model, clean, [top])[top]
        total = (z - h).norm(dim=-1).mean().item()
        for row in shares:
            row["share"] = row["assigned"] / total if total else 0.0
        info = {"contexts": list(templates), "opt": log, "z": z, "delta_norms": (z - h).norm(dim=-1).tolist(),
                "layer_shares": shares, "remaining_after": (z - h_after).norm(dim=-1).mean().item(),
                "keys": keys_shown}
        return WeightDelta.from_model(model, parts, method=self.name, hparams=hp.to_dict(),
                                      requests=requests, info=info)
