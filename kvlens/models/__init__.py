"""Models: architecture specs, the registry, ``KVModel`` and loading."""

from kvlens.models.kvmodel import Batch, KVModel, Site, wrap
from kvlens.models.loading import cache_dir, load
from kvlens.models.registry import UnknownArchitectureError, get_arch, register_arch, registered_types
from kvlens.models.spec import ArchSpec

__all__ = ["ArchSpec", "Batch", "KVModel", "Site", "UnknownArchitectureError", "cache_dir", "get_arch",
           "load", "register_arch", "registered_types", "wrap"]
