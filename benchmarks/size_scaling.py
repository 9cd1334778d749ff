"""How kvlens's costs grow with model size (issue 14): MEMIT's z stage, an exact trace, a statistics cache hit.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/size_scaling.py [--sizes embedded,0.5b,1b]

Models: the embedded SmolLM2-135M, and randomly initialised Llama-shaped models of about 0.5B
(24 layers, width 1024, FFN 4096) and 1.1B parameters (16 layers, width 2048, FFN 8192, 8 KV
heads: Llama-3.2-1B's shape), float32 on CPU, all with the embedded tokenizer (random weights
cost the same as trained ones; what they predict is irrelevant here). For each:

* **MEMIT z stage**: ``target_vectors`` for 4 bundled facts optimised together (``z_batch=4``),
  exactly 5 steps each (early stop off), the edited layers at the same depth as the embedded
  preset (layers 4-8 of 30, scaled); reported per request-step, the unit that extrapolates to
  10,000 requests x 20-25 steps;
* **exact causal trace** of one fact, all three kinds, 3 samples (the notebook default), per cell;
* **statistics cache hit**: the weights' fingerprint computed once (first call: every tensor
  hashed) and again (cached digests), then a cache hit of ``second_moments`` (C read from disk).

Writes benchmarks/results/size_scaling.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import kvlens as kv
from kvlens.editing import MEMIT
from kvlens.editing._shared import build_rows, context_templates
from kvlens.editing.hparams import MEMIT_PRESETS
from kvlens.editing.memit import target_vectors
from kvlens.independent import requests_of
from kvlens.memory.stats import second_moments

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES: dict[str, dict[str, int]] = {
    "0.5b": dict(num_hidden_layers=24, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                 num_key_value_heads=16),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8),
}
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


def random_llama(size: str, tokenizer: Any) -> kv.KVModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[size])
    hf = LlamaForCausalLM(cfg).float().eval()
    return kv.wrap(hf, tokenizer, name=f"random Llama {size}", prefix=tokenizer.bos_token or "")


def z_stage(model: kv.KVModel, steps: int = 5) -> dict[str, Any]:
    base = MEMIT_PRESETS["smollm2-135m"]
    scale = model.n_layers / 30
    layers = tuple(sorted({min(model.n_layers - 1, round(l * scale)) for l in base.layers}))
    hp = replace(base, layers=layers, z_batch=4, opt=replace(base.opt, steps=steps, early_stop=0.0))
    requests = requests_of(kv.load_bundled()[:4])
    rows = build_rows(model, requests, context_templates(model, hp.contexts))
    MEMIT(hp).check(model, hp)
    start = time.perf_counter()
    target_vectors(model, rows, hp)
    seconds = time.perf_counter() - start
    return {"layers": list(layers), "requests": len(requests), "steps": steps, "seconds": round(seconds, 2),
            "per_request_step_s": round(seconds / (len(requests) * steps), 3), "rows": len(rows.batch)}


def exact_trace(model: kv.KVModel) -> dict[str, Any]:
    start = time.perf_counter()
    t = kv.trace(model, PROMPT, SUBJECT, kind="all", samples=3, mode="exact", progress=False)
    seconds = time.perf_counter() - start
    cells = sum(t.scores[k].numel() for k in t.kinds)
    return {"seconds": round(seconds, 2), "cells": cells, "per_cell_ms": round(1000 * seconds / cells, 2)}


def cache_hit(model: kv.KVModel) -> dict[str, Any]:
    model._tensor_digests.clear()
    start = time.perf_counter()
    model.keys_fingerprint(model.n_layers - 1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.keys_fingerprint(model.n_layers - 1)
    again = time.perf_counter() - start
    layer = model.n_layers // 4
    with tempfile.TemporaryDirectory() as root:
        second_moments(model, [layer], n_tokens=300, cache_root=Path(root), progress=False)
        hits = []
        for _ in range(3):
            start = time.perf_counter()
            second_moments(model, [layer], n_tokens=300, cache_root=Path(root), progress=False)
            hits.append(time.perf_counter() - start)
    return {"fingerprint_first_s": round(first, 3), "fingerprint_cached_s": round(again, 4),
            "cache_hit_s": [round(h, 4) for h in hits], "C_MiB": round(model.d_ff ** 2 * 4 / 2 ** 20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="embedded,0.5b,1b")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    embedded = kv.load()
    out: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                           "threads": torch.get_num_threads(), "load_before": os.getloadavg(), "models": {}}
    for size in args.sizes.split(","):
        model = embedded if size == "embedded" else random_llama(size, embedded.tokenizer)
        params = sum(p.numel() for p in model.hf.parameters())
        row: dict[str, Any] = {"name": model.name, "params_M": round(params / 1e6, 1), "layers": model.n_layers,
                               "d_model": model.d_model, "d_ff": model.d_ff}
        row["z_stage"] = z_stage(model)
        row["exact_trace"] = exact_trace(model)
        row["stats_cache"] = cache_hit(model)
        out["models"][size] = row
        print(json.dumps({size: row}), flush=True)
        if model is not embedded:
            del model
            gc.collect()
    out["load_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "size_scaling.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
