"""Saving and loading :class:`~kvlens.editing.delta.WeightDelta` as safetensors (never pickle).

The file holds the factors as tensors named ``"{layer}.{role}.left"`` / ``".right"`` and one JSON
metadata entry with the method, hyperparameters, requests, library versions, the per-weight
fingerprints of the model the delta was computed for, and the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvlens.editing.delta import Part, PartKey, WeightDelta, dumps
from kvlens.editing.request import EditRequest
from kvlens.errors import CorruptFile, KVLensError
from kvlens.fileio import atomic_path, check_folder
from kvlens.models.kvmodel import KVModel
from kvlens.version import versions

FORMAT = "kvlens.WeightDelta/1"


def _versions() -> dict[str, str]:
    return versions(("kvlens", "torch", "transformers"))


#: Metadata fields every delta file has (``versions`` and ``info`` are optional on load).
_REQUIRED = ("format", "method", "hparams", "requests", "base")


def save_delta(delta: WeightDelta, path: str | Path) -> None:
    """Write ``delta`` to ``path`` (safetensors), through a temporary file renamed into place.

    Raises:
        MissingFolder: the folder of ``path`` does not exist (nothing is written).
    """
    from safetensors import torch as st

    path = check_folder(path, "delta")

    tensors: dict[str, torch.Tensor] = {}
    for (layer, role), part in delta.parts.items():
        tensors[f"{layer}.{role}.left"] = part.left.detach().cpu().contiguous()
        if part.right is not None:
            tensors[f"{layer}.{role}.right"] = part.right.detach().cpu().contiguous()
    meta = {"format": FORMAT, "method": delta.method, "hparams": delta.hparams,
            "requests": [r.to_dict() for r in delta.requests], "model": delta.model_name,
            "base": {f"{l}.{r}": fp for (l, r), fp in delta.base.items()},
            "versions": _versions(), "info": delta.info}
    with atomic_path(path) as tmp:
        st.save_file(tensors, str(tmp), metadata={"kvlens": dumps(meta)})


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no delta file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("kvlens")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFile(f"{path} is not a safetensors file ({exc}); kvlens deltas are saved "
                          "with WeightDelta.save and never read from pickles") from None
    if raw is None:
        raise CorruptFile(f"{path} is a safetensors file but not a kvlens WeightDelta (no 'kvlens' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptFile(f"{path}: its 'kvlens' metadata is not valid JSON ({exc}); the file was altered "
                          "or not written by WeightDelta.save: save the delta again") from None
    if not isinstance(meta, dict):
        raise CorruptFile(f"{path}: its 'kvlens' metadata is a JSON {type(meta).__name__}, not an object")
    missing = [f for f in _REQUIRED if f not in meta]
    if missing:
        raise CorruptFile(f"{path}: the delta metadata lacks field(s) {', '.join(map(repr, missing))} "
                          f"(it has {sorted(meta)}); save the delta again with WeightDelta.save")
    if meta["format"] != FORMAT:
        raise CorruptFile(f"{path} has format {meta['format']!r}, expected {FORMAT!r}")
    return tensors, meta


def _key(name: str) -> PartKey:
    layer, role = name.split(".")
    if role not in ("key", "gate", "value"):
        raise ValueError(f"unknown role {role!r}")
    return (int(layer), role)  # type: ignore[return-value]


def _build(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> WeightDelta:
    """The delta described by a file's tensors and metadata; :class:`CorruptFile` naming what is wrong."""
    parts: dict[PartKey, Part] = {}
    base: dict[PartKey, str] = {}
    if not isinstance(meta["base"], dict) or not meta["base"]:
        raise CorruptFile(f"{path}: field 'base' must map 'layer.role' to fingerprints, got {meta['base']!r}")
    for name, fp in meta["base"].items():
        try:
            key = _key(name)
        except ValueError:
            raise CorruptFile(f"{path}: field 'base' names {name!r}, not 'layer.role' "
                              "(role key, gate or value)") from None
        left = tensors.get(f"{name}.left")
        if left is None:
            raise CorruptFile(f"{path}: tensor {name}.left is missing")
        try:
            parts[key] = Part(left, tensors.get(f"{name}.right"))
        except ValueError as exc:
            raise CorruptFile(f"{path}: tensor {name}: {exc}") from None
        base[key] = str(fp)
    try:
        requests = [EditRequest.from_dict(r) for r in meta["requests"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptFile(f"{path}: field 'requests' does not hold edit requests "
                          f"({type(exc).__name__}: {exc})") from None
    raw_info = meta.get("info")
    info = raw_info if isinstance(raw_info, dict) else {}
    try:
        return WeightDelta(parts, method=str(meta["method"]), hparams=meta["hparams"], requests=requests,
                           base=base, model_name=meta.get("model", ""),
                           info={**info, "versions": meta.get("versions", {})})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, KVLensError):
            raise
        raise CorruptFile(f"{path}: {exc}") from None


def load_delta(path: str | Path, model: KVModel | None = None) -> WeightDelta:
    """Read a delta; with ``model``, refuse it unless the edited weights match its fingerprints.

    Raises:
        FileNotFoundError: no file at ``path``.
        CorruptFile: not a kvlens delta file, metadata not JSON or lacking a field, tensors
            missing, of the wrong shape, or not finite (NaN/Inf).
        ValueError: with ``model``: the delta was computed for other weights.
    """
    tensors, meta = _read(path)
    delta = _build(path, tensors, meta)
    if model is not None:
        for layer, role in delta.parts:
            model.check_layer(layer)
            if role not in model.roles():
                raise ValueError(f"{path} edits a {role} projection, which {model.spec.model_type} does not have")
        stale = delta.matches(model)
        if stale:
            raise ValueError(
                f"{path} was computed for model {delta.model_name!r} with other weights at "
                f"{[f'{l}.{r}' for l, r in stale]}; it does not belong to {model.name!r}")
    return delta
