"""Batch-edit efficacy on the embedded model: MEMIT at several λ vs AlphaEdit, same facts and z setup.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edit_methods.py --n 16 --lam 15000 2000 300

Requests: every 6th of the first 100 requests of benchmarks/memit_batched.py (CounterFact-style
facts of data/counterfact_mini.json). Statistics: 20k tokens of the bundled sample (cached).
Writes benchmarks/results/edit_methods.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

from memit_batched import load_requests

import kvlens
from kvlens.editing import MEMIT, AlphaEdit, Contexts
from kvlens.editing.alphaedit import ALPHAEDIT_PRESETS
from kvlens.editing.hparams import MEMIT_PRESETS
from kvlens.memory.stats import second_moments


def run(model, editor, reqs, stats) -> dict:
    start = time.perf_counter()
    delta = editor.compute(model, reqs, stats=stats)
    out = delta.info["outcome"]
    return {"seconds": time.perf_counter() - start, "efficacy_top1": out["efficacy"],
            "p_target_mean_before": sum(r["p_before"] for r in out["requests"]) / len(reqs),
            "p_target_mean_after": sum(r["p_after"] for r in out["requests"]) / len(reqs),
            "z_loss_mean": sum(delta.info["opt"]["loss"]) / len(reqs), "norms": delta.norms()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--lam", type=float, nargs="+", default=[15_000.0, 2_000.0])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    model = kvlens.load()
    reqs = load_requests(100)[0][::6][: args.n]
    stats = second_moments(model, [4, 5, 6, 7, 8], n_tokens=20_000, progress=False)
    ctx = {"contexts": Contexts(n=2, tokens=5), "z_batch": 16}
    result = {"model": model.name, "requests": len(reqs), "stats_tokens": 20_000, "runs": {}}
    for lam in args.lam:
        hp = replace(MEMIT_PRESETS["smollm2-135m"], lam=lam, **ctx)
        result["runs"][f"memit_lam{lam:g}"] = run(model, MEMIT(hp), reqs, stats)
        print(lam, result["runs"][f"memit_lam{lam:g}"], flush=True)
    hp = replace(ALPHAEDIT_PRESETS["smollm2-135m"], **ctx)
    result["runs"]["alphaedit"] = {**run(model, AlphaEdit(hp), reqs, stats), "l2": hp.l2,
                                   "nullspace_threshold": hp.nullspace_threshold}
    out = Path(__file__).parent / "results" / "edit_methods.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
