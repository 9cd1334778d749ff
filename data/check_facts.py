"""Check that a model knows the facts of a CounterFact-format file (default: the bundled set).

    .venv/bin/python data/check_facts.py [FILE.json] [--margin NATS] [--show-failures]

A fact passes when, on its rewrite prompt (the template filled with the subject, tokenized by the
model with its prefix), the true object beats the counterfactual and is either the model's top-1
(its first token is the argmax) or ahead by at least ``margin`` nats of length-normalised
teacher-forced log-probability (default ln 10: a 10x geometric-mean probability ratio). Exit
status 1 if any fact fails. Importable: tests call :func:`check_records` on the embedded model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLED = Path(__file__).parent / "counterfact_mini.json"
MARGIN = math.log(10.0)


@dataclass(frozen=True)
class FactCheck:
    """The check of one fact: length-normalised NLLs of both objects and the verdict."""

    case_id: Any
    relation_id: str
    prompt: str
    target_true: str
    target_new: str
    nll_true: float
    nll_new: float
    true_top1: bool
    passed: bool

    @property
    def margin(self) -> float:
        """nll_new - nll_true (nats): how far the true object is ahead."""
        return self.nll_new - self.nll_true


def check_records(model: Any, records: Sequence[dict], *, margin: float = MARGIN,
                  batch_size: int = 32) -> list[FactCheck]:
    """Score every record's true and new object on its rewrite prompt, in batches."""
    from kvlens.evaluate import score_targets

    prompts, targets = [], []
    for r in records:
        rw = r["requested_rewrite"]
        prompt = rw["prompt"].replace("{}", rw["subject"])
        prompts += [prompt, prompt]
        targets += [rw["target_true"]["str"], rw["target_new"]["str"]]
    scores = score_targets(model, prompts, targets, batch_size=batch_size)
    out = []
    for i, r in enumerate(records):
        true, new = scores[2 * i], scores[2 * i + 1]
        top1 = true.first_is_top1
        ok = true.nll < new.nll and (top1 or new.nll - true.nll >= margin)
        out.append(FactCheck(r.get("case_id"), r["requested_rewrite"]["relation_id"], true.prompt,
                             true.target, new.target, true.nll, new.nll, top1, ok))
    return out


def summarize(checks: Sequence[FactCheck]) -> str:
    """Pass rate overall and per relation, as text."""
    lines = [f"passed {sum(c.passed for c in checks)}/{len(checks)} "
             f"({100 * sum(c.passed for c in checks) / max(len(checks), 1):.1f}%)"]
    for rid in sorted({c.relation_id for c in checks}):
        group = [c for c in checks if c.relation_id == rid]
        lines.append(f"  {rid:6s} {sum(c.passed for c in group):4d}/{len(group):<4d}"
                     f" top-1 {sum(c.true_top1 for c in group):4d}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", default=str(BUNDLED))
    parser.add_argument("--margin", type=float, default=MARGIN)
    parser.add_argument("--show-failures", action="store_true")
    args = parser.parse_args(argv)
    import kvlens

    records = json.loads(Path(args.file).read_text(encoding="utf-8"))
    checks = check_records(kvlens.load(), records, margin=args.margin)
    print(summarize(checks))
    if args.show_failures:
        for c in checks:
            if not c.passed:
                print(f"FAIL {c.prompt!r}: true {c.target_true!r} nll {c.nll_true:.2f}, "
                      f"new {c.target_new!r} nll {c.nll_new:.2f}, top-1 {c.true_top1}")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
