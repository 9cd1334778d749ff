"""The ``kvlens`` command: run the tour headlessly and write an HTML report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from kvlens import tracing
from kvlens.memory.activations import keys
from kvlens.models.kvmodel import KVModel, Site
from kvlens.models.loading import load
from kvlens.views import figures
from kvlens.views.report import Report, Section

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"


def _prediction_section(model: KVModel, prompt: str, k: int = 10) -> Section:
    batch = model.tokenize(prompt)
    logits = tracing.run(model, batch, read=[Site("logits")])[Site("logits")]
    probs = tracing.at_last_token(batch, logits)[0].float().softmax(-1)
    top = probs.topk(k)
    rows = [{"rank": r + 1, "token": model.tokenizer.decode([int(i)]), "id": int(i), "probability": float(p)}
            for r, (p, i) in enumerate(zip(top.values, top.indices))]
    return Section("Prediction", text=f"Prompt: {prompt!r}", table=rows,
                   params={"prompt": prompt, "prefix": model.prefix, "k": k})


def tour(model: KVModel, prompt: str = DEFAULT_PROMPT, layer: int | None = None) -> Report:
    """The report of the tour: model card, a prediction, key activations at one layer."""
    layer = model.n_layers // 2 if layer is None else model.check_layer(layer)
    report = Report(f"kvlens tour: {model.name}")
    card = model.card()
    report.add(Section("Model", table=[{"property": k, "value": v} for k, v in card.items()]))
    report.add(_prediction_section(model, prompt))
    acts = keys(model, prompt, layers=[layer])
    top = acts.top(layer, k=10)
    report.add(Section(
        f"Key activations at layer {layer}",
        text=(f"Memory coefficients (input of the value projection {model.spec.value!r}) at layer {layer}. "
              f"At the last token {top.token!r} the strongest memories are "
              + ", ".join(f"m{m} ({c:+.2f})" for m, c in zip(top.memories, top.coefficients)) + "."),
        figure=figures.key_activation_heatmap(acts, layer),
        params={"prompt": prompt, "layer": layer, "k": 20},
    ))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_tour = sub.add_parser("tour", help="run the tour on a model and write an HTML report")
    p_tour.add_argument("--model", default=None, help="HF id or local directory (default: embedded SmolLM2)")
    p_tour.add_argument("--prompt", default=DEFAULT_PROMPT)
    p_tour.add_argument("--layer", type=int, default=None)
    p_tour.add_argument("--out", default="out/kvlens-tour.html", help="where to write the report")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            model = load(args.model)
            report = tour(model, args.prompt, args.layer)
        path = report.save(Path(args.out))
    except (OSError, ValueError, IndexError, KeyError) as exc:
        print(f"kvlens: error: {exc}", file=sys.stderr)
        return 2
    print(f"kvlens: wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
