"""The independent-edit protocol (CounterFact as ROME, MEMIT and Qiu et al. ran it), batched.

Each case is edited *alone*, from the unedited model, evaluated with the standard metrics
(:mod:`kvlens.evaluate`), and undone bitwise; the per-case values are aggregated with 95 % CIs
(:func:`kvlens.evaluate.aggregate`). The batch (all requests in one edit) and sequential modes
stay in :mod:`kvlens.experiments`.

    rep = kv.evaluate_each(model, kv.ROME(), cases[:100])
    print(rep.summary())            # ES/PS/NS/S ... with 95 % CIs; rep.protocol says how it ran

Independent edits do not interact, so many are computed and scored in the same forwards
(``batched=True``, the default), each batch row carrying its own change:

* compute: ROME, MEMIT and AlphaEdit optimise every request's δ together with per-row Adam
  (:func:`kvlens.editing._shared.optimise_targets`) and solve each request's own update
  (``compute_each``); fine-tuning of any role (keys, gates, values) trains a per-row ΔW_r
  (:func:`kvlens.editing.per_row.finetune_each`) and LoRA of any role per-row factors A_r, B_r
  from peft's seeded init (:func:`kvlens.editing.lora.lora_each`), both by
  :func:`~kvlens.editing.per_row.fit_each`. LoRA with dropout > 0 is computed one by one, with a
  warning (its random masks cannot be drawn per request in a shared batch).
* evaluate: every delta runs per row through the seam (:mod:`kvlens.editing.per_row`): value
  parts add ``k ΔV`` at the FFN output, key and gate parts ``x ΔKᵀ`` at the projection's output
  (sites ``key_pre`` / ``gate_pre``, inside the FFN's nonlinearity).

The results equal the one-by-one protocol (``batched=False``) to float tolerance (tests). The
batch size is chosen from a memory budget (:func:`choose_batch_size`): a requested size over
the budget is chosen down, with a warning.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlens.datasets import EvalCase, as_cases
from kvlens.editing._shared import context_templates
from kvlens.editing.base import EditMethod
from kvlens.editing.delta import WeightDelta
from kvlens.editing.finetune import FineTune
from kvlens.editing.lora import LoRA, lora_each
from kvlens.editing.per_row import finetune_each, stack_changes
from kvlens.editing.request import EditRequest, check_requests
from kvlens.evaluate import EditReport, TargetScore, _tests_for, aggregate, case_metrics, score_state
from kvlens.models.kvmodel import KVModel

#: Default memory budget (bytes) of one batch of independent edits.
DEFAULT_BUDGET = 2 * 2**30
#: Default requests per batch (before the budget is applied).
DEFAULT_BATCH = 32
_FLOAT = 4  # bytes


def requests_of(cases: Sequence[EvalCase]) -> list[EditRequest]:
    """The edit request of each case."""
    return [EditRequest(c.prompt, c.subject, c.target_new, c.target_true) for c in cases]


@dataclass(frozen=True)
class IndependentReport(EditReport):
    """An :class:`~kvlens.evaluate.EditReport` of independent edits, with how they were run.

    ``protocol``: ``{"protocol": "independent", "compute": "batched" | "one-by-one",
    "evaluate": "batched" | "one-by-one", "batch_size", "fallback" (why a part ran one by one, or
    None), "compute_seconds", "evaluate_seconds", "steps" (optimisation steps per case, when the
    method records them)}``.
    """

    protocol: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        p = self.protocol
        line = (f"independent edits: compute {p.get('compute')}, evaluate {p.get('evaluate')}, "
                f"batch size {p.get('batch_size')}" + (f" ({p['fallback']})" if p.get("fallback") else ""))
        return super().summary() + "\n" + line

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "protocol": self.protocol}

    @classmethod
    def from_dict(cls, d: dict[str, Any], cases: Sequence[EvalCase], **extra: Any) -> IndependentReport:
        return super().from_dict(d, cases, protocol=d.get("protocol", {}), **extra)


def request_bytes(model: KVModel, hp: Any, width: int) -> int:
    """A rough upper estimate of one request's memory in a batch of independent edits.

    Target-vector methods (ROME/MEMIT/AlphaEdit): the backward pass keeps, per row (the request's
    contexts + the clean and KL prompts) and per token of ``width`` and per layer above the
    edited one, about 12 d_model + 4 d_ff floats. Per-row training (FT, LoRA) keeps that for every
    layer, and per edited layer its parameters (FT: d_ff x d_model, LoRA: r (d_ff + d_model)) four
    times: the leaf, its grad and Adam's two moments.
    """
    per = 0
    if hasattr(hp, "opt"):
        top = hp.layer if hasattr(hp, "layer") else max(hp.layers)
        rows = hp.contexts.n + 2
        per += rows * width * (model.n_layers - top) * (12 * model.d_model + 4 * model.d_ff) * _FLOAT
    if hasattr(hp, "role"):  # FT / LoRA: per-row parameters, their grads and Adam's two moments
        rows = hp.contexts.n + 2
        size = hp.rank * (model.d_ff + model.d_model) if hasattr(hp, "rank") else model.d_ff * model.d_model
        per += 4 * len(hp.layers) * size * _FLOAT
        per += rows * width * model.n_layers * (12 * model.d_model + 4 * model.d_ff) * _FLOAT
    return max(per, model.d_model * width * _FLOAT)


def choose_batch_size(model: KVModel, hp: Any, cases: Sequence[EvalCase], requested: int | None,
                      budget: int) -> int:
    """Requests per batch: ``requested`` (default 32) chosen down to fit ``budget`` bytes (warns)."""
    if requested is not None and requested < 1:
        raise ValueError(f"batch_size must be >= 1, got {requested}")
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {budget}")
    width = max(len(model.tokenize(c.rewrite_prompt).input_ids[0]) for c in cases) + 4
    if hasattr(hp, "contexts"):
        width += hp.contexts.tokens + 2
    per = request_bytes(model, hp, width)
    fits = max(1, budget // per)
    size = min(requested or DEFAULT_BATCH, len(cases))
    if size > fits:
        if requested is not None:
            warnings.warn(f"batch_size {requested} exceeds the memory budget ({budget / 2**20:.0f} MiB at "
                          f"~{per / 2**20:.1f} MiB per request): using {fits}", stacklevel=3)
        size = fits
    return int(size)


def evaluate_each(model: KVModel, method: EditMethod, cases: Any, *, tests: Sequence[str] | None = None,
                  baseline: EditReport | None = None, batched: bool = True, batch_size: int | None = None,
                  memory_budget: int | None = None, eval_batch_size: int = 32, label: str | None = None,
                  progress: bool = False, **compute_kwargs: Any) -> IndependentReport:
    """Edit each case alone from the unedited model, score it, undo it; aggregate with 95 % CIs.

    Args:
        model: the model (bit-identical afterwards; every revert is checked bitwise).
        method: an editing method (ROME, MEMIT, AlphaEdit, FineTune, LoRA, ...): each case gets its
            own fresh copy (so e.g. AlphaEdit's accumulated keys never leak between cases).
        cases: :class:`~kvlens.datasets.EvalCase` s or records (as :func:`kvlens.evaluate.evaluate`).
        tests: prompt groups to score (default: those every case has).
        baseline: a report on the same cases whose unedited state is reused.
        batched: compute and score many independent edits in the same forwards (see the module);
            ``False``: strictly one by one.
        batch_size: requests per batch (default 32), chosen down to ``memory_budget`` bytes
            (default: :meth:`KVModel.memory_budget`, half the free memory of the tightest GPU the
            model computes on, or 2 GiB on the CPU).
        eval_batch_size: rows per scoring forward.
        label: the report's method name (default: the method's registry name).
        progress: print a line per batch.
        **compute_kwargs: passed to the method's compute (e.g. ``stats=`` for ROME/MEMIT).

    Returns:
        An :class:`IndependentReport`: states ``before`` and ``after``, per-case values, and
        ``protocol`` (how it ran, timings, fallbacks).
    """
    if not isinstance(method, EditMethod):
        raise TypeError(f"method must be an EditMethod (e.g. kv.ROME()), got {type(method).__name__}")
    t0 = time.perf_counter()
    cases = as_cases(cases)
    if not cases:
        raise ValueError("no cases to edit: pass at least one")
    tests = _tests_for(cases, tests)
    reqs = [check_requests([r])[0] for r in requests_of(cases)]
    hp = method.hparams_for(model)
    method.check(model, hp)
    before = _before(model, cases, tests, baseline, eval_batch_size)
    budget = model.memory_budget(cpu_bytes=DEFAULT_BUDGET) if memory_budget is None else memory_budget
    size = choose_batch_size(model, hp, cases, batch_size, budget)  # checks them in both modes
    size = size if batched else 1
    each, why = _compute_each(method, hp)
    fallback = [] if batched and each is not None else ["compute" + (f": {why}" if batched else "")]
    if batched and fallback:
        warnings.warn(f"{type(method).__name__} ({getattr(hp, 'role', '')}) cannot be batched per row ({why}): "
                      "its edits are computed one by one", stacklevel=2)
    after: list[dict[str, list[TargetScore]]] = []
    infos: list[dict[str, Any]] = []
    seconds = {"compute": 0.0, "evaluate": 0.0}
    for lo in range(0, len(cases), size):
        chunk, chunk_reqs = cases[lo: lo + size], reqs[lo: lo + size]
        start = time.perf_counter()
        if fallback:
            deltas = [copy.deepcopy(method).compute(model, [r], report=False, **compute_kwargs) for r in chunk_reqs]
        else:
            if each is None:  # fallback is empty only when the method batches per row
                raise RuntimeError(f"{type(method).__name__} has no per-row compute_each to batch with")
            deltas = each(model, chunk_reqs, batch_size=size, **compute_kwargs)
        seconds["compute"] += time.perf_counter() - start
        start = time.perf_counter()
        after.extend(_score_rows(model, chunk, tests, deltas, eval_batch_size) if batched
                     else [_score_applied(model, c, tests, d, eval_batch_size) for c, d in zip(chunk, deltas)])
        seconds["evaluate"] += time.perf_counter() - start
        infos.extend(d.info for d in deltas)
        if progress:
            print(f"{label or type(method).__name__}: {lo + len(chunk)}/{len(cases)} cases, "
                  f"{time.perf_counter() - t0:.1f} s")
    per_case = {"before": [case_metrics(b) for b in before],
                "after": [case_metrics(a, b) for a, b in zip(after, before)]}
    protocol = {"protocol": "independent", "compute": "one-by-one" if fallback else "batched",
                "evaluate": "batched" if batched else "one-by-one",
                "batch_size": size, "fallback": ", ".join(fallback) or None,
                "compute_seconds": seconds["compute"], "evaluate_seconds": seconds["evaluate"],
                "steps": [_steps(i) for i in infos]}
    return IndependentReport(model=model.name, method=label or type(method).__name__, cases=tuple(cases),
                             per_case=per_case,
                             aggregate={s: aggregate(r) for s, r in per_case.items()},
                             seconds=time.perf_counter() - t0, raw={"before": before, "after": after},
                             protocol=protocol)


def _compute_each(method: EditMethod, hp: Any) -> tuple[Callable[..., list[WeightDelta]] | None, str | None]:
    """The method's batched independent compute, or None and why (then: one by one)."""
    if hasattr(method, "compute_each"):
        return copy.deepcopy(method).compute_each, None
    train: Callable[..., list[WeightDelta]]
    if isinstance(method, FineTune):
        train = finetune_each
    elif isinstance(method, LoRA):
        if hp.dropout > 0:
            return None, (f"LoRA dropout {hp.dropout} draws a random mask per forward, which requests trained "
                          "together cannot reproduce; set dropout=0 to batch")
        train = lora_each
    else:
        return None, "it has no per-row compute (compute_each)"

    def each(model: KVModel, requests: Sequence[EditRequest], *, batch_size: int, **_: Any) -> list[WeightDelta]:
        templates = context_templates(model, hp.contexts)
        out: list[WeightDelta] = []
        for lo in range(0, len(requests), batch_size):
            start = time.perf_counter()
            chunk = train(model, hp, requests[lo: lo + batch_size], templates, method=method.name)
            for d in chunk:
                d.info["seconds"] = (time.perf_counter() - start) / len(chunk)
                d.info["batched"] = len(chunk)
            out.extend(chunk)
        return out

    return each, None


def _before(model: KVModel, cases: Sequence[EvalCase], tests: Sequence[str], baseline: EditReport | None,
            batch_size: int) -> list[dict[str, list[TargetScore]]]:
    """The unedited scores: from ``baseline`` (checked to be on the same cases) or scored now."""
    if baseline is None:
        return score_state(model, cases, tests, batch_size=batch_size)
    state = next((s for s in ("before", "current") if s in baseline.raw), None)
    if state is None or [c.case_id for c in baseline.cases] != [c.case_id for c in cases]:
        raise ValueError("baseline must be a report on the same cases (same case ids, in order) "
                         "with an unedited state ('before' or 'current')")
    return baseline.raw[state]


def _score_rows(model: KVModel, cases: Sequence[EvalCase], tests: Sequence[str], deltas: Sequence[WeightDelta],
                batch_size: int) -> list[dict[str, list[TargetScore]]]:
    """Each case scored with its own delta, many per forward (every part per row through the seam)."""
    changes = stack_changes([d.parts for d in deltas], model.device)
    return score_state(model, cases, tests, batch_size=batch_size, writes=changes.writes)


def _score_applied(model: KVModel, case: EvalCase, tests: Sequence[str], delta: WeightDelta,
                   batch_size: int) -> dict[str, list[TargetScore]]:
    """One case scored with its delta applied to the weights, then reverted (checked bitwise)."""
    keys = list(delta.parts)
    saved = [model.projection(*k).weight.detach().clone() for k in keys]
    with delta.applied(model):
        (raw,) = score_state(model, [case], tests, batch_size=batch_size)
    for k, w in zip(keys, saved):
        if not torch.equal(model.projection(*k).weight, w):
            raise RuntimeError(f"layer {k[0]} {k[1]} is not bit-identical after reverting the edit of "
                               f"case {case.case_id!r}")
    return raw


def _steps(info: dict[str, Any]) -> int | None:
    """Optimisation steps the method recorded for its one request (None if it records none)."""
    opt = info.get("opt") or {}
    steps = opt.get("steps")
    if isinstance(steps, list):
        return int(steps[0]) if steps else None
    return None if steps is None else int(steps)
