"""BottleneckConfig and its two presets, HoulsbyConfig and PfeifferConfig."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from peft.config import PeftConfig

from ..._peft_types import BOTTLENECK_PEFT_TYPE
from .adapter import ACTIVATIONS
from .placement import PRESETS

# Non-linearity of each preset when none is given (AdapterHub's defaults).
DEFAULT_NON_LINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a :class:`BottleneckModel`: bottleneck adapters ``h + scaling * up(act(down(h)))``.

    Each adapter wraps a sublayer's output projection and corrects its output ``h`` before the residual add.
    Two presets fix where the adapters go when ``target_modules`` is not given:

    - ``"houlsby"`` (Houlsby et al. 2019): after the attention output and after the feed-forward output; swish.
    - ``"pfeiffer"`` (Pfeiffer et al. 2021): after the feed-forward output only; relu.

    Constructing a ``BottleneckConfig`` gives an instance of the preset's class (``BottleneckConfig(preset=
    "houlsby")`` is a :class:`HoulsbyConfig`), so the type survives ``save_pretrained``/``from_pretrained``.

    Args:
        preset: ``"houlsby"`` or ``"pfeiffer"`` (the default of this base class).
        reduction_factor: hidden size divided by the bottleneck width (16 in both papers' AdapterHub presets).
        bottleneck_size: explicit bottleneck width; overrides ``reduction_factor``.
        non_linearity: ``"relu"``, ``"swish"`` (= ``"silu"``), ``"gelu"`` or ``"tanh"``; ``None`` takes the
            preset's (swish for Houlsby, relu for Pfeiffer).
        scaling: factor on the adapter's correction.
        init_weights: ``True``: up-projection zero, so the model is unchanged at initialisation.
            ``False``: AdapterHub's "bert" init (N(0, 0.02) weights), near the identity but not exactly.
        target_modules: override of the placement: module names (suffix match) or a regex (full match). ``None``
            takes the preset's placement for the model type (see :mod:`~peft_safe.tuners.bottleneck.placement`).
        modules_to_save: modules besides the adapters to train and save (e.g. a classifier head).

    Raises:
        ValueError: for an unknown preset or non-linearity, a non-positive reduction factor or bottleneck size,
            a non-finite scaling, or a preset that contradicts the class (``HoulsbyConfig(preset="pfeiffer")``).

    Example:
        >>> from peft import get_peft_model
        >>> config = PfeifferConfig(reduction_factor=16)          # after the FFN of every block, relu
        >>> model = get_peft_model(base_model, config)
        >>> HoulsbyConfig(bottleneck_size=64, target_modules=r".*layers\\.\\d+\\.mlp\\.down_proj")
    """

    preset: str = field(
        default="pfeiffer",
        metadata={"help": "Placement and default non-linearity: 'houlsby' (attention and FFN) or 'pfeiffer' (FFN)."},
    )
    reduction_factor: float = field(
        default=16,
        metadata={"help": "Hidden size divided by the bottleneck width; ignored when bottleneck_size is set."},
    )
    bottleneck_size: int | None = field(
        default=None,
        metadata={"help": "Explicit bottleneck width; overrides reduction_factor."},
    )
    non_linearity: str | None = field(
        default=None,
        metadata={
            "help": f"Non-linearity in the bottleneck, one of {sorted(ACTIVATIONS)}; None takes the preset's "
            "(swish for houlsby, relu for pfeiffer)."
        },
    )
    scaling: float = field(
        default=1.0,
        metadata={"help": "Factor on the adapter's correction: out = h + scaling * up(act(down(h)))."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: up-projection zero (exact identity at init). False: N(0, 0.02) weights."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to wrap: names (exact or suffix match) or a regex (full match on the module name). "
            "None: the preset's placement for the model type; unknown model types must set it."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the adapters to train and save, e.g. ['classifier']."},
    )

    def __new__(cls, *args: Any, **kwargs: Any):
        # BottleneckConfig(preset="houlsby") is a HoulsbyConfig: the preset is the config's type, whichever way
        # it was built (directly, or by peft's loader, which calls the registered class with the saved fields).
        if cls is BottleneckConfig:
            cls = _PRESET_CLASSES.get(kwargs.get("preset", "pfeiffer"), cls)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK_PEFT_TYPE
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}.")
        expected = _CLASS_PRESETS.get(type(self))
        if expected is not None and self.preset != expected:
            raise ValueError(
                f"{type(self).__name__} has preset {expected!r}, got preset={self.preset!r}; use "
                f"BottleneckConfig(preset={self.preset!r}) or the {self.preset.capitalize()}Config class."
            )
        if self.non_linearity is None:
            self.non_linearity = DEFAULT_NON_LINEARITY[self.preset]
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}.")
        if not _is_number(self.reduction_factor) or not math.isfinite(self.reduction_factor):
            raise ValueError(f"reduction_factor must be a finite number, got {self.reduction_factor!r}.")
        if self.reduction_factor < 1:
            raise ValueError(
                f"reduction_factor must be >= 1 (e.g. 16), got {self.reduction_factor!r}: the bottleneck is "
                "hidden size / reduction_factor wide, so below 1 it is wider than the hidden state it compresses "
                f"(a 32-wide model would get {bottleneck_example(self.reduction_factor)}). For an explicit width, set "
                "bottleneck_size."
            )
        if self.bottleneck_size is not None and (
            not isinstance(self.bottleneck_size, int) or isinstance(self.bottleneck_size, bool)
        ):
            raise ValueError(f"bottleneck_size must be a positive int or None, got {self.bottleneck_size!r}.")
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {self.bottleneck_size}.")
        if not _is_number(self.scaling) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Houlsby bottleneck adapters: after the attention output and after the feed-forward output; swish.

    Same arguments as :class:`BottleneckConfig`, with ``preset="houlsby"``.

    Example:
        >>> config = HoulsbyConfig(reduction_factor=16, task_type="SEQ_CLS")
    """

    preset: str = field(default="houlsby", metadata={"help": "Always 'houlsby' for this class."})


@dataclass
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer bottleneck adapters: after the feed-forward output only; relu.

    Same arguments as :class:`BottleneckConfig`, with ``preset="pfeiffer"``.

    Example:
        >>> config = PfeifferConfig(reduction_factor=16, task_type="SEQ_CLS")
    """

    preset: str = field(default="pfeiffer", metadata={"help": "Always 'pfeiffer' for this class."})


_PRESET_CLASSES: dict[str, type[BottleneckConfig]] = {"houlsby": HoulsbyConfig, "pfeiffer": PfeifferConfig}
_CLASS_PRESETS: dict[type, str] = {cls: preset for preset, cls in _PRESET_CLASSES.items()}


def bottleneck_example(reduction_factor: float) -> str:
    """The width ``reduction_factor`` gives a 32-wide hidden state, for error messages."""
    return f"a {32 / reduction_factor:,.0f}-wide bottleneck" if reduction_factor > 0 else "no bottleneck at all"


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
