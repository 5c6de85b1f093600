"""The peft type members of this package's tuners, and their names: a leaf module.

peft keeps its method names in a closed ``str`` enum (``PeftType``) and ``register_peft_method`` refuses any
name that is not already a member. :func:`peft_type_member` adds a member to the enum's own lookup tables (the
same tables that ``PeftType("SAFE")``, ``PeftType.SAFE`` and ``list(PeftType)`` read). Configs need their
member when they are built, and :mod:`peft_safe.registry` needs the configs, so the members live here, below
both: this module imports nothing of this package, and of peft only the enum.
"""

from __future__ import annotations

from typing import Any

from peft.utils import PeftType

__all__ = [
    "BITFIT_PEFT_TYPE",
    "BOTTLENECK_PEFT_TYPE",
    "SAFE_PEFT_TYPE",
    "SUPPORTED_ADAPTER_TYPES",
    "peft_type_member",
    "peft_type_name",
]


def peft_type_member(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum first if it is not there (idempotent)."""
    if name in PeftType._member_map_:
        return PeftType._member_map_[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # Python 3.11 resolves ``PeftType.NAME`` through ``_member_map_``; 3.12+ looks in the class dict.
    if getattr(PeftType, name, None) is not member:
        type.__setattr__(PeftType, name, member)
    return member


def peft_type_name(peft_type: Any) -> str:
    """``"LORA"`` for ``PeftType.LORA`` or ``"LORA"`` (``str()`` of a str-enum member is ``"PeftType.LORA"``)."""
    return str(getattr(peft_type, "value", peft_type))


SAFE_PEFT_TYPE = peft_type_member("SAFE")
BOTTLENECK_PEFT_TYPE = peft_type_member("BOTTLENECK")
BITFIT_PEFT_TYPE = peft_type_member("BITFIT")

# The adapter types SAFE can wrap: peft's LoRA and AdaLoRA, and this package's two stand-alone tuners. A new
# tuner is added here once SAFE's units, scoring and freezing have been tested with it (docs/architecture.md).
SUPPORTED_ADAPTER_TYPES = ("LORA", "ADALORA", "BOTTLENECK", "BITFIT")
