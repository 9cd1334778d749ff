"""MEMIT on the embedded model: batched vs one-by-one z optimisation, agreement and efficacy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memit_batched.py --n 100 --subset 10

Requests: the CounterFact-style facts of data/counterfact_mini.json, extended (when ``--n`` is
larger) with requests built from their paraphrase prompts. The whole MEMIT edit runs with the
batched z stage (``z_batch`` requests per optimisation, layers <= L replayed from a cache, only
target positions decoded). The paper's one-by-one z optimisation (full forward per request) is
timed on ``--subset`` of the same requests, with the same seeded contexts; the ratio compares
seconds per request, and seconds per request-step (fair when the subset needs more or fewer
steps than the average request). Writes benchmarks/results/memit_<n>.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

import kvlens
from kvlens.editing import MEMIT, Contexts, EditRequest, check_requests
from kvlens.editing._shared import build_rows, target_report
from kvlens.editing.hparams import MEMIT_PRESETS
from kvlens.editing.memit import target_vectors
from kvlens.memory.stats import second_moments

DATA = Path(__file__).resolve().parent.parent / "data" / "counterfact_mini.json"


def load_requests(n: int) -> tuple[list[EditRequest], list[EditRequest]]:
    """``n`` requests (facts first, then paraphrase-prompt variants) and the facts' paraphrases."""
    records = json.loads(DATA.read_text())
    facts = [EditRequest.from_dict(r) for r in records]
    variants = [replace(f, prompt=p.replace(f.subject, "{}", 1)) for f, r in zip(facts, records)
                for p in r.get("paraphrase_prompts", []) if f.subject in p]
    reqs = list(check_requests(facts + variants))[:n]
    edited = {r.subject for r in reqs[: len(facts)]}
    paraphrases = [v for v in variants if v.subject in edited]
    return reqs, paraphrases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--subset", type=int, default=10)
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--z-batch", type=int, default=32)
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    model = kvlens.load()
    hp = replace(MEMIT_PRESETS["smollm2-135m"], contexts=Contexts(n=args.contexts, tokens=5), z_batch=args.z_batch)
    reqs, paraphrases = load_requests(args.n)
    stats = second_moments(model, hp.layers, n_tokens=args.stats_tokens, progress=False)
    start = time.perf_counter()
    delta = MEMIT(hp).compute(model, reqs, stats=stats)
    total = time.perf_counter() - start
    z, log = delta.info["z"], delta.info["opt"]
    subset = torch.linspace(0, len(reqs) - 1, args.subset).long().unique().tolist()
    rows = build_rows(model, [reqs[i] for i in subset], delta.info["contexts"])
    t0 = time.perf_counter()
    z_one, h, log_one = target_vectors(model, rows, replace(hp, z_batch=1, skip_fixed=False))
    one_seconds = time.perf_counter() - t0
    rel = ((z_one - z[subset]).norm(dim=-1) / (z[subset] - h).norm(dim=-1)).max()
    para = paraphrases[: 3 * len(reqs)]
    para_before = target_report(model, para)
    with delta.applied(model):
        para_after = target_report(model, para)
    result = {
        "model": model.name, "requests": len(reqs), "hparams": delta.hparams, "threads": torch.get_num_threads(),
        "total_seconds": total, "z_seconds_batched": log["z_seconds"],
        "z_seconds_per_request_batched": log["z_seconds"] / len(reqs),
        "one_by_one_subset": len(subset), "z_seconds_one_by_one_subset": one_seconds,
        "z_seconds_per_request_one_by_one": one_seconds / len(subset),
        "z_speedup": (one_seconds / len(subset)) / (log["z_seconds"] / len(reqs)),
        # per optimisation step of one request: the subset may need more (or fewer) steps than the average
        "z_speedup_per_request_step": (one_seconds / sum(log_one["steps"])) / (log["z_seconds"] / sum(log["steps"])),
        "mean_steps_batched_all": sum(log["steps"]) / len(reqs),
        "mean_steps_batched_subset": sum(log["steps"][i] for i in subset) / len(subset),
        "mean_steps_one_by_one_subset": sum(log_one["steps"]) / len(subset),
        "z_max_relative_difference": float(rel),
        "efficacy_top1": delta.info["outcome"]["efficacy"],
        "p_target_mean_before": sum(r["p_before"] for r in delta.info["outcome"]["requests"]) / len(reqs),
        "p_target_mean_after": sum(r["p_after"] for r in delta.info["outcome"]["requests"]) / len(reqs),
        "paraphrase_prompts": len(para),
        "paraphrase_top1_before": sum(r["target_is_top1"] for r in para_before) / max(1, len(para)),
        "paraphrase_top1_after": sum(r["target_is_top1"] for r in para_after) / max(1, len(para)),
        "norms": delta.norms(),
    }
    out = Path(__file__).parent / "results" / f"memit_{len(reqs)}{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
