"""EditRequest validation and batch checks (MEMIT Eq. 5)."""

from __future__ import annotations

import pytest

from kvlens.editing import EditRequest, check_requests


def test_template_and_plain_prompt():
    r = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    assert r.text == "The Eiffel Tower is located in the city of" and r.target_text == " Rome"
    plain = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome")
    assert plain.prompt == "{} is located in the city of"
    assert EditRequest("{} is in", "X", " Rome").target_text == " Rome"


@pytest.mark.parametrize("args, match", [
    (("The Louvre is in", "The Eiffel Tower", "Rome"), "not in the prompt"),
    (("{} and {} are in", "X", "Rome"), "exactly one"),
    (("{} is in", "X", ""), "target_new"),
    (("{} is in", "X", "   "), "target_new"),
    (("{} is in", "", "Rome"), "subject"),
    (("{} is in", "X", "Paris", " Paris"), "equals target_true"),
    (("{} is in", "X", "Rome", " "), "target_true"),
])
def test_bad_requests(args, match):
    with pytest.raises(ValueError, match=match):
        EditRequest(*args)


def test_conflicts_and_duplicates():
    a = EditRequest("{} is in", "X", "Rome")
    assert check_requests([a, EditRequest("{} is in", "X", "Rome")]) == (a,)
    assert len(check_requests([a, EditRequest("{} lives in", "X", "Oslo")])) == 2
    with pytest.raises(ValueError, match="conflicting"):
        check_requests([a, EditRequest("{} is in", "X", "Oslo")])
    with pytest.raises(ValueError, match="no edit requests"):
        check_requests([])
    with pytest.raises(TypeError):
        check_requests(["X is in Rome"])


def test_counterfact_record():
    rec = {"requested_rewrite": {"prompt": "{} is located in", "subject": "Big Ben",
                                 "target_new": {"str": "Rome", "id": "Q1"},
                                 "target_true": {"str": "London", "id": "Q2"}}}
    r = EditRequest.from_dict(rec)
    assert (r.subject, r.target_new, r.target_true) == ("Big Ben", "Rome", "London")
    assert EditRequest.from_dict(r.to_dict()) == r
