"""Load times of the embedded default: first load (GGUF -> safetensors copy) vs later loads.

Each load runs in a fresh Python process with an empty (first) or warm (second) cache, so
import costs are the same in both and only the loading differs. Usage:

    .venv/bin/python benchmarks/load_times.py [--repeats 3]

Writes benchmarks/results/load_times.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import time, torch, kvlens
t = time.perf_counter(); m = kvlens.load(); dt = time.perf_counter() - t
print("SECONDS", dt)
"""


def timed_load(cache: str) -> float:
    env = {**os.environ, "KVLENS_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return float(next(l for l in out.stdout.splitlines() if l.startswith("SECONDS")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    first, second = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            first.append(timed_load(cache))
            second.append(timed_load(cache))
    result = {
        "what": "kvlens.load() of the embedded SmolLM2-135M-Instruct, each in a new process",
        "first_load_s": first, "second_load_s": second,
        "first_median_s": statistics.median(first), "second_median_s": statistics.median(second),
        "speedup": statistics.median(first) / statistics.median(second),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
    }
    out = Path(__file__).parent / "results" / "load_times.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
