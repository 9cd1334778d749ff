"""The experiments the seeds report, one call each: keys vs values (Qiu et al. 2024) and scaling (MEMIT Fig. 5).

    comp = kv.keys_vs_values(model, kv.datasets.load_bundled()[:10])
    print(comp.summary());  kvlens.views.eval_figures.comparison_figure(comp)
    sc = kv.scaling(model, cases, methods=("MEMIT", "FT values"), ns=(1, 4, 16))
    kvlens.views.eval_figures.scaling_figure(sc, "ES")

Every method edits the *same* requests; the unedited model is scored once and shared as the
baseline. Methods are built by factories so each experiment starts from fresh hyperparameters.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from kvlens.datasets import EvalCase, as_cases
from kvlens.editing import MEMIT, ROME, EditRequest, KeyFT, LoRAKeys, LoRAValues, ValueFT
from kvlens.editing.base import EditMethod, sequentially
from kvlens.editing.delta import WeightDelta
from kvlens.errors import EditedNeighbours
from kvlens.evaluate import AGGREGATES, SCORES, EditReport, evaluate, warn_edited_neighbours
from kvlens.independent import evaluate_each, requests_of
from kvlens.metrics import Estimate, harmonic_mean
from kvlens.models.kvmodel import KVModel

#: name -> (factory, side). ROME/MEMIT read 5k-token E[kkᵀ] statistics (low-sample mode) by default
#: so the experiments run in minutes on CPU; pass your own factories for 100k-token statistics.
KEY_VALUE_METHODS: dict[str, tuple[Callable[[], EditMethod], str]] = {
    "FT keys": (KeyFT, "key"),
    "FT values": (ValueFT, "value"),
    "LoRA keys": (LoRAKeys, "key"),
    "LoRA values": (LoRAValues, "value"),
    "ROME": (lambda: ROME(stats_tokens=5000), "value"),
    "MEMIT": (lambda: MEMIT(stats_tokens=5000), "value"),
}
#: Qiu et al.'s table columns -> kvlens metric names (CounterFact convention; fluency = GE).
COLUMNS = {"Score": "S", "Efficacy": "ES", "Generalization": "PS", "Specificity": "NS", "Fluency": "GE"}


def _methods(methods: Sequence[str] | Mapping[str, Any] | None) -> dict[str, tuple[Callable[[], EditMethod], str]]:
    if methods is None:
        return dict(KEY_VALUE_METHODS)
    if isinstance(methods, Mapping):
        return {k: (v if isinstance(v, tuple) else (v, "")) for k, v in methods.items()}
    unknown = [m for m in methods if m not in KEY_VALUE_METHODS]
    if unknown:
        raise KeyError(f"unknown methods {unknown}; choose from {list(KEY_VALUE_METHODS)} or pass "
                       f"{{name: factory}}")
    return {m: KEY_VALUE_METHODS[m] for m in methods}


def compute_delta(model: KVModel, method: EditMethod, requests: Sequence[EditRequest],
                  mode: Literal["batch", "sequential"] = "batch") -> WeightDelta:
    """One delta for all ``requests``: computed together (batch) or one after another (sequential)."""
    if mode == "batch":
        return method.compute(model, requests, report=False)
    if mode == "sequential":
        return sequentially(model, [[r] for r in requests], lambda chunk: method.compute(model, chunk, report=False))
    raise ValueError(f"mode must be 'batch' or 'sequential', got {mode!r}")


@dataclass(frozen=True)
class Comparison:
    """Reports of several methods editing the same requests, and the shared unedited baseline."""

    baseline: EditReport
    reports: dict[str, EditReport]
    sides: dict[str, str]
    compute_seconds: dict[str, float]
    mode: str

    def table(self) -> list[dict[str, Any]]:
        """One row per method (plus ``unedited``): Qiu et al.'s columns as Estimates (x100, 95% CI)."""
        rows = [{"method": "unedited", "side": "", **self._cells(self.baseline, "current"), "seconds": 0.0}]
        for name, r in self.reports.items():
            rows.append({"method": name, "side": self.sides.get(name, ""), **self._cells(r, "after"),
                         "seconds": self.compute_seconds[name]})
        return rows

    @staticmethod
    def _cells(report: EditReport, state: str) -> dict[str, Estimate | None]:
        agg = report.aggregate.get(state) or report.aggregate[report.states[-1]]
        return {col: agg.get(metric) for col, metric in COLUMNS.items()}

    def summary(self) -> str:
        head = f"{'method':12s} {'side':6s} " + " ".join(f"{c:>20s}" for c in COLUMNS) + "  compute s"
        lines = [head]
        for row in self.table():
            cells = " ".join(f"{'' if row[c] is None else str(row[c]):>20s}" for c in COLUMNS)
            lines.append(f"{row['method']:12s} {row['side']:6s} {cells}  {row['seconds']:9.1f}")
        lines.append(f"{len(self.baseline.cases)} requests, {self.mode} edits; CounterFact convention "
                     f"(S, ES, PS, NS) and GE (fluency), x100 with 95% CIs")
        return "\n".join(lines)


def compare_methods(model: KVModel, requests: Any, methods: Sequence[str] | Mapping[str, Any] | None = None, *,
                    mode: Literal["batch", "sequential", "independent"] = "batch", generation: bool = True,
                    max_new_tokens: int = 50, seed: int = 0, progress: bool = False,
                    **independent: Any) -> Comparison:
    """Edit the same requests with each method and score each edit (keys vs values, Qiu et al.).

    Args:
        model: the model (left unchanged).
        requests: cases/records (with paraphrase and neighbourhood prompts for PS/NS).
        methods: names from :data:`KEY_VALUE_METHODS` or ``{name: factory}``/``{name: (factory, side)}``.
        mode: one delta for all requests (``batch``), requests applied one after another
            (``sequential``), or each request edited alone from the unedited model and undone
            (``independent``, the CounterFact protocol: :func:`kvlens.independent.evaluate_each`,
            which gets ``**independent``, e.g. ``batched=False``).
        generation: GE on the first generation prompt of each case (``max_new_tokens`` tokens);
            not available in ``independent`` mode (pass ``generation=False``).
    """
    if mode not in ("batch", "sequential", "independent"):
        raise ValueError(f"mode must be 'batch', 'sequential' or 'independent', got {mode!r}")
    if mode == "independent" and generation:
        raise ValueError("generation (GE) is not measured under the independent protocol: pass generation=False")
    if independent and mode != "independent":
        raise TypeError(f"{sorted(independent)} are options of mode='independent' only")
    cases = as_cases(requests)
    if mode != "independent":  # said once, before any edit (each scored delta would say it again)
        warn_edited_neighbours(cases, None, f"the same {mode} edit")
    if generation:
        cases = [replace(c, generation_prompts=c.generation_prompts[:1]) for c in cases]
    chosen = _methods(methods)
    gen: dict[str, Any] = dict(generation=generation, max_new_tokens=max_new_tokens, seed=seed)
    baseline = evaluate(model, cases, **gen)
    reqs = requests_of(cases)
    reports: dict[str, EditReport] = {}
    seconds: dict[str, float] = {}
    for name, (factory, _side) in chosen.items():
        t0 = time.perf_counter()
        if mode == "independent":
            report = evaluate_each(model, factory(), cases, baseline=baseline, label=name, **independent)
            reports[name] = report
            seconds[name] = report.protocol["compute_seconds"]
        else:
            delta = compute_delta(model, factory(), reqs, mode)
            seconds[name] = time.perf_counter() - t0
            reports[name] = _after(model, cases, delta, baseline, name, gen)
        if progress:
            print(f"{name}: computed in {seconds[name]:.1f} s, evaluated in {reports[name].seconds:.1f} s")
    return Comparison(baseline, reports, {k: s for k, (_, s) in chosen.items()}, seconds, mode)


def paired_difference(a: EditReport, b: EditReport, metric: str, *, state: str = "after", n_boot: int = 2000,
                      seed: int = 0) -> Estimate:
    """Mean of ``metric`` in ``a`` minus in ``b`` on the same cases, with a paired bootstrap 95 % CI.

    Cases are resampled together for both reports (the difference of the two methods on the same
    requests). ``metric``: a per-case key of :func:`kvlens.evaluate.case_metrics` by its report
    name (``ES``, ``PS``, ``NS``, ``Efficacy`` ...; x100) or a score (``S``, ``Score``: the
    harmonic mean of its parts, recomputed in every resample).
    """
    if [c.case_id for c in a.cases] != [c.case_id for c in b.cases]:
        raise ValueError("paired differences need reports on the same cases (same case ids, in order)")
    keys, convention = _metric_keys(metric)
    rows_a, rows_b = a.per_case[state], b.per_case[state]
    missing = [k for k in keys if not all(k in r for r in (*rows_a, *rows_b))]
    if missing:
        raise KeyError(f"metric {metric!r} needs per-case {missing}, which some cases lack")
    x = np.array([[r[k] for r in rows_a] for k in keys], dtype=np.float64)
    y = np.array([[r[k] for r in rows_b] for k in keys], dtype=np.float64)

    def stat(i: np.ndarray) -> float:
        if len(keys) == 1:
            return float(100.0 * (x[0, i].mean() - y[0, i].mean()))
        return float(100.0 * (harmonic_mean(x[:, i].mean(1)) - harmonic_mean(y[:, i].mean(1))))

    n = int(x.shape[1])
    rng = np.random.default_rng(seed)
    boots = [stat(rng.integers(0, n, n)) for _ in range(n_boot)]
    low, high = np.percentile(boots, [2.5, 97.5])
    return Estimate(stat(np.arange(n)), float(low), float(high), n, convention, "paired bootstrap")


def _metric_keys(metric: str) -> tuple[tuple[str, ...], str]:
    if metric in SCORES:
        return SCORES[metric]
    for name, key, convention in AGGREGATES:
        if name == metric:
            return (key,), convention
    raise KeyError(f"unknown metric {metric!r}; choose from {[n for n, _, _ in AGGREGATES] + list(SCORES)}")


def keys_vs_values(model: KVModel, requests: Any, **kwargs: Any) -> Comparison:
    """:func:`compare_methods` with every key-side and value-side method (FT, LoRA, ROME, MEMIT)."""
    return compare_methods(model, requests, None, **kwargs)


def _after(model: KVModel, cases: Sequence[EvalCase], delta: WeightDelta, baseline: EditReport, name: str,
           gen: dict[str, Any]) -> EditReport:
    """The edited state only (the baseline supplies 'before'), labelled with the method name."""
    with _neighbours_said():
        return evaluate(model, cases, delta, baseline=baseline, method=name, **gen)


@contextlib.contextmanager
def _neighbours_said() -> Iterator[None]:
    """Silence :class:`EditedNeighbours` in a scoring the caller has already warned about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EditedNeighbours)
        yield


@dataclass(frozen=True)
class Scaling:
    """Reports after editing the first n requests, for each n and method (MEMIT Fig. 5)."""

    baseline: EditReport
    points: dict[str, list[tuple[int, EditReport]]]
    compute_seconds: dict[str, list[float]]
    mode: str

    def table(self, metrics: Sequence[str] = ("ES", "PS", "NS", "S")) -> list[dict[str, Any]]:
        rows = []
        for name, pts in self.points.items():
            for (n, r), s in zip(pts, self.compute_seconds[name]):
                rows.append({"method": name, "n": n, **{m: r.aggregate["after"].get(m) for m in metrics},
                             "seconds": s})
        return rows

    def summary(self, metrics: Sequence[str] = ("ES", "PS", "NS", "S")) -> str:
        lines = [f"{'method':12s} {'n':>5s} " + " ".join(f"{m:>20s}" for m in metrics) + "  compute s"]
        base = self.baseline.aggregate["current"]
        lines.append(f"{'unedited':12s} {len(self.baseline.cases):5d} " +
                     " ".join(f"{'' if base.get(m) is None else str(base[m]):>20s}" for m in metrics))
        for row in self.table(metrics):
            lines.append(f"{row['method']:12s} {row['n']:5d} " +
                         " ".join(f"{'' if row[m] is None else str(row[m]):>20s}" for m in metrics) +
                         f"  {row['seconds']:9.1f}")
        lines.append(f"{self.mode} edits; metrics on the n edited requests, x100 with 95% CIs (CounterFact)")
        return "\n".join(lines)


def scaling(model: KVModel, requests: Any, methods: Sequence[str] | Mapping[str, Any] = ("MEMIT", "FT values"),
            ns: Sequence[int] | None = None, *, mode: Literal["batch", "sequential"] = "batch",
            progress: bool = False) -> Scaling:
    """Edit the first n requests for each n in ``ns`` (default: 1, 2, 4, ... up to all) and score them."""
    cases = as_cases(requests)
    if ns is None:
        ns = [2 ** i for i in range(len(cases).bit_length()) if 2 ** i <= len(cases)]
    ns = sorted(set(ns))
    if not ns or ns[0] < 1 or ns[-1] > len(cases):
        raise ValueError(f"ns must lie in 1..{len(cases)} (the number of requests), got {list(ns)}")
    warn_edited_neighbours(cases[: ns[-1]], None, f"the same {mode} edit")
    chosen = _methods(methods)
    baseline = evaluate(model, cases)
    points: dict[str, list[tuple[int, EditReport]]] = {}
    seconds: dict[str, list[float]] = {}
    for name, (factory, _side) in chosen.items():
        points[name], seconds[name] = [], []
        for n in ns:
            t0 = time.perf_counter()
            delta = compute_delta(model, factory(), requests_of(cases[:n]), mode)
            seconds[name].append(time.perf_counter() - t0)
            with _neighbours_said():
                points[name].append((n, evaluate(model, cases[:n], delta, before=False, method=name)))
            if progress:
                print(f"{name} n={n}: {seconds[name][-1]:.1f} s")
    return Scaling(baseline, points, seconds, mode)
