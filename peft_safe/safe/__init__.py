"""SAFE as a peft tuner: its config, the tuner and its parts (units, scoring, freezing, checkpoint payload).

Imports peft and torch; never transformers' Trainer, the measurement code or the applications.
"""

from .config import SAFEConfig
from .model import SAFEModel, find_safe_model

__all__ = ["SAFEConfig", "SAFEModel", "find_safe_model"]
