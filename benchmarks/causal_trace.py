"""Benchmark of causal tracing on the embedded model (issue 7): exact fast mode vs the plain loop.

    .venv/bin/python benchmarks/causal_trace.py            # writes benchmarks/results/causal_trace.json
    .venv/bin/python benchmarks/causal_trace.py --facts 20 --skip-plain

1. One prompt, every layer × every token, hidden + mlp + attn, 10 samples, in one run:
   ``mode="exact"`` against ROME's procedure implemented plainly (one forward per cell, the
   samples batched, through nnsight: ``mode="plain", per_forward=1``). Both use the same seed,
   so their maps must agree up to float32 rounding; the largest absolute difference is recorded.
2. The approximate mode (attribution patching): time, and Spearman rank correlation of its
   effect maps with the exact maps, per kind, over ``--facts`` facts of data/counterfact_mini.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import kvlens
from kvlens.causal import rank_correlation, trace

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "causal_trace.json"
PROMPT, SUBJECT = "{} is located in the city of", "The Eiffel Tower"


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def exact_vs_plain(model, samples: int, skip_plain: bool) -> dict:
    opts = dict(kind="all", samples=samples, seed=1, progress=False)
    exact, t_exact = timed(trace, model, PROMPT, SUBJECT, mode="exact", **opts)
    row = dict(prompt=PROMPT, subject=SUBJECT, tokens=len(exact.tokens), layers=exact.n_layers,
               kinds=list(exact.kinds), samples=samples, cells=len(exact.tokens) * exact.n_layers * 3,
               exact_seconds=round(t_exact, 2), p_clean=exact.high, p_corrupted=exact.low,
               layer_work_fraction=work_fraction(exact.n_layers, len(exact.tokens), exact.subject_range[0]))
    if not skip_plain:
        plain, t_plain = timed(trace, model, PROMPT, SUBJECT, mode="plain", per_forward=1, **opts)
        diff = max(float((exact.scores[k] - plain.scores[k]).abs().max()) for k in exact.kinds)
        row.update(plain_per_cell_seconds=round(t_plain, 2), speedup=round(t_plain / t_exact, 2),
                   max_abs_difference=diff)
    return row


def work_fraction(n_layers: int, tokens: int, subject_start: int, window: int = 10) -> dict:
    """Decoder-layer work of the exact mode over the plain loop, counted in (layer, position) units.

    A plain cell runs every layer at every position; an exact cell runs layers ``>= start`` at
    positions ``>= t`` (none before the subject). Counted from the cell plans, not timed; the
    plain loop also computes the logits at every position, the exact mode at the scored ones.
    """
    from kvlens.causal.cells import KINDS, Cell, plan

    out = {}
    for kind in KINDS:
        done = sum((n_layers - plan(Cell(kind, l, t), window, n_layers).start) * (tokens - t)
                   for l in range(n_layers) for t in range(subject_start, tokens))
        out[kind] = round(done / (n_layers * tokens * n_layers * tokens), 3)
    out["all"] = round(sum(out[k] for k in KINDS) / len(KINDS), 3)
    return out


def approx_agreement(model, n_facts: int, samples: int, save=lambda partial: None) -> dict:
    records = json.loads((ROOT / "data" / "counterfact_mini.json").read_text())
    seen, facts = set(), []
    for r in records:  # one fact per subject, spread over relations
        rw = r["requested_rewrite"]
        if rw["subject"] not in seen:
            seen.add(rw["subject"])
            facts.append((rw["prompt"], rw["subject"], rw["target_true"]["str"]))
    facts = facts[:: max(1, len(facts) // n_facts)][:n_facts]
    corr: dict[str, list[float]] = {k: [] for k in ("hidden", "mlp", "attn")}
    t_exact = t_approx = 0.0
    for prompt, subject, target in facts:
        opts = dict(kind="all", samples=samples, seed=1, progress=False)
        ex, dt_e = timed(trace, model, prompt, subject, target, mode="exact", **opts)
        ap, dt_a = timed(trace, model, prompt, subject, target, mode="approx", **opts)
        t_exact, t_approx = t_exact + dt_e, t_approx + dt_a
        for k in corr:
            corr[k].append(rank_correlation(ap.effect(k), ex.effect(k)))
        print(f"  {subject!r}: exact {dt_e:.1f}s approx {dt_a:.1f}s",
              {k: round(v[-1], 3) for k, v in corr.items()}, flush=True)
        summary = dict(facts=len(corr["hidden"]), facts_planned=len(facts), samples=samples,
                       exact_seconds_total=round(t_exact, 1), approx_seconds_total=round(t_approx, 1),
                       speedup=round(t_exact / t_approx, 2),
                       spearman_mean={k: round(sum(v) / len(v), 3) for k, v in corr.items()},
                       spearman_min={k: round(min(v), 3) for k, v in corr.items()},
                       spearman_per_fact={k: [round(x, 3) for x in v] for k, v in corr.items()})
        save(summary)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--approx-samples", type=int, default=3)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--parts", default="plain,approx", help="comma-separated: plain (exact vs plain), approx")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = kvlens.load()
    result = dict(machine=dict(cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                               python=platform.python_version(), note="shared 2-core machine, noisy"),
                  model=model.name)
    parts = args.parts.split(",")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if "plain" in parts:
        result["exact_vs_plain"] = exact_vs_plain(model, args.samples, args.skip_plain)
        print(json.dumps(result["exact_vs_plain"], indent=1), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if "approx" in parts and args.facts:
        def save(partial: dict) -> None:
            args.out.write_text(json.dumps(dict(result, approx=partial), indent=1) + "\n")

        result["approx"] = approx_agreement(model, args.facts, args.approx_samples, save)
        print(json.dumps(result["approx"], indent=1), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
