"""The committed lock is the tested environment: it covers pyproject.toml, environment.yml agrees with it,
the running interpreter has exactly its versions, and kvlens calls no deprecated transformers API."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"

_spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
assert _spec is not None and _spec.loader is not None
check_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_lock)


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"], *extras["notebook"]]]


def test_lock_pins_every_dependency_inside_its_range():
    lock = check_lock.read_lock(LOCK)
    for req in _requirements():
        key = check_lock.normalise(req.name)
        assert key in lock, f"{req.name} is a dependency in pyproject.toml but not in requirements.lock"
        version = lock[key][1]
        assert req.specifier.contains(Version(version), prereleases=True), \
            f"requirements.lock pins {req.name}=={version}, outside pyproject's range {req.specifier}"


def test_environment_yml_is_the_lock():
    lock = check_lock.read_lock(LOCK)
    text = (ROOT / "environment.yml").read_text()
    assert text == check_lock.environment_yml(lock, LOCK.name), \
        "environment.yml differs from requirements.lock: regenerate both with bash scripts/lock.sh"
    pins = dict(re.findall(r"^\s+- ([A-Za-z0-9._-]+)==(\S+)$", text, flags=re.M))
    assert {check_lock.normalise(k): v for k, v in pins.items()} == \
        {k: v for k, (_, v) in lock.items() if k not in check_lock.NOT_IN_ENVIRONMENT}


def test_this_environment_is_the_lock():
    """The suite runs on the locked versions (scripts/test.sh), except under the drift check."""
    if Path(sys.prefix).name == ".venv-latest":
        pytest.skip("the drift check (scripts/test.sh --latest) runs on the newest releases on purpose")
    diff = check_lock.differences(check_lock.read_lock(LOCK), check_lock.installed(), set())
    assert diff == [], "installed versions differ from requirements.lock (run scripts/setup.sh):\n" + "\n".join(diff)


def test_differences_names_what_drifted():
    lock = {"torch": ("torch", "2.13.0"), "plotly": ("plotly", "7.1.0"), "peft": ("peft", "0.18.0")}
    have = {"torch": "2.13.0+cpu", "plotly": "7.2.0"}
    assert check_lock.differences(lock, have, set()) == [
        "peft: locked 0.18.0, not installed", "plotly: locked 7.1.0, installed 7.2.0"]
    assert check_lock.differences(lock, have, {"plotly", "peft"}) == []


def test_no_deprecated_past_key_values_in_kvlens():
    """transformers 5.24 renamed the cache argument to ``cache=``; 5.40 removes ``past_key_values``."""
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "kvlens").rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "past_key_values" in line]
    assert offenders == []
