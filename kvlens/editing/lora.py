"""LoRA on keys vs values through peft (Qiu et al. 2024: "Key_up", "Key_gate", "Value_down").

The target modules are the FFN projections the architecture registry names for the chosen role
(``c_fc`` / ``up_proj`` / ``gate_proj`` for keys, ``c_proj`` / ``down_proj`` for values), given
to peft as full module paths of the chosen layers. Adapters are injected for the training only:
peft's ``unload()`` puts the original modules back in a ``finally`` (the model stays
bit-identical), and the merged adapter ``s·B A`` is returned as a rank-``r``
:class:`WeightDelta` like any other edit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from kvlens.editing._shared import Rows, build_rows, context_templates
from kvlens.editing.base import EditMethod, check_layers, register_method
from kvlens.editing.delta import Part, PartKey, WeightDelta
from kvlens.editing.finetune import check_role, fit
from kvlens.editing.hparams import LORA_PRESETS, LoRAHparams
from kvlens.editing.per_row import RowChanges, fit_each
from kvlens.editing.request import EditRequest
from kvlens.models.kvmodel import KVModel


def target_modules(model: KVModel, role: str, layers: tuple[int, ...]) -> list[str]:
    """Full module names of the ``role`` projection at ``layers`` (from the architecture spec)."""
    path = {"key": model.spec.key, "gate": model.spec.gate, "value": model.spec.value}[role]
    return [f"{model.spec.layers}.{l}.{model.spec.mlp}.{path}" for l in layers]


def factors(lora_module: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A peft LoRA layer's ``(A [r, in], B [out, r], scaling)`` (float32 copies)."""
    A = lora_module.lora_A["default"].weight.detach().float().clone()
    B = lora_module.lora_B["default"].weight.detach().float().clone()
    return A, B, float(lora_module.scaling["default"])


def lora_part(A: torch.Tensor, B: torch.Tensor, scaling: float, role: str) -> Part:
    """The merged adapter as canonical ``[d_ff, d_model]`` factors.

    In feature terms the adapter maps in → out by ``s·B A`` (B ``[out, r]``, A ``[r, in]``).
    Keys/gates map d_model → d_ff, so canonical = s·B A; values map d_ff → d_model, so
    canonical = (s·B A)ᵀ = Aᵀ (s·Bᵀ).
    """
    A, B = A.detach().float(), B.detach().float()
    if role == "value":
        return Part(A.T.clone(), (scaling * B.T).clone())
    return Part((scaling * B).clone(), A.clone())


@contextlib.contextmanager
def peft_lora(model: KVModel, config: Any, seed: int) -> Iterator[Any]:
    """peft's LoRA layers (``config``: a ``LoraConfig``) inside the model for the block; yields peft's
    ``LoraModel``. A is drawn by peft from the global RNG seeded with ``seed``, which is left as it
    was. Afterwards (also after an interrupt mid-injection) the model gets its own modules, its
    ``peft_config``, every parameter's ``requires_grad`` and its train/eval mode back, bitwise.
    The one injection of editing (:func:`injected`) and task tuning (:mod:`kvlens.tuning.train`).
    """
    from peft.tuners.lora import LoraModel

    training = model.hf.training
    grads = {n: p.requires_grad for n, p in model.hf.named_parameters()}
    had_config = hasattr(model.hf, "peft_config")  # peft writes into it: set it aside meanwhile
    saved_config = model.hf.__dict__.pop("peft_config", None) if had_config else None
    lora = None
    try:
        with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: seed it, leave it as it was
            torch.manual_seed(seed)
            lora = LoraModel(model.hf, config, "default")
        yield lora
    finally:
        if lora is not None:
            lora.unload()
        else:
            _restore_modules(model.hf)
        model.hf.__dict__.pop("peft_config", None)
        if had_config:
            model.hf.__dict__["peft_config"] = saved_config  # as it was popped
        for n, p in model.hf.named_parameters():
            p.requires_grad_(grads.get(n, False))
        model.hf.train(training)


@contextlib.contextmanager
def injected(model: KVModel, hp: LoRAHparams, names: Sequence[str]) -> Iterator[list[Any]]:
    """peft's LoRA layers at the modules ``names`` for the block: yields them, in that order.

    ``init_lora_weights=True``: Kaiming-uniform A, B = 0, A seeded with ``hp.contexts.seed``
    (:func:`peft_lora`, which also gives the model back as it was).
    """
    from peft import LoraConfig

    config = LoraConfig(r=hp.rank, lora_alpha=hp.alpha,  # type: ignore[arg-type]  # peft says int; scaling = alpha / r
                        lora_dropout=hp.dropout, target_modules=list(names),
                        bias="none", fan_in_fan_out=model.spec.conv1d, init_lora_weights=True)
    with peft_lora(model, config, hp.contexts.seed):
        yield [model.hf.get_submodule(n) for n in names]  # peft's LoRA layers


@register_method
class LoRA(EditMethod):
    """LoRA on one FFN role (``role="key"`` / ``"gate"`` / ``"value"``) at chosen layers."""

    name = "lora"
    presets = LORA_PRESETS
    role: Literal["key", "gate", "value"] | None = None

    def __init__(self, hparams: LoRAHparams | None = None, *, preset: str | None = None, **overrides: Any) -> None:
        if self.role is not None and "role" not in overrides:
            overrides["role"] = self.role
        super().__init__(hparams, preset=preset, **overrides)

    def default_hparams(self, model: KVModel) -> LoRAHparams:
        return LoRAHparams(layers=(max(0, model.n_layers // 4),))

    def check(self, model: KVModel, hp: LoRAHparams) -> None:
        check_layers(model, hp.layers)
        check_role(model, hp.role)
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapted = [n for n, m in model.hf.named_modules() if isinstance(m, BaseTunerLayer)]
        if adapted:
            more = " ..." if len(adapted) > 3 else ""
            raise ValueError(f"the model already holds peft adapters ({adapted[:3]}{more}); "
                             "kvlens's LoRA edit would remove them when it unloads its own: merge them first "
                             "(peft: model.merge_and_unload()) or edit a model without adapters")

    def _compute(self, model: KVModel, requests: tuple[EditRequest, ...], hp: LoRAHparams, **_: Any) -> WeightDelta:
        from kvlens.editing.adapters import prepare_kbit

        prepare_kbit(model)  # 4-bit models: QLoRA's preparation (Dettmers et al. 2023; Qiu et al. 2024)

        layers = check_layers(model, hp.layers)
        templates = context_templates(model, hp.contexts)
        rows = build_rows(model, requests, templates, kl=hp.kl_factor > 0)
        names = target_modules(model, hp.role, layers)
        with injected(model, hp, names) as modules:
            log = self._train(model, rows, modules, hp)
            parts = {(l, hp.role): lora_part(*factors(m), hp.role) for l, m in zip(layers, modules)}
            for (layer, role), m in zip(parts, modules):  # orientation self-check against peft's merge
                merged = m.get_delta_weight("default").float()
                if not torch.allclose(model.stored(parts[(layer, role)].dense(), role), merged, atol=1e-5, rtol=1e-4):
                    raise RuntimeError(f"LoRA factors of layer {layer} {role} disagree with peft's merged weight")
        return WeightDelta.from_model(model, parts, method=self.name, hparams=hp.to_dict(), requests=requests,
                                      info={"contexts": list(templates), "opt": log, "target_modules": names})

    def _train(self, model: KVModel, rows: Rows, modules: list[Any], hp: LoRAHparams) -> dict[str, Any]:
        params = [p for m in modules for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
        for p in params:
            p.requires_grad_(True)
        for m in modules:
            m.train()
        try:
            return fit(model, rows, params, steps=hp.steps, lr=hp.lr, kl_factor=hp.kl_factor,
                       early_stop=hp.early_stop)
        finally:
            for m in modules:
                m.eval()


def lora_each(model: KVModel, hp: LoRAHparams, requests: Sequence[EditRequest], templates: Sequence[str],
              *, method: str = "lora") -> list[WeightDelta]:
    """LoRA of each request alone, all trained in the same forwards: row b runs with adapter b.

    Beside the projection, request r's rows add ``s · x A_rᵀ B_rᵀ`` (peft's vanilla LoRA forward:
    ``result + lora_B(lora_A(x)) * scaling``): at the key / gate projection's output with x the
    FFN input, at the FFN output with x the key activation for values
    (:class:`~kvlens.editing.per_row.RowChanges`). Each request starts from the init
    :meth:`LoRA._compute` gives it: peft's adapters are injected once under the same seed (the
    same for every request) and their A, B and scaling read off, then removed. The same loss,
    Adam (elementwise) and early stop per request (:func:`~kvlens.editing.per_row.fit_each`).
    Dropout draws a mask per forward from the global RNG: with ``hp.dropout > 0`` a batch cannot
    reproduce one-by-one runs, and this refuses.
    """
    from kvlens.editing.adapters import prepare_kbit

    if hp.dropout > 0:
        raise ValueError(f"LoRA dropout {hp.dropout} draws a random mask per forward: requests trained together "
                         "cannot draw the masks each would alone; train them one by one")
    prepare_kbit(model)  # as LoRA._compute
    layers = check_layers(model, hp.layers)
    with injected(model, hp, target_modules(model, hp.role, layers)) as modules:
        init = [factors(m) for m in modules]
    rows = build_rows(model, requests, templates, kl=hp.kl_factor > 0)
    n, dev = len(requests), model.device
    leaves = [t.to(dev).expand(n, *t.shape).clone() for A, B, _ in init for t in (A, B)]

    def changes(params: Sequence[torch.Tensor]) -> RowChanges:  # params: A_0, B_0, A_1, B_1, ...
        return RowChanges({(l, hp.role): (params[2 * i].transpose(1, 2), s * params[2 * i + 1].transpose(1, 2))
                           for i, (l, (_, _, s)) in enumerate(zip(layers, init))}, n)

    logs = fit_each(model, rows, leaves, changes, steps=hp.steps, lr=hp.lr, kl_factor=hp.kl_factor,
                    early_stop=hp.early_stop)
    out = []
    for r, request in enumerate(requests):
        parts: dict[PartKey, Part] = {(l, hp.role): lora_part(leaves[2 * i][r], leaves[2 * i + 1][r], s, hp.role)
                                      for i, (l, (_, _, s)) in enumerate(zip(layers, init))}
        out.append(WeightDelta.from_model(model, parts, method=method, hparams=hp.to_dict(), requests=[request],
                                          info={"contexts": list(templates), "opt": logs[r],
                                                "target_modules": target_modules(model, hp.role, layers)}))
    return out


def _restore_modules(root: torch.nn.Module) -> None:
    """Put back the base layer of every LoRA wrapper peft had injected before it was interrupted."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(root.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, module.get_base_layer())


class LoRAKeys(LoRA):
    """LoRA on the key matrix (``c_fc`` / ``fc_in`` / ``up_proj``)."""

    role = "key"


class LoRAGates(LoRA):
    """LoRA on the gate matrix of a gated FFN (``gate_proj``)."""

    role = "gate"


class LoRAValues(LoRA):
    """LoRA on the value matrix (``c_proj`` / ``fc_out`` / ``down_proj``)."""

    role = "value"
