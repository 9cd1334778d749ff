"""Reversible weight changes: the one object every editing method returns.

A :class:`WeightDelta` holds, for each edited ``(layer, role)`` with role ∈ key / gate / value, a
change of the canonical ``[d_ff, d_model]`` view (row i = memory i), dense or as low-rank factors
``left @ right``. It is converted to the family's stored layout only when applied
(:meth:`KVModel.stored`). Applying keeps the exact original tensors; reverting copies them back,
so a round trip is bit-for-bit. Each delta carries a per-weight fingerprint of the model it was
computed for, and refuses other weights.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlens.editing.request import EditRequest
from kvlens.errors import BadInput, EditStateError
from kvlens.models.kvmodel import KVModel, Role, Site
from kvlens.tracing import Write

PartKey = tuple[int, Role]


@dataclass(frozen=True)
class Part:
    """A change of one canonical ``[d_ff, d_model]`` weight: ``left`` alone (dense) or ``left @ right``."""

    left: torch.Tensor
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.right is not None and (self.left.dim() != 2 or self.right.dim() != 2
                                       or self.left.shape[1] != self.right.shape[0]):
            raise ValueError(f"low-rank factors do not chain: {tuple(self.left.shape)} @ {tuple(self.right.shape)}")
        for name, t in (("left", self.left), ("right", self.right)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise BadInput(f"the {name} factor of this change contains NaN or Inf "
                               f"({int((~torch.isfinite(t)).sum())} of {t.numel()} entries): it cannot be written "
                               "into weights; recompute the delta (check the method's statistics and learning rate)")

    @property
    def shape(self) -> tuple[int, int]:
        rows = self.left.shape[0]
        cols = self.left.shape[1] if self.right is None else self.right.shape[1]
        return (int(rows), int(cols))

    @property
    def rank(self) -> int | None:
        """The factor rank (None for a dense change)."""
        return None if self.right is None else int(self.left.shape[1])

    def dense(self) -> torch.Tensor:
        """The full ``[d_ff, d_model]`` change in float32."""
        if self.right is None:
            return self.left.float()
        return self.left.float() @ self.right.float()

    def norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.dense()))


def _part_fingerprint(model: KVModel, key: PartKey) -> str:
    return model.fingerprint([key[0]], [key[1]])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (a NaN equals a NaN with the same bits, unlike ``torch.equal``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def _edit_stacks(model: KVModel) -> dict[PartKey, list[AppliedEdit]]:
    """Per weight, the edits applied to it on ``model``, oldest first (kept on the model object)."""
    stacks: dict[PartKey, list[AppliedEdit]] | None = vars(model).get("_kvlens_edits")
    if stacks is None:
        stacks = vars(model)["_kvlens_edits"] = {}
    return stacks


def _applied_list(model: KVModel) -> list[AppliedEdit]:
    """The model's applied edits in the order applied (kept on the model, beside the per-weight stacks)."""
    return model.__dict__.setdefault("_kvlens_applied_edits", [])


def applied_edits(model: KVModel) -> list[AppliedEdit]:
    """The edits applied to ``model`` now, oldest first (every apply and revert keeps this current)."""
    return list(_applied_list(model))


class AppliedEdit:
    """The handle :meth:`WeightDelta.apply` returns: ``revert()`` removes exactly this edit.

    Edits applied on top of each other form a stack per weight. Reverting the newest restores
    the weights bitwise; reverting an older one rebuilds the weights as if it had never been
    applied (the later edits written again, in order, on the weights before it), so every
    other edit stays applied and stays revertible, and ``is_applied`` always tells the truth.
    """

    def __init__(self, delta: WeightDelta, model: KVModel,
                 originals: dict[PartKey, torch.Tensor], written: dict[PartKey, torch.Tensor]) -> None:
        self.delta, self.model = delta, model
        self._originals, self._written = originals, written
        self.active = True

    def revert(self, *, force: bool = False) -> None:
        """Remove this edit's change; the weights end as if it had never been applied.

        Raises:
            EditStateError: already reverted, or a weight was changed outside kvlens since the
                last edit of it (``force=True`` restores the weights regardless).
        """
        if not self.active:
            raise EditStateError("this edit was already reverted")
        stacks = _edit_stacks(self.model)
        for key in self._written:
            top = stacks[key][-1]
            if not force and not _same_bits(self.model.projection(*key).weight, top._written[key]):
                raise EditStateError(
                    f"layer {key[0]} {key[1]} changed after this edit was applied, outside kvlens's "
                    "apply/revert; revert(force=True) restores the weights as they were before it")
        values: dict[PartKey, torch.Tensor] = {}
        rebuilt: list[tuple[AppliedEdit, PartKey, torch.Tensor, torch.Tensor]] = []
        for key in self._written:  # compute everything first: a failure changes nothing
            stack = stacks[key]
            base = self._originals[key]
            for later in stack[stack.index(self) + 1:]:
                wrote = later.delta._added(self.model, key, base)
                rebuilt.append((later, key, base, wrote))
                base = wrote
            values[key] = base
        with torch.no_grad():
            for key, value in values.items():
                self.model.projection(*key).weight.copy_(value)
        for later, key, base, wrote in rebuilt:
            later._originals[key], later._written[key] = base, wrote
        for key in self._written:
            stacks[key].remove(self)
            if not stacks[key]:
                del stacks[key]
        self.active = False
        self.delta._handles.pop(id(self.model), None)
        _applied_list(self.model).remove(self)

    def __repr__(self) -> str:
        return f"AppliedEdit({self.delta.method}, active={self.active})"


class WeightDelta:
    """A reversible change of FFN weights, with its provenance.

    Attributes:
        parts: ``{(layer, role): Part}`` in canonical orientation.
        method: the editing method's registry name.
        hparams: the hyperparameters, as plain data.
        requests: the edit requests it implements.
        base: ``{(layer, role): fingerprint}`` of the weights it was computed for.
        info: plain-data report (target probabilities, prefixes, norms, timings).
    """

    def __init__(self, parts: Mapping[PartKey, Part], *, method: str, hparams: Mapping[str, Any],
                 requests: Sequence[EditRequest], base: Mapping[PartKey, str],
                 model_name: str = "", info: Mapping[str, Any] | None = None) -> None:
        if not parts:
            raise ValueError("a WeightDelta needs at least one part")
        missing = set(parts) - set(base)
        if missing:
            raise ValueError(f"no fingerprint for parts {sorted(missing)}")
        self.parts = dict(sorted(parts.items()))
        self.method, self.hparams = method, json.loads(dumps(dict(hparams)))  # plain JSON data
        self.requests, self.base = tuple(requests), dict(base)
        self.model_name, self.info = model_name, dict(info or {})
        self._handles: dict[int, AppliedEdit] = {}

    @classmethod
    def from_model(cls, model: KVModel, parts: Mapping[PartKey, Part], **kwargs: Any) -> WeightDelta:
        """A delta whose fingerprints are taken from ``model``'s current weights."""
        base = {key: _part_fingerprint(model, key) for key in parts}
        return cls(parts, base=base, model_name=model.name, **kwargs)

    # ---- inspection --------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.parts})

    @property
    def roles(self) -> list[str]:
        return sorted({role for _, role in self.parts})

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each part, keyed ``"layer.role"``."""
        return {f"{layer}.{role}": part.norm() for (layer, role), part in self.parts.items()}

    def matches(self, model: KVModel) -> list[PartKey]:
        """The parts whose current weights in ``model`` differ from the ones it was computed for."""
        return [key for key in self.parts if _part_fingerprint(model, key) != self.base[key]]

    def is_applied(self, model: KVModel) -> bool:
        return id(model) in self._handles

    def __repr__(self) -> str:
        parts = ", ".join(f"{l}.{r}" + (f"(rank {p.rank})" if p.rank else "") for (l, r), p in self.parts.items())
        return f"WeightDelta({self.method}, {len(self.requests)} requests, parts: {parts})"

    # ---- apply / revert ------------------------------------------------------------------
    def _check_target(self, model: KVModel, force: bool) -> None:
        if self.is_applied(model):
            raise EditStateError(f"{self!r} is already applied to this model; revert it before applying again")
        for layer, role in self.parts:
            model.check_layer(layer)
            if role not in model.roles():
                raise ValueError(f"{model.spec.model_type} has no {role} projection")
            w = model.projection(layer, role).weight
            if getattr(w, "quant_state", None) is not None or getattr(w, "SCB", None) is not None:
                raise TypeError("cannot apply a WeightDelta to quantized weights; use delta.writes() in a trace")
            if tuple(model.canonical(w, role).shape) != self.parts[(layer, role)].shape:
                raise ValueError(f"delta part {layer}.{role} has shape {self.parts[(layer, role)].shape}, "
                                 f"the model's weight {tuple(model.canonical(w, role).shape)}")
        stale = [] if force else self.matches(model)
        if stale:
            raise ValueError(
                f"this delta was computed for other weights at {[f'{l}.{r}' for l, r in stale]} "
                f"(model {self.model_name!r}); pass force=True to apply anyway")

    def _added(self, model: KVModel, key: PartKey, base: torch.Tensor) -> torch.Tensor:
        """``base`` (a stored weight) plus this delta's part at ``key``, in ``base``'s dtype.

        Raises:
            BadInput: the change holds NaN/Inf, or adding it overflows the weight's dtype
                where the weight was finite (the weight's own NaN/Inf are left as they are).
        """
        change = model.stored(self.parts[key].dense().to(base.device), key[1])
        if not bool(torch.isfinite(change).all()):
            raise BadInput(f"delta part {key[0]}.{key[1]} contains NaN or Inf: refusing to write it into "
                           "the weights (the model is unchanged); recompute the delta")
        out = (base.float() + change).to(base.dtype)
        overflow = ~torch.isfinite(out) & torch.isfinite(base)
        if bool(overflow.any()):
            raise BadInput(f"adding delta part {key[0]}.{key[1]} would overflow {base.dtype} at "
                           f"{int(overflow.sum())} entries (largest change {float(change.abs().max()):.3g}): "
                           "the model is unchanged; load the model in float32 or use a smaller edit")
        return out

    def _write(self, model: KVModel, key: PartKey, value: torch.Tensor) -> None:
        """Copy ``value`` into the stored weight at ``key`` (in place)."""
        with torch.no_grad():
            model.projection(*key).weight.copy_(value)

    def apply(self, model: KVModel, *, force: bool = False) -> AppliedEdit:
        """Add the change to ``model``'s weights; ``handle.revert()`` (or ``delta.revert()``) undoes it.

        The new weights are computed and checked (finite, no overflow) before any is written;
        the original tensors are kept, and if anything (including KeyboardInterrupt) stops the
        writes, every weight is restored before the exception propagates. Deltas applied on
        top of each other can be reverted in any order (see :class:`AppliedEdit`).

        Raises:
            EditStateError: this delta is already applied to ``model``.
            ValueError: the model's weights are not the ones the delta was computed for.
            BadInput: the change is not finite or overflows the weights' dtype.
        """
        model.require_local("delta.apply (writing weights)")
        from kvlens.editing.adapters import apply_beside, quantized_parts

        if quantized_parts(self, model):  # packed 4-bit/8-bit weights: low-rank adapters beside them
            return apply_beside(self, model, force=force)  # type: ignore[return-value]
        self._check_target(model, force)
        originals = {key: model.projection(*key).weight.detach().clone() for key in self.parts}
        written = {key: self._added(model, key, originals[key]) for key in self.parts}
        try:
            for key, value in written.items():
                self._write(model, key, value)
        except BaseException:
            with torch.no_grad():
                for key, orig in originals.items():
                    model.projection(*key).weight.copy_(orig)
            raise
        handle = AppliedEdit(self, model, originals, written)
        stacks = _edit_stacks(model)
        for key in self.parts:
            stacks.setdefault(key, []).append(handle)
        self._handles[id(model)] = handle
        _applied_list(model).append(handle)
        return handle

    def revert(self, model: KVModel | None = None) -> None:
        """Undo this delta's application (on ``model``, or on its only model)."""
        if model is not None:
            handle = self._handles.get(id(model))
        elif len(self._handles) == 1:
            handle = next(iter(self._handles.values()))
        else:
            handle = None
        if handle is None:
            raise EditStateError("this delta is not applied" + ("" if model is None else " to that model"))
        handle.revert()

    @contextlib.contextmanager
    def applied(self, model: KVModel, *, force: bool = False) -> Iterator[AppliedEdit]:
        """``with delta.applied(model): ...`` runs the block with the edit, then reverts it.

        Edits applied inside the block and still applied at its end stay applied (on the
        weights as they were before this one); only this delta's change is removed."""
        handle = self.apply(model, force=force)
        try:
            yield handle
        finally:
            if handle.active:
                handle.revert(force=True)

    def intervened(self, model: KVModel, *, force: bool = False) -> contextlib.AbstractContextManager:
        """``with delta.intervened(model):`` the value edit as standing trace writes (weights untouched;
        remote models too). See :func:`kvlens.editing.adapters.intervened`."""
        from kvlens.editing.adapters import intervened

        return intervened(self, model, force=force)

    def writes(self, model: KVModel) -> dict[Site, Write]:
        """The delta as trace writes for :func:`kvlens.tracing.run`; the weights stay untouched.

        A value part adds ``k ΔV`` to the FFN output, with k the key activation read in the same
        forward (FFN(x) = k V + b). Key and gate parts are refused here (apply those deltas to the
        weights); the per-row writes of independent edits run them locally at the ``key_pre`` /
        ``gate_pre`` sites (:mod:`kvlens.editing.per_row`).
        """
        writes: dict[Site, Write] = {}
        for (layer, role), part in self.parts.items():
            if role != "value":
                raise ValueError(f"part {layer}.{role}: only value parts can run as a trace intervention; "
                                 "use delta.apply(model) / delta.applied(model) for key and gate edits")
            stash: dict[str, torch.Tensor] = {}

            def keep(state: torch.Tensor, stash: dict[str, torch.Tensor] = stash) -> torch.Tensor:
                stash["k"] = state
                return state

            def add(state: torch.Tensor, stash: dict[str, torch.Tensor] = stash, left: torch.Tensor = part.left,
                    right: torch.Tensor | None = part.right) -> torch.Tensor:  # torch only: runs remotely too
                change = stash["k"].float() @ left.to(state.device).float()
                if right is not None:
                    change = change @ right.to(state.device).float()
                return state + change.to(state.dtype)

            writes[Site("key", layer)] = keep
            writes[Site("mlp", layer)] = add
        return writes

    # ---- algebra -------------------------------------------------------------------------
    def compose(self, other: WeightDelta) -> WeightDelta:
        """One delta doing ``self`` then ``other``: parts added (low-rank factors concatenated).

        Fingerprints of shared weights are ``self``'s (the composed delta applies to the weights
        ``self`` was computed for).
        """
        parts = dict(self.parts)
        for key, p in other.parts.items():
            q = parts.get(key)
            if q is None:
                parts[key] = p
            elif q.right is not None and p.right is not None:
                parts[key] = Part(torch.cat([q.left, p.left], 1), torch.cat([q.right, p.right], 0))
            else:
                parts[key] = Part(q.dense() + p.dense())
        base = {**other.base, **self.base}
        info = {"components": [d.summary() for d in (self, other)]}
        return WeightDelta(parts, method=f"{self.method}+{other.method}", hparams={},
                           requests=self.requests + other.requests, base=base,
                           model_name=self.model_name, info=info)

    __add__ = compose

    def summary(self) -> dict[str, Any]:
        """Plain data describing the delta (no tensors)."""
        return {"method": self.method, "model": self.model_name, "hparams": self.hparams,
                "requests": [r.to_dict() for r in self.requests], "norms": self.norms(),
                "ranks": {f"{l}.{r}": p.rank for (l, r), p in self.parts.items()}}

    # ---- files ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the delta to a safetensors file (tensors + JSON metadata; never pickle)."""
        from kvlens.editing.files import save_delta

        save_delta(self, path)

    @classmethod
    def load(cls, path: str, model: KVModel | None = None) -> WeightDelta:
        """Read a delta saved by :meth:`save`; with ``model``, refuse it unless its weights match."""
        from kvlens.editing.files import load_delta

        return load_delta(path, model)


def json_default(obj: Any) -> Any:
    """JSON encoder fallback for tuples of tensors in ``info``."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=json_default, sort_keys=True)
