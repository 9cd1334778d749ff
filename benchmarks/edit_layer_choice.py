"""Where to edit the embedded model, pooled over many facts (``kv.choose_edit_layers``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/edit_layer_choice.py [--every 12] [--samples 10]

Severed paths (ROME Fig. 3, at the last subject token) of every ``--every``-th bundled fact the
model knows (clean top-1 = the true object), pooled: MEMIT's range by ``suggest_edit_layers``'s
rule on the mean gap, the one-layer choice (the pooled MLP contribution's peak, the layer a
one-layer method such as ROME or FT at "the causal-trace layer" edits), each with a bootstrap
95 % interval over facts, and every fact's own range. Writes
benchmarks/results/edit_layer_choice.json and the figure ``edit_layer_choice_figure.json``
(``kv.views.trace_figures.layer_choice_chart``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import kvlens as kv
from kvlens.views.trace_figures import layer_choice_chart

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=int, default=12)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    model = kv.load()
    cases = kv.load_bundled()[:: args.every]
    facts = [(c.prompt, c.subject, c.target_true) for c in cases]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    choice = kv.choose_edit_layers(model, facts, samples=args.samples, n_boot=args.n_boot, progress=True)
    seconds = time.perf_counter() - t0
    print(choice)
    out = {"model": model.name, "facts_tried": len(facts), "facts_known": choice.n_facts,
           "skipped_unknown": choice.params["skipped"], "every": args.every, "samples": args.samples,
           "range": [choice.layers.start, choice.last], "first_layer_ci": list(choice.start_ci),
           "last_layer_ci": list(choice.stop_ci), "agreement": choice.agreement,
           "peak": choice.peak, "peak_ci": list(choice.peak_ci),
           "pooled_contribution": [round(float(x), 6) for x in choice.contribution],
           "per_fact": [{"subject": s, "range": [r.start, r.stop - 1],
                         "peak": int(choice.per_fact_contribution[i].argmax())}
                        for i, (s, r) in enumerate(zip(choice.subjects, choice.per_fact))],
           "relations": sorted({c.relation_id for c in cases}), "summary": str(choice),
           "seconds": seconds, "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                                           "loadavg_after": os.getloadavg()}}
    (RESULTS / "edit_layer_choice.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "edit_layer_choice_figure.json").write_text(layer_choice_chart(choice).to_json())
    print(f"{seconds:.0f} s")


if __name__ == "__main__":
    main()
