"""kvlens: look inside a language model's feed-forward layers as key-value memories, and change them.

    import kvlens as kv
    model = kv.load()                          # the embedded default, offline
    acts = kv.keys(model, "The Eiffel Tower is located in the city of")
"""

from kvlens.memory.activations import KeyActivations, keys
from kvlens.models import (ArchSpec, Batch, KVModel, Site, UnknownArchitectureError, cache_dir, get_arch,
                           load, register_arch, registered_types, wrap)
from kvlens.views.report import Report, Section

__version__ = "0.1.0"

__all__ = ["ArchSpec", "Batch", "KVModel", "KeyActivations", "Report", "Section", "Site",
           "UnknownArchitectureError", "cache_dir", "get_arch", "keys", "load", "register_arch",
           "registered_types", "wrap"]
