"""The architecture registry, keyed by Hugging Face ``config.model_type`` (as peft does).

Families are checked by ``tests/test_registry.py`` with tiny random models: a reference
forward proves each role and the canonical orientation. Add a family with
:func:`register_arch`.
"""

from __future__ import annotations

from dataclasses import replace

from kvlens.errors import KVLensError
from kvlens.models.spec import ArchSpec

_GPT2 = ArchSpec(
    model_type="gpt2", layers="transformer.h", embedding="transformer.wte",
    final_norm="transformer.ln_f", unembedding="lm_head", attn="attn", mlp="mlp",
    key="c_fc", value="c_proj", activation="act", conv1d=True, attn_lora=("c_attn",),
)
_GPTJ = ArchSpec(
    model_type="gptj", layers="transformer.h", embedding="transformer.wte",
    final_norm="transformer.ln_f", unembedding="lm_head", attn="attn", mlp="mlp",
    key="fc_in", value="fc_out", activation="act", parallel_residual=True,
    attn_lora=("q_proj", "v_proj"),
)
_NEOX = ArchSpec(
    model_type="gpt_neox", layers="gpt_neox.layers", embedding="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm", unembedding="lm_head", attn="attention",
    mlp="mlp", key="dense_h_to_4h", value="dense_4h_to_h", activation="act",
    parallel_residual=True, parallel_residual_attr="use_parallel_residual", attn_lora=("query_key_value",),
)
_LLAMA = ArchSpec(
    model_type="llama", layers="model.layers", embedding="model.embed_tokens",
    final_norm="model.norm", unembedding="lm_head", attn="self_attn", mlp="mlp",
    key="up_proj", gate="gate_proj", value="down_proj", activation="act_fn",
    attn_lora=("q_proj", "v_proj"),
)

#: Families whose modules match Llama's names (each checked by the registry test) and whose FFN
#: output joins the residual unchanged. Not included: gemma2 and olmo2 (a norm after the FFN) and
#: granite (a residual multiplier): ROME/MEMIT's δ on the residual would not be what lands.
LLAMA_LIKE = ("mistral", "qwen2", "qwen3", "gemma", "olmo")

_REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec for spec in (_GPT2, _GPTJ, _NEOX, _LLAMA)
}
_REGISTRY.update({name: replace(_LLAMA, model_type=name) for name in LLAMA_LIKE})


class UnknownArchitectureError(KVLensError, KeyError):
    """Raised for a ``model_type`` that no spec is registered for."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def register_arch(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Register ``spec`` for ``spec.model_type`` so that ``kvlens.load``/``wrap`` accept it.

    Example::

        kvlens.register_arch(kvlens.ArchSpec(model_type="my_llama", layers="model.layers", ...))

    Raises:
        ValueError: a spec is already registered for that type and ``overwrite`` is False.
    """
    if spec.model_type in _REGISTRY and not overwrite:
        raise ValueError(
            f"an architecture is already registered for model_type {spec.model_type!r}; "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[spec.model_type] = spec
    return spec


def get_arch(model_type: str) -> ArchSpec:
    """The spec registered for ``model_type``; a clear error naming the fix if none is."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"kvlens has no architecture spec for model_type {model_type!r} "
            f"(known: {', '.join(sorted(_REGISTRY))}). Register one with "
            "kvlens.register_arch(kvlens.ArchSpec(model_type=..., layers=..., embedding=..., "
            "final_norm=..., unembedding=..., attn=..., mlp=..., key=..., value=...))."
        ) from None


def registered_types() -> tuple[str, ...]:
    """All model types with a registered spec, sorted."""
    return tuple(sorted(_REGISTRY))
