#!/usr/bin/env bash
# Lint and type-check: ruff (rules in pyproject's [tool.ruff]) and mypy over kvlens/ ([tool.mypy]).
# Runs both, then exits non-zero if either found anything. Uses the project venv (.venv, or $VENV).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
for tool in ruff mypy; do
    if [ ! -x "$VENV/bin/$tool" ]; then
        echo "lint.sh: $VENV/bin/$tool not found; install the dev extras: $VENV/bin/pip install -e '.[dev]'" >&2
        exit 2
    fi
done
status=0
echo "== ruff check"
"$VENV/bin/ruff" check . || status=1
echo "== mypy"
"$VENV/bin/mypy" || status=1
exit $status
