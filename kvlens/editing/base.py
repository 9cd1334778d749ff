"""The editing-method protocol, its registry, and what every method does around its math.

A method is a class with a registry ``name``, a hyperparameter dataclass and presets; its
``compute(model, requests)`` validates the requests and hyperparameters *before* any work,
measures each target's probability on its own prompt, runs the method's math (``_compute``),
measures again with the delta applied (then reverted), warns when the edit did not take, and
returns a :class:`~kvlens.editing.delta.WeightDelta`. The model is bit-identical afterwards.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import reduce
from typing import Any, ClassVar, TypeVar

from kvlens.editing._shared import EditProgress, on_progress, outcome, target_report
from kvlens.editing.delta import WeightDelta
from kvlens.editing.history import EditHistory
from kvlens.editing.hparams import check_fields, check_hparams, preset_for
from kvlens.editing.request import EditRequest, check_requests
from kvlens.models.kvmodel import KVModel

H = TypeVar("H")


class EditMethod(abc.ABC):
    """Base of all editing methods.

    Args:
        hparams: the full hyperparameters; else ``preset`` by name; else the preset matching the
            model's name; else :meth:`default_hparams` for the model.
        **overrides: fields replaced on whichever hyperparameters are chosen (``layer=8``).
    """

    name: ClassVar[str]
    presets: ClassVar[Mapping[str, Any]]

    def __init__(self, hparams: Any | None = None, *, preset: str | None = None, **overrides: Any) -> None:
        if preset is not None and preset not in self.presets:
            raise KeyError(f"no {self.name} preset {preset!r}; presets: {sorted(self.presets)}")
        if self.presets:  # the presets' type is the hyperparameter type: check names before any work
            hp_type = type(next(iter(self.presets.values())))
            check_hparams(hparams, hp_type, type(self).__name__)
            check_fields(hp_type, overrides, type(self).__name__)
        self._hparams, self._preset, self._overrides = hparams, preset, overrides

    def hparams_for(self, model: KVModel) -> Any:
        """The hyperparameters this method will use on ``model``."""
        hp = self._hparams
        if hp is None and self._preset is not None:
            hp = self.presets[self._preset]
        if hp is None:
            hp = preset_for(self.presets, model.name) or self.default_hparams(model)
        return replace(hp, **self._overrides) if self._overrides else hp

    @abc.abstractmethod
    def default_hparams(self, model: KVModel) -> Any:
        """Hyperparameters for a model without a preset."""

    @abc.abstractmethod
    def check(self, model: KVModel, hp: Any) -> None:
        """Raise a clear error for hyperparameters that do not fit ``model`` (before any work)."""

    @abc.abstractmethod
    def _compute(self, model: KVModel, requests: tuple[EditRequest, ...], hp: Any, **kwargs: Any) -> WeightDelta:
        """The method's math; must leave ``model`` bit-identical."""

    def compute(self, model: KVModel, requests: EditRequest | Iterable[EditRequest], *,
                report: bool = True, progress: Callable[[EditProgress], None] | None = None,
                **kwargs: Any) -> WeightDelta:
        """A :class:`WeightDelta` implementing ``requests`` on ``model`` (which is left unchanged).

        ``delta.info["outcome"]`` holds each target's probability before/after on its own prompt;
        a warning says plainly when the optimisation did not make the target top-1. ``progress``
        is called after each optimisation step (:class:`~kvlens.editing._shared.EditProgress`); an
        exception it raises stops the computation with the model left bit-identical.
        """
        model.require_local(f"{type(self).__name__}.compute")
        reqs = check_requests(requests)
        hp = self.hparams_for(model)
        self.check(model, hp)
        before = target_report(model, reqs) if report else None
        start = time.perf_counter()
        with on_progress(progress):
            delta = self._compute(model, reqs, hp, **kwargs)
        delta.info["seconds"] = time.perf_counter() - start
        if before is not None:
            delta.info["outcome"] = outcome(model, reqs, before, delta)
        return delta

    def __repr__(self) -> str:
        return f"{type(self).__name__}(preset={self._preset!r}, overrides={self._overrides})"


def check_layers(model: KVModel, layers: Sequence[int]) -> tuple[int, ...]:
    """Layers as non-negative indices; a clear error for any outside the model."""
    return tuple(model.check_layer(l) for l in layers)


def sequentially(model: KVModel, chunks: Sequence[Any], compute_one: Callable[[Any], WeightDelta]) -> WeightDelta:
    """Compute a delta per chunk, each on top of the previous ones, and compose them.

    The intermediate deltas are applied on an :class:`EditHistory` and all reverted at the end
    (also on error or interrupt), so the model is unchanged; the weight norm of every edited
    layer after each chunk is recorded in ``info["norm_history"]``, and each chunk's own info (with
    its number of requests, ``n_requests``) in ``info["chunks"]``.
    """
    history = EditHistory(model)
    deltas: list[WeightDelta] = []
    try:
        for chunk in chunks:
            deltas.append(compute_one(chunk))
            if len(chunks) > 1:
                history.push(deltas[-1])
    finally:
        history.undo_all()
    out = reduce(WeightDelta.compose, deltas)
    out.method, out.hparams = deltas[0].method, deltas[0].hparams
    out.info.update({k: v for k, v in deltas[0].info.items() if k != "components"})
    if len(deltas) > 1:
        out.info["chunks"] = [{**d.info, "n_requests": len(d.requests)} for d in deltas]
        out.info["norm_history"] = history.norms[: len(deltas) + 1]
    return out


_METHODS: dict[str, type[EditMethod]] = {}


def register_method(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator: make ``cls`` available as ``get_method(cls.name)``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"an editing method named {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[EditMethod]:
    """The editing method registered as ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"no editing method {name!r}; available: {sorted(_METHODS)}") from None


def available_methods() -> list[str]:
    return sorted(_METHODS)
