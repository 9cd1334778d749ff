"""The tour: locate, inspect, edit keys and values, evaluate — one fact, one HTML report.

:func:`tour` runs the four verbs on one CounterFact-style fact from the bundled set (by default
"The Eiffel Tower is located in the city of Paris", edited to London) and returns a
:class:`~kvlens.views.report.Report`: the model card and a prediction; a causal trace of the fact
(locate); the memories that fire on the prompt, the values that write the true object, and
their vocabulary projections (inspect); the same fact edited on the value side (ROME) and on
the key side (fine-tuning of K), each evaluated before/after on the prompt, its paraphrases and
its neighbours, and compared (edit + evaluate). ``kvlens tour`` writes it to a file.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from kvlens.causal.trace import trace
from kvlens.datasets import EvalCase, load_bundled
from kvlens.editing import ROME, KeyFT
from kvlens.editing.base import EditMethod
from kvlens.editing.request import EditRequest
from kvlens.evaluate import evaluate
from kvlens.memory.activations import keys
from kvlens.memory.intervene import predict
from kvlens.memory.vocab import find_memories, values
from kvlens.models.kvmodel import KVModel
from kvlens.views import eval_figures
from kvlens.views.report import Report, Section

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEFAULT_CASE = 167  # The Eiffel Tower: Paris -> London, 3 paraphrases, 6 neighbours


def tour_methods() -> dict[str, Callable[[], EditMethod]]:
    """The two edits of the tour: value side (ROME, rank one on V) and key side (fine-tuning K).

    ROME runs without the C⁻¹ key statistics here (``mom2_adjustment=False``, as EasyEdit's
    defaults for Llama): collecting E[kkᵀ] over 100k tokens takes minutes on a CPU. Pass your
    own methods to :func:`tour` for the full algorithm.
    """
    return {"ROME (values)": lambda: ROME(mom2_adjustment=False), "fine-tune keys": KeyFT}


def find_case(case_id: int) -> EvalCase:
    """The bundled case ``case_id``; a clear error naming some ids when it is not there."""
    cases = load_bundled()
    for case in cases:
        if case.case_id == case_id:
            return case
    raise KeyError(f"no bundled case {case_id}; ids run from {cases[0].case_id} to {cases[-1].case_id}")


def prediction_section(model: KVModel, prompt: str, k: int = 10) -> Section:
    """The model's top-``k`` next tokens after ``prompt``."""
    pred = predict(model, prompt, k)
    rows = [{"rank": r + 1, "token": t, "id": i, "probability": p}
            for r, (i, t, p) in enumerate(zip(pred.ids, pred.tokens, pred.probs))]
    return Section("Prediction", text=f"Prompt: {prompt!r}", table=rows,
                   params={"prompt": prompt, "prefix": model.prefix, "k": k})


def tour(model: KVModel, prompt: str = DEFAULT_PROMPT, layer: int | None = None, *, case: int | EvalCase = DEFAULT_CASE,
         trace_mode: str = "approx", edit: bool = True,
         methods: dict[str, Callable[[], EditMethod]] | None = None,
         log: Callable[[str], None] = lambda _: None) -> Report:
    """The tour's report (see the module docstring).

    Args:
        model: the model (edits are computed and evaluated, never left applied).
        prompt: the prompt of the prediction and key-activation sections.
        layer: the layer of the key activations (default: the middle one).
        case: a bundled case id or an :class:`~kvlens.datasets.EvalCase` to trace and edit.
        trace_mode: ``"approx"`` (attribution patching: seconds, an estimate, labelled so) or
            ``"exact"`` (ROME's procedure: minutes on a CPU).
        edit: run the edit and evaluation part.
        methods: label -> method factory (default: :func:`tour_methods`).
        log: called with a line before each stage (the command prints them).
    """
    layer = model.n_layers // 2 if layer is None else model.check_layer(layer)
    fact = find_case(case) if isinstance(case, int) else case
    true = fact.target_true or fact.target_new
    report = Report(f"kvlens tour: {model.name}")
    report.add(Section("Model", table=[{"property": k, "value": v} for k, v in model.card().items()]))
    report.add(prediction_section(model, prompt))
    log(f"locate: tracing {fact.subject!r} -> {true!r} ({trace_mode})")
    report.add(trace(model, fact.prompt, fact.subject, true, kind="all", mode=trace_mode, progress=False))
    log(f"inspect: key activations at layer {layer}, values of the upper layers that write {true!r}")
    with torch.no_grad():
        report.add(keys(model, prompt, layers=[layer]))
        upper = list(range(model.n_layers * 2 // 3, model.n_layers))  # where values write output tokens
        found = find_memories(model, true, upper, k=8, by="zscore")
        top = found.found[0]
        report.add(found, values(model, top.layer, [f.memory for f in found.found if f.layer == top.layer], k=8))
    if edit:
        _edits(model, fact, methods or tour_methods(), report, log)
    return report


def _edits(model: KVModel, fact: EvalCase, methods: dict[str, Callable[[], EditMethod]], report: Report,
           log: Callable[[str], None]) -> None:
    request = EditRequest(fact.prompt, fact.subject, fact.target_new, fact.target_true)
    report.add(Section("Edit: keys or values", text=(
        f"The fact {fact.rewrite_prompt!r} → {(fact.target_true or '?').strip()!r} is rewritten to "
        f"{fact.target_new.strip()!r} by each method below, on a copy of the weights that is reverted "
        f"afterwards. Metrics are measured on the prompt, {len(fact.paraphrase_prompts)} paraphrases and "
        f"{len(fact.neighborhood_prompts)} neighbouring facts, before and after each edit.")))
    baseline = evaluate(model, [fact], method="unedited")
    reports = {}
    for label, make in methods.items():
        log(f"edit: {label}")
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an edit that does not take shows in its metrics
            delta = make().compute(model, [request])
        reports[label] = evaluate(model, [fact], delta, baseline=baseline, method=label)
        report.add(delta, reports[label], params={"tour_label": label,
                                                  "seconds_with_evaluation": time.perf_counter() - start})
    metrics = [m for m in eval_figures.DEFAULT_METRICS if all(m in r.aggregate["after"] for r in reports.values())]
    report.add(Section("Edit: keys vs values compared", figure=eval_figures.method_comparison(
        reports, metrics, baseline=baseline), params={"methods": list(reports), "case": fact.case_id}))
