"""An undo stack for sequences of edits, recording weight norms per edited layer.

Sequential editing makes edited matrices grow (ENCORE, Gupta et al. 2025; EasyEdit #236, #47);
:attr:`EditHistory.norms` keeps ``‖W‖_F`` of every edited weight after each step, ready to plot.
"""

from __future__ import annotations

from typing import Any

import torch

from kvlens.editing.delta import AppliedEdit, WeightDelta
from kvlens.models.kvmodel import KVModel


class EditHistory:
    """Apply deltas one after another on ``model``; undo them in reverse order.

    Example::

        history = EditHistory(model)
        for batch in batches:
            history.push(kv.MEMIT().compute(model, batch))
        history.undo_all()            # the model is bit-identical to before
    """

    def __init__(self, model: KVModel) -> None:
        self.model = model
        self._stack: list[AppliedEdit] = []
        self.norms: list[dict[str, float]] = []

    def __len__(self) -> int:
        return len(self._stack)

    @property
    def deltas(self) -> list[WeightDelta]:
        return [h.delta for h in self._stack]

    def _record(self) -> None:
        keys = sorted({key for h in self._stack for key in h.delta.parts})
        row: dict[str, float] = {"step": float(len(self._stack))}
        for layer, role in keys:
            w = self.model.projection(layer, role).weight
            row[f"{layer}.{role}"] = float(torch.linalg.matrix_norm(w.detach().float()))
        self.norms.append(row)

    def push(self, delta: WeightDelta, *, force: bool = False) -> AppliedEdit:
        """Apply ``delta`` on top of the current edits and record the norms."""
        if not self._stack and not self.norms:
            self.norms.append({"step": 0.0, **{f"{l}.{r}": float(torch.linalg.matrix_norm(
                self.model.projection(l, r).weight.detach().float())) for l, r in delta.parts}})
        handle = delta.apply(self.model, force=force)
        self._stack.append(handle)
        self._record()
        return handle

    def undo(self) -> WeightDelta:
        """Revert the last edit still applied; returns its delta.

        Edits reverted by hand (``handle.revert()``) are dropped from the stack, not reverted twice.
        """
        while self._stack and not self._stack[-1].active:
            self._stack.pop()
        if not self._stack:
            raise IndexError("nothing to undo")
        handle = self._stack.pop()
        handle.revert()
        self._record()
        return handle.delta

    def undo_all(self) -> None:
        """Revert every edit, newest first: the weights are bitwise those before the first push."""
        while any(h.active for h in self._stack):
            self.undo()
        self._stack.clear()

    def summary(self) -> dict[str, Any]:
        return {"edits": [d.summary() for d in self.deltas], "norms": self.norms}
