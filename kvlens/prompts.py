"""Prompts and subjects: fill ``{}`` templates and find the subject's tokens.

Shared by causal tracing (which subject tokens to corrupt) and editing (the last subject token
whose key ROME/MEMIT read), so the lookup is written once. Token indices are positions in
:meth:`KVModel.tokenize` output, the model's prefix included.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlens.models.kvmodel import KVModel


def check_template(template: str) -> str:
    """``template`` if it holds exactly one ``{}``; a clear error otherwise."""
    if not isinstance(template, str) or template.count("{}") != 1:
        found = template.count("{}") if isinstance(template, str) else "no"
        raise ValueError(
            f"prompt template {template!r} must contain exactly one '{{}}' where the subject goes "
            f"(found {found}); e.g. '{{}} is located in the city of'"
        )
    return template


def fill(template: str, subject: str) -> str:
    """The prompt with ``subject`` put in the template's ``{}``."""
    check_template(template)
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"empty subject {subject!r}: give the entity the fact is about")
    return template.replace("{}", subject)


def continuation(text: str) -> str:
    """``text`` as it follows a prompt: with a leading space unless it has one (ROME's convention).

    ``"Paris"`` -> ``" Paris"``; the same rule for edit targets, trace targets and evaluation.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty target {text!r}: give the expected continuation, e.g. ' Paris'")
    return text if text[0].isspace() else " " + text


def continuation_ids(model: KVModel, text: str) -> list[int]:
    """Token ids of ``text`` as it follows a prompt (see :func:`continuation`); never empty."""
    ids = list(model.tokenizer(continuation(text), add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {text!r} turns into no tokens with this tokenizer")
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
        raise ValueError(f"empty subject {subject!r}: give the entity the fact is about")
    if "{}" in prompt_or_template:
        prompt = fill(prompt_or_template, subject)
        char_start = prompt_or_template.index("{}")
    else:
        prompt = prompt_or_template
        char_start = prompt.find(subject)
        if char_start < 0:
            tokens = model.token_strings(model.tokenize(prompt).input_ids[0])
            raise ValueError(f"subject {subject!r} is not in the prompt {prompt!r} (its tokens: {tokens})")
    text = model.prefix + prompt
    char_start += len(model.prefix)
    char_end = char_start + len(subject)
    enc = model.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < char_end and b > char_start]
    if not hits:
        raise ValueError(f"subject {subject!r} covers no token of {prompt!r}")
    return SubjectSpan(prompt, subject, hits[0], hits[-1] + 1)
