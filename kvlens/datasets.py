"""Evaluation cases: CounterFact / zsRE records from local JSON, the Hugging Face hub or the bundled set.

Everything becomes an :class:`EvalCase` (one edit request with its test prompts). Records are read
in the ROME/MEMIT formats:

* CounterFact (``counterfact.json``, ``multi_counterfact.json``, ``data/counterfact_mini.json``):
  ``requested_rewrite{prompt, subject, relation_id, target_new{str}, target_true{str}}``,
  ``paraphrase_prompts``, ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``;
* zsRE as ROME's ``MENDQADataset`` reads ``zsre_mend_eval.json``: ``subject``, ``src``,
  ``answers`` (the edit target is ``answers[0]``, the true object is unknown), ``rephrase``,
  ``loc`` and ``loc_ans`` (the specificity question and its answer).

Hub loads go through ``datasets`` and fail fast when the hub cannot be reached, with a message
naming how to use a local file instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvlens.bundled_data import data_dir
from kvlens.errors import BadInput, CorruptFile, KVLensError
from kvlens.fileio import atomic_path, check_folder
from kvlens.prompts import check_template, check_visible, continuation

COUNTERFACT_HUB_ID = "azhx/counterfact"


class DatasetUnavailableError(KVLensError, RuntimeError):
    """A dataset could not be fetched (offline, unknown id, ...)."""


@dataclass(frozen=True)
class EvalCase:
    """One edit request and the prompts that test it.

    ``prompt`` is a template with ``{}`` for ``subject``. ``target_true`` is ``None`` when the
    true object is unknown (zsRE). Neighbourhood prompts are scored against
    ``neighborhood_targets`` (one per prompt) or, when that is empty, against ``target_true``
    (CounterFact: neighbours share the true object).
    """

    case_id: Any
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    relation_id: str = ""
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_targets: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    source: str = "counterfact"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = f"case {self.case_id!r}"
        check_template(self.prompt)
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise BadInput(f"{where}: empty subject {self.subject!r} (no visible text)")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise BadInput(f"{where}: empty target_new {self.target_new!r} (no visible text)")
        for name in ("subject", "target_new"):
            try:
                check_visible(name, getattr(self, name))
            except BadInput as exc:
                raise BadInput(f"{where}: {exc}") from None
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise ValueError(
                f"{where}: target_new {self.target_new!r} equals the true object {self.target_true!r}; "
                f"an edit must ask for a different object"
            )
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_targets",
                     "attribute_prompts", "generation_prompts"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"{where}: {name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.neighborhood_targets and len(self.neighborhood_targets) != len(self.neighborhood_prompts):
            raise ValueError(f"{where}: {len(self.neighborhood_targets)} neighborhood_targets for "
                             f"{len(self.neighborhood_prompts)} neighborhood_prompts")
        if not self.neighborhood_targets and self.neighborhood_prompts and self.target_true is None:
            raise ValueError(f"{where}: neighbourhood prompts need neighborhood_targets or a target_true")

    @property
    def rewrite_prompt(self) -> str:
        """The template filled with the subject (what the editing method sees)."""
        return self.prompt.replace("{}", self.subject)

    def neighborhood_pairs(self) -> list[tuple[str, str]]:
        """``(prompt, expected object)`` for each neighbourhood prompt."""
        if not self.neighborhood_targets and self.target_true is None and self.neighborhood_prompts:
            raise ValueError(f"case {self.case_id!r}: neighbourhood prompts need neighborhood_targets "
                             "when the true object is unknown")
        targets = self.neighborhood_targets or (self.target_true or "",) * len(self.neighborhood_prompts)
        return list(zip(self.neighborhood_prompts, targets))


def _names(subject: str) -> re.Pattern[str]:
    """``subject`` as a whole name in a prompt (not inside another word: "Rome" is not in "Romeo")."""
    return re.compile(rf"(?<!\w){re.escape(subject)}(?!\w)")


def names_subject(text: str, subject: str) -> bool:
    """Whether ``text`` names ``subject`` as a whole name (the test behind :func:`without_edited_neighbours`)."""
    return _names(subject).search(text) is not None


def without_edited_neighbours(cases: Sequence[EvalCase], subjects: Sequence[str] | None = None) -> list[EvalCase]:
    """``cases`` without the neighbourhood prompts that name an edited subject.

    NS scores facts an edit must leave unchanged. A neighbour whose subject is edited in the same
    delta is meant to change, so scoring it as a neighbour counts the edit's success as damage.
    In the bundled set, facts of one relation are each other's neighbours, so this is common when
    facts are edited together (21 of the 48 neighbour prompts of the first 8 bundled facts); the
    independent protocol (each fact edited alone) does not need it. Targets of zsRE-style
    neighbours are dropped with their prompts. See :func:`count_edited_neighbours`.

    Args:
        cases: the cases to score.
        subjects: the edited subjects (default: the cases' own, i.e. the cases are edited together).
    """
    edited = (c.subject for c in cases) if subjects is None else subjects
    names = [_names(s) for s in dict.fromkeys(edited)]
    out = []
    for c in cases:
        keep = [i for i, p in enumerate(c.neighborhood_prompts) if not any(n.search(p) for n in names)]
        out.append(c if len(keep) == len(c.neighborhood_prompts) else replace(
            c, neighborhood_prompts=tuple(c.neighborhood_prompts[i] for i in keep),
            neighborhood_targets=tuple(c.neighborhood_targets[i] for i in keep) if c.neighborhood_targets else ()))
    return out


def count_edited_neighbours(cases: Sequence[EvalCase], subjects: Sequence[str] | None = None) -> tuple[int, int]:
    """``(n, total)``: how many of the cases' neighbourhood prompts name an edited subject
    (``subjects``, default the cases' own), of all their neighbourhood prompts."""
    kept = without_edited_neighbours(cases, subjects)
    total = sum(len(c.neighborhood_prompts) for c in cases)
    return total - sum(len(c.neighborhood_prompts) for c in kept), total


# ---- records <-> cases -------------------------------------------------------------------------
def _get(record: dict, path: str, where: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where} is missing field {path!r} (its fields: {sorted(record)})")
        value = value[part]
    return value


def _target(text: Any, where: str, field: str) -> str:
    """A target as it follows the prompt (leading space); errors name the record and field."""
    try:
        return continuation(text)
    except ValueError as exc:
        raise ValueError(f"{where}, field {field!r}: {exc}") from exc


def from_record(record: dict, index: int = 0) -> EvalCase:
    """An :class:`EvalCase` from one CounterFact or zsRE (MEND) record; errors name the record and field."""
    if not isinstance(record, dict):
        raise TypeError(f"record {index} is a {type(record).__name__}, not a JSON object")
    where = f"record {index}" + (f" (case_id {record['case_id']!r})" if "case_id" in record else "")
    if "requested_rewrite" in record:
        rw = lambda p: _get(record, "requested_rewrite." + p, where)  # noqa: E731
        true = rw("target_true.str")
        return EvalCase(
            case_id=record.get("case_id", index), prompt=rw("prompt"), subject=rw("subject"),
            # ROME's evaluator prepends a space to both targets; keep one already there.
            target_new=_target(rw("target_new.str"), where, "requested_rewrite.target_new.str"),
            target_true=None if true == "<|endoftext|>" else _target(true, where, "requested_rewrite.target_true.str"),
            relation_id=record["requested_rewrite"].get("relation_id", ""),
            paraphrase_prompts=_get(record, "paraphrase_prompts", where),
            neighborhood_prompts=_prompts(_get(record, "neighborhood_prompts", where)),
            neighborhood_targets=_targets(record["neighborhood_prompts"]),
            attribute_prompts=_prompts(record.get("attribute_prompts", [])),
            generation_prompts=record.get("generation_prompts", []),
            source="zsre" if true == "<|endoftext|>" else "counterfact", extra={"record": record})
    if "src" in record and "rephrase" in record:
        subject, src = _get(record, "subject", where), _get(record, "src", where)
        if subject not in src:
            raise ValueError(f"{where}: subject {subject!r} does not occur in src {src!r}")
        answers = _get(record, "answers", where)
        if not answers:
            raise ValueError(f"{where} has an empty 'answers' list")
        return EvalCase(
            case_id=record.get("case_id", index), prompt=src.replace(subject, "{}", 1), subject=subject,
            target_new=_target(answers[0], where, "answers"), target_true=None, relation_id="zsre",
            paraphrase_prompts=(_get(record, "rephrase", where),),
            neighborhood_prompts=(_get(record, "loc", where) + "?",),
            neighborhood_targets=(_target(_get(record, "loc_ans", where), where, "loc_ans"),),
            source="zsre", extra={"record": record})
    if {"prompt", "subject", "target_new"} <= set(record):
        true = record.get("target_true")
        return EvalCase(
            case_id=record.get("case_id", index), prompt=record["prompt"], subject=record["subject"],
            target_new=_target(record["target_new"], where, "target_new"),
            target_true=None if true is None else _target(true, where, "target_true"),
            relation_id=record.get("relation_id", ""),
            paraphrase_prompts=record.get("paraphrase_prompts", []),
            neighborhood_prompts=record.get("neighborhood_prompts", []),
            generation_prompts=record.get("generation_prompts", []), source="request")
    raise ValueError(
        f"{where} is neither a CounterFact record (needs 'requested_rewrite') nor a zsRE/MEND record "
        f"(needs 'src', 'rephrase', 'answers', 'loc', 'loc_ans') nor a flat request (needs 'prompt', 'subject', "
        f"'target_new'); its fields: {sorted(record)}"
    )


def _prompts(items: Sequence[Any]) -> tuple[str, ...]:
    """Neighbourhood prompts may be strings or MEMIT-style ``{"prompt", "target"}`` dicts."""
    return tuple(p["prompt"] if isinstance(p, dict) else p for p in items)


def _targets(items: Sequence[Any]) -> tuple[str, ...]:
    if items and all(isinstance(p, dict) for p in items):
        return tuple(p["target"] for p in items)
    return ()


def to_record(case: EvalCase) -> dict:
    """The ROME/MEMIT CounterFact record of ``case`` (the inverse of :func:`from_record`)."""
    neighbours: list[Any] = list(case.neighborhood_prompts)
    if case.neighborhood_targets:
        neighbours = [{"prompt": p, "target": t} for p, t in case.neighborhood_pairs()]
    return {
        "case_id": case.case_id,
        "requested_rewrite": {
            "prompt": case.prompt, "subject": case.subject, "relation_id": case.relation_id,
            "target_new": {"str": case.target_new},
            "target_true": {"str": case.target_true if case.target_true is not None else "<|endoftext|>"},
        },
        "paraphrase_prompts": list(case.paraphrase_prompts),
        "neighborhood_prompts": neighbours,
        "attribute_prompts": list(case.attribute_prompts),
        "generation_prompts": list(case.generation_prompts),
    }


def from_records(records: Iterable[dict], limit: int | None = None) -> list[EvalCase]:
    """Cases from records (the first ``limit`` if given)."""
    cases = []
    for i, r in enumerate(records):
        if limit is not None and i >= limit:
            break
        cases.append(from_record(r, i))
    return cases


def as_cases(items: EvalCase | dict | Any | Sequence[Any]) -> list[EvalCase]:
    """Normalise what :func:`kvlens.evaluate` accepts: cases, records, or edit requests.

    An edit request is any object with ``prompt``, ``subject`` and ``target_new`` attributes
    (and optionally ``target_true``); it becomes a case with no test prompts besides its own.
    """
    if isinstance(items, (EvalCase, dict)) or hasattr(items, "target_new"):
        items = [items]
    items = list(items)
    if not items:
        raise ValueError("no requests to evaluate: pass at least one EvalCase, record or edit request")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, EvalCase):
            out.append(item)
        elif isinstance(item, dict):
            out.append(from_record(item, i))
        elif all(hasattr(item, a) for a in ("prompt", "subject", "target_new")):
            new, true = item.target_new, getattr(item, "target_true", None)
            new = getattr(new, "str", new)
            true = getattr(true, "str", true)
            out.append(EvalCase(getattr(item, "case_id", i), item.prompt, item.subject, continuation(new),
                                None if true is None else continuation(true),
                                relation_id=getattr(item, "relation_id", "") or ""))
        else:
            raise TypeError(f"request {i} is a {type(item).__name__}: pass EvalCase objects, CounterFact/zsRE "
                            f"records (dicts) or edit requests with prompt/subject/target_new")
    return out


# ---- files -------------------------------------------------------------------------------------
def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; :class:`CorruptFile` naming it when it is binary, not UTF-8 or empty."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b" or b"\x00" in data[:65536]:
        raise CorruptFile(f"{path} looks binary (it holds NUL bytes or is gzip-compressed), not a {what}; "
                          "give the plain UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFile(f"{path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                          f"re-save the {what} as UTF-8") from None
    if not text.strip():
        raise CorruptFile(f"{path} is empty: a {what} needs at least one record")
    return text


def load_json(path: str | os.PathLike[str], limit: int | None = None) -> list[EvalCase]:
    """Cases from a local ROME/MEMIT JSON file (a list of records) or JSON-lines file.

    Raises:
        FileNotFoundError: no file at ``path``.
        CorruptFile: the file is binary, not UTF-8, empty, not JSON, holds no records, or a
            record lacks a field (the message names the file, the record and the field).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}")
    text = read_text_file(path, "dataset JSON file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise CorruptFile(f"{path} is neither a JSON list nor JSON lines: {e}") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("records", [data]))
    if not isinstance(data, list):
        raise CorruptFile(f"{path} must hold a JSON list of records, got {type(data).__name__}")
    if not data:
        raise CorruptFile(f"{path} holds no records (an empty list): give a file with at least one record")
    try:
        return from_records(data, limit)
    except (TypeError, ValueError) as exc:
        raise CorruptFile(f"{path}: {exc}") from None


def save_json(cases: Sequence[EvalCase], path: str | os.PathLike[str]) -> Path:
    """Write cases as a ROME/MEMIT CounterFact JSON list (through a temporary file renamed into place)."""
    path = check_folder(path, "dataset")
    text = json.dumps([to_record(c) for c in cases], indent=1, ensure_ascii=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def load_bundled(limit: int | None = None) -> list[EvalCase]:
    """The facts shipped in ``data/counterfact_mini.json`` (known by the embedded model)."""
    return load_json(data_dir() / "counterfact_mini.json", limit)


# ---- the hub -----------------------------------------------------------------------------------
def _offline_hint(name: str, kind: str) -> str:
    return (f"Download the {kind} JSON once where there is network (e.g. datasets.load_dataset({name!r})"
            f".to_json(...), or ROME's counterfact.json / zsre_mend_eval.json) and pass the local "
            f"path instead: kvlens.datasets.load_json('path/to/file.json')")


def load_hub(name: str, *, split: str | None = None, revision: str | None = None,
             limit: int | None = None, timeout: float = 10.0, kind: str = "dataset",
             **load_kwargs: Any) -> list[EvalCase]:
    """Cases from a Hugging Face dataset ``name`` (any id, any ``revision``); fail fast offline.

    With ``HF_HUB_OFFLINE=1`` only the local ``datasets`` cache is used. Otherwise the hub is
    first asked about the dataset with a ``timeout`` (seconds), so an unreachable hub raises
    :class:`DatasetUnavailableError` promptly instead of hanging. ``split=None`` takes ``train``
    if present, else the first split.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"hub dataset id must be a non-empty string, got {name!r}")
    if Path(name).expanduser().is_file():
        return load_json(name, limit)
    loaded = hub_dataset(name, revision=revision, timeout=timeout, kind=kind, **load_kwargs)
    if split is None:
        split = "train" if "train" in loaded else next(iter(loaded))
    if split not in loaded:
        raise ValueError(f"{name!r} has no split {split!r}; its splits: {list(loaded)}")
    rows = loaded[split]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return from_records(rows)


def hub_dataset(name: str, *, revision: str | None = None, timeout: float = 10.0, kind: str = "dataset",
                hint: str | None = None, **load_kwargs: Any) -> Any:
    """``datasets.load_dataset(name, ...)``, failing fast with :class:`DatasetUnavailableError` offline.

    ``hint`` replaces the default advice on using a local file instead.
    """
    hint = _offline_hint(name, kind) if hint is None else hint
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        from huggingface_hub import HfApi

        try:
            HfApi().dataset_info(name, revision=revision, timeout=timeout)
        except Exception as e:  # connection errors, timeouts, 404s, gated repos
            raise DatasetUnavailableError(
                f"cannot reach {kind} {name!r} (revision {revision or 'default'}) on the Hugging Face hub: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. {hint}"
            ) from None
    import datasets

    try:
        return datasets.load_dataset(name, revision=revision, **load_kwargs)
    except Exception as e:
        raise DatasetUnavailableError(
            f"could not load {kind} {name!r}{' from the local cache (HF_HUB_OFFLINE is set)' if offline else ''}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. {hint}"
        ) from None


def load_counterfact(source: str = COUNTERFACT_HUB_ID, **kwargs: Any) -> list[EvalCase]:
    """CounterFact from the hub (default ``azhx/counterfact``, ROME's records) or a local file."""
    return load_hub(source, kind="CounterFact", **kwargs)


def load_zsre(source: str, **kwargs: Any) -> list[EvalCase]:
    """zsRE in ROME's MEND format (``zsre_mend_eval.json``) from a local file or a hub id you name.

    There is no single canonical hub copy of that file, so ``source`` is required.
    """
    return load_hub(source, kind="zsRE", **kwargs)


def load_reference_texts(path: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """Reference texts for RS, ``{object without its leading space: [texts]}``.

    Default: ``data/reference_texts.json``, written for every object of the bundled set (CC0).
    Keys starting with ``_`` (notes) are skipped.
    """
    path = Path(path).expanduser() if path is not None else data_dir() / "reference_texts.json"
    if not path.is_file():
        raise FileNotFoundError(f"no reference-text file at {path}")
    try:
        data = json.loads(read_text_file(path, "reference-text JSON file"))
    except json.JSONDecodeError as exc:
        raise CorruptFile(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{path} must hold a JSON object {{object: [texts]}}")
    out = {}
    for key, texts in data.items():
        if key.startswith("_"):
            continue
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise CorruptFile(f"{path}: object {key!r} needs a non-empty list of texts")
        out[key.strip()] = list(texts)
    return out
