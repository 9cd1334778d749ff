"""ROME edit latency on the embedded model with statistics cached vs not, and E[kkᵀ] throughput.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edit_latency.py [--tokens 20000]

Writes benchmarks/results/edit_latency.json. The statistics use ``--tokens`` corpus tokens of the
bundled Wikipedia sample (ROME used 100k samples; fewer is the low-sample mode).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

import kvlens
from kvlens.editing import ROME, EditRequest
from kvlens.memory.stats import throughput

REQ = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    model = kvlens.load()
    result: dict = {"model": model.name, "threads": torch.get_num_threads(), "machine": platform.machine(),
                    "stats_tokens": args.tokens}
    result["stats_throughput_1_layer"] = throughput(model, [8], n_tokens=5000)
    result["stats_throughput_5_layers"] = throughput(model, [4, 5, 6, 7, 8], n_tokens=5000)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KVLENS_CACHE"] = cache
        editor = ROME(stats_tokens=args.tokens)
        for label in ("uncached", "cached"):
            start = time.perf_counter()
            delta = editor.compute(model, [REQ])
            total = time.perf_counter() - start
            result[f"rome_{label}"] = {"seconds": total, "compute_seconds": delta.info["seconds"],
                                       "steps": delta.info["opt"]["steps"],
                                       "p_before": delta.info["outcome"]["requests"][0]["p_before"],
                                       "p_after": delta.info["outcome"]["requests"][0]["p_after"]}
            print(label, result[f"rome_{label}"], flush=True)
    result["speedup_cached"] = result["rome_uncached"]["seconds"] / result["rome_cached"]["seconds"]
    out = Path(__file__).parent / "results" / "edit_latency.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
