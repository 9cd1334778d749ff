"""Per-row edits through the seam: batch row b runs with its own owner's value change.

Independent edits (each request edited alone) do not interact, so many of them can share one
forward if each row carries its owner's change. A value part ΔV of layer l changes the FFN
output by ``k ΔV`` (k the key activation, FFN(x) = k V + b, as :meth:`WeightDelta.writes`);
here row b adds ``k_b ΔV_{owner(b)}``, with the owners' factors stacked: low-rank parts as
``[n, d_ff, r] @ [n, r, d_model]`` (ranks padded with zero columns, which add exactly nothing),
dense ones as ``[n, d_ff, d_model]``, in batched matmuls. Key and gate parts change the FFN
inside its nonlinearity, which no site exposes: they are refused (apply those deltas instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kvlens.editing._shared import _Adam, build_rows, forward_logprobs, request_losses
from kvlens.editing.delta import Part, PartKey, WeightDelta
from kvlens.editing.hparams import FTHparams
from kvlens.editing.request import EditRequest
from kvlens.models.kvmodel import KVModel, Site
from kvlens.tracing import Write


@dataclass(frozen=True)
class RowChanges:
    """Value changes of ``n`` owners at some layers: ``factors[layer] = (left, right or None)``."""

    factors: dict[int, tuple[torch.Tensor, torch.Tensor | None]]
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
        out: dict[Site, Write] = {}
        for layer, (left, right) in self.factors.items():
            stash: dict[str, torch.Tensor] = {}

            def keep(state: torch.Tensor, stash: dict[str, torch.Tensor] = stash) -> torch.Tensor:
                stash["k"] = state
                return state

            def add(state: torch.Tensor, stash: dict[str, torch.Tensor] = stash, left: torch.Tensor = left,
                    right: torch.Tensor | None = right) -> torch.Tensor:
                k = stash["k"].to(left.device, left.dtype)
                if grouped:  # [n·c, T, d_ff] -> [n, c·T, d_ff]
                    change = torch.bmm(k.reshape(self.n, -1, k.shape[-1]), left)
                    change = (torch.bmm(change, right) if right is not None else change).reshape(*k.shape[:-1], -1)
                else:
                    idx = owners.to(left.device)
                    change = torch.bmm(k, left[idx])
                    if right is not None:
                        change = torch.bmm(change, right[idx])
                return state + change.to(state.device, state.dtype)

            out[Site("key", layer)] = keep
            out[Site("mlp", layer)] = add
        return out


def stack_changes(parts: Sequence[Mapping[PartKey, Part]], device: torch.device | str = "cpu") -> RowChanges:
    """Stack the value parts of each owner (``parts[o]``: owner o's ``{(layer, role): Part}``)."""
    if not parts:
        raise ValueError("no per-row changes to stack: pass at least one owner's parts")
    other = sorted({key for p in parts for key in p if key[1] != "value"})
    if other:
        raise ValueError(f"parts {[f'{l}.{r}' for l, r in other]}: only value parts run per row through the seam "
                         "(key and gate parts change the FFN inside its nonlinearity); apply those deltas instead")
    factors: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for layer in sorted({l for p in parts for (l, _) in p}):
        mine = [p.get((layer, "value")) for p in parts]
        shape = next(q.shape for q in mine if q is not None)
        if any(q is not None and q.right is None for q in mine):  # one dense: all dense
            dense = [q.dense() if q is not None else torch.zeros(shape) for q in mine]
            factors[layer] = (torch.stack(dense).to(device), None)
            continue
        rank = max(q.rank or 0 for q in mine if q is not None)
        left = torch.zeros(len(mine), shape[0], rank)
        right = torch.zeros(len(mine), rank, shape[1])
        for o, q in enumerate(mine):
            if q is not None:
                if q.right is None:  # ruled out above: one dense part makes the layer dense
                    raise RuntimeError(f"layer {layer}: a dense part among the low-rank ones to stack")
                left[o, :, : q.rank] = q.left.float()
                right[o, : q.rank] = q.right.float()
        factors[layer] = (left.to(device), right.to(device))
    return RowChanges(factors, len(parts))


def finetune_values_each(model: KVModel, hp: FTHparams, requests: Sequence[EditRequest], templates: Sequence[str],
                         *, method: str = "ft") -> list[WeightDelta]:
    """Value fine-tuning of each request alone, all trained in the same forwards (per-row ΔV_r).

    The same loss, Adam, early stop (per request), FT-W decay and FT+L clamp as
    :class:`~kvlens.editing.finetune.FineTune` on one request, with each request's ΔV_r a leaf of
    its own rows' FFN output (``k ΔV_r``) instead of a change of the shared weight. Adam is
    elementwise and the loss a sum over requests, so each ΔV_r follows its own run; a request that
    reached ``early_stop`` stops updating (:class:`~kvlens.editing._shared._Adam` on active rows).
    """
    if hp.role != "value":
        raise ValueError(f"per-row fine-tuning runs on value parts only (role {hp.role!r} changes the FFN "
                         "inside its nonlinearity): compute those edits one by one")
    layers = tuple(model.check_layer(l) for l in hp.layers)
    rows = build_rows(model, requests, templates, kl=hp.kl_factor > 0)
    n, dev = len(requests), model.device
    leaves = {l: torch.zeros(n, model.d_ff, model.d_model, device=dev) for l in layers}
    adams = {l: _Adam(hp.lr, torch.zeros_like(leaves[l]), torch.zeros_like(leaves[l])) for l in layers}
    active = torch.ones(n, dtype=torch.bool)
    kl_init: torch.Tensor | None = None
    losses: list[list[float]] = [[] for _ in range(n)]
    final_nll = [0.0] * n
    for _ in range(hp.steps):
        params = {l: leaves[l].clone().requires_grad_(True) for l in layers}
        changes = RowChanges({l: (p, None) for l, p in params.items()}, n)
        tgt_logp, kl_logp = forward_logprobs(model, rows, None, layer=model.n_layers - 1,
                                             extra=changes.writes(rows.request))
        nll, kl = request_losses(rows, tgt_logp, kl_logp, kl_init, hp.kl_factor)
        if kl_init is None and hp.kl_factor > 0:
            kl_init = kl_logp.detach()
        loss = nll + kl + hp.weight_decay * sum((p ** 2).sum((1, 2)) for p in params.values())  # FT-W
        logged, nll_now = loss.detach().cpu(), nll.detach().cpu()
        for r in active.nonzero().flatten().tolist():
            losses[r].append(float(logged[r]))
            final_nll[r] = float(nll_now[r])
        active &= ~(nll_now < hp.early_stop)
        if not bool(active.any()):
            break
        grads = torch.autograd.grad(loss[active.to(loss.device)].sum(), list(params.values()))
        with torch.no_grad():
            for l, g in zip(layers, grads):
                adams[l].step(leaves[l], g, active.to(dev))
                if hp.norm_constraint is not None:  # FT+L: ‖ΔW‖∞ ≤ ε
                    leaves[l][active] = leaves[l][active].clamp(-hp.norm_constraint, hp.norm_constraint)
    out = []
    for r, request in enumerate(requests):
        parts: dict[PartKey, Part] = {(l, "value"): Part(leaves[l][r].detach().cpu().clone()) for l in layers}
        info = {"contexts": list(templates),
                "opt": {"loss": losses[r], "steps": len(losses[r]), "final_nll": [final_nll[r]]}}
        out.append(WeightDelta.from_model(model, parts, method=method, hparams=hp.to_dict(), requests=[request],
                                          info=info))
    return out
