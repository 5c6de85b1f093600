"""Where the SAFE tuner classes lived before 0.2: kept so that objects pickled then still unpickle.

Pickle stores a class by module and name (``peft_safe.tuners.safe.SAFELoraModel``); those names now resolve
to the classes of :mod:`peft_safe.safe.model`. New code imports from :mod:`peft_safe` or :mod:`peft_safe.safe`.
"""

from __future__ import annotations

from typing import Any

from ..safe import model as _model

SAFEModel = _model.SAFEModel


def __getattr__(name: str) -> Any:
    return getattr(_model, name)
