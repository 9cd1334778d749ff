"""Keys vs values (Qiu et al.) and scaling (MEMIT Fig. 5) on the embedded model with the bundled facts.

    .venv/bin/python benchmarks/editing_experiments.py [--n 10] [--ns 1,2,4,8,16] \
        [--scaling-methods "MEMIT,FT values"] [--mode batch] [--skip-scaling]

Requests: every 23rd bundled fact (different relations), the first --n for keys vs values and
up to max(--ns) for scaling. ROME and MEMIT use 5k-token E[kkᵀ] statistics (low-sample mode) so
this runs in minutes on CPU. Writes benchmarks/results/editing_experiments.{json,md} and the
figures as Plotly JSON next to them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import kvlens
from kvlens.datasets import load_bundled
from kvlens.experiments import keys_vs_values, scaling
from kvlens.views.eval_figures import comparison_figure, scaling_figure

RESULTS = Path(__file__).parent / "results"


def _cell(e) -> str:
    return "" if e is None else str(e)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--ns", default="1,2,4,8,16")
    p.add_argument("--scaling-methods", default="MEMIT,FT values")
    p.add_argument("--mode", default="batch", choices=["batch", "sequential"])
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args()
    command = "benchmarks/editing_experiments.py " + " ".join(sys.argv[1:])
    model = kvlens.load()
    ns = [int(x) for x in args.ns.split(",")]
    cases = load_bundled()[::23][: max(args.n, max(ns))]
    out = {"command": command, "model": model.name, "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    md = [f"# Editing experiments on {model.name} (bundled facts)", "", f"Command: `{command}`", ""]

    comp = keys_vs_values(model, cases[: args.n], mode=args.mode, generation=True, max_new_tokens=30,
                          progress=True)
    print(comp.summary())
    out["keys_vs_values"] = {"requests": [c.case_id for c in comp.baseline.cases], "mode": comp.mode,
                             "rows": [{k: (vars(v) if hasattr(v, "mean") else v) for k, v in row.items()}
                                      for row in comp.table()]}
    (RESULTS / "keys_vs_values_figure.json").write_text(comparison_figure(comp).to_json())
    cols = ["Score", "Efficacy", "Generalization", "Specificity", "Fluency"]
    md += [f"## Keys vs values: {args.n} requests, {comp.mode} edits", "",
           "| method | side | " + " | ".join(cols) + " | compute s |", "|---" * (len(cols) + 3) + "|"]
    md += [f"| {r['method']} | {r['side']} | " + " | ".join(_cell(r[c]) for c in cols) + f" | {r['seconds']:.1f} |"
           for r in comp.table()]
    md += ["", "Score/Efficacy/Generalization/Specificity = S/ES/PS/NS (CounterFact convention), Fluency = GE "
           "(30 generated tokens, first generation prompt per request); x100, 95% CIs.", ""]

    if not args.skip_scaling:
        methods = [m.strip() for m in args.scaling_methods.split(",")]
        sc = scaling(model, cases[: max(ns)], methods, ns, mode=args.mode, progress=True)
        print(sc.summary())
        out["scaling"] = {"mode": sc.mode, "ns": ns, "rows": [{k: (vars(v) if hasattr(v, "mean") else v)
                                                              for k, v in row.items()} for row in sc.table()],
                          "baseline": {k: vars(v) for k, v in sc.baseline.aggregate["current"].items()}}
        for metric in ("ES", "NS"):
            (RESULTS / f"scaling_{metric}_figure.json").write_text(scaling_figure(sc, metric).to_json())
        mets = ["ES", "PS", "NS", "S"]
        md += [f"## Scaling: {sc.mode} edits of the first n requests", "",
               "| method | n | " + " | ".join(mets) + " | compute s |", "|---" * (len(mets) + 3) + "|"]
        base = sc.baseline.aggregate["current"]
        md += [f"| unedited | {max(ns)} | " + " | ".join(_cell(base.get(m)) for m in mets) + " | |"]
        md += [f"| {r['method']} | {r['n']} | " + " | ".join(_cell(r[m]) for m in mets) + f" | {r['seconds']:.1f} |"
               for r in sc.table()]
        md += ["", "Metrics on the n edited requests (CounterFact convention), x100, 95% CIs.", ""]
    (RESULTS / "editing_experiments.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "editing_experiments.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'editing_experiments.md'}")


if __name__ == "__main__":
    main()
