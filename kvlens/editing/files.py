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
from kvlens.models.kvmodel import KVModel
from kvlens.version import versions

FORMAT = "kvlens.WeightDelta/1"


def _versions() -> dict[str, str]:
    return versions(("kvlens", "torch", "transformers"))


def save_delta(delta: WeightDelta, path: str | Path) -> None:
    """Write ``delta`` to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for (layer, role), part in delta.parts.items():
        tensors[f"{layer}.{role}.left"] = part.left.detach().cpu().contiguous()
        if part.right is not None:
            tensors[f"{layer}.{role}.right"] = part.right.detach().cpu().contiguous()
    meta = {"format": FORMAT, "method": delta.method, "hparams": delta.hparams,
            "requests": [r.to_dict() for r in delta.requests], "model": delta.model_name,
            "base": {f"{l}.{r}": fp for (l, r), fp in delta.base.items()},
            "versions": _versions(), "info": delta.info}
    save_file(tensors, str(path), metadata={"kvlens": dumps(meta)})


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
        raise ValueError(f"{path} is not a safetensors file ({exc}); kvlens deltas are saved "
                         "with WeightDelta.save and never read from pickles") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a kvlens WeightDelta (no 'kvlens' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, meta


def _key(name: str) -> PartKey:
    layer, role = name.split(".")
    return (int(layer), role)  # type: ignore[return-value]


def load_delta(path: str | Path, model: KVModel | None = None) -> WeightDelta:
    """Read a delta; with ``model``, refuse it unless the edited weights match its fingerprints."""
    tensors, meta = _read(path)
    parts: dict[PartKey, Part] = {}
    for name in meta["base"]:
        left = tensors.get(f"{name}.left")
        if left is None:
            raise ValueError(f"{path}: tensor {name}.left is missing")
        parts[_key(name)] = Part(left, tensors.get(f"{name}.right"))
    delta = WeightDelta(parts, method=meta["method"], hparams=meta["hparams"],
                        requests=[EditRequest.from_dict(r) for r in meta["requests"]],
                        base={_key(k): v for k, v in meta["base"].items()},
                        model_name=meta.get("model", ""), info={**meta["info"], "versions": meta["versions"]})
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
