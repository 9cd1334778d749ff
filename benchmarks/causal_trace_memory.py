"""Is memory flat across many traces in one session? (nnsight #538, #396; issue 7)

    .venv/bin/python benchmarks/causal_trace_memory.py     # writes benchmarks/results/causal_trace_memory.json

Runs ``--traces`` traces of the same fact in one process (exact mode, as a notebook user would
call ``kv.trace`` again and again, no explicit ``gc.collect()``) and records the process's
resident memory after each one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil

import kvlens
from kvlens.causal import trace

OUT = Path(__file__).resolve().parent / "results" / "causal_trace_memory.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", type=int, default=100)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--kind", default="hidden")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    proc = psutil.Process()
    model = kvlens.load()
    mib = lambda: round(proc.memory_info().rss / 2**20, 1)  # noqa: E731
    rss, t0 = [mib()], time.perf_counter()
    for i in range(args.traces):
        trace(model, "{} is located in the city of", "The Eiffel Tower", kind=args.kind,
              samples=args.samples, seed=i, progress=False)
        rss.append(mib())
        if (i + 1) % 10 == 0:
            print(f"{i + 1} traces: {rss[-1]} MiB", flush=True)
    after_first = rss[1]
    result = dict(model=model.name, traces=args.traces, kind=args.kind, samples=args.samples,
                  seconds=round(time.perf_counter() - t0, 1), rss_mib_before=rss[0], rss_mib_after_first=after_first,
                  rss_mib_after_10=rss[min(10, args.traces)], rss_mib_after_last=rss[-1],
                  growth_after_first_mib=round(rss[-1] - after_first, 1),
                  growth_last_half_mib=round(rss[-1] - rss[len(rss) // 2], 1), rss_mib=rss)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
