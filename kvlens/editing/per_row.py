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

from kvlens.editing.delta import Part, PartKey
from kvlens.models.kvmodel import Site
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
        out: dict[Site, Write] = {}
        for layer, (left, right) in self.factors.items():
            stash: dict[str, torch.Tensor] = {}

            def keep(state: torch.Tensor, stash: dict[str, torch.Tensor] = stash) -> torch.Tensor:
                stash["k"] = state
                return state

            def add(state: torch.Tensor, stash: dict[str, torch.Tensor] = stash, left: torch.Tensor = left,
                    right: torch.Tensor | None = right) -> torch.Tensor:
                idx = owners.to(left.device)
                change = torch.bmm(stash["k"].float().to(left.device), left[idx])
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
                left[o, :, : q.rank] = q.left.float()
                right[o, : q.rank] = q.right.float()
        factors[layer] = (left.to(device), right.to(device))
    return RowChanges(factors, len(parts))
