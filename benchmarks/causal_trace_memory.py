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
    ap.add_argument("--prompt", default="{} is located in the city of")
    ap.add_argument("--subject", default="The Eiffel Tower")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    proc = psutil.Process()
    model = kvlens.load()
    mib = lambda: round(proc.memory_info().rss / 2**20, 1)  # noqa: E731
    rss, t0 = [mib()], time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(args.traces):
        trace(model, args.prompt, args.subject, kind=args.kind, samples=args.samples, seed=i, progress=False)
        rss.append(mib())
        if (i + 1) % 10 == 0 or i + 1 == args.traces:
            result = summary(model.name, args, rss, time.perf_counter() - t0)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{i + 1} traces: {rss[-1]} MiB", flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib"}, indent=1))


def summary(name: str, args: argparse.Namespace, rss: list[float], seconds: float) -> dict:
    """RSS figures after ``len(rss) - 1`` traces (rss[0] is before the first)."""
    return dict(model=name, traces_done=len(rss) - 1, traces_planned=args.traces, kind=args.kind,
                samples=args.samples, prompt=args.prompt, seconds=round(seconds, 1), rss_mib_before=rss[0],
                rss_mib_after_first=rss[1], rss_mib_after_10=rss[min(10, len(rss) - 1)], rss_mib_after_last=rss[-1],
                growth_after_first_mib=round(rss[-1] - rss[1], 1),
                growth_last_half_mib=round(rss[-1] - rss[len(rss) // 2], 1), rss_mib=rss)


if __name__ == "__main__":
    main()
