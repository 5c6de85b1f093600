"""SAFE as a peft tuner: its config, the tuner and its parts (units, scoring, freezing, checkpoint payload, the
schedule's driver, the backprop cut, the memory budget and the prefix cache).

Imports peft, torch, ``core`` and ``measure`` (below it: the memory budget measures saved activations, lazily);
never transformers' Trainer, the callbacks or the applications.
"""

from .config import SAFEConfig
from .model import SAFEModel, find_safe_model

__all__ = ["SAFEConfig", "SAFEModel", "find_safe_model"]
