"""Text corpora for statistics (E[k kᵀ] for editing) and trigger examples (Geva et al. 2021, §3).

A :class:`Corpus` is a named, re-iterable source of documents. Its :attr:`Corpus.id` is stable
across sessions and changes when the text changes (it holds a content hash for files), so caches
can be keyed by it. Three sources:

* :func:`bundled` — an English Wikipedia excerpt shipped in ``data/text`` (CC BY-SA 3.0; about 100
  articles, ~2.9 M characters; see ``data/text/README.md``). Works offline.
* :func:`from_files` — any local UTF-8 text files (one document per file; ``.gz`` and ``.jsonl``
  with a ``"text"`` field are read too).
* :func:`from_datasets` — any Hugging Face ``datasets`` text dataset, for users with the hub.

:func:`token_windows` and :func:`batches` stream a corpus as fixed-size token windows (each
starting with the model's prefix/BOS), so memory stays flat however large the corpus is.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import socket
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvlens.bundled_data import data_dir
from kvlens.errors import BadInput, CorruptFile
from kvlens.models.kvmodel import Batch, KVModel

BUNDLED_FILE = "enwiki_sample.jsonl.gz"


@dataclass(frozen=True)
class Corpus:
    """A named, re-iterable source of text documents.

    Attributes:
        name: a stable identifier of the source (with a content hash where it has one).
        load: a function returning a fresh iterable of documents on every call.
        max_documents: keep only the first ``max_documents`` non-empty documents (None: all).
    """

    name: str
    load: Callable[[], Iterable[str]] = field(repr=False, compare=False)
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a corpus needs a non-empty name (it keys caches)")
        if self.max_documents is not None and self.max_documents <= 0:
            raise ValueError(f"max_documents must be positive, got {self.max_documents}")

    @property
    def id(self) -> str:
        """A filename-safe, stable id: the name (sanitized) plus a short hash of it."""
        full = self.name if self.max_documents is None else f"{self.name}[:{self.max_documents}]"
        digest = hashlib.sha256(full.encode()).hexdigest()[:12]
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', full)[:80]}-{digest}"

    def texts(self) -> Iterator[str]:
        """The documents, in a fixed order; empty ones are skipped."""
        n = 0
        for text in self.load():
            if self.max_documents is not None and n >= self.max_documents:
                return
            if text and text.strip():
                n += 1
                yield text

    def head(self, n: int) -> Corpus:
        """The same corpus cut to its first ``n`` documents (with its own id)."""
        return replace(self, max_documents=n)

    def count(self) -> int:
        """Number of documents (reads the whole corpus)."""
        return sum(1 for _ in self.texts())


# ---- sources -------------------------------------------------------------------------------
def _read_file(path: Path) -> Generator[str, None, None]:
    """Documents of one file: one per JSON line for ``.jsonl`` (field ``text``), else the file.

    Raises:
        CorruptFile: naming the file (and line): a ``.gz`` that is not gzip, text that is not
            UTF-8 or is binary, a JSON line that does not parse or has no string ``text`` field.
    """
    gz = path.suffix == ".gz"
    stem = path.with_suffix("") if gz else path
    if gz:
        with open(path, "rb") as raw:
            if raw.read(2) != b"\x1f\x8b":
                raise CorruptFile(f"corpus file {path} ends in .gz but is not gzip-compressed; "
                                  "rename it without .gz or compress it with gzip")
    opener = gzip.open if gz else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem.suffix == ".jsonl":
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield _jsonl_text(path, number, line)
            else:
                text = f.read()
                if "\x00" in text:
                    raise CorruptFile(f"corpus file {path} looks binary (it holds NUL bytes); give UTF-8 text files")
                yield text
    except UnicodeDecodeError as exc:
        raise CorruptFile(f"corpus file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start} of its text); re-save it as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise CorruptFile(f"corpus file {path} is not a complete gzip file ({exc}); compress it again") from None


def _jsonl_text(path: Path, number: int, line: str) -> str:
    """The ``text`` field of one JSON line; errors name the file, the line and the fields it has."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorruptFile(f"corpus file {path}, line {number}: not JSON ({exc.msg}); a .jsonl file holds one "
                          '{"text": ...} object per line') from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorruptFile(f"corpus file {path}, line {number}: needs a string field 'text' (it has {fields})")
    return record["text"]


def _hash_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"corpus directory {str(path)!r} is empty")
        return files
    return [path]


def from_files(paths: str | os.PathLike | Sequence[str | os.PathLike], *, name: str | None = None) -> Corpus:
    """A corpus of local text files (a directory means every file under it, sorted).

    Each plain file is one document; ``.jsonl`` files hold one ``{"text": ...}`` document a
    line; ``.gz`` is decompressed. The id holds a hash of the files' contents.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no paths, an empty directory, or files without any text.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("from_files needs at least one path")
    files = [f for p in items for f in _expand(Path(p))]
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:
        raise BadInput(f"corpus file(s) {empty} are empty: give files that contain text")
    for f in files:  # each file's first document read now: a wrong format fails here, not mid-run
        docs = _read_file(f)
        next(docs, None)
        docs.close()
    loader = lambda: (t for f in files for t in _read_file(f))  # noqa: E731
    if not any(t.strip() for t in loader()):
        raise BadInput(f"corpus files {[str(f) for f in files]} contain only whitespace")
    label = name or (files[0].stem if len(files) == 1 else f"{len(files)}files")
    return Corpus(f"files:{label}:{_hash_files(files)}", loader)


def bundled() -> Corpus:
    """The English Wikipedia excerpt shipped with kvlens (106 articles, CC BY-SA 3.0).

    Source: the shortened ``enwiki-latest-pages-articles1`` dump in the gensim wheel's test
    data, with wiki markup stripped by ``data/build_text_sample.py``.
    """
    path = data_dir() / "text" / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled text sample {path} is missing; rebuild it with `pip download --no-deps "
            f"gensim -d /tmp/g && python data/build_text_sample.py /tmp/g/gensim-*.whl`"
        )
    corpus = from_files(path, name="enwiki_sample")
    return replace(corpus, name=corpus.name.replace("files:", "bundled:", 1))


def from_datasets(name: str, config: str | None = None, *, split: str = "train", column: str = "text",
                  streaming: bool = False, **kwargs: Any) -> Corpus:
    """A corpus from a Hugging Face ``datasets`` dataset (``load_dataset(name, config, split=...)``).

    The dataset is opened now, so a missing dataset, no network, or a wrong ``column`` fails here
    with a clear message rather than in the middle of a statistics run.
    """
    import datasets  # heavy import, only when used

    _check_hub(name)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming, **kwargs)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        hint = " (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline() else ""
        raise RuntimeError(
            f"could not load dataset {name!r} (config={config!r}, split={split!r}){hint}: "
            f"{type(exc).__name__}: {exc}. Without the hub, use kvlens.corpus.bundled() or from_files(paths)."
        ) from exc
    columns = list(ds.column_names or []) if ds.column_names is not None else []
    if columns and column not in columns:
        raise ValueError(f"dataset {name!r} has no column {column!r}; its columns are {columns}")
    version = getattr(ds, "_fingerprint", None) or "stream"
    ident = f"hf:{name}:{config or ''}:{split}:{column}:{version}"
    return Corpus(ident, lambda: (row[column] for row in ds))


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(v, "0").lower() not in ("0", "", "false") for v in flags)


def _check_hub(name: str, timeout: float = 3.0) -> None:
    """Fail in seconds (not after the hub client's retries) when a hub dataset cannot be reached."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if name in _PACKAGED_DATASETS_MODULES or Path(name).exists() or _offline():
        return  # a local builder/folder, or offline mode reading the local cache
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    host, _, port = host.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(
            f"cannot reach the Hugging Face hub ({host}) to load dataset {name!r}: {exc}. "
            f"If the dataset is in your local cache, set HF_HUB_OFFLINE=1 (and HF_DATASETS_OFFLINE=1); "
            f"otherwise use kvlens.corpus.bundled() or from_files(paths)."
        ) from exc


# ---- token windows ----------------------------------------------------------------------------
def head_ids(model: KVModel) -> list[int]:
    """Ids the model puts before every prompt: its prefix text, or the tokenizer's BOS."""
    return list(model.tokenizer(model.prefix, add_special_tokens=True)["input_ids"])


def token_windows(model: KVModel, corpus: Corpus, *, window: int = 128, max_tokens: int | None = None,
                  min_tokens: int = 2) -> Iterator[list[int]]:
    """Each document cut into consecutive windows of at most ``window`` text tokens.

    Every window starts with :func:`head_ids` (not counted in ``window``). A document's last
    window is kept if it has at least ``min_tokens`` tokens. Stops once ``max_tokens`` text tokens
    have been yielded (the last window is cut to fit).
    """
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    head, total = head_ids(model), 0
    for text in corpus.texts():
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), window):
            piece = ids[start: start + window]
            if max_tokens is not None:
                piece = piece[: max_tokens - total]
            if len(piece) < min_tokens:
                continue
            total += len(piece)
            yield head + list(piece)
            if max_tokens is not None and total >= max_tokens:
                return


def batches(model: KVModel, corpus: Corpus, *, batch_size: int = 8, window: int = 128,
            max_tokens: int | None = None) -> Iterator[Batch]:
    """:func:`token_windows` grouped into right-padded batches on the model's device."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pending: list[list[int]] = []
    for w in token_windows(model, corpus, window=window, max_tokens=max_tokens):
        pending.append(w)
        if len(pending) == batch_size:
            yield Batch.from_ids(pending, model.tokenizer.pad_token_id, model.device)
            pending = []
    if pending:
        yield Batch.from_ids(pending, model.tokenizer.pad_token_id, model.device)
