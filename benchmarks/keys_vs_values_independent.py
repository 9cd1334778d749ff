"""Keys vs values (Qiu et al. 2024) under the independent-edit protocol, with paired differences.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/keys_vs_values_independent.py --n 200 [--methods ...]

Each of the first ``--n`` bundled facts (data/counterfact_mini.json) is edited alone from the
unedited model, scored and undone (``kv.evaluate_each``), by: ROME,
MEMIT and AlphaEdit (5k-token E[kkᵀ] statistics), FT keys / values / gates at the causal-trace layer
(``--layer``, 8 on the embedded model: the ROME preset's layer and the peak of the severed-path MLP
contribution pooled over 29 facts, benchmarks/edit_layer_choice.py) and at an early layer
(``--early``, default 2), and LoRA
keys / values / gates at ``--layer``. For each key-side method and its value-side twin, the
key − value difference of every metric is estimated on the same requests with a paired bootstrap
95 % CI (:func:`kvlens.experiments.paired_difference`). Results are written after every method
(benchmarks/results/keys_vs_values_independent.{json,md}, and as Plotly JSON the figures of the
methods' metrics and of the key − value differences), so a run stopped early keeps what it
measured; the files say how many requests each method saw. Each method's per-request results
are kept in benchmarks/results/keys_vs_values_independent/<method>.json with the run's settings
and the method's hyperparameters, so the table grows over several runs: a later run skips the
methods already measured on the same facts, settings and hyperparameters (``--redo`` measures
them again) and the paired differences
use the saved per-request values.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import kvlens as kv
from kvlens.evaluate import EditReport
from kvlens.experiments import Comparison, paired_difference
from kvlens.independent import IndependentReport
from kvlens.views.eval_figures import comparison_figure, difference_figure

RESULTS = Path(__file__).resolve().parent / "results"
PER_METHOD = RESULTS / "keys_vs_values_independent"
METRICS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "Efficacy", "Paraphrase", "Specificity")
PAIRS = (("FT keys @L", "FT values @L"), ("FT gates @L", "FT values @L"), ("FT keys @early", "FT values @early"),
         ("LoRA keys @L", "LoRA values @L"), ("LoRA gates @L", "LoRA values @L"))


def methods(layer: int, early: int) -> dict[str, tuple]:
    """name -> (factory, side); FT/LoRA keep their embedded-model presets except the layer."""
    return {
        "ROME": (lambda: kv.ROME(stats_tokens=5000), "value"),
        "MEMIT": (lambda: kv.MEMIT(stats_tokens=5000), "value"),
        "AlphaEdit": (lambda: kv.AlphaEdit(preset="smollm2-135m", stats_tokens=5000), "value"),
        "FT keys @L": (lambda: kv.KeyFT(layers=(layer,)), "key"),
        "FT values @L": (lambda: kv.ValueFT(layers=(layer,)), "value"),
        "FT gates @L": (lambda: kv.GateFT(layers=(layer,)), "gate"),
        "FT keys @early": (lambda: kv.KeyFT(layers=(early,)), "key"),
        "FT values @early": (lambda: kv.ValueFT(layers=(early,)), "value"),
        "LoRA keys @L": (lambda: kv.LoRAKeys(layers=(layer,)), "key"),
        "LoRA values @L": (lambda: kv.LoRAValues(layers=(layer,)), "value"),
        "LoRA gates @L": (lambda: kv.LoRAGates(layers=(layer,)), "gate"),
    }


def settings(args, hparams: dict) -> dict:
    """What a saved method's results depend on: a saved row is reused only if these are equal."""
    return {"n": args.n, "layer": args.layer, "early": args.early, "hparams": json.loads(json.dumps(hparams))}


def saved_path(name: str) -> Path:
    return PER_METHOD / (name.replace(" ", "_").replace("@", "at_") + ".json")


def save(name: str, rep: IndependentReport, args, hparams: dict, seconds: float) -> None:
    PER_METHOD.mkdir(parents=True, exist_ok=True)
    saved_path(name).write_text(json.dumps({
        "settings": settings(args, hparams), "compute_seconds": seconds, "loadavg": os.getloadavg(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "report": rep.to_dict()}))


def load_saved(name: str, args, hparams: dict, cases) -> tuple[IndependentReport, float] | None:
    """The saved report of ``name`` on these cases, settings and hyperparameters, or None."""
    path = saved_path(name)
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    if d["settings"] != settings(args, hparams) or d["report"]["cases"] != [c.case_id for c in cases]:
        return None
    return IndependentReport.from_dict(d["report"], cases), float(d["compute_seconds"])


def write(comp: Comparison, args) -> None:
    seconds = comp.compute_seconds
    table = []
    for name, rep in comp.reports.items():
        agg = rep.aggregate["after"]
        table.append({"method": name, "side": comp.sides.get(name, ""), "n": len(rep.cases),
                      **{m: vars(agg[m]) for m in METRICS if m in agg}, "seconds": seconds[name],
                      "protocol": {k: v for k, v in rep.protocol.items() if k != "steps"}})
    estimates = {(key, value): {m: paired_difference(comp.reports[key], comp.reports[value], m)
                                for m in METRICS if m in comp.reports[key].aggregate["after"]}
                 for key, value in PAIRS if key in comp.reports and value in comp.reports}
    diffs = [{"key": k, "value": v, **{m: vars(e) for m, e in est.items()}} for (k, v), est in estimates.items()]
    base = comp.baseline.aggregate["current"]
    out = {"model": "SmolLM2-135M-Instruct (embedded)", "n": args.n, "layer": args.layer, "early": args.early,
           "protocol": "independent (each request edited alone from the unedited model, scored, undone)",
           "unedited": {m: vars(base[m]) for m in METRICS if m in base}, "methods": table,
           "key_minus_value": diffs, "seconds": seconds,
           "machine": {"cpus": os.cpu_count(), "loadavg_at_writing": os.getloadavg()}}
    (RESULTS / "keys_vs_values_independent.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Keys vs values, independent edits, {args.n} bundled facts (embedded model)", "",
             "| method | side | n | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS),
             "| unedited | | " + str(args.n) + " | " + " | ".join(str(base.get(m, "")) for m in METRICS) + " |"]
    for name, rep in comp.reports.items():
        agg = rep.aggregate["after"]
        lines.append(f"| {name} | {comp.sides.get(name, '')} | {len(rep.cases)} | "
                     + " | ".join(str(agg.get(m, "")) for m in METRICS) + " |")
    lines += ["", "## key − value, paired bootstrap 95 % CI (same requests)", "",
              "| pair | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for d in diffs:
        cells = [f"{d[m]['mean']:+.1f} [{d[m]['low']:+.1f}, {d[m]['high']:+.1f}]" if m in d else "" for m in METRICS]
        lines.append(f"| {d['key']} − {d['value']} | " + " | ".join(cells) + " |")
    lines += ["", (f"x100; CounterFact (S ES PS NS EM PM NM) and zsRE (Efficacy Paraphrase Specificity) "
                   f"conventions. L = {args.layer} (the causal-trace layer: benchmarks/edit_layer_choice.py), "
                   f"early = {args.early}. Time to edit and "
                   f"score all {args.n} facts, per method: "
                   + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                   + " (2-core CPU; each method's load average is in its file).")]
    (RESULTS / "keys_vs_values_independent.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "keys_vs_values_independent_figure.json").write_text(comparison_figure(comp).to_json())
    if estimates:
        shown = ("S", "ES", "PS", "NS")
        fig = difference_figure({f"{k} − {v}": {m: est[m] for m in shown if m in est}
                                 for (k, v), est in estimates.items()},
                                title=f"key − value on the same {args.n} requests, independent edits")
        (RESULTS / "keys_vs_values_independent_differences.json").write_text(fig.to_json())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--early", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None, help="names as in methods(); default all")
    ap.add_argument("--redo", action="store_true", help="measure again methods already saved")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    RESULTS.mkdir(exist_ok=True)
    model = kv.load()
    cases = kv.load_bundled()[: args.n]
    if len(cases) < args.n:
        raise SystemExit(f"only {len(cases)} bundled facts; pass --n <= {len(cases)}")
    chosen = methods(args.layer, args.early)
    names = args.methods or list(chosen)
    unknown = [n for n in names if n not in chosen]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(chosen)}")
    baseline: EditReport = kv.evaluate(model, cases)
    reports: dict[str, IndependentReport] = {}
    seconds: dict[str, float] = {}
    hparams = {name: factory().hparams_for(model).to_dict() for name, (factory, _) in chosen.items()}
    for name in chosen:  # methods saved by earlier runs join the table
        saved = None if (args.redo and name in names) else load_saved(name, args, hparams[name], cases)
        if saved is not None:
            reports[name], seconds[name] = saved
            print(f"{name}: saved ({seconds[name]:.0f} s)", flush=True)
    for name in names:  # the others are measured in the order asked for
        if name in reports:
            continue
        t0 = time.perf_counter()
        reports[name] = kv.evaluate_each(model, chosen[name][0](), cases, baseline=baseline, label=name)
        seconds[name] = time.perf_counter() - t0
        save(name, reports[name], args, hparams[name], seconds[name])
        print(f"{name}: {seconds[name]:.0f} s; S {reports[name].aggregate['after'].get('S')}", flush=True)
        write(in_table_order(baseline, reports, chosen, seconds), args)
    write(in_table_order(baseline, reports, chosen, seconds), args)


def in_table_order(baseline: EditReport, reports: dict, chosen: dict, seconds: dict[str, float]) -> Comparison:
    """The comparison of the methods measured so far, in methods()' order whatever order they ran in."""
    names = [n for n in chosen if n in reports]
    return Comparison(baseline, {n: reports[n] for n in names}, {n: chosen[n][1] for n in names},
                      {n: seconds[n] for n in names}, "independent")


if __name__ == "__main__":
    main()
