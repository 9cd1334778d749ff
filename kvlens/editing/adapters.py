"""Edits applied *beside* the weights, with the apply/revert contract of :class:`WeightDelta`.

Two ways, for weights that cannot (or must not) be written:

* :func:`apply_beside` - a low-rank adapter next to each edited projection: a forward hook adds
  the part's change to the projection's output, ``y = W x + ΔW x`` with ``ΔW = left @ right``
  (LoRA's form, Hu et al. 2021, Eq. 3). The stored weights are never touched, so revert (removing
  the hooks) is exact, and it works on bitsandbytes' packed 4-bit layers. Every forward sees the
  edit: traces, scoring, generation.
* :func:`intervened` - the delta's value parts as standing writes of the nnsight seam
  (:func:`kvlens.tracing.standing`): the FFN output gains ``k ΔV`` (FFN(x) = k V + b, Geva et
  al. 2021, Eq. 2), with ``k`` read in the same forward. Runs wherever the seam runs, remote
  models included (NDIF: evaluate an edit without touching the served weights).

Both check the delta against the model's fingerprints first: a delta computed on other weights
(another checkpoint, or a 4-bit copy of a full-precision one and back) is refused unless
``force=True`` asks to transfer it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch

from kvlens import tracing
from kvlens.models.kvmodel import KVModel


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes packed parameter (4-bit ``Params4bit`` or 8-bit)."""
    return getattr(weight, "quant_state", None) is not None or getattr(weight, "SCB", None) is not None


def quantized_parts(delta: Any, model: KVModel) -> list[tuple[int, str]]:
    """The parts of ``delta`` whose weights in ``model`` are quantized or offloaded by accelerate
    (``device_map`` to CPU/disk: the module holds a meta tensor): written beside, not into."""
    return [key for key in delta.parts if model.local_weights and key[1] in model.roles()
            and (is_quantized(w := model.projection(*key).weight) or w.is_meta)]


def prepare_kbit(model: KVModel) -> None:
    """QLoRA's preparation of a quantized model (peft's ``prepare_model_for_kbit_training``), no-op otherwise.

    Without gradient checkpointing it freezes every parameter and casts half-precision
    non-quantized ones to float32; kvlens loads 4-bit models with float32 compute and frozen
    weights, so the model is left bit-identical (the call is kept so the recipe is peft's own).
    """
    hf = model.hf
    if not (getattr(hf, "is_loaded_in_4bit", False) or getattr(hf, "is_loaded_in_8bit", False)):
        return
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(hf, use_gradient_checkpointing=False)


class BesideEdit:
    """The handle of an edit applied beside the weights: ``revert()`` removes it (exactly)."""

    def __init__(self, delta: Any, model: KVModel, undo: Callable[[], None], how: str) -> None:
        self.delta, self.model, self._undo, self.how = delta, model, undo, how
        self.active = True

    def revert(self, *, force: bool = False) -> None:
        """Remove the adapters / interventions (``force`` is accepted for the common contract)."""
        if not self.active:
            raise RuntimeError("this edit was already reverted")
        self._undo()
        self.active = False
        self.delta._handles.pop(id(self.model), None)

    def __repr__(self) -> str:
        return f"BesideEdit({self.delta.method}, {self.how}, active={self.active})"


def check_beside(delta: Any, model: KVModel, force: bool) -> None:
    """Refuse a double apply, unknown layers or roles, wrong shapes and (unless ``force``) other weights."""
    if delta.is_applied(model):
        raise RuntimeError(f"{delta!r} is already applied to this model; revert it before applying again")
    for layer, role in delta.parts:
        model.check_layer(layer)
        if role not in model.roles():
            raise ValueError(f"{model.spec.model_type} has no {role} projection")
        shape = model.canonical(model.weight(layer, role), role).shape
        if tuple(shape) != delta.parts[(layer, role)].shape:
            raise ValueError(f"delta part {layer}.{role} has shape {delta.parts[(layer, role)].shape}, "
                             f"the model's weight {tuple(shape)}")
    stale = [] if force else delta.matches(model)
    if stale:
        raise ValueError(
            f"this delta was computed for other weights at {[f'{l}.{r}' for l, r in stale]} (model "
            f"{delta.model_name!r}; a 4-bit and a full-precision copy of one checkpoint differ too); "
            "pass force=True to transfer it to this model anyway")


def _adapter_change(left: torch.Tensor, right: torch.Tensor | None, value: bool) -> Callable:
    """``x ↦ x ΔWᵀ``, the change of a projection's output (``ΔW`` canonical ``[d_ff, d_model]``).

    Value projections map ``k`` (d_ff) to d_model: the change is ``k @ ΔV``; key and gate
    projections map ``x`` (d_model) to d_ff: ``x @ ΔKᵀ``.
    """

    def change(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        a, b = left.to(x.device).float(), None if right is None else right.to(x.device).float()
        if value:
            return x @ a if b is None else (x @ a) @ b
        return x @ a.T if b is None else (x @ b.T) @ a.T

    return change


def apply_beside(delta: Any, model: KVModel, *, force: bool = False) -> BesideEdit:
    """Apply ``delta`` as low-rank adapters next to the edited projections (weights untouched)."""
    model.require_local("applying an edit as adapters")
    check_beside(delta, model, force)
    handles = []
    try:
        for (layer, role), part in delta.parts.items():
            change = _adapter_change(part.left.detach(), None if part.right is None else part.right.detach(),
                                     role == "value")
            module = cast(torch.nn.Module, model.projection(layer, role))  # a local projection is a Module
            handles.append(tracing.add_beside(module, change))
    except BaseException:
        for h in handles:
            h.remove()
        raise

    def undo() -> None:
        for h in handles:
            h.remove()

    edit = BesideEdit(delta, model, undo, "adapters")
    delta._handles[id(model)] = edit
    return edit


@contextlib.contextmanager
def intervened(delta: Any, model: KVModel, *, force: bool = False) -> Iterator[BesideEdit]:
    """``with intervened(delta, model):`` every forward through the seam adds the value edit.

    Only value parts can run as interventions (:meth:`WeightDelta.writes`); remote models included.
    """
    writes = delta.writes(model)  # refuses key/gate parts
    check_beside(delta, model, force)
    standing = tracing.standing(model, writes)
    standing.__enter__()

    def leave() -> None:
        standing.__exit__(None, None, None)

    edit = BesideEdit(delta, model, leave, "interventions")
    delta._handles[id(model)] = edit
    try:
        yield edit
    finally:
        if edit.active:
            edit.revert()
