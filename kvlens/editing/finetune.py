"""Key-side vs value-side fine-tuning (Qiu et al. 2024) with the constraints of the FT baselines.

Qiu et al. compare updating the FFN's first matrix (keys: ``c_fc`` / ``fc_in`` / ``up_proj``, and
``gate_proj`` for gated models) with updating the second (values: ``c_proj`` / ``fc_out`` /
``down_proj``). Here one switch picks the role; the layers are trained by Adam on the target's
length-normalized NLL (over the request's prompt and optional random-prefix contexts, the same
rows ROME uses) with, as in ROME/MEMIT's FT baselines:

* ``norm_constraint``: an L∞ bound ε on every entry's change, enforced after each step (FT+L);
* ``weight_decay``: ``wd·‖ΔW‖²`` in the loss (FT-W); ``kl_factor``: the essence KL of ROME;
* early stopping once every request's NLL is below ``early_stop``.

Training happens on the live weights under :func:`kvlens.tracing.trainable`; the originals are
restored bitwise in a ``finally`` (also on KeyboardInterrupt) and the change is returned as a
dense :class:`WeightDelta`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from kvlens import tracing
from kvlens.editing._shared import (
    Rows,
    build_rows,
    context_templates,
    forward_logprobs,
    report_step,
    request_losses,
)
from kvlens.editing.base import EditMethod, check_layers, register_method
from kvlens.editing.delta import Part, WeightDelta
from kvlens.editing.hparams import FT_PRESETS, FTHparams
from kvlens.editing.request import EditRequest
from kvlens.models.kvmodel import KVModel


def check_role(model: KVModel, role: str) -> None:
    """A clear error for a role the family does not have (gate on a non-gated FFN)."""
    if role not in model.roles():
        raise ValueError(f"{model.spec.model_type} has no {role!r} projection; its FFN roles are {model.roles()}")


def train_loss(model: KVModel, rows: Rows, kl_init: torch.Tensor | None, kl_factor: float,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-request NLL, per-request KL, KL-row log-probs) of one full forward with the current weights."""
    tgt_logp, kl_logp = forward_logprobs(model, rows, None, layer=model.n_layers - 1)
    nll, kl = request_losses(rows, tgt_logp, kl_logp, kl_init, kl_factor)
    return nll, kl, kl_logp


def fit(model: KVModel, rows: Rows, params: Sequence[torch.Tensor], *, steps: int, lr: float, kl_factor: float,
        early_stop: float, penalty: Callable[[], torch.Tensor | float] | None = None,
        project: Callable[[], None] | None = None) -> dict[str, Any]:
    """Adam on ``params`` for the edit loss: NLL of the new targets + the KL essence term (+ ``penalty``).

    Stops once every request's NLL is below ``early_stop``; ``project`` runs after each step (no grad),
    e.g. FT+L's clamp. Shared by weight fine-tuning and LoRA. Returns the loss log.
    """
    opt = torch.optim.Adam(params, lr=lr)
    kl_init: torch.Tensor | None = None
    losses: list[float] = []
    for _ in range(steps):
        nll, kl, kl_logp = train_loss(model, rows, kl_init, kl_factor)
        if kl_init is None and kl_factor > 0:
            kl_init = kl_logp.detach()
        loss = (nll + kl).sum() + (penalty() if penalty is not None else 0.0)
        losses.append(float(loss.detach()))
        report_step("fine-tuning", len(losses), steps, losses[-1], int((nll >= early_stop).sum()))
        if bool((nll < early_stop).all()):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        if project is not None:
            with torch.no_grad():
                project()
    return {"loss": losses, "steps": len(losses), "final_nll": nll.detach().tolist()}


@register_method
class FineTune(EditMethod):
    """Constrained fine-tuning of keys (``role="key"`` / ``"gate"``) or values (``role="value"``)."""

    name = "ft"
    presets = FT_PRESETS
    role: Literal["key", "gate", "value"] | None = None

    def __init__(self, hparams: FTHparams | None = None, *, preset: str | None = None, **overrides: Any) -> None:
        if self.role is not None and "role" not in overrides:
            overrides["role"] = self.role
        super().__init__(hparams, preset=preset, **overrides)

    def default_hparams(self, model: KVModel) -> FTHparams:
        return FTHparams(layers=(max(0, model.n_layers // 4),), lr=1e-3, norm_constraint=None)

    def check(self, model: KVModel, hp: FTHparams) -> None:
        check_layers(model, hp.layers)
        check_role(model, hp.role)
        from kvlens.editing.adapters import is_quantized

        packed = [l for l in hp.layers if is_quantized(model.projection(l, hp.role).weight)]
        if packed:
            raise TypeError(f"full-matrix fine-tuning cannot train the quantized (bitsandbytes) {hp.role} weights of "
                            f"layers {packed}: packed 4-bit/8-bit parameters take no gradient. Use LoRA on them "
                            f"(LoRA{hp.role.capitalize()}s(), the QLoRA recipe), or load the model in full precision")

    def _compute(self, model: KVModel, requests: tuple[EditRequest, ...], hp: FTHparams, **_: Any) -> WeightDelta:
        layers = check_layers(model, hp.layers)
        templates = context_templates(model, hp.contexts)
        rows = build_rows(model, requests, templates, kl=hp.kl_factor > 0)
        weights = [model.projection(l, hp.role).weight for l in layers]
        originals = [w.detach().clone() for w in weights]
        try:
            with tracing.trainable(*weights):
                log = self._train(model, rows, weights, originals, hp)
            parts = {(l, hp.role): Part(model.canonical(w.detach().float() - o.float(), hp.role).clone())
                     for l, w, o in zip(layers, weights, originals)}
        finally:
            with torch.no_grad():
                for w, o in zip(weights, originals):
                    w.copy_(o)
                    w.grad = None
        return WeightDelta.from_model(model, parts, method=self.name, hparams=hp.to_dict(),
                                      requests=requests, info={"contexts": list(templates), "opt": log})

    def _train(self, model: KVModel, rows: Rows, weights: list[torch.nn.Parameter],
               originals: list[torch.Tensor], hp: FTHparams) -> dict[str, Any]:
        def decay() -> torch.Tensor | float:  # FT-W: λ‖W − W₀‖²
            return hp.weight_decay * sum(((w - o) ** 2).sum() for w, o in zip(weights, originals))

        def clamp() -> None:  # FT+L: ‖W − W₀‖∞ ≤ ε
            for w, o in zip(weights, originals):
                eps = float(hp.norm_constraint or 0.0)  # only used when it is set
                w.copy_(o + (w - o).clamp(-eps, eps))

        return fit(model, rows, weights, steps=hp.steps, lr=hp.lr, kl_factor=hp.kl_factor,
                   early_stop=hp.early_stop, penalty=decay,
                   project=clamp if hp.norm_constraint is not None else None)


class KeyFT(FineTune):
    """Fine-tuning of the key matrix (``c_fc`` / ``fc_in`` / ``up_proj``); Qiu et al.'s "keys"."""

    role = "key"


class GateFT(FineTune):
    """Fine-tuning of the gate matrix of a gated FFN (``gate_proj``); Qiu et al.'s "Key_gate"."""

    role = "gate"


class ValueFT(FineTune):
    """Fine-tuning of the value matrix (``c_proj`` / ``fc_out`` / ``down_proj``)."""

    role = "value"
