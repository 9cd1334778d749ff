"""Trigger-example mining streams: throughput (tokens/s) and peak memory at 1x and 4x corpus sizes.

Each size runs in a fresh Python process (so peak RSS is that run's own), mining the top-n
positions of every memory of ``--layers`` from the bundled Wikipedia sample, without the disk
cache. Memory should stay flat as the corpus grows: the miner holds one batch of activations
and an ``n x d_ff`` table per layer. Usage:

    .venv/bin/python benchmarks/triggers_stream.py [--tokens 4096] [--layers 5] [--threads 2]

Writes benchmarks/results/triggers_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads({threads})
import kvlens
from kvlens.corpus import bundled
from kvlens.memory import triggers
m = kvlens.load()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
tops, seen = triggers.mine(m, {layers}, bundled(), n={n}, window={window}, max_tokens={tokens},
                           batch_size={batch}, progress=False)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", json.dumps({{"tokens": seen, "seconds": dt, "tokens_per_s": seen / dt,
                            "rss_after_load_mib": base / 1024, "peak_rss_mib": peak / 1024,
                            "peak_minus_load_mib": (peak - base) / 1024}}))
"""


def run(tokens: int, args: argparse.Namespace) -> dict:
    code = CHILD.format(threads=args.threads, layers=args.layers, n=args.n, window=args.window,
                        tokens=tokens, batch=args.batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))[7:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096, help="text tokens of the 1x corpus")
    parser.add_argument("--layers", type=int, nargs="+", default=[5])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sizes = {"1x": run(args.tokens, args), "4x": run(4 * args.tokens, args)}
    result = {
        "what": "kvlens.memory.triggers.mine on the bundled enwiki sample, embedded SmolLM2-135M "
                "(float32, CPU); each size in a fresh process; forward stops after the highest layer mined",
        "params": {"layers": args.layers, "n": args.n, "window": args.window, "batch_size": args.batch,
                   "torch_threads": args.threads},
        "sizes": sizes,
        "peak_growth_4x_vs_1x_mib": sizes["4x"]["peak_rss_mib"] - sizes["1x"]["peak_rss_mib"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "python": platform.python_version(),
    }
    out = Path(__file__).parent / "results" / "triggers_stream.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
