"""peft_safe: SAFE (Selective Adapter FrEezing) as a peft tuner.

Importing this package registers the ``"SAFE"`` peft type (and the bottleneck and BitFit tuners) with peft,
so ``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*`` work with them. That is all an
import does: the Trainer callbacks and the measurement code (the callbacks pull in transformers' Trainer) are
imported only when their names are first used, and no FLOP formula is registered with torch until a counter runs.

Layers (docs/architecture.md): ``core`` (the pure algorithm) < ``measure`` (memory, FLOPs, time) < ``safe`` (the
method as a peft tuner) and ``tuners`` (the adapters it wraps) < ``callbacks`` < the applications ``bench`` and
``plan``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .core.state import FreezeState
from .registry import register as _register
from .safe.config import SAFEConfig
from .safe.model import SAFEModel
from .tuners.bitfit import BitFitConfig, BitFitModel
from .tuners.bottleneck import BottleneckConfig, BottleneckModel, HoulsbyConfig, PfeifferConfig

_register()

# Public names whose modules import transformers' Trainer or touch torch's FLOP registry: loaded on first use.
_LAZY = {
    "MeasureCallback": "peft_safe.callbacks.measure",
    "SAFECallback": "peft_safe.callbacks.safe",
    "TrainingMeter": "peft_safe.measure.meter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'peft_safe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BitFitConfig",
    "BitFitModel",
    "BottleneckConfig",
    "BottleneckModel",
    "FreezeState",
    "HoulsbyConfig",
    "MeasureCallback",
    "PfeifferConfig",
    "SAFECallback",
    "SAFEConfig",
    "SAFEModel",
    "TrainingMeter",
    "__version__",
]
