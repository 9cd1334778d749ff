"""kvlens: look inside a language model's feed-forward layers as key-value memories, and change them.

    import kvlens as kv
    model = kv.load()                                       # the embedded default, offline
    trace = kv.trace(model, "{} is located in the city of", subject="The Eiffel Tower")
    acts = kv.keys(model, "The Eiffel Tower is located in the city of")
    req = kv.EditRequest("{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
    delta = kv.ROME().compute(model, [req])
    with delta.applied(model):
        ...
    report = kv.evaluate(model, [req], delta)
    kv.Report("Eiffel Tower -> Rome").add(trace, delta, report).save("report.html")

Views (``Report``, ``Section``, ``to_sections``, the widgets ``EditStepper``, ``MemoryBrowser``,
``TraceExplorer``, ``notebook_mode``, ``export_notebook``) are imported on first use, so the core
never loads them.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvlens import corpus, metrics, tuning
from kvlens.causal import (
    CausalTrace,
    LayerChoice,
    SeveredTrace,
    TraceSummary,
    choose_edit_layers,
    noise_scale,
    pool_edit_layers,
    sever,
    suggest_edit_layers,
    trace,
    trace_many,
)
from kvlens.corpus import Corpus
from kvlens.datasets import EvalCase, load_bundled, load_counterfact, load_json, load_reference_texts, load_zsre
from kvlens.editing import (
    MEMIT,
    ROME,
    AlphaEdit,
    EditHistory,
    EditRequest,
    GateFT,
    KeyFT,
    LoRAGates,
    LoRAKeys,
    LoRAValues,
    ValueFT,
    WeightDelta,
    available_methods,
    get_method,
    register_method,
)
from kvlens.evaluate import EditReport, evaluate
from kvlens.experiments import compare_methods, keys_vs_values, scaling
from kvlens.independent import IndependentReport, evaluate_each
from kvlens.memory.activations import KeyActivations, TopMemories, keys
from kvlens.memory.contrib import Contributions, contributions
from kvlens.memory.intervene import Intervention, Prediction, intervene, predict
from kvlens.memory.lens import Composition, LogitLens, composition, logit_lens
from kvlens.memory.triggers import TriggerExamples, trigger_examples
from kvlens.memory.vocab import FoundMemories, VocabProjection, find_memories, values
from kvlens.models import (
    ArchSpec,
    Batch,
    KVModel,
    Site,
    UnknownArchitectureError,
    cache_dir,
    get_arch,
    load,
    register_arch,
    registered_types,
    wrap,
)
from kvlens.tuning import TuneHParams, TuningComparison, tune_keys_vs_values
from kvlens.version import package_version

__version__ = package_version("kvlens", default="0+unknown")

_LAZY = {
    "Report": "kvlens.views.report",
    "Section": "kvlens.views.report",
    "to_sections": "kvlens.views.renderers",
    "EditStepper": "kvlens.views.stepper",
    "MemoryBrowser": "kvlens.views.explorers",
    "TraceExplorer": "kvlens.views.explorers",
    "notebook_mode": "kvlens.views.widgets",
    "export_notebook": "kvlens.views.export",
}


def __getattr__(name: str) -> Any:
    """Import the widgets and the notebook exporter on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvlens' has no attribute {name!r}")


__all__ = [
    "MEMIT", "ROME", "AlphaEdit", "ArchSpec", "Batch", "CausalTrace", "Composition", "Contributions",
    "Corpus", "EditHistory", "EditReport", "EditRequest", "EvalCase", "FoundMemories", "GateFT",
    "IndependentReport",
    "Intervention", "KVModel", "KeyActivations", "KeyFT", "LoRAGates", "LoRAKeys", "LoRAValues", "LogitLens",
    "Prediction", "SeveredTrace", "Site", "TopMemories", "TraceSummary", "TriggerExamples",
    "UnknownArchitectureError", "ValueFT", "LayerChoice", "choose_edit_layers", "pool_edit_layers", "VocabProjection",
    "WeightDelta", "available_methods", "cache_dir",
    "compare_methods", "composition", "contributions", "corpus", "evaluate", "evaluate_each",
    "find_memories", "get_arch",
    "get_method", "intervene", "keys", "keys_vs_values", "load", "load_bundled", "load_counterfact",
    "load_json", "load_reference_texts", "load_zsre", "logit_lens", "metrics", "noise_scale", "predict",
    "register_arch", "register_method", "registered_types", "scaling", "sever", "suggest_edit_layers",
    "trace", "trace_many", "trigger_examples", "TuneHParams", "TuningComparison", "tune_keys_vs_values", "tuning",
    "values", "wrap", *_LAZY,
]
