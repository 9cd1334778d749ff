"""Metrics of the unedited embedded model on the bundled fact set (the baseline of every edit).

    .venv/bin/python benchmarks/eval_unedited.py [--every 1] [--generation-cases 10]

Scores every ``--every``-th bundled fact (rewrite, paraphrase and neighbourhood prompts) and
generates from the first ``--generation-cases`` of them for GE (and RS against
data/reference_texts.json when present). Writes benchmarks/results/eval_unedited.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import kvlens
from kvlens.datasets import load_bundled, load_reference_texts
from kvlens.evaluate import evaluate

OUT = Path(__file__).parent / "results" / "eval_unedited.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--generation-cases", type=int, default=10)
    args = parser.parse_args()
    model = kvlens.load()
    cases = load_bundled()[:: args.every]
    report = evaluate(model, cases, batch_size=64)
    print(report.summary())
    result = {"command": f"benchmarks/eval_unedited.py --every {args.every} "
                         f"--generation-cases {args.generation_cases}",
              "model": model.name, "cases": len(cases), "seconds": report.seconds,
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "aggregate": {k: vars(v) for k, v in report.aggregate["current"].items()}}
    if args.generation_cases:
        gen_cases = cases[: args.generation_cases]
        gen = evaluate(model, gen_cases, tests=["rewrite"], generation=True, references=load_reference_texts())
        print(gen.summary())
        result["generation"] = {"cases": len(gen_cases), "seconds": gen.seconds,
                                "GE": vars(gen.metric("GE")), "RS": vars(gen.metric("RS")),
                                "example": gen.generations["current"][0][0]}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
