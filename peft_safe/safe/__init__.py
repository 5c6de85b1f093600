"""SAFE as a peft tuner, in three parts under two public modules.

- ``config`` (:class:`SAFEConfig`, with ``config_fields``: the wrapped config's keywords) and ``model`` (the tuner,
  :class:`SAFEModel`) are the public face; they compose the parts below and may import all of them.
- ``method``: units, scoring, freezing, the schedule's driver; the tuner's view and its hooks registry.
- ``savings``: the backprop cut, the memory budget, the prefix cache. Imports ``method``.
- ``persistence``: the checkpoint payload, state dicts, weights files, the model card. Imports ``method`` and
  ``savings``.

Imports peft, torch, ``core`` and ``measure`` (below it: the memory budget measures saved activations, lazily);
never transformers' Trainer, the callbacks or the applications. Modules that lived directly in ``safe/`` before
0.3 keep their old names (``peft_safe.safe.scoring`` is ``peft_safe.safe.method.scoring``), so imports and pickles
that recorded them still resolve.
"""

import importlib
import sys
from types import ModuleType

from .config import SAFEConfig
from .model import SAFEModel, find_safe_model

__all__ = ["SAFEConfig", "SAFEModel", "find_safe_model"]

#: Module (as named before 0.3) -> the part it moved to.
MOVED_MODULES = {
    **dict.fromkeys(("adalora", "distributed", "driver", "freezing", "frozen_prefix", "hooks", "optimizer",
                     "probe_inputs", "scoring", "trainer_clock", "tuner_view", "units", "zero"), "method"),
    **dict.fromkeys(("budget", "cache_options", "prefix_cache", "prefix_rows", "truncation"), "savings"),
    **dict.fromkeys(("checkpoint", "model_card", "state_dict", "weights_file"), "persistence"),
}

for _old, _part in MOVED_MODULES.items():  # the config and the model above have imported every one of them
    sys.modules.setdefault(f"{__name__}.{_old}", sys.modules[f"{__name__}.{_part}.{_old}"])


def __getattr__(name: str) -> ModuleType:
    """``peft_safe.safe.scoring`` after ``import peft_safe.safe.scoring``: the module under its new name."""
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{MOVED_MODULES[name]}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
