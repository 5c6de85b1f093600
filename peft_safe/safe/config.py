"""SAFEConfig: the wrapped adapter's config plus SAFE's hyper-parameters, checked when set.

How it delegates, and why (three mechanisms, each at the bottom of the class or of this module):

- **Reading** ``config.r``: ``__getattr__`` runs only when normal lookup fails and reads the wrapped config
  (``adapter_config``), so a SAFEConfig answers for LoRA's fields as peft's code and users expect of "the config".
- **Writing**: ``__setattr__`` sends a wrapped field to the wrapped config; a SAFE field set after the model was
  built is validated, and a refused value is put back (the documented way to change tau mid-run is
  ``model.peft_config[name].tau = ...``, so it is checked where it is set, not at the next scoring); a deprecated
  name warns and sets the new field.
- **Constructing**: ``SAFEConfig(r=8, target_modules=...)`` takes the wrapped config's fields as keywords, which a
  dataclass ``__init__`` cannot; :func:`.config_fields.install_forwarding_init` replaces ``__init__`` after the
  class is made and gives it the dataclass's signature plus those keywords, so ``help()`` and IDEs show them.

Imports: peft's ``PeftConfig`` and its config mapping, ``core.schedule`` (the allowed values) and the peft type
members; nothing that runs a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from .._peft_types import SAFE_PEFT_TYPE, SUPPORTED_ADAPTER_TYPES, peft_type_name
from ..core.budget import check_memory_budget
from ..core.cka import CKA_PRECISIONS, SCORING_SITES
from ..core.policy import SchedulePolicy, as_number
from ..core.schedule import DEFAULT_WARMUP_TOLERANCE, FREEZE_ORDERS, SCORE_SCALES, WARMUP_RULES
from .config_fields import (
    check_change_after_build,
    install_forwarding_init,
    renamed_reader,
    warn_renamed,
    wrapped_name,
)
from .persistence.history import LEGACY_VALUES, RENAMED_FIELDS
from .persistence.model_card import add_safe_section
from .persistence.weights_file import check_weights_file, save_config_atomically, weights_record
from .savings.cache_options import DEFAULT_CACHE_DISK_BYTES, DEFAULT_CACHE_MEMORY_BYTES, check_cache_options

SCHEDULE_UNITS = ("epoch", "step")

# Adapters whose change to their layer depends on the layer's input (W x -> (W + BA) x): the layer's own output
# shows it. The others can shift it by a constant, which CKA (centred) cannot see.
_MULTIPLICATIVE_ADAPTERS = ("LORA", "ADALORA")

# PeftConfig fields that SAFEConfig and the wrapped adapter config both carry; kept equal on both.
_MIRRORED_FIELDS = ("task_type", "inference_mode", "base_model_name_or_path", "revision")


def _sets_to_lists(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _sets_to_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_sets_to_lists(v) for v in value)
    return value


@dataclass
class SAFEConfig(PeftConfig):
    """Configuration of a :class:`~peft_safe.SAFEModel`.

    SAFE wraps another adapter (LoRA, AdaLoRA, Houlsby, Pfeiffer, BitFit). The wrapped adapter is injected
    exactly as its own peft tuner would inject it; SAFE adds scoring of each transformer block's adapters
    (``1 - CKA`` between activations with and without them, at ``scoring_site``), a warm-up stage, and freezing
    of the least important blocks on a cubic threshold schedule.

    Attributes of the wrapped config (``r``, ``target_modules``, ``modules_to_save``...) are readable and
    writable on the SAFEConfig itself, so peft code that expects a LoraConfig works unchanged.

    Args:
        adapter_config: the wrapped adapter's config (``LoraConfig(...)``) or its dict form.
        tau: final freezing threshold, in (0, 1]. With the defaults, the bottom units freeze while together they
            hold less than the threshold's share of the total importance; with ``freeze_order="any"``, every unit
            whose importance is below the threshold freezes.
        final_freeze_time: t_f, the time (in ``schedule_unit``: epochs or optimizer steps) at which the threshold
            reaches ``tau``. Called ``final_freeze_epoch`` before 0.2, a name still accepted (deprecated).
        schedule_unit: ``"epoch"`` or ``"step"`` (optimizer steps); the unit of every time below.
        scoring_interval: score importance every this many schedule units.
        warmup_rule: ``"relative_norm"`` (default): warm-up ends once the importance vector moves by less than
            ``warmup_tolerance`` of its norm between two scorings. ``"per_unit"``: the paper's rule, every unit's
            score changes by less than ``warmup_tolerance`` relative to itself.
        warmup_tolerance: tolerance of the warm-up rule; ``None`` means 0.15 for ``"relative_norm"`` (above the
            jitter of scores between scorings once they have settled, measured in docs/method.md) and the paper's
            0.05 for ``"per_unit"``.
        warmup_floor: with ``"per_unit"``, scores below this absolute value never block the end of warm-up.
        warmup_cap: the latest time at which warm-up ends; ``None`` means half of ``final_freeze_time``. Called
            ``max_warmup`` before 0.2, a name still accepted (deprecated). :attr:`warmup_cap_value` resolves it.
        importance_scale: ``"share"`` (default: each unit's share of the total importance of all units, frozen
            ones at their last score), ``"normalized"`` (divided by the largest unit's score, the 0.1 default) or
            ``"raw"``.
        scoring_site: where 1 - CKA is measured: ``"adapter_output"`` (each adapted layer's output with vs
            without its adapter, averaged over the unit's layers), ``"block_output"`` (the block's output, the 0.1
            behaviour) or ``"residual_update"`` (the block's output minus its input). ``"auto"`` (default):
            ``"adapter_output"`` for LoRA and AdaLoRA, ``"block_output"`` for Houlsby, Pfeiffer and BitFit, whose
            changes to their own layer's output can be constant shifts that CKA cannot see (a bias; a bottleneck
            whose ReLUs are off), while the block after it sees them. :attr:`scoring_site_value` resolves it;
            docs/method.md compares the sites on MiniLM and SmolLM2.
        freeze_order: ``"prefix"`` (default: the frozen units are always a bottom prefix, the only frozen set that
            cuts backprop; with the ``"share"`` scale the prefix freezes while it holds less than the threshold's
            share of the total importance) or ``"any"`` (the paper's rule: every unit below the threshold).
        memory_budget: off when ``None`` (default). Otherwise the bytes a training step's saved activations may
            take at once, recompute included: an int (bytes) or a fraction in (0, 1] of what the step saves without
            checkpointing (measured by SAFE on the first training batch). SAFE checkpoints the lowest trainable
            blocks that this needs and stops checkpointing as freezing frees memory (docs/method.md).
        probe_tokens: token budget per unit for one CKA: real tokens are subsampled to at most this many.
        cka_precision: ``"float64"`` (default: the reference) or ``"float32"``: 1 - CKA from the change an adapter
            makes, its products in float32 (``core.cka.importance_by_difference``; the same scores to a relative
            1e-3, measured 5e-6; the products in float32, which consumer GPUs run 64 times faster than float64).
        blocks_path: dotted path (from the base model) of the list of transformer blocks; found automatically
            when ``None``.
        seed: seed of the token subsampling; the global RNG is never touched.
        cache_frozen, cache_memory_bytes, cache_disk_bytes, cache_dir: the frozen prefix's cache, off by default.

    Raises:
        ValueError: for values out of range, named with the range they must be in.
        TypeError: when ``adapter_config`` is neither a PeftConfig nor a dict.

    Example:
        >>> from peft import LoraConfig
        >>> config = SAFEConfig(adapter_config=LoraConfig(r=4, target_modules=["query", "value"]), tau=0.3)
    """

    adapter_config: PeftConfig | dict | None = field(
        default=None,
        metadata={"help": "Config (or dict) of the wrapped adapter: LoRA, AdaLoRA, Houlsby, Pfeiffer, BitFit."},
    )
    tau: float = field(default=0.3, metadata={"help": "Final freezing threshold on the importance score, in (0, 1]."})
    final_freeze_time: float = field(
        default=5, metadata={"help": "t_f: time (in schedule_unit) at which the threshold reaches tau."}
    )
    schedule_unit: Literal["epoch", "step"] = field(
        default="epoch", metadata={"help": "Unit of the schedule's times: 'epoch' or 'step' (optimizer steps)."}
    )
    scoring_interval: float = field(
        default=1, metadata={"help": "Score importance every this many schedule units."}
    )
    warmup_rule: Literal["relative_norm", "per_unit"] = field(
        default="relative_norm",
        metadata={"help": "'relative_norm' (robust default) or 'per_unit' (the paper's rule read literally)."},
    )
    warmup_tolerance: float | None = field(
        default=None, metadata={"help": "Tolerance of the warm-up rule; None: 0.15 (relative_norm), 0.05 (per_unit)."}
    )
    warmup_floor: float = field(
        default=0.0, metadata={"help": "'per_unit' rule: scores below this never block the end of warm-up."}
    )
    warmup_cap: float | None = field(
        default=None, metadata={"help": "Latest time at which warm-up ends; None: half of final_freeze_time."}
    )
    importance_scale: Literal["share", "normalized", "raw"] = field(
        default="share",
        metadata={"help": "'share' (of the total importance), 'normalized' (divided by the top unit's) or 'raw'."},
    )
    scoring_site: Literal["auto", "adapter_output", "block_output", "residual_update"] = field(
        default="auto",
        metadata={"help": "Where 1 - CKA is measured: 'auto', 'adapter_output', 'block_output', 'residual_update'."},
    )
    freeze_order: Literal["prefix", "any"] = field(
        default="prefix",
        metadata={"help": "'prefix' (frozen units stay a bottom prefix) or 'any' (the paper's rule)."},
    )
    memory_budget: int | float | None = field(
        default=None, metadata={"help": "Activation bytes (int) or fraction (0, 1] a step may hold; None: off."}
    )
    probe_tokens: int = field(default=4096, metadata={"help": "Token budget per unit for one CKA."})
    cka_precision: Literal["float64", "float32"] = field(
        default="float64", metadata={"help": "'float64' (the reference) or 'float32' (the difference form)."}
    )
    blocks_path: str | None = field(
        default=None, metadata={"help": "Dotted path of the transformer block list; found automatically if None."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the probe-token subsampling."})
    cache_frozen: bool = field(default=False, metadata={"help": "Serve the frozen blocks' output from a cache."})
    cache_memory_bytes: int = field(default=DEFAULT_CACHE_MEMORY_BYTES, metadata={"help": "Cache RAM before disk."})
    cache_disk_bytes: int = field(default=DEFAULT_CACHE_DISK_BYTES, metadata={"help": "Cache disk, then no more."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where rows beyond the RAM budget go."})
    # The deprecated names (final_freeze_epoch, max_warmup) and the wrapped config's fields (r, target_modules...)
    # are keyword arguments too: the __init__ installed below this class maps them (see _forwarding_init).

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SAFE_PEFT_TYPE
        self.adapter_config = self._build_adapter_config(self.adapter_config)
        for name in _MIRRORED_FIELDS:
            own = self.__dict__.get(name)
            if own is not None or name == "inference_mode":
                setattr(self.adapter_config, name, own)
            elif getattr(self.adapter_config, name, None) is not None:
                object.__setattr__(self, name, getattr(self.adapter_config, name))
        self._validate()
        object.__setattr__(self, "_built", True)  # from now on, assignments to SAFE's fields are checked

    def _build_adapter_config(self, adapter_config: Any) -> PeftConfig:
        supported = SUPPORTED_ADAPTER_TYPES
        if adapter_config is None:
            raise ValueError(
                "SAFEConfig needs adapter_config, the config of the adapter SAFE wraps, e.g. "
                f"SAFEConfig(adapter_config=LoraConfig(r=8, target_modules=[...])); supported types: {supported}."
            )
        if isinstance(adapter_config, dict):
            peft_type = adapter_config.get("peft_type")
            config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) if peft_type is not None else None
            if config_cls is None or peft_type_name(peft_type) not in supported:
                raise ValueError(
                    f"adapter_config has peft_type {peft_type!r}; SAFE wraps one of {supported}."
                )
            kwargs = {k: v for k, v in adapter_config.items() if k != "peft_type"}
            known = {f.name for f in dataclasses.fields(config_cls)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise ValueError(
                    f"adapter_config has keys {unknown} that {config_cls.__name__} does not know; "
                    "was it written by a newer peft?"
                )
            return config_cls(**kwargs)
        if not isinstance(adapter_config, PeftConfig):
            raise TypeError(
                "adapter_config must be a PeftConfig (e.g. LoraConfig) or its dict, "
                f"got {type(adapter_config).__name__}."
            )
        if isinstance(adapter_config, SAFEConfig):
            raise ValueError("adapter_config is itself a SAFEConfig; SAFE wraps a plain adapter such as LoraConfig.")
        if peft_type_name(adapter_config.peft_type) not in supported:
            raise ValueError(
                f"SAFE cannot wrap adapter type {peft_type_name(adapter_config.peft_type)!r} "
                f"({type(adapter_config).__name__}); supported types: {supported}."
            )
        return adapter_config

    def _validate(self) -> None:
        def finite(name: str) -> float:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                number = as_number(value)  # a numpy or torch scalar: stored as the plain number it holds
                if number is None:
                    raise ValueError(f"{name} must be a finite number, got {value!r}.")
                object.__setattr__(self, name, number)
                value = number
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
            return value

        for name in ("probe_tokens", "seed"):
            value = getattr(self, name)
            number = None if isinstance(value, (int, float)) else as_number(value)  # np.int64(7), torch.tensor(7)
            if isinstance(number, int):
                object.__setattr__(self, name, number)

        if not 0.0 < finite("tau") <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}; it is the final threshold on importance.")
        if finite("final_freeze_time") <= 0:
            raise ValueError(f"final_freeze_time must be > 0, got {self.final_freeze_time!r}.")
        if finite("scoring_interval") <= 0:
            raise ValueError(f"scoring_interval must be > 0, got {self.scoring_interval!r}.")
        if self.scoring_interval > self.final_freeze_time:
            raise ValueError(
                f"scoring_interval ({self.scoring_interval}) is longer than final_freeze_time "
                f"({self.final_freeze_time}): the first scoring would come after the threshold reached tau, so "
                "units would freeze on a single score; lower scoring_interval or raise final_freeze_time."
            )
        if self.warmup_tolerance is not None and finite("warmup_tolerance") <= 0:
            raise ValueError(
                f"warmup_tolerance must be > 0 or None (the rule's default), got {self.warmup_tolerance!r} "
                "(the paper uses 0.05)."
            )
        if finite("warmup_floor") < 0:
            raise ValueError(f"warmup_floor must be >= 0, got {self.warmup_floor!r}.")
        if self.warmup_cap is not None:
            if finite("warmup_cap") <= 0:
                raise ValueError(f"warmup_cap must be > 0 or None, got {self.warmup_cap!r}.")
            if self.warmup_cap >= self.final_freeze_time:
                raise ValueError(
                    f"final_freeze_time ({self.final_freeze_time}) must come after the warm-up cap "
                    f"warmup_cap ({self.warmup_cap}); raise final_freeze_time or lower warmup_cap."
                )
        for name, allowed in (
            ("warmup_rule", WARMUP_RULES),
            ("schedule_unit", SCHEDULE_UNITS),
            ("importance_scale", SCORE_SCALES),
            ("scoring_site", ("auto", *SCORING_SITES)),
            ("freeze_order", FREEZE_ORDERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        budget = as_number(self.memory_budget)  # a numpy or torch scalar is the number it holds
        object.__setattr__(self, "memory_budget", check_memory_budget(self.memory_budget if budget is None
                                                                      else budget))
        if isinstance(self.probe_tokens, bool) or not isinstance(self.probe_tokens, int) or self.probe_tokens < 3:
            raise ValueError(f"probe_tokens must be an int >= 3 (the CKA of two centred tokens is always 1, so every "
                             f"unit would score 0), got {self.probe_tokens!r}.")
        if self.cka_precision not in CKA_PRECISIONS:
            raise ValueError(f"cka_precision must be one of {CKA_PRECISIONS}, got {self.cka_precision!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0 (it seeds the probe-token subsampling), got {self.seed!r}.")
        if self.blocks_path is not None and (not isinstance(self.blocks_path, str) or not self.blocks_path):
            raise ValueError(
                f"blocks_path must be a dotted module path such as 'encoder.layer', got {self.blocks_path!r}."
            )
        check_cache_options(self)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Called by ``from_pretrained`` on a saved config: a field it lacks takes its :data:`LEGACY_VALUES`."""
        kwargs = super().check_kwargs(**kwargs)
        return {**LEGACY_VALUES, **kwargs}

    # ------------------------------------------------------------------ derived values
    @property
    def warmup_cap_value(self) -> float:
        """The latest time at which warm-up ends: ``warmup_cap``, or half of ``final_freeze_time`` when it is None."""
        return self.warmup_cap if self.warmup_cap is not None else self.final_freeze_time / 2

    def schedule_policy(self) -> SchedulePolicy:
        """The :class:`~peft_safe.core.policy.SchedulePolicy` of these hyper-parameters, defaults resolved."""
        return SchedulePolicy(
            tau=self.tau,
            final_freeze_time=self.final_freeze_time,
            warmup_rule=self.warmup_rule,
            warmup_tolerance=self.warmup_tolerance_value,
            warmup_floor=self.warmup_floor,
            warmup_cap=self.warmup_cap_value,
            importance_scale=self.importance_scale,
            freeze_order=self.freeze_order,
        )

    @property
    def scoring_site_value(self) -> str:
        """The site scores are measured at: ``scoring_site``, with ``"auto"`` resolved by the wrapped adapter."""
        if self.scoring_site != "auto":
            return self.scoring_site
        return "adapter_output" if self.adapter_peft_type in _MULTIPLICATIVE_ADAPTERS else "block_output"

    @property
    def warmup_tolerance_value(self) -> float:
        """The tolerance the warm-up rule uses: ``warmup_tolerance``, or the rule's default when it is None."""
        if self.warmup_tolerance is not None:
            return self.warmup_tolerance
        return DEFAULT_WARMUP_TOLERANCE[self.warmup_rule]

    @property
    def adapter_peft_type(self) -> str:
        return peft_type_name(self.adapter_config.peft_type)

    # ------------------------------------------------------------------ deprecated names
    def _set_renamed(self, old: str, value: Any) -> None:
        new = RENAMED_FIELDS[old]
        warn_renamed(old, new, stacklevel=4)  # the user's line: config.old_name = value
        object.__setattr__(self, new, value)

    # ------------------------------------------------------------------ delegation to the wrapped config
    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: fields of the wrapped config (r, target_modules, ...).
        if name.startswith("__") or name == "adapter_config":
            raise AttributeError(name)
        adapter_config = self.__dict__.get("adapter_config")
        if isinstance(adapter_config, PeftConfig):
            name = wrapped_name(type(adapter_config), name)
            if hasattr(adapter_config, name):
                return getattr(adapter_config, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RENAMED_FIELDS:
            old = self.__dict__.get(RENAMED_FIELDS[name])
            self._set_renamed(name, value)
            self._validate_or_restore(RENAMED_FIELDS[name], old)
            return
        if name in _SAFE_FIELDS and self.__dict__.get("_built"):
            # model.peft_config[name].tau = ... is the documented way to change a hyper-parameter: checked here,
            # before any scoring uses it; a refused value leaves the old one in place.
            old = self.__dict__.get(name)
            check_change_after_build(self, name, old, value)  # what a built model reads once: refused, not ignored
            object.__setattr__(self, name, value)
            self._validate_or_restore(name, old)
            return
        adapter_config = self.__dict__.get("adapter_config")
        own = name in self.__dataclass_fields__ or name.startswith("_")
        if isinstance(adapter_config, PeftConfig):
            if name in _MIRRORED_FIELDS:
                setattr(adapter_config, name, value)
            elif not own and hasattr(adapter_config, wrapped_name(type(adapter_config), name)):
                setattr(adapter_config, wrapped_name(type(adapter_config), name), value)
                return
        object.__setattr__(self, name, value)

    def _validate_or_restore(self, name: str, old: Any) -> None:
        try:
            self._validate()
        except ValueError:
            object.__setattr__(self, name, old)
            raise

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` atomically, naming the weights file just written (:mod:`.weights_file`)."""
        save_config_atomically(save_directory, super().save_pretrained, weights_record(save_directory, self), **kwargs)
        add_safe_section(save_directory, self.adapter_peft_type)  # peft's model card gets a SAFE section

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """peft's loader, then a check that the weights file peft loads next is the one this config was saved with."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        check_weights_file(pretrained_model_name_or_path, config, subfolder)
        return config

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "adapter_config"}
        out["adapter_config"] = _sets_to_lists(self.adapter_config.to_dict())
        return _sets_to_lists(out)


# SAFE's own hyper-parameters: assignments to them after construction are validated.
_SAFE_FIELDS = frozenset(f.name for f in dataclasses.fields(SAFEConfig) if f.name != "adapter_config") - {
    f.name for f in dataclasses.fields(PeftConfig)
}

# The deprecated names read through to the new fields (assignment goes through SAFEConfig.__setattr__).
for _old in RENAMED_FIELDS:
    setattr(SAFEConfig, _old, renamed_reader(_old, RENAMED_FIELDS[_old]))
del _old


# Keyword arguments: the deprecated names and the wrapped config's fields too (config_fields.forwarding_init).
install_forwarding_init(SAFEConfig, RENAMED_FIELDS, _SAFE_FIELDS)
