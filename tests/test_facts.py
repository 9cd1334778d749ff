"""The bundled fact set: well-formed, and known by the embedded model (its own check)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def _check_module():
    spec = importlib.util.spec_from_file_location("check_facts", DATA / "check_facts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_facts", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _records() -> list[dict]:
    return json.loads((DATA / "counterfact_mini.json").read_text(encoding="utf-8"))


def test_bundled_set_shape():
    records = _records()
    assert len(records) >= 200
    relations = Counter(r["requested_rewrite"]["relation_id"] for r in records)
    assert len(relations) >= 10
    assert len({r["case_id"] for r in records}) == len(records)
    for r in records:
        rw = r["requested_rewrite"]
        assert rw["prompt"].count("{}") == 1
        assert rw["target_true"]["str"].startswith(" ") and rw["target_new"]["str"].startswith(" ")
        assert rw["target_true"]["str"] != rw["target_new"]["str"]
        assert len(r["paraphrase_prompts"]) >= 2
        assert len(r["neighborhood_prompts"]) >= 5
        assert len(r["generation_prompts"]) >= 1
        own = re.compile(rf"(^|\W){re.escape(rw['subject'])}(\W|$)")
        assert not any(own.search(p) for p in r["neighborhood_prompts"])
        assert all(rw["subject"] in p for p in r["paraphrase_prompts"])


def test_bundled_set_passes_its_check(embedded):
    """Every bundled fact passes data/check_facts.py on the embedded model (one batched pass)."""
    check = _check_module()
    records = _records()
    results = check.check_records(embedded, records, batch_size=64)
    failed = [(c.prompt, c.target_true, round(c.margin, 2)) for c in results if not c.passed]
    assert not failed, f"{len(failed)} bundled facts fail: {failed[:5]}"
    assert "passed" in check.summarize(results)
