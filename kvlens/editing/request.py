"""Edit requests: "make the model say ``target_new`` after this prompt about ``subject``".

A request is the triple (subject s, relation prompt p, new object o*) of ROME/MEMIT. The prompt is
a template with one ``{}`` where the subject goes; a prompt that spells the subject out is turned
into that template (its first occurrence of the subject becomes ``{}``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvlens.errors import BadInput
from kvlens.prompts import check_template, check_visible, continuation, fill


def _check_text(name: str, value: Any) -> str:
    """A non-empty string with a visible character (zero-width or whitespace-only text is refused)."""
    return check_visible(name, value)


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    Args:
        prompt: the relation prompt with one ``{}`` for the subject, e.g.
            ``"{} is located in the city of"``; a prompt containing ``subject`` literally is
            accepted and templated.
        subject: the entity the fact is about (``"The Eiffel Tower"``).
        target_new: the new object (``"Rome"``). As in ROME, a leading space is added for
            tokenization unless the target already starts with whitespace.
        target_true: the object the model knows now (``"Paris"``), optional; used by metrics.

    Raises:
        ValueError: template without exactly one ``{}``, subject not in the prompt, empty or
            whitespace target, or a new target equal to the true one.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        _check_text("subject", self.subject)
        _check_text("prompt", self.prompt)
        if "{" not in self.prompt:
            if self.subject not in self.prompt:
                raise BadInput(
                    f"subject {self.subject!r} is not in the prompt {self.prompt!r}; write the prompt as "
                    f"a template with '{{}}' where the subject goes, e.g. '{{}} is located in'")
            object.__setattr__(self, "prompt", self.prompt.replace(self.subject, "{}", 1))
        check_template(self.prompt)
        _check_text("target_new", self.target_new)
        if self.target_true is not None:
            _check_text("target_true", self.target_true)
            if self.target_true.strip() == self.target_new.strip():
                raise BadInput(
                    f"target_new {self.target_new!r} equals target_true: the model already says it, "
                    "there is nothing to edit")

    @property
    def text(self) -> str:
        """The filled prompt (subject in place)."""
        return fill(self.prompt, self.subject)

    @property
    def target_text(self) -> str:
        """``target_new`` as it is tokenized after the prompt (with its leading space)."""
        return continuation(self.target_new)

    @property
    def key(self) -> tuple[str, str]:
        """(subject, relation prompt): two requests with the same key must agree (MEMIT Eq. 5)."""
        return (self.subject, self.prompt)

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        """From a dict with our field names or a CounterFact ``requested_rewrite`` record."""
        if "requested_rewrite" in d:
            d = d["requested_rewrite"]
        if isinstance(d.get("target_new"), dict):
            true = d.get("target_true")
            return cls(d["prompt"], d["subject"], d["target_new"]["str"],
                       true["str"] if isinstance(true, dict) else true)
        return cls(d["prompt"], d["subject"], d["target_new"], d.get("target_true"))


def check_requests(requests: EditRequest | Iterable[EditRequest]) -> tuple[EditRequest, ...]:
    """The requests as a tuple, refusing an empty batch and conflicting requests.

    Two requests for the same subject and relation prompt with different new targets cannot both
    hold (MEMIT Eq. 5 asks for one memory per key); identical duplicates are kept once.
    """
    if isinstance(requests, EditRequest):
        requests = [requests]
    out: list[EditRequest] = []
    seen: dict[tuple[str, str], EditRequest] = {}
    for r in requests:
        if not isinstance(r, EditRequest):
            raise TypeError(f"expected EditRequest objects, got {type(r).__name__}")
        other = seen.get(r.key)
        if other is not None:
            if other.target_text.strip() != r.target_text.strip():
                raise BadInput(
                    f"conflicting requests for {r.subject!r} / {r.prompt!r}: targets "
                    f"{other.target_new!r} and {r.target_new!r}; one key can store one value (MEMIT Eq. 5)")
            continue
        seen[r.key] = r
        out.append(r)
    if not out:
        raise BadInput("no edit requests given")
    return tuple(out)


def check_each(requests: Sequence[EditRequest], batch_size: int) -> list[EditRequest]:
    """Requests edited each alone (``compute_each``): each checked by itself (no conflict or
    duplicate check across them), at least one, and a batch size of at least 1."""
    reqs = [check_requests([r])[0] for r in requests]
    if not reqs:
        raise ValueError("no requests to edit: pass at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return reqs
