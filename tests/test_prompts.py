"""Subject lookup shared by tracing and editing."""

from __future__ import annotations

import pytest

from kvlens.prompts import fill, subject_span
from tests.conftest import tiny


def test_subject_tokens_in_the_embedded_model(embedded):
    span = subject_span(embedded, "{} is located in the city of", "The Eiffel Tower")
    ids = embedded.tokenize(span.prompt).input_ids[0]
    pieces = embedded.token_strings(ids[span.start: span.end])
    assert "".join(pieces).strip() == "The Eiffel Tower"
    assert span.start == 1  # after the <|endoftext|> prefix
    mid = subject_span(embedded, "Where is the Eiffel Tower? In", "Eiffel Tower")
    assert "".join(embedded.token_strings(embedded.tokenize(mid.prompt).input_ids[0][mid.start:mid.end])) \
        == " Eiffel Tower"


def test_template_and_subject_errors(embedded):
    with pytest.raises(ValueError, match="exactly one"):
        fill("no slot here", "x")
    with pytest.raises(ValueError, match="exactly one"):
        fill("{} and {}", "x")
    with pytest.raises(ValueError, match="empty subject"):
        fill("{} is", " ")
    with pytest.raises(ValueError, match="not in the prompt .*its tokens"):
        subject_span(embedded, "The Louvre is in", "Eiffel")


def test_char_tokenizer_span():
    m = tiny("llama")
    span = subject_span(m, "ab {} cd", "XYZ")
    assert (span.start, span.end, span.last) == (3, 6, 5)
