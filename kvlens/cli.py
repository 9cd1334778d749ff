"""The ``kvlens`` command: run the tour headlessly and write an HTML report.

    kvlens tour                          # the embedded model, offline: out/kvlens-tour.html
    kvlens tour --model gpt2 --out r.html --trace exact
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvlens.models.loading import load
from kvlens.views.tour import DEFAULT_CASE, DEFAULT_PROMPT, prediction_section, tour

__all__ = ["DEFAULT_PROMPT", "main", "prediction_section", "tour"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_tour = sub.add_parser("tour", help="run the tour on a model and write an HTML report")
    p_tour.add_argument("--model", default=None, help="HF id or local directory (default: embedded SmolLM2)")
    p_tour.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the prediction and key activations")
    p_tour.add_argument("--layer", type=int, default=None, help="layer of the key activations (default: middle)")
    p_tour.add_argument("--case", type=int, default=DEFAULT_CASE,
                        help="bundled fact to trace and edit (data/counterfact_mini.json case_id)")
    p_tour.add_argument("--trace", choices=["approx", "exact"], default="approx",
                        help="causal-trace mode: approx (seconds, an estimate) or exact (minutes on CPU)")
    p_tour.add_argument("--no-edit", action="store_true", help="skip the edits and their evaluation")
    p_tour.add_argument("--out", default="out/kvlens-tour.html", help="where to write the report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"kvlens: [{time.perf_counter() - start:6.1f} s] {line}", flush=True)

    try:
        model = load(args.model)
        report = tour(model, args.prompt, args.layer, case=args.case, trace_mode=args.trace,
                      edit=not args.no_edit, log=log)
        path = report.save(Path(args.out))
    except (OSError, ValueError, IndexError, KeyError) as exc:
        print(f"kvlens: error: {exc}", file=sys.stderr)
        return 2
    print(f"kvlens: wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
