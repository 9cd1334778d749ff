"""Prompts and subjects: fill ``{}`` templates and find the subject's tokens.

Shared by causal tracing (which subject tokens to corrupt) and editing (the last subject token
whose key ROME/MEMIT read), so the lookup is written once. Token indices are positions in
:meth:`KVModel.tokenize` output, the model's prefix included.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

from kvlens.errors import BadInput, PromptTooLong
from kvlens.models.kvmodel import KVModel

#: Config attributes that hold a model's position limit, by family (GPT-2: ``n_positions``).
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx")


def visible(text: str) -> bool:
    """Whether ``text`` has a character that shows: not whitespace, control or format (e.g. U+200B)."""
    return any(unicodedata.category(c)[0] not in "ZC" for c in text)


def check_visible(name: str, value: Any) -> str:
    """``value`` if it is a string with visible text; :class:`BadInput` otherwise.

    Zero-width spaces, joiners, byte-order marks and other format or control characters do not
    count: a subject made only of them would be edited while looking empty.
    """
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{name} must be a non-empty string with visible text, got {value!r}")
    if not visible(value):
        names = sorted({unicodedata.name(c, f"U+{ord(c):04X}") for c in value})
        raise BadInput(f"{name} {value!r} has no visible character (only {', '.join(names)}); "
                       "give the text itself")
    return value


def position_limit(model: KVModel) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings`` etc.), if it has one."""
    for attr in _POSITION_ATTRS:
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(model: KVModel, n_tokens: int, what: str) -> None:
    """Refuse a sequence of ``n_tokens`` tokens longer than the model's position limit, naming both."""
    limit = position_limit(model)
    if limit is not None and n_tokens > limit:
        raise PromptTooLong(
            f"{what} is {n_tokens} tokens long, more than {model.name}'s position limit of {limit} tokens; "
            "shorten the subject or prompt (or use fewer/shorter context prefixes)")


def check_template(template: str) -> str:
    """``template`` if it holds exactly one ``{}``; a clear error otherwise."""
    if not isinstance(template, str) or template.count("{}") != 1:
        found = template.count("{}") if isinstance(template, str) else "no"
        raise BadInput(
            f"prompt template {template!r} must contain exactly one '{{}}' where the subject goes "
            f"(found {found}); e.g. '{{}} is located in the city of'"
        )
    return template


def fill(template: str, subject: str) -> str:
    """The prompt with ``subject`` put in the template's ``{}``."""
    check_template(template)
    if not isinstance(subject, str) or not subject.strip():
        raise BadInput(f"empty subject {subject!r}: give the entity the fact is about")
    check_visible("subject", subject)
    return template.replace("{}", subject)


def continuation(text: str) -> str:
    """``text`` as it follows a prompt: with a leading space unless it has one (ROME's convention).

    ``"Paris"`` -> ``" Paris"``; the same rule for edit targets, trace targets and evaluation.
    """
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"empty target {text!r}: give the expected continuation, e.g. ' Paris'")
    check_visible("target", text)
    return text if text[0].isspace() else " " + text


def continuation_ids(model: KVModel, text: str) -> list[int]:
    """Token ids of ``text`` as it follows a prompt (see :func:`continuation`); never empty."""
    ids = list(model.tokenizer(continuation(text), add_special_tokens=False)["input_ids"])
    if not ids:
        raise BadInput(f"target {text!r} turns into no tokens with this tokenizer")
    return ids


@dataclass(frozen=True)
class SubjectSpan:
    """The tokens of ``subject`` in ``prompt``: ``start <= t < end`` (model token positions)."""

    prompt: str
    subject: str
    start: int
    end: int

    @property
    def last(self) -> int:
        """Position of the subject's last token (where ROME/MEMIT read the key)."""
        return self.end - 1

    @property
    def positions(self) -> list[int]:
        return list(range(self.start, self.end))


def subject_span(model: KVModel, prompt_or_template: str, subject: str) -> SubjectSpan:
    """Locate ``subject``'s tokens in a prompt, or in a template once ``{}`` is filled.

    With a template the subject sits where ``{}`` is; in a plain prompt its first occurrence
    is used. Tokens are the ones whose characters overlap the subject's characters.
    """
    if not isinstance(subject, str) or not subject.strip():
        raise BadInput(f"empty subject {subject!r}: give the entity the fact is about")
    check_visible("subject", subject)
    if "{}" in prompt_or_template:
        prompt = fill(prompt_or_template, subject)
        char_start = prompt_or_template.index("{}")
    else:
        prompt = prompt_or_template
        char_start = prompt.find(subject)
        if char_start < 0:
            tokens = model.token_strings(model.tokenize(prompt).input_ids[0])
            raise BadInput(f"subject {subject!r} is not in the prompt {prompt!r} (its tokens: {tokens})")
    text = model.prefix + prompt
    char_start += len(model.prefix)
    char_end = char_start + len(subject)
    enc = model.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < char_end and b > char_start]
    if not hits:
        raise BadInput(f"subject {subject!r} covers no token of {prompt!r}")
    shown = model.tokenizer.decode([enc["input_ids"][i] for i in hits])
    if not visible(shown):
        raise BadInput(f"subject {subject!r} turns into tokens that show nothing visible ({shown!r}) "
                       "with this tokenizer: give a subject the model can read")
    return SubjectSpan(prompt, subject, hits[0], hits[-1] + 1)
