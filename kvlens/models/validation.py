"""Load-time validation: the architecture spec checked on the checkpoint itself (as nnterp does).

A spec is a table of module paths (:mod:`kvlens.models.spec`); nothing in it is guessed, but
nothing in it is proved either until the model runs. :func:`validate` runs one short forward
through the seam (:func:`kvlens.tracing.run`) and checks, on the first and last layers, every
identity kvlens relies on (Geva et al. 2021, Eq. 2; the reference forward of
``tests/test_registry.py``, here on the real weights):

* ``value``: the FFN output is ``c V(l) + b_V``, ``c`` the key activation (the input of the
  value projection);
* ``key`` / ``gate`` / ``activation``: ``c = f(x K(l)ᵀ + b_K)``, or ``f(x G(l)ᵀ) ⊙ (x K(l)ᵀ)`` for
  gated families, ``x`` the FFN's input;
* ``residual``: the layer's output is its input + attention output + FFN output;
* ``parallel residual``: a second copy of the prompt in the same forward, with layer 0's
  attention output perturbed, shows whether the FFN reads the residual after attention
  (serial) or beside it (parallel, GPT-J).

A failure raises :class:`SpecMismatchError` naming each role that does not match, before the
model is used. Errors are relative (``‖got − expected‖ / ‖expected‖``), with a tolerance that
depends on the precision: float32 1e-2, half precision 5e-2, bitsandbytes-quantized 1e-1 (a
wrong role is off by order one). A model without local weights (meta tensors: remote or
offloaded) is not validated; :attr:`Validation.skipped` says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvlens.models.kvmodel import KVModel, SiteKind

#: The prompt of the validation forward: a few tokens, enough for attention to mix positions.
PROMPT = "The capital of France is Paris"
#: Config attributes that name a family's FFN activation (used to tell a wrong ``activation`` apart).
_ACT_ATTRS = ("hidden_act", "hidden_activation", "activation_function")


class SpecMismatchError(ValueError):
    """The architecture spec does not describe this checkpoint; ``roles`` names what does not match."""

    def __init__(self, message: str, roles: tuple[str, ...]) -> None:
        super().__init__(message)
        self.roles = roles


@dataclass(frozen=True)
class Validation:
    """What :func:`validate` checked: the layers, the worst relative error per check, the tolerance.

    ``skipped`` is the reason it did not run (then ``errors`` is empty).
    """

    layers: tuple[int, ...] = ()
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    parallel_residual: bool | None = None
    skipped: str = ""


def tolerance_for(model: KVModel) -> float:
    """The relative tolerance of the checks for this model's precision."""
    if quantized(model):
        return 1e-1
    if model.dtype in (torch.float16, torch.bfloat16):
        return 5e-2
    return 1e-2


def quantized(model: KVModel) -> bool:
    """Whether the FFN weights are bitsandbytes-quantized (4-bit or 8-bit)."""
    w = model.projection(0, "value").weight
    return getattr(w, "quant_state", None) is not None or getattr(w, "SCB", None) is not None


def _local(model: KVModel) -> bool:
    """Whether the weights the checks read are here (not meta tensors)."""
    if not model.local_weights:  # built without weights (remote): nothing to read without a trace
        return False
    weights = [model.projection(layer, role).weight for layer in _layers(model) for role in model.roles()]
    return not any(w.is_meta for w in weights)  # e.g. layers offloaded by accelerate


def _layers(model: KVModel) -> tuple[int, ...]:
    return tuple(sorted({0, model.n_layers - 1}))


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖got − expected‖ / ‖expected‖`` in float32 (inf when the shapes differ)."""
    if got.shape != expected.shape:
        return float("inf")
    scale = float(expected.float().norm().clamp_min(1e-12))
    return float((got.float() - expected.float()).norm()) / scale


def _linear(x: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x rowsᵀ (+ bias)`` in float32; a shape error says which side does not fit."""
    out = x @ rows.to(x.device, torch.float32).T
    return out if bias is None else out + bias.to(x.device, torch.float32)


def _config_activation(model: KVModel) -> Callable[[torch.Tensor], torch.Tensor] | None:
    from transformers.activations import ACT2FN

    for attr in _ACT_ATTRS:
        name = getattr(model.config, attr, None)
        if isinstance(name, str) and name in ACT2FN:
            return ACT2FN[name]
    return None


def _coefficients(model: KVModel, layer: int, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
                  swap: bool = False) -> torch.Tensor:
    """The key activation the spec predicts from the FFN input ``x`` (``swap``: key and gate exchanged)."""
    k_bias = model.key_bias(layer)
    pre = _linear(x, model.K(layer), k_bias)
    if not model.spec.gated:
        return act(pre)
    gate = _linear(x, model.gate(layer), model.projection(layer, "gate").bias)
    return act(pre) * gate if swap else act(gate) * pre


def _check_layer(model: KVModel, layer: int, states: Mapping[SiteKind, torch.Tensor], tol: float,
                 errors: dict[str, float], failures: list[tuple[str, str]]) -> None:
    """The value, key/gate/activation and residual identities at ``layer`` (see the module doc)."""
    s = model.spec
    x, c, y = states["mlp_in"], states["key"], states["mlp"]
    at = f"layer {layer}"
    why = ""
    try:
        err = _rel(y, _linear(c, model.V(layer).T, model.value_bias(layer)))
    except RuntimeError as exc:  # shapes that cannot multiply: a wrong module or orientation
        err, why = float("inf"), f" ({exc})"
    errors[f"value {layer}"] = err
    if not err <= tol:
        failures.append(("value", f"{at}: the MLP output is not (input of {s.value!r}) · V + b_V "
                                  f"(relative error {err:.3g}{why}): check value={s.value!r} and conv1d={s.conv1d}"))
    why = ""
    try:
        err = _rel(c, _coefficients(model, layer, x, model.activation(layer)))
    except RuntimeError as exc:
        err, why = float("inf"), f" ({exc})"
    errors[f"key {layer}"] = err
    if not err <= tol:
        failures.append(_diagnose(model, layer, x, c, err, why, tol))
    resid = states["resid_pre"] + states["attn"] + y
    err = _rel(states["resid"], resid)
    errors[f"residual {layer}"] = err
    if not err <= tol:
        failures.append(("residual", f"{at}: the layer's output is not its input + attention ({s.attn!r}) + MLP "
                                     f"({s.mlp!r}) output (relative error {err:.3g}): the FFN output must join the "
                                     "residual unchanged (not so with a norm after the FFN, as in Gemma 2 or OLMo 2, "
                                     "or a residual multiplier, as in Granite), and attn/mlp must name those modules"))


def _diagnose(model: KVModel, layer: int, x: torch.Tensor, c: torch.Tensor, err: float, why: str,
              tol: float) -> tuple[str, str]:
    """Which of key / gate / activation explains a key activation that does not match."""
    s = model.spec
    at = f"layer {layer}"
    if not why and s.gated and _rel(c, _coefficients(model, layer, x, model.activation(layer), swap=True)) <= tol:
        return ("key/gate", f"{at}: the key and gate projections are swapped: the activation is applied to "
                            f"{s.key!r}'s output; set key={s.gate!r}, gate={s.key!r}")
    config_act = _config_activation(model)
    if not why and config_act is not None and _rel(c, _coefficients(model, layer, x, config_act)) <= tol:
        return ("activation", f"{at}: activation={s.activation!r} is not the FFN's activation f (the config's "
                              f"activation matches); name the module that computes it")
    return ("key/gate/activation" if s.gated else "key/activation",
            f"{at}: the input of {s.value!r} is not {'f(x Gᵀ) ⊙ (x Kᵀ)' if s.gated else 'f(x Kᵀ + b_K)'} "
            f"(relative error {err:.3g}{why}): check key={s.key!r}"
            + (f", gate={s.gate!r}" if s.gated else "") + f", activation={s.activation!r} and conv1d={s.conv1d}")


def validate(model: KVModel, *, prompt: str = PROMPT, tolerance: float | None = None) -> Validation:
    """Check the spec on the model's own forward (first and last layers); raise if a role does not match.

    Args:
        model: the wrapped model (:func:`kvlens.wrap` and :func:`kvlens.load` call this unless
            ``validate=False``).
        prompt: the text of the forward (a few tokens).
        tolerance: relative tolerance (default: :func:`tolerance_for` the model's precision).

    Raises:
        SpecMismatchError: naming each role (``value``, ``key``, ``gate``, ``activation``,
            ``residual``, ``parallel residual``) that does not match, with what to fix.
    """
    from kvlens import tracing  # the seam sits above models/: imported when it runs
    from kvlens.models.kvmodel import Site

    if not _local(model):
        note = (f"validation of the {model.spec.model_type} spec skipped: {model.name} has no local weights "
                "(meta tensors: a remote or offloaded model)")
        warnings.warn(note, stacklevel=3)
        return Validation(skipped=note)
    tol = tolerance_for(model) if tolerance is None else tolerance
    layers = _layers(model)
    kinds: tuple[SiteKind, ...] = ("resid_pre", "attn", "mlp_in", "key", "mlp", "resid")
    batch = model.tokenize(prompt).repeat(2)  # row 0 as it is; row 1 with layer 0's attention perturbed
    with torch.no_grad():
        read = tracing.run(model, batch, read=[Site(k, layer) for layer in layers for k in kinds],
                           write={Site("attn", 0): _perturb_row_1})
    errors: dict[str, float] = {}
    failures: list[tuple[str, str]] = []
    for layer in layers:
        states = {k: read[Site(k, layer)][:1].float() for k in kinds}
        _check_layer(model, layer, states, tol, errors, failures)
    ffn_in = read[Site("mlp_in", 0)]
    parallel = _rel(ffn_in[1:], ffn_in[:1]) <= tol  # the FFN input did not see the perturbation
    errors["parallel residual"] = 0.0 if parallel == model.parallel_residual else 1.0
    if parallel != model.parallel_residual:
        said, found = ("parallel", "serial") if model.parallel_residual else ("serial", "parallel")
        failures.append(("parallel residual", f"the spec says attention and MLP run in {said}, but the MLP input "
                                              f"{'depends on' if found == 'serial' else 'does not depend on'} "
                                              f"the attention output ({found}): set parallel_residual="
                                              f"{found == 'parallel'} (or parallel_residual_attr)"))
    if failures:
        roles = tuple(dict.fromkeys(role for role, _ in failures))
        raise SpecMismatchError(
            f"the {model.spec.model_type} spec does not match {model.name} ({', '.join(roles)}):\n  "
            + "\n  ".join(msg for _, msg in failures)
            + "\nFix the spec with kvlens.register_arch(..., overwrite=True), or pass validate=False to skip "
              "this check.", roles)
    return Validation(layers, errors, tol, parallel)


def caller_state(hf_model: torch.nn.Module, tokenizer: Any) -> Callable[[], None]:
    """A function that puts back what wrapping changes: train/eval modes, ``requires_grad``, the pad token."""
    modes = [(m, m.training) for m in hf_model.modules()]
    flags = [(p, p.requires_grad) for p in hf_model.parameters()]
    no_pad = getattr(tokenizer, "pad_token_id", None) is None

    def restore() -> None:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        if no_pad:
            tokenizer.pad_token = None

    return restore


def _perturb_row_1(state: torch.Tensor) -> torch.Tensor:
    """Add seeded noise (larger than the state itself) to row 1 of an attention output."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(state[1].shape, generator=g).to(state.device, state.dtype)
    out = state.clone()
    out[1] = state[1] + noise * (float(state[1].float().std()) + 1.0)
    return out
