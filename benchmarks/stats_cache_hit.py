"""How long a statistics cache hit takes on the embedded model (issue 14: < 0.1 s, independent of size).

A hit still checks the model's fingerprint; its per-weight digests are computed once per weight
state (see ``KVModel._weight_digest``), so after the first call a hit reads only the cached file.
Run: ``python benchmarks/stats_cache_hit.py`` (writes benchmarks/results/stats_cache_hit.json).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import kvlens as kv
from kvlens.memory.stats import second_moments


def main() -> None:
    model = kv.load()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        second_moments(model, [8], n_tokens=2000, cache_root=Path(root), progress=False)
        first = time.perf_counter() - start
        hits = []
        for _ in range(5):
            start = time.perf_counter()
            second_moments(model, [8], n_tokens=2000, cache_root=Path(root), progress=False)
            hits.append(time.perf_counter() - start)
    out = {"model": model.name, "first_call_s (computes C from 2000 tokens)": round(first, 3),
           "cache_hit_s": [round(h, 4) for h in hits], "cache_hit_median_s": round(statistics.median(hits), 4),
           "note": "2-core machine shared by ~7 agents (load average ~20): absolute times are inflated"}
    path = Path(__file__).parent / "results" / "stats_cache_hit.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
