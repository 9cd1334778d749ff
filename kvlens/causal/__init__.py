"""Locate: causal tracing of facts (ROME, Meng et al. 2022 §2.1; MEMIT, Meng et al. 2023 App. A).

``trace`` (one fact, hidden / mlp / attn), ``sever`` (severed MLP / attention paths),
``suggest_edit_layers`` (the MLP range to edit), ``trace_many`` (averages with 95 % CIs),
``choose_edit_layers`` (the range pooled over many facts, with a bootstrap interval: the
recommended way to pick MEMIT's layers).
"""

from kvlens.causal.approx import rank_correlation
from kvlens.causal.many import TraceSummary, choose_edit_layers, trace_many
from kvlens.causal.setup import noise_scale
from kvlens.causal.severed import LayerChoice, SeveredTrace, pool_edit_layers, sever, suggest_edit_layers
from kvlens.causal.trace import CausalTrace, trace

__all__ = ["CausalTrace", "LayerChoice", "SeveredTrace", "choose_edit_layers", "pool_edit_layers", "TraceSummary",
           "noise_scale", "rank_correlation", "sever", "suggest_edit_layers", "trace", "trace_many"]
