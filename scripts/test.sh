#!/usr/bin/env bash
# Set everything up (the locked versions), lint and type-check, then run the whole test suite
# (real embedded model included).
#   bash scripts/test.sh [pytest args]            the locked, tested environment (.venv)
#   bash scripts/test.sh --latest [pytest args]   the drift check: the newest releases pyproject.toml
#                                                  allows, in .venv-latest; prints what differs from the lock
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--latest" ]; then
  shift
  KVLENS_VENV=.venv-latest KVLENS_LATEST=1 bash scripts/setup.sh
  .venv-latest/bin/python scripts/check_lock.py --lock requirements.lock --report
  VENV=.venv-latest bash scripts/lint.sh || echo "kvlens drift: ruff/mypy find problems with the newest releases (above)"
  exec .venv-latest/bin/python -m pytest "$@"
fi
bash scripts/setup.sh
bash scripts/lint.sh  # ruff (rules in pyproject.toml) and mypy over kvlens/, zero findings
exec .venv/bin/python -m pytest "$@"
