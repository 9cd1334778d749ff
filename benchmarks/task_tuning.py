"""Task tuning on the embedded model: LoRA q,v vs + keys / + gate / + values on the bundled mix.

    .venv/bin/python benchmarks/task_tuning.py                      # Qiu's preset, the whole mix
    .venv/bin/python benchmarks/task_tuning.py --preset cpu-small --tasks parity sentiment \
        --train 8 --test 8 --epochs 1                               # a short run

Writes benchmarks/results/task_tuning.json: exactly what was run (preset and overrides, tasks and
their sizes, the batch plan), the per-variant table (accuracy with Wilson CIs, macro-F1 with
bootstrap CIs, per task and overall), train/eval wall time per variant, the total wall time and
the machine's load average at start and end (the machine may be shared: say so when quoting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

import kvlens
from kvlens.tuning import load_bundled_tasks, tune_keys_vs_values

OUT = Path(__file__).parent / "results" / "task_tuning.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qiu2024")
    ap.add_argument("--tasks", nargs="*", default=None, help="bundled task names (default: all)")
    ap.add_argument("--train", type=int, default=None, help="train examples per task (default: all)")
    ap.add_argument("--test", type=int, default=None, help="test examples per task (default: all)")
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    model = kvlens.load()
    tasks = [t.subset(args.train, args.test) for t in load_bundled_tasks(args.tasks)]
    overrides = {} if args.epochs is None else {"epochs": args.epochs}
    result = tune_keys_vs_values(model, tasks, variants=args.variants, hparams=args.preset, **overrides)
    wall = time.perf_counter() - t0
    record = {"model": model.name, "machine": platform.machine(), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "preset": args.preset, "overrides": overrides, "argv": vars(args) | {"out": str(args.out)},
              "wall_s": wall, **result.to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    print(result.summary())
    print(f"wall {wall:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
