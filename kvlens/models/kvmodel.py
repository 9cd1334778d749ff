"""``KVModel``: a Hugging Face causal LM wrapped by nnsight, plus its architecture spec.

The FFN of layer ``l`` is read as key-value memories (Geva et al. 2021, Eq. 2)::

    FFN(x) = f(x K(l)ᵀ + b_K) V(l) + b_V                    (GELU families)
    FFN(x) = (f(x gate(l)ᵀ) ⊙ (x K(l)ᵀ)) V(l)                 (gated families: Llama, ...)

``K(l)``, ``gate(l)`` and ``V(l)`` are ``[d_ff, d_model]`` *views* of the live weights, row
``i`` = memory ``i``, whatever the family stores. The key activation (memory coefficients)
is the input of the value projection. Positions of states are named by :class:`Site`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import nnsight
import torch
from nnsight.modeling.transformers import TransformersModel
from torch import nn

from kvlens.models.registry import get_arch
from kvlens.models.spec import ArchSpec

if TYPE_CHECKING:
    from kvlens.models.validation import Validation

SiteKind = Literal["embed", "resid_pre", "attn", "mlp_in", "gate_pre", "key_pre", "key", "mlp", "resid", "logits"]
Role = Literal["key", "gate", "value"]
# gate_pre before key_pre: gated FFNs compute act(gate_proj(x)) * up_proj(x), the gate first
_KIND_ORDER: dict[str, int] = {"embed": 0, "resid_pre": 1, "attn": 2, "mlp_in": 3, "gate_pre": 4, "key_pre": 5,
                               "key": 6, "mlp": 7, "resid": 8, "logits": 9}


class Projection(Protocol):
    """An FFN projection as kvlens reads it: ``nn.Linear``, GPT-2's ``Conv1D`` or a bitsandbytes layer.

    ``nn.Module.__getattr__`` is typed ``Tensor | Module``; :meth:`KVModel.projection` checks
    the module and returns it under this type, so ``.weight`` and ``.bias`` are tensors.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __call__(self, x: torch.Tensor, /) -> torch.Tensor: ...


def weight_of(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` as a tensor; a clear error if the module has no such tensor."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor {name!r} (found {type(value).__name__}): "
                        "the architecture spec names the wrong module")
    return value


@dataclass(frozen=True)
class Site:
    """A named state of the forward pass.

    ``embed``: token embeddings (layer is ignored); ``resid_pre``: residual stream entering
    ``layer`` (its input; for layer 0 the embeddings as the model scales and positions them);
    ``attn``: attention output of ``layer``; ``mlp_in``: the FFN's input (the normalized
    residual); ``key_pre``: output of the key projection, before the nonlinearity
    (``x K(l)ᵀ + b_K``, ``[.., d_ff]``); ``gate_pre``: output of the gate projection of a gated
    FFN (``x gate(l)ᵀ``); ``key``: key activation of ``layer`` (input of the value projection,
    ``[.., d_ff]``); ``mlp``: FFN output of ``layer``; ``resid``: residual stream after
    ``layer``; ``logits``: unembedding output (layer is ignored).
    """

    kind: SiteKind
    layer: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KIND_ORDER:
            raise ValueError(f"unknown site kind {self.kind!r}; choose one of {list(_KIND_ORDER)}")

    @classmethod
    def parse(cls, kind: str, layer: int = 0) -> Site:
        """The site of a kind given as a plain string (checked like any other)."""
        if kind not in _KIND_ORDER:
            raise ValueError(f"unknown site kind {kind!r}; choose one of {list(_KIND_ORDER)}")
        return cls(cast(SiteKind, kind), layer)

    def order(self, n_layers: int) -> tuple[int, int]:
        """Sort key in execution order (nnsight requires reads in that order)."""
        if self.kind == "embed":
            return (-1, 0)
        if self.kind == "logits":
            return (n_layers, 0)
        return (self.layer % n_layers, _KIND_ORDER[self.kind])


@dataclass(frozen=True)
class Batch:
    """Tokenized prompts, right-padded so that token ``t`` of every prompt is column ``t``.

    Right padding keeps positions natural for absolute-position models (GPT-2) and exact for
    causal attention: padding after a prompt never influences its tokens.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    prompts: tuple[str, ...]

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real tokens per row, ``[B]``."""
        return self.attention_mask.sum(-1)

    @property
    def last(self) -> torch.Tensor:
        """Column of each row's last real token, ``[B]``."""
        return self.lengths - 1

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def from_ids(cls, rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu",
                 prompts: Sequence[str] | None = None) -> Batch:
        """Token-id rows right-padded with ``pad_id`` (``prompts`` default to empty strings)."""
        if not rows:
            raise ValueError("a batch needs at least one row of token ids")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
        return cls(ids.to(device), mask.to(device), tuple(prompts) if prompts is not None else ("",) * len(rows))

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword inputs for the model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def repeat(self, n: int) -> Batch:
        """Each row repeated ``n`` times (row-major: row 0 n times, then row 1, ...)."""
        return Batch(self.input_ids.repeat_interleave(n, 0),
                     self.attention_mask.repeat_interleave(n, 0),
                     tuple(p for p in self.prompts for _ in range(n)))


def _walk(envoy: Any, path: str) -> Any:
    """Follow a dotted module path through nnsight envoys."""
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def offloaded_weight(module: nn.Module | Projection) -> torch.Tensor:
    """The weight of a layer offloaded by accelerate (CPU/disk ``device_map``), read from its hook."""
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights is None:
        raise RuntimeError(f"{type(module).__name__} holds a meta weight and no accelerate offload hook "
                           "to read it from")
    return weights["weight"]


class KVModel:
    """A causal LM seen as key-value memories: the nnsight model, the HF model, its spec.

    Build one with :func:`kvlens.load` or :func:`kvlens.wrap`. kvlens never changes weights
    by itself; it turns off ``requires_grad`` on every parameter (editing methods enable
    gradients on the tensors they train, and restore the flag).
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any, spec: ArchSpec, *,
                 name: str = "", prefix: str = "", nn_model: Any = None, remote: bool | str = False) -> None:
        self.hf = hf_model
        #: where forwards through :mod:`kvlens.tracing` run by default (see ``tracing.Remote``)
        self.remote: bool | str = remote
        self.tokenizer = tokenizer
        self.spec = spec
        self.name = name or getattr(hf_model.config, "name_or_path", "") or spec.model_type
        self.prefix = prefix
        #: what load-time validation checked (:mod:`kvlens.models.validation`); None: not run
        self.validation: Validation | None = None
        try:
            layers = hf_model.get_submodule(spec.layers)
        except AttributeError:
            raise ValueError(
                f"the {spec.model_type} spec names layers {spec.layers!r}, which {type(hf_model).__name__} "
                "does not have; fix the spec with register_arch(..., overwrite=True)"
            ) from None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"the {spec.model_type} spec names layers {spec.layers!r}, which is a "
                             f"{type(layers).__name__}, not the ModuleList of decoder layers")
        self._layers = layers
        self._check_roles()  # before anything of the caller's is changed
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        hf_model.eval()
        hf_model.requires_grad_(False)
        self.nn = TransformersModel(hf_model, tokenizer=tokenizer) if nn_model is None else nn_model
        self.standing: tuple[dict[Any, Any], ...] = ()  # interventions every seam forward applies
        self._digests: dict[tuple[int, str], tuple[tuple[Any, ...], bytes]] = {}  # see _weight_digest
        self._tensor_digests: dict[str, tuple[tuple[Any, ...], bytes]] = {}  # see _tensor_digest
        self._fetched: dict[str, nn.Module] = {}  # leaf modules read through a trace (no local weights)

    # ---- where the weights are -----------------------------------------------------------
    @property
    def local_weights(self) -> bool:
        """False for a model built without its weights (``kv.load(name, remote=True)``)."""
        return not self.hf.get_submodule(self.spec.embedding).weight.is_meta

    def module(self, path: str) -> nn.Module:
        """The HF submodule at ``path``; for a model without local weights, a local copy whose
        parameters were read through one nnsight trace (remote when the model is), kept.

        Only leaf modules (projections, norms, embeddings) can be fetched: what the inspect
        verbs read (values, vocabulary projections, the final norm).
        """
        module = self.hf.get_submodule(path)
        if self.local_weights:
            return module
        if path not in self._fetched:
            names = [n for n, _ in module.named_parameters(recurse=False)]
            if list(module.children()) or not names:
                raise RuntimeError(f"{path} is not a leaf module with weights: it cannot be read through a trace")
            envoy = _walk(self.nn, path)
            ids = torch.tensor([[int(self.tokenizer.pad_token_id or 0)]])
            options = {"remote": self.remote} if self.remote else {}
            with torch.no_grad(), self.nn.trace(input_ids=ids, **options) as tracer:
                got = nnsight.save([getattr(envoy, n) for n in names])
                tracer.stop()
            local = copy.deepcopy(module).to_empty(device="cpu")
            with torch.no_grad():
                for n, tensor in zip(names, got):
                    getattr(local, n).copy_(tensor.detach().to("cpu"))
            self._fetched[path] = local.eval().requires_grad_(False)
        return self._fetched[path]

    def require_local(self, what: str) -> None:
        """Refuse ``what`` (before any work) when this model has no local weights."""
        if not self.local_weights:
            raise RuntimeError(
                f"{what} needs the model's weights here, but {self.name} was loaded with remote={self.remote!r} "
                "(nnsight's meta loading: no local weights). It can run remotely: trace/sever (mode='plain'), "
                "keys, values, find_memories, logit_lens, intervene, and a value-side delta as "
                "delta.intervened(model); for this, load the model locally: kv.load(name)")

    # ---- sizes -------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def d_model(self) -> int:
        return int(weight_of(self.embedding).shape[1])

    @property
    def d_ff(self) -> int:
        if not self.local_weights:  # the meta skeleton's shape (reading K would fetch it)
            return int(self.canonical(weight_of(self.mlp(0).get_submodule(self.spec.key)), "key").shape[0])
        return int(self.K(0).shape[0])

    @property
    def vocab_size(self) -> int:
        return int(weight_of(self.embedding).shape[0])

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (the CPU for a model without local weights)."""
        weight = weight_of(self.hf.get_submodule(self.spec.embedding))  # no fetch through a trace
        return torch.device("cpu") if weight.is_meta else weight.device

    def devices(self) -> list[torch.device]:
        """The devices the model computes on, the embedding's first: each layer's execution device
        (accelerate's hook decides it for offloaded layers, whose weights wait on the CPU or disk)."""
        out = [self.device]
        for j in range(self.n_layers):
            device = self.device_of(self._layers[j])
            if device not in out:
                out.append(device)
        return out

    def device_of(self, module: nn.Module) -> torch.device:
        """Where ``module`` computes: accelerate's execution device for a dispatched (e.g.
        offloaded) module, else the device of its first parameter, else the model's."""
        where = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if where is None:
            param = next(module.parameters(), None)
            where = param.device if param is not None and not param.is_meta else self.device
        return torch.device(f"cuda:{where}" if isinstance(where, int) else where)

    def memory_budget(self, cpu_bytes: int, fraction: float = 0.5) -> int:
        """Bytes one batched forward may use: ``fraction`` of the free memory of the tightest GPU
        the model computes on (every device holds the activations of its own layers for the whole
        batch, so the batch must fit on each), or ``cpu_bytes`` when it computes on the CPU only."""
        free = [torch.cuda.mem_get_info(d)[0] for d in self.devices() if d.type == "cuda"]
        return int(min(free) * fraction) if free else int(cpu_bytes)

    @property
    def dtype(self) -> torch.dtype:
        return weight_of(self.embedding).dtype

    @property
    def parallel_residual(self) -> bool:
        return self.spec.is_parallel(self.config)

    # ---- modules -----------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        """``layer`` as a non-negative index; a clear error if it is out of range."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(
                f"layer {layer} is out of range: {self.name} has {self.n_layers} layers "
                f"(0..{self.n_layers - 1})"
            )
        return layer % self.n_layers

    def layer(self, layer: int) -> nn.Module:
        return self._layers[self.check_layer(layer)]

    def mlp(self, layer: int) -> nn.Module:
        return self.layer(layer).get_submodule(self.spec.mlp)

    def attn(self, layer: int) -> nn.Module:
        return self.layer(layer).get_submodule(self.spec.attn)

    def projection(self, layer: int, role: Role) -> Projection:
        """The FFN projection module playing ``role`` (key / gate / value) at ``layer``."""
        path = {"key": self.spec.key, "gate": self.spec.gate, "value": self.spec.value}[role]
        if path is None:
            raise ValueError(f"{self.spec.model_type} has no gate projection (its FFN is not gated)")
        if self.local_weights:
            module = self.mlp(layer).get_submodule(path)
        else:
            module = self.module(f"{self.spec.layers}.{self.check_layer(layer)}.{self.spec.mlp}.{path}")
        weight_of(module)  # a projection holds a weight tensor
        return cast(Projection, module)

    def activation(self, layer: int) -> nn.Module:
        return self.mlp(layer).get_submodule(self.spec.activation)

    @property
    def embedding(self) -> nn.Module:
        return self.module(self.spec.embedding)

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.spec.final_norm)

    @property
    def unembedding(self) -> Projection:
        """The LM head: ``weight`` is ``[vocab, d_model]``."""
        module = self.module(self.spec.unembedding)
        weight_of(module)
        return cast(Projection, module)

    # ---- canonical [d_ff, d_model] views -----------------------------------------------
    def weight(self, layer: int, role: Role) -> torch.Tensor:
        """The stored weight of the ``role`` projection, in the family's own layout.

        For quantized (bitsandbytes) layers this is a dequantized *copy*: the weight the
        layer computes with, read off by applying it to the identity matrix (exact whatever
        the packing format, which bitsandbytes changes on CPU after the first forward).
        """
        module = self.projection(layer, role)
        w = module.weight
        if w.is_meta and self.local_weights:  # offloaded by accelerate (device_map): its hook holds the weight
            return offloaded_weight(module)
        if getattr(w, "quant_state", None) is None and getattr(w, "SCB", None) is None:
            return w
        if not isinstance(module, nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt are Linear
            raise TypeError(f"quantized {type(module).__name__} {role} projection: only Linear layers are supported")
        eye = torch.eye(module.in_features, device=self.device, dtype=torch.float32)
        with torch.no_grad():
            rows = module(eye).float()  # [in, out] = I Wᵀ + b
            if module.bias is not None:
                rows = rows - module.bias.float()
        return rows.T.contiguous()  # Linear layout [out, in]

    def canonical(self, weight: torch.Tensor, role: Role) -> torch.Tensor:
        """View a stored ``role`` weight (or a same-shaped delta) as ``[d_ff, d_model]``."""
        # Linear stores [out, in]: key/gate are [d_ff, d_model] as stored, value is transposed.
        # Conv1D stores [in, out]: the opposite.
        transpose = (role == "value") != self.spec.conv1d
        return weight.T if transpose else weight

    def stored(self, canonical: torch.Tensor, role: Role) -> torch.Tensor:
        """Inverse of :meth:`canonical`: a ``[d_ff, d_model]`` tensor in the stored layout."""
        return self.canonical(canonical, role)  # a transpose is its own inverse

    def K(self, layer: int) -> torch.Tensor:
        """Keys of ``layer``: ``[d_ff, d_model]``, row i = key of memory i (a view)."""
        return self.canonical(self.weight(layer, "key"), "key")

    def V(self, layer: int) -> torch.Tensor:
        """Values of ``layer``: ``[d_ff, d_model]``, row i = value of memory i (a view)."""
        return self.canonical(self.weight(layer, "value"), "value")

    def gate(self, layer: int) -> torch.Tensor:
        """Gate rows of a gated FFN: ``[d_ff, d_model]`` (a view)."""
        return self.canonical(self.weight(layer, "gate"), "gate")

    def key_bias(self, layer: int) -> torch.Tensor | None:
        return self.projection(layer, "key").bias

    def value_bias(self, layer: int) -> torch.Tensor | None:
        return self.projection(layer, "value").bias

    def roles(self) -> tuple[Role, ...]:
        """The FFN roles this family has."""
        return ("key", "gate", "value") if self.spec.gated else ("key", "value")

    # ---- nnsight envoys for sites -------------------------------------------------------
    def envoy(self, site: Site) -> tuple[Any, str]:
        """The nnsight envoy holding ``site`` and whether it is read as ``output``/``input``."""
        root = self.nn
        if site.kind == "embed":
            return _walk(root, self.spec.embedding), "output"
        if site.kind == "logits":
            return _walk(root, self.spec.unembedding), "output"
        layer = _walk(root, self.spec.layers)[self.check_layer(site.layer)]
        if site.kind in ("resid_pre", "resid"):
            return layer, "input" if site.kind == "resid_pre" else "output"
        if site.kind == "attn":
            return _walk(layer, self.spec.attn), "output"
        mlp = _walk(layer, self.spec.mlp)
        if site.kind in ("mlp_in", "mlp"):
            return mlp, "input" if site.kind == "mlp_in" else "output"
        if site.kind in ("key_pre", "gate_pre"):
            path = self.spec.key if site.kind == "key_pre" else self.spec.gate
            if path is None:
                raise ValueError(f"{self.spec.model_type} has no gate projection (its FFN is not gated): "
                                 f"no site {site.kind!r}")
            return _walk(mlp, path), "output"
        return _walk(mlp, self.spec.value), "input"

    # ---- tokens ------------------------------------------------------------------------
    def tokenize(self, prompts: str | Sequence[str]) -> Batch:
        """Tokenize ``prompts`` (with the model's prefix) into a right-padded :class:`Batch`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = tuple(prompts)
        if not prompts:
            raise ValueError("no prompts given: pass a non-empty string or list of strings")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"empty prompt {p!r}: every prompt must contain text")
        enc = [self.tokenizer(self.prefix + p, add_special_tokens=True)["input_ids"] for p in prompts]
        return Batch.from_ids(enc, self.tokenizer.pad_token_id, self.device, prompts)

    def token_strings(self, ids: Sequence[int | torch.Tensor] | torch.Tensor) -> list[str]:
        """Each id decoded on its own (for labels)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def token_id(self, text: str) -> int:
        """The id of ``text`` when it is exactly one token; else an error naming its pieces."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.token_strings(ids)
            hint = f"; the first is {pieces[0]!r} (id {ids[0]})" if ids else ""
            raise ValueError(f"{text!r} is not a single token: it splits into {pieces}{hint}")
        return int(ids[0])

    # ---- identity ----------------------------------------------------------------------
    def fingerprint(self, layers: Sequence[int] | None = None,
                    roles: Sequence[Role] | None = None) -> str:
        """SHA-256 over the model type, sizes and the named FFN weights (all if not given)."""
        h = hashlib.sha256()
        h.update(f"{self.spec.model_type}:{self.n_layers}:{self.d_model}:{self.d_ff}".encode())
        for layer in (range(self.n_layers) if layers is None else layers):
            for role in (self.roles() if roles is None else roles):
                h.update(f"{layer}.{role}".encode())
                h.update(self._weight_digest(layer, role))
        return h.hexdigest()

    def keys_fingerprint(self, layer: int) -> str:
        """SHA-256 over exactly the weights the key activations of ``layer`` depend on: every
        parameter except those of the layers above it, of its own value projection (which acts
        after the key), of the final norm and of the unembedding. The cache key of what is
        computed from keys (E[kkᵀ] statistics, trigger examples): a value edit at ``layer`` or any
        change above it keeps it; a change below it, attention and norms included, changes it.
        Each tensor is hashed once per state (:meth:`_tensor_digest`), so repeated calls are cheap.
        """
        layer = self.check_layer(layer)
        after = [f"{self.spec.layers}.{j}." for j in range(layer + 1, self.n_layers)]
        after += [f"{self.spec.layers}.{layer}.{self.spec.mlp}.{self.spec.value}.", f"{self.spec.final_norm}.",
                  f"{self.spec.unembedding}."]
        h = hashlib.sha256(f"{self.spec.model_type}:{self.n_layers}:{self.d_model}:{self.d_ff}:keys@{layer}".encode())
        for name, param in self.hf.named_parameters():  # tied weights appear once, under their first name
            if not any(name.startswith(prefix) for prefix in after):
                h.update(name.encode())
                h.update(self._tensor_digest(name, param))
        return h.hexdigest()

    def _tensor_digest(self, name: str, tensor: torch.Tensor) -> bytes:
        """SHA-256 of a parameter's bytes (any dtype, packed 4-bit weights included), once per state."""
        if tensor.is_meta:
            raise RuntimeError(f"{name} has no local values (a model without local weights) to fingerprint")

        def raw() -> bytes:
            return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return _once_per_state(self._tensor_digests, name, tensor, raw)

    def _weight_digest(self, layer: int, role: Role) -> bytes:
        """SHA-256 of one FFN weight (its canonical float32 values, as delta files record), once per state."""
        def values() -> bytes:
            return self.weight(layer, role).detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return _once_per_state(self._digests, (layer, role), self.projection(layer, role).weight, values)

    def card(self) -> dict[str, Any]:
        """A plain description for reports and reprs."""
        n_params = sum(p.numel() for p in self.hf.parameters())
        return {
            "name": self.name, "model_type": self.spec.model_type,
            "class": type(self.hf).__name__, "layers": self.n_layers, "d_model": self.d_model,
            "d_ff": self.d_ff, "vocab_size": self.vocab_size, "parameters": n_params,
            "gated_ffn": self.spec.gated, "parallel_residual": self.parallel_residual,
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
            "key_projection": self.spec.key, "value_projection": self.spec.value,
            "gate_projection": self.spec.gate,
        }

    def __repr__(self) -> str:
        c = self.card()
        return (f"KVModel({c['name']!r}, {c['model_type']}, {c['layers']} layers, "
                f"d_model={c['d_model']}, d_ff={c['d_ff']}, {c['dtype']}, {c['device']})")

    def _check_roles(self) -> None:
        """Fail at wrap time, naming the path, if the spec does not match the modules."""
        paths = [self.spec.embedding, self.spec.final_norm, self.spec.unembedding]
        for path in paths:
            try:
                self.hf.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"the {self.spec.model_type} spec names module {path!r}, which "
                    f"{type(self.hf).__name__} does not have; fix the spec with register_arch(..., overwrite=True)"
                ) from None
        for role in self.roles():
            try:
                weight_of(self.mlp(0).get_submodule(getattr(self.spec, role)))  # no fetch through a trace
            except (AttributeError, TypeError) as exc:
                what = "does not have" if isinstance(exc, AttributeError) else "has, but it holds no weight"
                raise ValueError(
                    f"the {self.spec.model_type} spec names FFN {role} projection "
                    f"{getattr(self.spec, role)!r}, which layer 0's MLP {what}"
                ) from None


def _once_per_state(store: dict[Any, tuple[tuple[Any, ...], bytes]], key: Any, tensor: torch.Tensor,
                    data: Callable[[], bytes]) -> bytes:
    """SHA-256 of ``data()``, kept in ``store[key]`` with ``tensor``'s version (``data_ptr``, in-place
    ``_version``, shape, dtype): every in-place write (``delta.apply``/``revert``, an optimiser step)
    bumps ``_version`` and a swapped tensor has another ``data_ptr``, so a stale digest is never reused."""
    version = (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tensor.is_meta)
    cached = store.get(key)
    if cached is not None and cached[0] == version:
        return cached[1]
    digest = hashlib.sha256(data()).digest()
    store[key] = (version, digest)
    return digest


def wrap(hf_model: nn.Module, tokenizer: Any, *, name: str = "", prefix: str = "",
         validate: bool = True) -> KVModel:
    """Wrap a model you already have: its ``config.model_type`` picks the spec.

    Args:
        hf_model: a Hugging Face causal LM (``...ForCausalLM``).
        tokenizer: its tokenizer.
        name: a display name (defaults to ``config.name_or_path``).
        prefix: text put before every prompt (e.g. a BOS token string for models whose
            tokenizer adds none).
        validate: check the spec on the model's own forward, first and last layers
            (:func:`kvlens.models.validation.validate`: one forward of a few tokens and one
            with layer 0's attention perturbed); a mismatch raises
            :class:`~kvlens.models.validation.SpecMismatchError` naming the role, and leaves
            ``hf_model`` and ``tokenizer`` as they were.
    """
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"wrap() needs a Hugging Face model with a config.model_type; got {type(hf_model).__name__}"
        )
    spec = get_arch(model_type)
    if not validate:
        return KVModel(hf_model, tokenizer, spec, name=name, prefix=prefix)
    from kvlens.models.validation import caller_state
    from kvlens.models.validation import validate as check

    restore = caller_state(hf_model, tokenizer)
    model = KVModel(hf_model, tokenizer, spec, name=name, prefix=prefix)
    try:
        model.validation = check(model)
    except BaseException:
        restore()
        raise
    return model
