"""The tour: locate, inspect, edit keys and values, evaluate — one HTML report.

:func:`tour` runs the four verbs on CounterFact-style facts from the bundled set (by default
"The Eiffel Tower is located in the city of Paris", edited to London) and returns a
:class:`~kvlens.views.report.Report`: the model card (with its edit state) and a prediction;
an exact causal trace of the fact (ROME's procedure, 3 noise samples: locate); the memories that
fire on the prompt, the values that write the true object, and their vocabulary projections
(inspect); then keys vs values like with like: the same ``n_cases`` facts (the Eiffel Tower
first) edited by fine-tuning the keys and by fine-tuning the values, with ROME (a rank-one edit
of the values) beside as the reference value-side method, each evaluated before/after on the
edited prompts, their paraphrases and their neighbours, with 95 % intervals over the facts, and
compared (edit, evaluate). Every metric name is explained where it appears; the prompts are listed.
``kvlens tour`` writes it to a file.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

from kvlens.causal.trace import trace
from kvlens.datasets import EvalCase, load_bundled, names_subject
from kvlens.editing import ROME, KeyFT, ValueFT
from kvlens.editing.base import EditMethod
from kvlens.editing.delta import applied_edits
from kvlens.evaluate import EditReport, evaluate
from kvlens.experiments import compute_delta, requests_of
from kvlens.memory.activations import keys
from kvlens.memory.intervene import predict
from kvlens.memory.vocab import find_memories, values
from kvlens.models.kvmodel import KVModel
from kvlens.views import eval_figures
from kvlens.views.report import Report, Section

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEFAULT_CASE = 167  # The Eiffel Tower: Paris -> London, 3 paraphrases, 6 neighbours
#: Facts edited and evaluated by default: enough for the 95 % intervals over facts to be informative
#: (with 1 fact an interval is a single point). The default tour took 11.6 min on a 2-core CPU
#: (2026-12-02); ``--cases 4 --trace approx`` is the short run.
DEFAULT_CASES = 10
#: Noise draws per cell of the tour's exact trace.
DEFAULT_SAMPLES = 3


def tour_methods() -> dict[str, tuple[Callable[[], EditMethod], str]]:
    """The tour's edits: label -> (factory, side). Keys vs values like with like (the same
    fine-tuning of K or of V), and ROME beside them as the reference value-side method.

    ROME runs without the C⁻¹ key statistics here (``mom2_adjustment=False``, as EasyEdit's
    defaults for Llama): collecting E[kkᵀ] over 100k tokens takes minutes on a CPU. Pass your
    own methods to :func:`tour` for the full algorithm, or MEMIT.
    """
    return {"fine-tune keys": (KeyFT, "key"), "fine-tune values": (ValueFT, "value"),
            "ROME (values, a rank-one update per fact, without C⁻¹; reference)":
                (lambda: ROME(mom2_adjustment=False), "value")}


def find_case(case_id: int) -> EvalCase:
    """The bundled case ``case_id``; a clear error naming some ids when it is not there."""
    cases = load_bundled()
    for case in cases:
        if case.case_id == case_id:
            return case
    raise KeyError(f"no bundled case {case_id}; ids run from {cases[0].case_id} to {cases[-1].case_id}")


def _mentions(case: EvalCase, subject: str) -> bool:
    """Whether any prompt ``case`` is scored on names ``subject`` (as a whole name, as NS filtering tests)."""
    prompts = (case.rewrite_prompt, *case.paraphrase_prompts, *case.neighborhood_prompts)
    return any(names_subject(p, subject) for p in prompts)


def independent_cases(first: EvalCase, pool: list[EvalCase], n: int) -> list[EvalCase]:
    """``first`` and the next cases of ``pool`` that can be edited together without one edit's
    request being another's neighbour: a case is skipped when a chosen case's prompts name its
    subject or its prompts name a chosen subject (in the bundled set, same-relation facts are each
    other's neighbours: edited together, a neighbour "that should stay" would be asked to change).
    One fact per relation is taken first, so that the facts are not all of one kind."""
    chosen = [first]
    for new_relation in (True, False):  # first one fact per relation (template), then any
        for case in pool:
            if len(chosen) == n:
                return chosen
            if case in chosen or (new_relation and any(c.prompt == case.prompt for c in chosen)):
                continue
            if not any(_mentions(c, case.subject) or _mentions(case, c.subject) for c in chosen):
                chosen.append(case)
    return chosen


def prediction_section(model: KVModel, prompt: str, k: int = 10) -> Section:
    """The model's top-``k`` next tokens after ``prompt``."""
    pred = predict(model, prompt, k)
    rows = [{"rank": r + 1, "token": t, "id": i, "probability": p}
            for r, (i, t, p) in enumerate(zip(pred.ids, pred.tokens, pred.probs))]
    return Section("Prediction", text=f"Prompt: {prompt!r}", table=rows,
                   params={"prompt": prompt, "prefix": model.prefix, "k": k})


def edit_state_row(model: KVModel) -> dict[str, str]:
    """The model card's line saying whether the model is edited (the model's own record)."""
    edits = applied_edits(model)
    text = "none (the original weights)" if not edits else f"{len(edits)}: " + ", ".join(
        f"{h.delta.method} at layer(s) {h.delta.layers}" for h in edits)
    return {"property": "edits applied", "value": text}


def tour(model: KVModel, prompt: str = DEFAULT_PROMPT, layer: int | None = None, *, case: int | EvalCase = DEFAULT_CASE,
         trace_mode: str = "exact", samples: int = DEFAULT_SAMPLES, n_cases: int = DEFAULT_CASES, edit: bool = True,
         methods: dict[str, tuple[Callable[[], EditMethod], str]] | None = None,
         log: Callable[[str], None] = lambda _: None) -> Report:
    """The tour's report (see the module docstring).

    Args:
        model: the model (edits are computed and evaluated, never left applied).
        prompt: the prompt of the prediction and key-activation sections.
        layer: the layer of the key activations (default: the middle one).
        case: a bundled case id or an :class:`~kvlens.datasets.EvalCase` to trace and edit first.
        trace_mode: ``"exact"`` (ROME's procedure) or ``"approx"`` (attribution patching: seconds,
            an estimate, labelled so).
        samples: noise draws per trace cell.
        n_cases: facts edited and evaluated (the case first, then the next bundled ones).
        edit: run the edit and evaluation part.
        methods: label -> (method factory, side) (default: :func:`tour_methods`).
        log: called with a line before each stage (the command prints them).
    """
    layer = model.n_layers // 2 if layer is None else model.check_layer(layer)
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or n_cases < 1:
        raise ValueError(f"n_cases must be an integer >= 1, got {n_cases!r}")
    fact = find_case(case) if isinstance(case, int) else case
    true = fact.target_true or fact.target_new
    report = Report(f"kvlens tour: {model.name}")
    card = [{"property": k, "value": v} for k, v in model.card().items()]
    report.add(Section("Model", table=[*card, edit_state_row(model)]))
    report.add(prediction_section(model, prompt))
    log(f"locate: tracing {fact.subject!r} -> {true!r} ({trace_mode}, {samples} samples)")
    report.add(trace(model, fact.prompt, fact.subject, true, kind="all", mode=trace_mode, samples=samples,
                     progress=False))
    log(f"inspect: key activations at layer {layer}, values of the upper layers that write {true!r}")
    report.add(keys(model, prompt, layers=[layer]))
    upper = list(range(model.n_layers * 2 // 3, model.n_layers))  # where values write output tokens
    found = find_memories(model, true, upper, k=8, by="zscore")
    top = found.found[0]
    report.add(found, values(model, top.layer, [f.memory for f in found.found if f.layer == top.layer], k=8))
    if edit:
        cases = independent_cases(fact, load_bundled(), n_cases)
        _edits(model, cases, methods or tour_methods(), report, log)
    return report


def prompts_section(cases: list[EvalCase]) -> Section:
    """Every prompt the evaluation scores: the edited one, its paraphrases, its neighbours."""
    rows = []
    for c in cases:
        rows.append({"case": c.case_id, "kind": "edited", "prompt": c.rewrite_prompt,
                     "new / true object": f"{c.target_new.strip()} / {(c.target_true or '?').strip()}"})
        rows += [{"case": c.case_id, "kind": "paraphrase", "prompt": p, "new / true object": ""}
                 for p in c.paraphrase_prompts]
        rows += [{"case": c.case_id, "kind": "neighbour", "prompt": p,
                  "new / true object": f"(should stay {(c.target_true or '?').strip()})"}
                 for p in c.neighborhood_prompts]
    return Section("Evaluate: the prompts scored", table=rows, text=(
        "Paraphrases say the edited fact in other words (ES/PS test that the edit took and generalises); "
        "neighbours are other subjects with the same relation and true object (NS tests that they are left "
        "alone)."), params={"cases": [c.case_id for c in cases]})


def _edits(model: KVModel, cases: list[EvalCase], methods: dict[str, tuple[Callable[[], EditMethod], str]],
           report: Report, log: Callable[[str], None]) -> None:
    facts = "; ".join(f"{c.rewrite_prompt!r} → {c.target_new.strip()!r}" for c in cases[:3])
    gated = model.spec.gate is not None
    key_matrix = (f"the FFN's key projection {model.spec.key}; its gate {model.spec.gate} is left as it is"
                  if gated else f"the FFN's first matrix, {model.spec.key}")
    value_matrix = f"its output matrix, {model.spec.value}"
    report.add(Section("Edit: keys vs values", text=(
        f"The same {len(cases)} facts ({facts}{' …' if len(cases) > 3 else ''}) are edited together by each "
        f"method below: fine-tuning the keys ({key_matrix}) and fine-tuning the values ({value_matrix}) with "
        "the same loss, steps and constraints, so that only the side differs (Qiu et al. 2024); ROME, a "
        "rank-one edit of the values per fact (applied one after another), is shown beside them as the "
        "reference value-side method, here without its key statistics C (mom2_adjustment=False, as "
        "EasyEdit's Llama defaults: collecting E[kkᵀ] takes minutes on a CPU). No fact is another's "
        "neighbour (facts whose prompts name each other's subjects are skipped). Each edit is computed on "
        "the weights, measured, and reverted. " + eval_figures.explain(
            ["ES", "PS", "NS", "S"]))))
    report.add(prompts_section(cases))
    baseline = evaluate(model, cases, method="unedited")
    report.add(baseline)
    reports: dict[str, EditReport] = {}
    for label, (make, side) in methods.items():
        log(f"edit: {label} on {len(cases)} facts")
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an edit that does not take shows in its metrics
            delta = compute_delta(model, make(), requests_of(cases))
        reports[label] = evaluate(model, cases, delta, baseline=baseline, method=label)
        report.add(delta, reports[label], params={"tour_label": label, "side": side,
                                                  "seconds_with_evaluation": time.perf_counter() - start})
    metrics = [m for m in eval_figures.DEFAULT_METRICS if all(m in r.aggregate["after"] for r in reports.values())]
    names = {f"{label} [{methods[label][1]}s]": r for label, r in reports.items()}
    report.add(Section("Evaluate: keys vs values compared", text=(
        f"After each edit, on {len(cases)} facts (bars: mean x100, whiskers: 95 % CI over the facts). Compare "
        "fine-tune keys with fine-tune values (the same method on either side); ROME is the value-side "
        "reference. " + eval_figures.explain(metrics)), figure=eval_figures.method_comparison(
        names, metrics, baseline=baseline), params={"methods": list(reports), "cases": [c.case_id for c in cases]}))
