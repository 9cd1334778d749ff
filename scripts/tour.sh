#!/usr/bin/env bash
# Set everything up, then run the kvlens tour on the embedded default model headlessly.
# It writes an HTML report and prints its path. Extra arguments go to `kvlens tour`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvlens tour "$@"
