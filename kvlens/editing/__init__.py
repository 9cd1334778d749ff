"""Editing: requests, reversible deltas, and the methods (ROME, MEMIT, key/value FT, LoRA).

    delta = kv.ROME().compute(model, [kv.EditRequest("{} is located in the city of",
                                                     "The Eiffel Tower", "Rome")])
    with delta.applied(model):
        ...                                   # the edited model
    handle = delta.apply(model); delta.revert()  # bit-for-bit back
"""

from kvlens.editing.alphaedit import AlphaEdit, AlphaEditHparams
from kvlens.editing.base import EditMethod, available_methods, get_method, register_method
from kvlens.editing.delta import AppliedEdit, Part, WeightDelta
from kvlens.editing.finetune import FineTune, GateFT, KeyFT, ValueFT
from kvlens.editing.history import EditHistory
from kvlens.editing.hparams import Contexts, FTHparams, LoRAHparams, MEMITHparams, ROMEHparams, TargetOpt
from kvlens.editing.lora import LoRA, LoRAGates, LoRAKeys, LoRAValues
from kvlens.editing.memit import MEMIT, Targets
from kvlens.editing.request import EditRequest, check_requests
from kvlens.editing.rome import ROME

__all__ = [
    "MEMIT",
    "ROME",
    "AlphaEdit",
    "AlphaEditHparams",
    "AppliedEdit",
    "Contexts",
    "EditHistory",
    "EditMethod",
    "EditRequest",
    "FTHparams",
    "FineTune",
    "GateFT",
    "KeyFT",
    "LoRA",
    "LoRAGates",
    "LoRAHparams",
    "LoRAKeys",
    "LoRAValues",
    "MEMITHparams",
    "Part",
    "ROMEHparams",
    "TargetOpt",
    "Targets",
    "ValueFT",
    "WeightDelta",
    "available_methods",
    "check_requests",
    "get_method",
    "register_method",
]
