"""Architecture specs: which modules of a model family play which role.

An :class:`ArchSpec` is a table of module paths, never guessed from a checkpoint name or a
tensor shape. Paths are relative: ``layers`` from the model root, the per-layer roles from
one decoder layer, the FFN roles from the MLP module.

Orientation: every FFN weight is exposed as ``[d_ff, d_model]`` with row ``i`` = memory ``i``
(Geva et al. 2021, FFN(x) = f(x Kᵀ) V). ``torch.nn.Linear`` stores ``[out, in]`` and GPT-2's
``Conv1D`` stores ``[in, out]``; ``conv1d`` says which, and :mod:`kvlens.models.kvmodel` turns
that into the canonical view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchSpec:
    """Module roles of one model family, keyed in the registry by ``config.model_type``.

    Attributes:
        model_type: the Hugging Face ``config.model_type`` this spec serves.
        layers: path of the decoder-layer ``ModuleList`` from the model root.
        embedding: path of the token embedding from the model root.
        final_norm: path of the norm applied before the unembedding.
        unembedding: path of the output projection (LM head).
        attn: path of the attention module inside one layer.
        mlp: path of the feed-forward module inside one layer.
        key: key projection inside the MLP (d_model -> d_ff): rows of K.
        value: value projection inside the MLP (d_ff -> d_model): rows of V.
            Its *input* is the key activation (memory coefficients).
        gate: gate projection inside the MLP for gated (GLU) families, else None.
        activation: the activation module inside the MLP (f in f(x Kᵀ)).
        conv1d: True when FFN weights are stored ``[in, out]`` (GPT-2 Conv1D).
        parallel_residual: True when attention and MLP read the same residual (GPT-J).
        parallel_residual_attr: config attribute that decides it per checkpoint (NeoX).
        attn_lora: the attention projections inside ``attn`` that standard LoRA adapts (the
            query and value projections, Hu et al. 2021; the fused ``c_attn`` /
            ``query_key_value`` where a family fuses them). Empty: not known for the family.
    """

    model_type: str
    layers: str
    embedding: str
    final_norm: str
    unembedding: str
    attn: str
    mlp: str
    key: str
    value: str
    gate: str | None = None
    activation: str = "act"
    conv1d: bool = False
    parallel_residual: bool = False
    parallel_residual_attr: str | None = None
    attn_lora: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("model_type", "layers", "embedding", "final_norm", "unembedding",
                     "attn", "mlp", "key", "value", "activation"):
            if not getattr(self, name):
                raise ValueError(f"ArchSpec.{name} must be a non-empty module path")

    @property
    def gated(self) -> bool:
        """Whether the FFN is gated: f(x Gᵀ) ⊙ (x Kᵀ) instead of f(x Kᵀ)."""
        return self.gate is not None

    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP run in parallel for a model with this ``config``."""
        if self.parallel_residual_attr is not None:
            return bool(getattr(config, self.parallel_residual_attr, self.parallel_residual))
        return self.parallel_residual
