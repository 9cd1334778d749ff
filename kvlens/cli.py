"""The kvlens command: run the tour headlessly and write an HTML report.

examples:
  kvlens tour                              the embedded model, offline: out/kvlens-tour.html
  kvlens tour --trace approx --cases 4     faster: an estimated trace, 4 facts edited
  kvlens tour --model gpt2 --out r.html    a Hugging Face model
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvlens.models.loading import load
from kvlens.views.tour import (
    DEFAULT_CASE,
    DEFAULT_CASES,
    DEFAULT_PROMPT,
    DEFAULT_SAMPLES,
    prediction_section,
    tour,
)

__all__ = ["DEFAULT_PROMPT", "main", "prediction_section", "tour"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; the description's examples kept as written."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlens", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p_tour = sub.add_parser("tour", help="run the tour on a model and write an HTML report", formatter_class=_Formatter,
                            description="Locate, inspect, edit (keys vs values) and evaluate one model; write one "
                                        "self-contained HTML report.")
    p_tour.add_argument("--model", default=None,
                        help="Hugging Face id or local directory; none: the embedded SmolLM2-135M-Instruct, offline")
    p_tour.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the prediction and key activations")
    p_tour.add_argument("--layer", type=int, default=None, help="layer of the key activations; none: the middle one")
    p_tour.add_argument("--case", type=int, default=DEFAULT_CASE,
                        help="bundled fact traced and edited first (a case_id of data/counterfact_mini.json)")
    p_tour.add_argument("--cases", type=_positive, default=DEFAULT_CASES,
                        help="facts edited and evaluated by each method (more: tighter intervals, longer run)")
    p_tour.add_argument("--trace", choices=["exact", "approx"], default="exact",
                        help="causal-trace mode: exact (ROME's procedure) or approx (an estimate, seconds)")
    p_tour.add_argument("--samples", type=_positive, default=DEFAULT_SAMPLES, help="noise draws per trace cell")
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
        report = tour(model, args.prompt, args.layer, case=args.case, trace_mode=args.trace, samples=args.samples,
                      n_cases=args.cases, edit=not args.no_edit, log=log)
        path = report.save(Path(args.out))
    except (OSError, ValueError, IndexError, KeyError) as exc:
        print(f"kvlens: error: {exc}", file=sys.stderr)
        return 2
    print(f"kvlens: wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
