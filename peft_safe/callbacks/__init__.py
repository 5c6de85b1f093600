"""transformers Trainer callbacks: thin shells over the tuner (SAFECallback) and the meter (MeasureCallback).

The only package of peft_safe that imports transformers' Trainer machinery.
"""

from .measure import MeasureCallback
from .safe import SAFECallback

__all__ = ["MeasureCallback", "SAFECallback"]
