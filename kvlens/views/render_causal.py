"""Report renderers for the locate verb: causal traces, severed paths, averages over many facts.

Registered on import (:data:`kvlens.views.renderers.RENDERER_MODULES`). The figures are those of
:mod:`kvlens.views.trace_figures`; each section records the trace's parameters (mode, window,
noise, samples, seed, model) and says plainly when the numbers are an estimate.
"""

from __future__ import annotations

from typing import Any

from kvlens.causal.many import TraceSummary
from kvlens.causal.severed import LayerChoice, SeveredTrace, suggest_edit_layers
from kvlens.causal.trace import CausalTrace
from kvlens.views import trace_figures
from kvlens.views.renderers import to_sections
from kvlens.views.report import Section


def peak_rows(tr: CausalTrace) -> list[dict[str, Any]]:
    """Per traced kind: the (token, layer) cell of the largest indirect effect and its size."""
    rows = []
    for kind in tr.kinds:
        token, layer = tr.peak(kind)
        rows.append({"kind": kind, "token": f"{token}: {tr.tokens[token]!r}", "layer": layer,
                     "indirect effect": float(tr.effect(kind)[token, layer]),
                     "p restored": float(tr.scores[kind][token, layer])})
    return rows


def _how(tr: CausalTrace) -> str:
    """How the numbers were made, in words (the exact trace is ROME's procedure, Meng et al. 2022 §2.1)."""
    p = tr.params
    noise, samples, window = p.get("noise_std"), p.get("samples"), p.get("window")
    how = ("Numbers: exact, ROME's procedure (every restored state run through the model). " if not tr.estimate
           else "Numbers: an estimate by attribution patching (one gradient per kind), not the exact effect. ")
    if noise is not None:
        how += (f"Gaussian noise of std {float(noise):.3g} on the subject's tokens (by default 3 × the std of "
                f"known subjects' token embeddings, ROME's s3), {samples} noise draw(s) per cell")
        how += f"; MLP and attention cells restore a window of {window} layers centred on the layer. " if window \
            else ". "
    return how + "'p restored' is p(target) with that state restored, averaged over the draws."


@to_sections.register
def _trace(result: CausalTrace) -> list[Section]:
    start, end = result.subject_range
    text = (f"Causal trace of {result.prompt!r}: the subject {result.subject!r} (tokens {start}–{end - 1}) is "
            f"corrupted with noise and each (token, layer) state is restored in turn. p({result.target.strip()!r}) "
            f"is {result.high:.3f} clean and {result.low:.3f} corrupted (total effect {result.total_effect:.3f}). "
            + _how(result))
    return [Section(f"Locate: causal trace of {result.subject!r}", text=text, table=peak_rows(result),
                    figure=trace_figures.trace_heatmaps(result),
                    params={**result.params, "prompt": result.prompt, "subject": result.subject,
                            "target": result.target, "kinds": list(result.kinds)})]


@to_sections.register
def _severed(result: SeveredTrace) -> list[Section]:
    layers = suggest_edit_layers(result)
    text = (f"Indirect effect at {result.token_text!r} (token {result.token}) with the MLP or attention path "
            f"severed. The gap between the normal and MLP-severed curves is what later MLPs carry; the "
            f"suggested MLP edit layers are {layers.start}–{layers.stop - 1}.")
    return [Section(f"Locate: severed paths for {result.subject!r}", text=text,
                    figure=trace_figures.severed_chart(result, layers),
                    params={**result.params, "prompt": result.prompt, "subject": result.subject,
                            "target": result.target, "token": result.token,
                            "suggested_layers": [layers.start, layers.stop - 1]})]


@to_sections.register
def _summary(result: TraceSummary) -> list[Section]:
    sections = [Section(f"Locate: average effects over {result.n_facts} facts ({kind})",
                        text=(f"{result.n_facts} facts traced, {len(result.skipped)} skipped (not known by the "
                              "model or not traceable); bands are 95 % confidence intervals."),
                        figure=trace_figures.average_curves(result, kind),
                        params={**result.params, "kind": kind, "groups": list(result.groups)})
                for kind in result.kinds]
    return sections


@to_sections.register
def _layer_choice(result: LayerChoice) -> list[Section]:
    return [Section(f"Locate: MLP edit layers pooled over {result.n_facts} facts", text=str(result) + ".",
                    figure=trace_figures.layer_choice_chart(result),
                    params={**result.params, "layers": [result.layers.start, result.last],
                            "first_layer_ci": list(result.start_ci), "last_layer_ci": list(result.stop_ci),
                            "agreement": result.agreement, "peak": result.peak, "peak_ci": list(result.peak_ci)})]
