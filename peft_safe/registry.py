"""The only module that fills peft's type registries.

peft refuses ``register_peft_method`` for a name that is not a member of its closed ``PeftType`` enum; the
members come from :mod:`peft_safe._peft_types`, and this module fills peft's mapping dicts with the configs and
tuners, the same dicts ``register_peft_method`` fills. Every step is idempotent, so importing :mod:`peft_safe`
twice, or re-running :func:`register`, changes nothing.

Imports: peft's mappings, and this package's configs and tuners (never the Trainer or measurement code).
"""

from __future__ import annotations

import logging

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType

from ._peft_types import peft_type_member
from .safe.config import SAFEConfig
from .safe.model import SAFEModel
from .tuners.bitfit import BitFitConfig, BitFitModel
from .tuners.bottleneck import BottleneckConfig, BottleneckModel

logger = logging.getLogger(__name__)

# (peft type, config, tuner, parameter prefix): every tuner this package provides. SAFE has no prefix of its
# own: its parameter names are the wrapped adapter's.
TUNERS: tuple[tuple[str, type, type, str | None], ...] = (
    ("SAFE", SAFEConfig, SAFEModel, None),
    ("BOTTLENECK", BottleneckConfig, BottleneckModel, "bottleneck_"),
    ("BITFIT", BitFitConfig, BitFitModel, "bitfit_"),
)


def _same_class(a: type, b: type) -> bool:
    # A module reloaded (importlib.reload, a notebook re-run) gives new class objects with the same path.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_peft_type(name: str, config_cls: type, model_cls: type, prefix: str | None = None) -> PeftType:
    """Register a tuner type with peft so that ``get_peft_model`` and ``PeftModel.from_pretrained`` know it.

    Args:
        name: upper-case peft type name, e.g. ``"SAFE"``; it is what ``adapter_config.json`` stores.
        config_cls: the ``PeftConfig`` subclass of the method.
        model_cls: the ``BaseTuner`` subclass of the method.
        prefix: parameter-name prefix of the method (``"bitfit_"``); ``None`` registers no prefix, for
            tuners whose parameter names come from a wrapped method.

    Returns:
        The ``PeftType`` member for ``name``.

    Raises:
        ValueError: if ``name`` is not upper case, or is already registered to different classes.
    """
    if not name.isupper() or not name.replace("_", "").isalnum():
        raise ValueError(f"peft type names are upper-case identifiers, got {name!r}; use e.g. 'SAFE'.")
    peft_type = peft_type_member(name)
    for mapping, cls in ((PEFT_TYPE_TO_CONFIG_MAPPING, config_cls), (PEFT_TYPE_TO_TUNER_MAPPING, model_cls)):
        existing = mapping.get(peft_type)
        if existing is not None and not _same_class(existing, cls):
            raise ValueError(
                f"peft type {name!r} is already registered to {existing.__module__}.{existing.__qualname__}; "
                f"refusing to replace it with {cls.__module__}.{cls.__qualname__}."
            )
        mapping[peft_type] = cls
    if prefix is not None:
        owner = next((t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != peft_type), None)
        if owner is not None:
            raise ValueError(f"parameter prefix {prefix!r} of {name!r} is already used by peft type {owner!r}.")
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    logger.debug("registered peft type %s", name)
    return peft_type


def register() -> None:
    """Register every tuner type this package provides. Safe to call any number of times."""
    for name, config_cls, model_cls, prefix in TUNERS:
        register_peft_type(name, config_cls, model_cls, prefix)
