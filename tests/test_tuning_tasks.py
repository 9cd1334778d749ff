"""The bundled task mix passes data/check_tasks.py on the embedded model; a broken file fails it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def _check_module():
    spec = importlib.util.spec_from_file_location("check_tasks", DATA / "check_tasks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_tasks", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bundled_tasks_pass_their_check(embedded):
    check = _check_module()
    files = check.bundled_files()
    assert [f.stem for f in files] == ["animal_class", "continent", "parity", "sentiment"]
    results = [check.check_task_file(embedded, f) for f in files]
    assert all(r.passed for r in results), [r.problem for r in results if not r.passed]
    tokens = {r.name: r.label_tokens for r in results}
    assert tokens["continent"]["North America"] == 2 and tokens["parity"] == {"even": 1, "odd": 1}


def test_a_broken_task_file_fails_the_check(embedded, tmp_path):
    check = _check_module()
    task = json.loads((DATA / "tasks" / "parity.json").read_text(encoding="utf-8"))
    task["template"] = task["template"].replace("even or odd", "even")  # 'odd' no longer in the prompt
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(task), encoding="utf-8")
    result = check.check_task_file(embedded, bad)
    assert not result.passed and "'odd'" in result.problem and "not named in the prompt" in result.problem
    task = json.loads((DATA / "tasks" / "parity.json").read_text(encoding="utf-8"))
    task["train"] = ([e for e in task["train"] if e["label"] == "even"]
                     + [e for e in task["train"] if e["label"] == "odd"][:3])
    bad.write_text(json.dumps(task), encoding="utf-8")
    assert "unbalanced" in check.check_task_file(embedded, bad).problem
    assert check.main([str(DATA / "tasks" / "parity.json")]) == 0
