"""Independent edits on the embedded model: batched vs one by one, wall time, peak memory, agreement.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/independent_edits.py --n 100 --subset 10

For each method, ``kv.evaluate_each`` runs the independent protocol (each request edited alone
from the unedited model, scored, undone) on the first ``--n`` bundled facts with ``batched=True``,
and with ``batched=False`` (strictly one by one) on the first ``--subset`` of them; the ratio
compares seconds per request (every method batches per row; the results say how each ran). Each
(method, mode) runs in its own process, so its peak resident
memory (``ru_maxrss``) is its own; the process's memory after loading the model and statistics
is recorded beside it. The batched and one-by-one scores of the subset are compared (max
absolute difference of every teacher-forced log-probability, and of the per-case metrics).
Writes benchmarks/results/independent_edits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: name -> factory source, evaluated in the child process
METHODS = {
    "ROME": "kv.ROME(stats_tokens=TOK)",
    "MEMIT": "kv.MEMIT(stats_tokens=TOK)",
    "AlphaEdit": "kv.AlphaEdit(preset='smollm2-135m', stats_tokens=TOK)",
    "FT keys": "kv.KeyFT()",
    "FT values": "kv.ValueFT()",
    "FT gates": "kv.GateFT()",
    "LoRA keys": "kv.LoRAKeys()",
    "LoRA values": "kv.LoRAValues()",
    "LoRA gates": "kv.LoRAGates()",
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(name: str, mode: str, n: int, tokens: int, out: str) -> None:
    """One (method, mode) run; writes its timings, memory and raw scores to ``out``."""
    import kvlens as kv

    warnings.simplefilter("ignore")
    model = kv.load()
    method = eval(METHODS[name].replace("TOK", str(tokens)), {"kv": kv})  # our own table above
    cases = kv.load_bundled()[:n]
    hp = method.hparams_for(model)
    if hasattr(hp, "stats_tokens"):  # statistics computed/cached before the clock starts
        from kvlens.memory.stats import second_moments

        layers = [hp.layer] if hasattr(hp, "layer") else list(hp.layers)
        second_moments(model, layers, n_tokens=hp.stats_tokens, progress=False)
    base = rss_mib()
    start = time.perf_counter()
    rep = kv.evaluate_each(model, method, cases, batched=mode == "batched")
    seconds = time.perf_counter() - start
    raw = [{k: [s.logprobs.tolist() for s in v] for k, v in case.items()} for case in rep.raw["after"]]
    Path(out).write_text(json.dumps({
        "method": name, "mode": mode, "n": n, "seconds": seconds, "per_request_s": seconds / n,
        "rss_after_load_mib": base, "peak_rss_mib": rss_mib(), "protocol": rep.protocol,
        "aggregate": {k: str(v) for k, v in rep.aggregate["after"].items()},
        "per_case": rep.per_case["after"], "raw": raw}))


def run_child(name: str, mode: str, n: int, tokens: int) -> dict:
    out = RESULTS / f".independent_{name.replace(' ', '_')}_{mode}.json"
    subprocess.run([sys.executable, __file__, "--child", name, "--mode", mode, "--n", str(n),
                    "--stats-tokens", str(tokens), "--out", str(out)], check=True)
    data = json.loads(out.read_text())
    out.unlink()
    return data


def agreement(a: dict, b: dict, n: int) -> dict:
    """Max |difference| of the first ``n`` cases' log-probabilities and per-case metrics."""
    lp = max((abs(x - y) for ca, cb in zip(a["raw"][:n], b["raw"][:n]) for k in ca
              for sa, sb in zip(ca[k], cb[k]) for x, y in zip(sa, sb)), default=0.0)
    mt = max((abs(ca[k] - cb[k]) for ca, cb in zip(a["per_case"][:n], b["per_case"][:n]) for k in ca), default=0.0)
    return {"max_abs_logprob": lp, "max_abs_metric": mt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--subset", type=int, default=10, help="requests for the one-by-one runs")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--child", default=None)
    ap.add_argument("--mode", default="batched")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.mode, args.n, args.stats_tokens, args.out)
        return
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for name in args.methods:
        load, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        b = run_child(name, "batched", args.n, args.stats_tokens)
        a = run_child(name, "one-by-one", args.subset, args.stats_tokens)
        row = {"method": name, "batched_n": b["n"], "one_by_one_n": a["n"],
               "batched_s_per_request": b["per_request_s"], "one_by_one_s_per_request": a["per_request_s"],
               "speedup": a["per_request_s"] / b["per_request_s"],
               "batched_peak_rss_mib": b["peak_rss_mib"], "one_by_one_peak_rss_mib": a["peak_rss_mib"],
               "rss_after_load_mib": b["rss_after_load_mib"],
               "batched_protocol": {k: v for k, v in b["protocol"].items() if k != "steps"},
               "agreement_on_subset": agreement(b, a, args.subset),
               "after_batched": b["aggregate"], "after_one_by_one": a["aggregate"], "n": args.n,
               "subset": args.subset, "stats_tokens": args.stats_tokens, "started": started,
               "machine": {"cpus": os.cpu_count(), "loadavg_at_start": load, "loadavg_now": os.getloadavg()}}
        rows.append(row)
        print(f"{name:12s} batched {row['batched_s_per_request']:.2f} s/req (n={b['n']}) vs one-by-one "
              f"{row['one_by_one_s_per_request']:.2f} s/req (n={a['n']}): {row['speedup']:.2f}x; peak RSS "
              f"{row['batched_peak_rss_mib']:.0f} vs {row['one_by_one_peak_rss_mib']:.0f} MiB; "
              f"max |Δ logprob| {row['agreement_on_subset']['max_abs_logprob']:.1e}", flush=True)
        path = RESULTS / "independent_edits.json"  # rows of methods not run now are kept
        kept = [r for r in json.loads(path.read_text())["rows"] if r["method"] not in {x["method"] for x in rows}] \
            if path.exists() else []
        path.write_text(json.dumps({
            "model": "SmolLM2-135M-Instruct (embedded)",
            "note": ("batched: kv.evaluate_each(batched=True) on n requests; one-by-one: batched=False on the "
                     "first `subset` of them (each method's `batched_protocol` says how it ran, and any fallback). "
                     "Ratios are per request, both modes of a row measured in one run (each row says when, its "
                     "n, subset, statistics size and the machine's load); rows of methods not run are kept."),
            "rows": kept + rows}, indent=1))


if __name__ == "__main__":
    main()
