"""Key activations for 100 prompts at all layers: one batched pass set vs a per-prompt loop.

Times ``kvlens.keys(model, prompts)`` on the embedded SmolLM2-135M (float32, CPU) with all 100
prompts in one forward, in chunks of 25, and (for comparison) one prompt at a time, each in a
fresh process so that peak RSS is that run's own. Usage:

    .venv/bin/python benchmarks/inspect_keys.py [--prompts 100] [--threads 2]

Writes benchmarks/results/inspect_keys.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SUBJECTS = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Brazil", "Egypt", "India", "Kenya"]
TEMPLATES = ["The capital of {} is", "The official language of {} is", "The currency used in {} is the",
             "The largest city in {} is", "A famous dish from {} is", "The president of {} lives in",
             "{} is a country located in", "The national sport of {} is",
             "Tourists who visit {} often see the", "The flag of {} is mostly"]

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads({threads})
import kvlens
prompts = json.loads(sys.argv[1]); mode = sys.argv[2]
m = kvlens.load()
kvlens.keys(m, prompts[:2], layers=[0])  # warm-up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "loop":
    shapes = [kvlens.keys(m, p).coefficients[m.n_layers - 1].shape for p in prompts]
    tokens = sum(s[1] for s in shapes)
else:
    acts = kvlens.keys(m, prompts, batch_size=None if mode == "one" else int(mode))
    tokens = int(acts.batch.lengths.sum())
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", json.dumps({{"seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
                            "peak_rss_mib": peak / 1024, "peak_minus_load_mib": (peak - base) / 1024}}))
"""


def prompts(n: int) -> list[str]:
    all_prompts = [t.format(s) for t in TEMPLATES for s in SUBJECTS]
    return all_prompts[:n]


def run(mode: str, items: list[str], threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads), json.dumps(items), mode],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))[7:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-loop", action="store_true", help="do not time the per-prompt loop")
    args = parser.parse_args()
    items = prompts(args.prompts)
    runs = {"one_batch": run("one", items, args.threads), "chunks_of_25": run("25", items, args.threads)}
    if not args.skip_loop:
        runs["per_prompt_loop"] = run("loop", items, args.threads)
    result = {
        "what": f"kvlens.keys on {len(items)} prompts, all 30 layers of the embedded SmolLM2-135M "
                "(float32, CPU), coefficients returned for every token; each mode in a fresh process",
        "runs": runs, "torch_threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "python": platform.python_version(),
    }
    out = Path(__file__).parent / "results" / "inspect_keys.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
