"""Report renderer for task tuning (:class:`kvlens.tuning.TuningComparison`).

Registered on import (:data:`kvlens.views.renderers.RENDERER_MODULES`): the overall and
per-task table with CIs, both bar charts, and the settings (preset, targets, batch plan, times).
"""

from __future__ import annotations

from kvlens.tuning.compare import TuningComparison
from kvlens.views import tuning_figures
from kvlens.views.renderers import to_sections
from kvlens.views.report import Section


@to_sections.register
def _tuning(result: TuningComparison) -> list[Section]:
    text = (f"LoRA task tuning (Qiu et al. 2024 §4) on {len(result.tasks)} tasks: {', '.join(result.tasks)} "
            f"({result.params.get('n_train')} train, {result.params.get('n_test')} test examples). Each variant "
            "adapts the attention q,v projections plus the named FFN matrix at every layer; answers are greedy "
            "and compared with the label. Accuracy: Wilson 95 % CI; macro-F1: bootstrap 95 % CI over examples. "
            + (result.params.get("batch_note") or ""))
    table = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for row in result.table()]
    params = {"hparams": result.hparams.to_dict(), "model": result.params.get("model"),
              "batch_size": result.params.get("batch_size"), "grad_accum": result.params.get("grad_accum"),
              "targets": {v: len(t) for v, t in result.targets.items()},
              "train_s": {v: round(l.get("train_s", 0.0), 1) for v, l in result.logs.items()}}
    return [Section("Tune: keys vs values on tasks", text=text, table=table,
                    figure=tuning_figures.tuning_bars(result, "accuracy"), params=params,
                    figures=[tuning_figures.tuning_bars(result, "macro_f1")])]
