"""Locate: causal tracing of facts (ROME, Meng et al. 2022 §2.1; MEMIT, Meng et al. 2023 App. A)."""

from kvlens.causal.setup import noise_scale
from kvlens.causal.trace import CausalTrace, trace

__all__ = ["CausalTrace", "noise_scale", "trace"]
