"""The wrapped adapter's field names as SAFEConfig keyword arguments: ``SAFEConfig(adapter_config=..., r=16)``.

peft builds configs with ``dataclasses.replace(config, r=..., target_modules=...)`` (``add_weighted_adapter``)
and sets generic names on any config (``init_weights = True`` before a PiSSA conversion). A SAFEConfig takes
those names and forwards them to a copy of the config it wraps, so the wrapped class validates them and the
original is never changed.

Also the deprecated names of SAFE's own fields (``final_freeze_epoch`` for ``final_freeze_time``...): their
warning and the property that reads through to the new field; and :func:`install_forwarding_init`, the
``__init__`` that takes all of these as keyword arguments.

Imports: peft's ``PeftConfig`` and its config mapping, the peft type members and
``safe.persistence.weights_file`` (the record save_pretrained writes beside the fields); nothing of the SAFE config.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Iterable
from typing import Any

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from .._peft_types import peft_type_name
from .persistence.weights_file import RECORD_KEY, keep_record

__all__ = ["GENERIC_NAMES", "check_change_after_build", "install_forwarding_init", "mark_built_into_model",
           "renamed_reader", "warn_renamed", "with_adapter_fields", "wrapped_name"]

# Generic names peft's own code uses on any config -> the name of the LoRA family's field.
GENERIC_NAMES = {"init_weights": "init_lora_weights"}


def wrapped_name(config_cls: type, name: str) -> str:
    """``name`` as ``config_cls`` calls it: ``init_weights`` is LoRA's ``init_lora_weights``, others unchanged."""
    alias = GENERIC_NAMES.get(name)
    fields = getattr(config_cls, "__dataclass_fields__", {})
    return alias if alias is not None and name not in fields and alias in fields else name


def with_adapter_fields(adapter_config: Any, given: dict[str, Any], safe_fields: Iterable[str]) -> Any:
    """A copy of ``adapter_config`` (a PeftConfig or its dict) with the fields in ``given`` set.

    Args:
        adapter_config: the wrapped adapter's config, as passed to SAFEConfig.
        given: keyword arguments of SAFEConfig that are not its own fields.
        safe_fields: SAFE's own hyper-parameters, named in the error for an unknown name.

    Raises:
        TypeError: for a name that the wrapped config does not have either, worded as Python's own error (peft's
            ``from_pretrained`` drops such keys of configs saved by a newer version when it sees that wording).
        ValueError: when names are given but the wrapped config cannot take them.

    Names given without any ``adapter_config`` (``SAFEConfig(target_modules=[...])``, as peft's generic code builds
    configs) wrap LoRA, the paper's adapter, with a warning saying so.
    """
    if adapter_config is None and given:
        from peft import LoraConfig

        warnings.warn(
            f"SAFEConfig got {sorted(given)} but no adapter_config: SAFE wraps LoRA, the paper's adapter "
            "(LoraConfig with those fields). Pass adapter_config=... to wrap another adapter.",
            UserWarning,
            stacklevel=4,
        )
        adapter_config = LoraConfig()
    if isinstance(adapter_config, dict):
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(adapter_config.get("peft_type"))
    else:
        config_cls = type(adapter_config) if isinstance(adapter_config, PeftConfig) else None
    nested = config_cls is not None and hasattr(config_cls, "adapter_peft_type")  # a SAFEConfig: refused later
    if config_cls is None or nested or peft_type_name(getattr(adapter_config, "peft_type", None)) == "SAFE":
        if not given:
            return adapter_config  # SAFEConfig.__post_init__ says what is wrong with it
        raise ValueError(
            f"SAFEConfig got {sorted(given)}, fields of the adapter SAFE wraps, but no adapter config to set them on "
            f"(adapter_config={adapter_config!r:.80}); pass one, e.g. SAFEConfig(adapter_config=LoraConfig(...), "
            "r=16)."
        )
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    given = {wrapped_name(config_cls, name): value for name, value in given.items()}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(
            f"SAFEConfig.__init__() got an unexpected keyword argument {unknown[0]!r}: it is neither a SAFE "
            f"hyper-parameter ({', '.join(sorted(safe_fields))}) nor a field of the wrapped {config_cls.__name__}."
        )
    if isinstance(adapter_config, dict):
        return {**adapter_config, **given}
    # a copy: a config made by dataclasses.replace(safe_config, ...) never shares (nor changes) the original's
    return dataclasses.replace(adapter_config, **given) if given else copy.deepcopy(adapter_config)


def warn_renamed(old: str, new: str, stacklevel: int) -> None:
    """The FutureWarning for a deprecated SAFEConfig field name ``old`` (now ``new``)."""
    warnings.warn(
        f"SAFEConfig.{old} is deprecated and will be removed in peft_safe 0.3; use {new} (same meaning). "
        "Re-saving the adapter writes the new name.",
        FutureWarning,
        stacklevel=stacklevel,
    )


def renamed_reader(old: str, new: str) -> property:
    """A property reading the deprecated field ``old`` through to ``new``, with a FutureWarning."""

    def read(self: Any) -> Any:
        warnings.warn(f"SAFEConfig.{old} is deprecated; read {new} instead.", FutureWarning, stacklevel=2)
        return getattr(self, new)

    return property(read, doc=f"Deprecated name of :attr:`{new}`.")


def mark_built_into_model(config: Any) -> None:
    """Record that a SAFE model was built from ``config`` (this object: a copy of it is not marked)."""
    object.__setattr__(config, "_built_into_model", id(config))


def check_change_after_build(config: Any, name: str, old: Any, value: Any) -> None:
    """Refuse a change that a model built from ``config`` would not act on (issue 21.2: ``memory_budget`` set after
    the build was ignored, or crashed the next forward when set to None).

    ``blocks_path`` decides the units, which the freeze state names; ``memory_budget`` decides at the build whether
    blocks are checkpointed at all (a budget may change to another budget, which takes effect at the next step). The
    cache's options and every other field are read where they are used, so their changes take effect.

    Raises:
        ValueError: naming the field, both values and the fix.
    """
    if config.__dict__.get("_built_into_model") != id(config) or old == value:
        return
    if name == "blocks_path":
        raise ValueError(
            f"blocks_path is read when the model is built (it decides the units the freeze state names); changing "
            f"it from {old!r} to {value!r} on a built model is refused. Build a new model with "
            f"get_peft_model(base, SAFEConfig(..., blocks_path={value!r}))."
        )
    if name == "memory_budget" and (old is None) != (value is None):
        switch = "on" if old is None else "off"
        raise ValueError(
            f"memory_budget={value!r}: whether blocks are checkpointed under a budget is decided when the model is "
            f"built (it was built with memory_budget={old!r}), so it cannot be switched {switch} now; a budget may "
            f"change to another one. Build a new model with memory_budget={value!r}."
        )


def install_forwarding_init(cls: type, renamed: dict[str, str], safe_fields: frozenset[str]) -> None:
    """Replace the dataclass ``__init__`` of ``cls`` (SAFEConfig) by one that also takes the deprecated names in
    ``renamed`` (with a FutureWarning) and the wrapped config's fields (``r=``, ``target_modules=``...), and shows
    them in its signature, which peft's loader inspects."""
    dataclass_init = cls.__init__
    init_fields = [f.name for f in dataclasses.fields(cls) if f.init]
    name = cls.__name__

    def forwarding_init(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(init_fields):
            raise TypeError(f"{name} takes at most {len(init_fields)} positional arguments, got {len(args)}.")
        own = dict(zip(init_fields, args))
        given = {}
        for key, value in kwargs.items():
            if key in own:
                raise TypeError(f"{name}.__init__() got multiple values for argument {key!r}")
            (own if key in init_fields else given)[key] = value
        for old, new in renamed.items():
            value = given.pop(old, None)
            if value is None:
                continue
            warn_renamed(old, new, stacklevel=3)  # the user's SAFEConfig(...)
            default = cls.__dataclass_fields__[new].default
            current = own.get(new, default)
            if current != default and current != value:
                raise ValueError(f"{name} got {old}={value!r} and {new}={current!r}; pass only {new}.")
            own[new] = value
        keep_record(self, given.pop(RECORD_KEY, None))  # written by save_pretrained beside the fields: not a field
        own["adapter_config"] = with_adapter_fields(own.get("adapter_config"), given, safe_fields)
        dataclass_init(self, **own)

    forwarding_init.__signature__ = inspect.signature(dataclass_init).replace(
        parameters=[
            *inspect.signature(dataclass_init).parameters.values(),
            *(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=None) for old in renamed),
            inspect.Parameter("adapter_fields", inspect.Parameter.VAR_KEYWORD),
        ]
    )
    forwarding_init.__doc__ = dataclass_init.__doc__
    forwarding_init.__qualname__ = f"{name}.__init__"
    cls.__init__ = forwarding_init
