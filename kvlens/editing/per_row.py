"""Per-row edits through the seam: batch row b runs with its own owner's weight change.

Independent edits (each request edited alone) do not interact, so many of them can share one
forward if each row carries its owner's change. A change of a projection's weight is a change
of that projection's output, linear in its input (Geva et al. 2021: FFN(x) = f(x Kᵀ) V):

* value part ΔV of layer l: the FFN output gains ``k ΔV`` (k the key activation, the value
  projection's input: site ``key``), as :meth:`WeightDelta.writes`;
* key / gate part ΔK (canonical ``[d_ff, d_model]``): the key (gate) projection's output, before
  the nonlinearity (site ``key_pre`` / ``gate_pre``), gains ``x ΔKᵀ`` (x the FFN input: site
  ``mlp_in``). ``Linear`` computes ``x Wᵀ`` with W = K and GPT-2's ``Conv1D`` ``x W`` with W = Kᵀ:
  the same ``x Kᵀ``, so the canonical form covers both layouts.

Here row b adds its owner's change, with the owners' factors stacked *in feature order* (input
→ output: the change is ``inp @ first (@ second)``): low-rank parts as ``[n, in, r] @ [n, r, out]``
(ranks padded with zero columns, which add exactly nothing), dense ones as ``[n, in, out]``, in
batched matmuls. :func:`fit_each` trains such per-row changes for many requests in the same
forwards (the per-row form of :func:`kvlens.editing.finetune.fit`); :func:`finetune_each` is
fine-tuning of any role with it, :func:`kvlens.editing.lora.lora_each` LoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlens.editing._shared import (
    Rows,
    _Adam,
    _kl_index,
    build_rows,
    forward_logprobs,
    report_step,
    request_losses,
)
from kvlens.editing.delta import Part, PartKey, WeightDelta
from kvlens.editing.hparams import FTHparams
from kvlens.editing.request import EditRequest
from kvlens.models.kvmodel import KVModel, Role, Site, SiteKind
from kvlens.tracing import Write

#: Per role: the site whose state the change multiplies, and the site whose state it is added to.
SITES: dict[Role, tuple[SiteKind, SiteKind]] = {"value": ("key", "mlp"), "key": ("mlp_in", "key_pre"),
                                                 "gate": ("mlp_in", "gate_pre")}

#: A change in feature order: ``first`` (``[.., in, r]`` or dense ``[.., in, out]``) and ``second``.
Factors = tuple[torch.Tensor, torch.Tensor | None]


def feature_order(role: Role, left: torch.Tensor, right: torch.Tensor | None = None) -> Factors:
    """A canonical change ``ΔW = left @ right`` (``[.., d_ff, d_model]``) as input → output factors.

    Values map d_ff → d_model: the change of the output is ``k ΔV = (k left) right``. Keys and
    gates map d_model → d_ff: it is ``x ΔKᵀ = (x rightᵀ) leftᵀ`` (dense: ``x ΔKᵀ``). Leading batch
    dimensions (one per owner) are kept.
    """
    if role == "value":
        return left, right
    if right is None:
        return left.transpose(-1, -2), None
    return right.transpose(-1, -2), left.transpose(-1, -2)


@dataclass(frozen=True)
class RowChanges:
    """Changes of ``n`` owners: ``factors[(layer, role)] = (first, second or None)``, stacked ``[n, ...]``
    in feature order (:func:`feature_order`)."""

    factors: dict[PartKey, Factors]
    n: int

    def writes(self, owners: torch.Tensor) -> dict[Site, Write]:
        """Trace writes for :func:`kvlens.tracing.run`: row b gets owner ``owners[b]``'s change."""
        owners = torch.as_tensor(owners, dtype=torch.long)
        if len(owners) and (int(owners.min()) < 0 or int(owners.max()) >= self.n):
            raise ValueError(f"row owners must lie in 0..{self.n - 1}, got {owners.tolist()}")
        each = len(owners) // self.n if self.n else 0
        # rows grouped by owner, equally many each (training batches): no per-row copy of the factors
        grouped = each > 0 and len(owners) == each * self.n and bool(
            (owners == torch.arange(self.n).repeat_interleave(each)).all())
        stash: dict[Site, torch.Tensor] = {}  # the input states of this forward, as they pass
        out: dict[Site, Write] = {}
        for (layer, role), (first, second) in self.factors.items():
            src, dst = Site(SITES[role][0], layer), Site(SITES[role][1], layer)

            def keep(state: torch.Tensor, src: Site = src) -> torch.Tensor:
                stash[src] = state
                return state

            def add(state: torch.Tensor, src: Site = src, first: torch.Tensor = first,
                    second: torch.Tensor | None = second) -> torch.Tensor:
                change = _row_product(stash[src], first, second, owners, self.n if grouped else None)
                return state + change.to(state.device, state.dtype)

            out[src] = keep
            out[dst] = add
        return out


def _row_product(inp: torch.Tensor, first: torch.Tensor, second: torch.Tensor | None, owners: torch.Tensor,
                 grouped: int | None) -> torch.Tensor:
    """``inp_b @ first[o(b)] (@ second[o(b)])`` for every row b; ``grouped`` = n when the rows are n equal
    blocks in owner order (then the factors are used as they are, no per-row copy)."""
    x = inp.to(first.device, first.dtype)
    if grouped:  # [n·c, T, d] -> [n, c·T, d]
        change = torch.bmm(x.reshape(grouped, -1, x.shape[-1]), first)
        change = torch.bmm(change, second) if second is not None else change
        return change.reshape(*x.shape[:-1], -1)
    idx = owners.to(first.device)
    change = torch.bmm(x, first[idx])
    return torch.bmm(change, second[idx]) if second is not None else change


def stack_changes(parts: Sequence[Mapping[PartKey, Part]], device: torch.device | str = "cpu") -> RowChanges:
    """Stack the parts of each owner (``parts[o]``: owner o's ``{(layer, role): Part}``), any role."""
    if not parts:
        raise ValueError("no per-row changes to stack: pass at least one owner's parts")
    factors: dict[PartKey, Factors] = {}
    for key in sorted({key for p in parts for key in p}):
        mine = [p.get(key) for p in parts]
        shape = next(q.shape for q in mine if q is not None)
        if any(q is not None and q.right is None for q in mine):  # one dense: all dense
            dense = [q.dense() if q is not None else torch.zeros(shape) for q in mine]
            factors[key] = feature_order(key[1], torch.stack(dense).to(device))
            continue
        rank = max(q.rank or 0 for q in mine if q is not None)
        left = torch.zeros(len(mine), shape[0], rank)
        right = torch.zeros(len(mine), rank, shape[1])
        for o, q in enumerate(mine):
            if q is not None:
                if q.right is None:  # ruled out above: one dense part makes the weight dense
                    raise RuntimeError(f"{key[0]}.{key[1]}: a dense part among the low-rank ones to stack")
                left[o, :, : q.rank] = q.left.float()
                right[o, : q.rank] = q.right.float()
        factors[key] = feature_order(key[1], left.to(device), right.to(device))
    return RowChanges(factors, len(parts))


def fit_each(model: KVModel, rows: Rows, leaves: Sequence[torch.Tensor],
             changes: Callable[[Sequence[torch.Tensor]], RowChanges], *, steps: int, lr: float, kl_factor: float,
             early_stop: float, penalty: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None,
             project: Callable[[Sequence[torch.Tensor], torch.Tensor], None] | None = None) -> list[dict[str, Any]]:
    """:func:`kvlens.editing.finetune.fit` for each request alone, all in the same forwards.

    ``leaves`` are ``[n, ...]`` tensors, slice r request r's parameters (trained in place);
    ``changes(params)`` makes them the per-row changes of a forward. Loss of request r: NLL of its
    target + its KL term (+ ``penalty(params)[r]``); the total is a *sum* over requests, so each
    slice gets its own request's gradient, and Adam is elementwise
    (:class:`~kvlens.editing._shared._Adam`, only active rows stepping): each request follows the
    run it would have alone. A request stops once its NLL is below ``early_stop`` and its rows
    leave the forwards (as in :func:`~kvlens.editing._shared.optimise_targets`); ``project``
    (no grad) runs after each step on the leaves and the mask of active requests (FT+L's clamp).
    Returns each request's log, shaped as ``fit``'s log of it alone.
    """
    n = rows.n_requests
    adams = [_Adam(lr, torch.zeros_like(x), torch.zeros_like(x)) for x in leaves]
    active = torch.ones(n, dtype=torch.bool)
    kl_init: torch.Tensor | None = None
    losses: list[list[float]] = [[] for _ in range(n)]
    final_nll = [0.0] * n
    sub, sub_idx = rows, torch.arange(n)  # only the rows of requests still training are run
    for step in range(steps):
        params = [x.clone().requires_grad_(True) for x in leaves]
        tgt_logp, kl_logp = forward_logprobs(model, sub, None, layer=model.n_layers - 1,
                                             extra=changes(params).writes(sub_idx[sub.request]))
        kl_ref = kl_init[_kl_index(rows, sub_idx[sub.request[sub.kl_rows]])] if kl_init is not None else None
        nll, kl = request_losses(sub, tgt_logp, kl_logp, kl_ref, kl_factor)
        if kl_init is None and kl_factor > 0:  # the first step, on every row
            kl_init = kl_logp.detach()
        loss = nll + kl + (penalty(params).to(nll.device)[sub_idx.to(nll.device)] if penalty is not None else 0.0)
        logged, nll_now = loss.detach().cpu(), nll.detach().cpu()
        for i, r in enumerate(sub_idx.tolist()):
            losses[r].append(float(logged[i]))
            final_nll[r] = float(nll_now[i])
        done = nll_now < early_stop
        report_step("fine-tuning", step + 1, steps, float(logged.sum()), int((~done).sum()))
        active[sub_idx[done]] = False
        if not bool(active.any()):
            break
        grads = torch.autograd.grad(loss[~done.to(loss.device)].sum(), params)
        with torch.no_grad():
            for x, g, adam in zip(leaves, grads, adams):
                adam.step(x, g, active.to(x.device))
            if project is not None:
                project(leaves, active)
        if bool(done.any()):
            sub_idx = active.nonzero().flatten()
            sub = rows.select(sub_idx)
    return [{"loss": losses[r], "steps": len(losses[r]), "final_nll": [final_nll[r]]} for r in range(n)]


def finetune_each(model: KVModel, hp: FTHparams, requests: Sequence[EditRequest], templates: Sequence[str],
                  *, method: str = "ft") -> list[WeightDelta]:
    """Fine-tuning (any role) of each request alone, all trained in the same forwards (per-row ΔW_r).

    The same loss, Adam, early stop (per request), FT-W decay and FT+L clamp as
    :class:`~kvlens.editing.finetune.FineTune` on one request, with each request's canonical
    ΔW_r (``[d_ff, d_model]``) a leaf of its own rows' change (:class:`RowChanges`: ``k ΔV_r`` at the
    FFN output, ``x ΔK_rᵀ`` at the key or gate projection's output) instead of a change of the
    shared weight, trained by :func:`fit_each`.
    """
    layers = tuple(model.check_layer(l) for l in hp.layers)
    rows = build_rows(model, requests, templates, kl=hp.kl_factor > 0)
    n, dev = len(requests), model.device
    leaves = [torch.zeros(n, model.d_ff, model.d_model, device=dev) for _ in layers]

    def changes(params: Sequence[torch.Tensor]) -> RowChanges:
        return RowChanges({(l, hp.role): feature_order(hp.role, p) for l, p in zip(layers, params)}, n)

    def decay(params: Sequence[torch.Tensor]) -> torch.Tensor:  # FT-W: λ‖ΔW_r‖² per request
        return hp.weight_decay * torch.stack([(p ** 2).sum((1, 2)) for p in params]).sum(0)

    def clamp(leaves: Sequence[torch.Tensor], active: torch.Tensor) -> None:  # FT+L: ‖ΔW_r‖∞ ≤ ε
        eps = float(hp.norm_constraint or 0.0)  # only used when it is set
        for x in leaves:
            on = active.to(x.device)
            x[on] = x[on].clamp(-eps, eps)

    logs = fit_each(model, rows, leaves, changes, steps=hp.steps, lr=hp.lr, kl_factor=hp.kl_factor,
                    early_stop=hp.early_stop, penalty=decay,
                    project=clamp if hp.norm_constraint is not None else None)
    out = []
    for r, request in enumerate(requests):
        parts: dict[PartKey, Part] = {(l, hp.role): Part(x[r].detach().cpu().clone()) for l, x in zip(layers, leaves)}
        out.append(WeightDelta.from_model(model, parts, method=method, hparams=hp.to_dict(), requests=[request],
                                          info={"contexts": list(templates), "opt": logs[r]}))
    return out
