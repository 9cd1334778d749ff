"""Loaders: ROME JSON round trip, zsRE (MEND) records, bad records, the hub failing fast offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from kvlens import datasets as D

RECORD = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                          "relation_id": "P131", "target_new": {"str": "Rome", "id": "Q220"},
                          "target_true": {"str": "Paris", "id": "Q90"}},
    "paraphrase_prompts": ["The Eiffel Tower can be found in the city of", "Where is the Eiffel Tower? In"],
    "neighborhood_prompts": ["The Louvre is located in the city of"],
    "attribute_prompts": ["The Colosseum is located in the city of"],
    "generation_prompts": ["The Eiffel Tower is"],
}
ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "answers": ["Illinois Institute of Technology"], "alt": "University of Michigan",
        "rephrase": "What university did Watts Humphrey take part in?",
        "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}


def test_counterfact_record_and_round_trip(tmp_path):
    case = D.from_record(RECORD)
    assert case.rewrite_prompt == "The Eiffel Tower is located in the city of"
    assert (case.target_new, case.target_true) == (" Rome", " Paris")  # ROME prepends the space
    assert case.neighborhood_pairs() == [("The Louvre is located in the city of", " Paris")]
    path = D.save_json([case], tmp_path / "cf.json")
    again = D.load_json(path)
    assert again == [case]
    assert json.loads(path.read_text())[0]["requested_rewrite"]["subject"] == "The Eiffel Tower"


def test_jsonl_and_limit(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps({**RECORD, "case_id": i}) for i in range(5)))
    assert [c.case_id for c in D.load_json(path, limit=3)] == [0, 1, 2]


def test_zsre_record():
    case = D.from_record(ZSRE, 3)
    assert case.source == "zsre" and case.target_true is None
    assert case.prompt == "What university did {} attend?"
    assert case.target_new == " Illinois Institute of Technology"
    assert case.neighborhood_pairs() == [(ZSRE["loc"] + "?", " Hugo Weaving")]
    assert D.from_record(D.to_record(case)) == case


def test_missing_field_names_record_and_field():
    bad = json.loads(json.dumps(RECORD))
    del bad["requested_rewrite"]["target_new"]["str"]
    with pytest.raises(ValueError, match=r"record 4 \(case_id 7\) is missing field 'requested_rewrite.target_new.str'"):
        D.from_records([RECORD] * 4 + [bad])
    with pytest.raises(ValueError, match="record 0 is missing field 'loc_ans'"):
        D.from_record({k: v for k, v in ZSRE.items() if k != "loc_ans"})
    with pytest.raises(ValueError, match="neither a CounterFact record"):
        D.from_record({"question": "?"})
    empty = json.loads(json.dumps(RECORD))
    empty["requested_rewrite"]["target_new"]["str"] = "  "
    with pytest.raises(ValueError,
                       match=r"record 0 \(case_id 7\), field 'requested_rewrite.target_new.str': empty target"):
        D.from_record(empty)


def test_bad_requests():
    same = json.loads(json.dumps(RECORD))
    same["requested_rewrite"]["target_new"]["str"] = "Paris"
    with pytest.raises(ValueError, match="equals the true object"):
        D.from_record(same)
    with pytest.raises(ValueError, match="no requests"):
        D.as_cases([])
    with pytest.raises(ValueError, match="exactly one"):
        D.EvalCase(0, "no placeholder", "X", " Y")
    with pytest.raises(TypeError, match="request 0"):
        D.as_cases([42])


def test_edit_request_like_objects_become_cases():
    class Req:  # the shape of kvlens.EditRequest
        prompt, subject, target_new, target_true = "{} is in", "Paris", "Rome", None

    (case,) = D.as_cases(Req())
    assert (case.rewrite_prompt, case.target_new, case.paraphrase_prompts) == ("Paris is in", " Rome", ())


def test_bundled_set_loads():
    cases = D.load_bundled()
    assert len(cases) >= 200 and all(c.target_true for c in cases)


def test_neighbours_naming_a_subject_edited_with_them_are_left_out():
    rome = D.EvalCase(0, "{} is in", "Rome", " Paris", " Italy",
                      neighborhood_prompts=("Milan is in", "Niger borders", "Romeo was born in"))
    niger = D.EvalCase(1, "{} borders", "Niger", " Chad", " Mali",
                       neighborhood_prompts=("Rome is in", "Nigeria borders"),
                       neighborhood_targets=(" Italy", " Benin"))
    kept = D.without_edited_neighbours([rome, niger])
    assert kept[0].neighborhood_prompts == ("Milan is in", "Romeo was born in")  # whole names only
    assert kept[1].neighborhood_prompts == ("Nigeria borders",) and kept[1].neighborhood_targets == (" Benin",)
    assert D.count_edited_neighbours([rome, niger]) == (2, 5) and D.count_edited_neighbours(kept) == (0, 3)
    assert rome.neighborhood_prompts[1] == "Niger borders"  # the caller's cases are not changed
    assert D.without_edited_neighbours([rome]) == [rome]  # edited alone: nothing to leave out
    # the subjects of another edit: only "Niger borders" (Rome's neighbour) names Niger
    assert D.count_edited_neighbours([rome, niger], ["Niger"]) == (1, 5)
    assert D.without_edited_neighbours([niger], ["Niger"]) == [niger]


def test_hub_fails_fast_with_local_file_hint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(D.DatasetUnavailableError, match="load_json"):
        D.load_counterfact("kvlens-test/does-not-exist-anywhere", timeout=5)
    assert time.perf_counter() - t0 < 30


def test_hub_offline_mode_uses_cache_only(tmp_path):
    """With HF_HUB_OFFLINE=1 (set before Python starts, as users do) an uncached id fails fast."""
    code = ("from kvlens import datasets as D\n"
            "try:\n    D.load_zsre('kvlens-test/not-cached')\n"
            "except D.DatasetUnavailableError as e:\n    print('UNAVAILABLE', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "UNAVAILABLE" in out.stdout and "HF_HUB_OFFLINE" in out.stdout, out.stderr[-2000:]
    assert time.perf_counter() - t0 < 60
    path = tmp_path / "local.json"
    path.write_text(json.dumps([ZSRE]))
    assert D.load_zsre(str(path))[0].source == "zsre"


def test_reference_texts_cover_every_bundled_object(tmp_path):
    refs = D.load_reference_texts()
    objects = {c.target_new.strip() for c in D.load_bundled()} | {c.target_true.strip() for c in D.load_bundled()}
    assert objects <= set(refs)
    bad = tmp_path / "refs.json"
    bad.write_text(json.dumps({"Paris": []}))
    with pytest.raises(ValueError, match="'Paris' needs a non-empty list"):
        D.load_reference_texts(bad)
