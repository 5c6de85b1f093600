"""The tuner as its helpers see it: :class:`TunerView`, the public members of a SAFE tuner that the parts it owns
(the driver, the prefix cache, the memory budget, the state-dict hooks) may use. They hold the tuner typed as this
``Protocol``, not as ``Any``, and reach nothing private of it (tests/test_architecture.py checks that no module but
the tuner's own reads a private member of it).

Imports torch, peft's config type and :mod:`.frozen_prefix`, :mod:`.units` and ``core.state`` for the types only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

if TYPE_CHECKING:
    import torch

    from ...core.state import FreezeState
    from .frozen_prefix import FrozenPrefix
    from .units import AdapterUnit

__all__ = ["CutView", "TunerView"]


class CutView(Protocol):
    """What the tuner's backprop cut (``savings.truncation.BackpropCut``) offers the prefix cache."""

    def feeds_no_gradient(self, hidden: torch.Tensor) -> bool: ...


class TunerView(Protocol):
    """What :class:`~peft_safe.SAFEModel` offers the parts it owns."""

    model: nn.Module  # the wrapped transformers model
    peft_config: dict[str, Any]  # adapter name -> SAFEConfig
    auto_driver: Any  # driver.AutoDriver
    prefix_cache: Any  # prefix_cache.PrefixCache

    @property
    def active_adapters(self) -> list[str]: ...

    @property
    def safe_adapter_name(self) -> str: ...

    @property
    def active_safe_adapter(self) -> str | None: ...

    @property
    def safe_config(self) -> Any: ...

    @property
    def freeze_state(self) -> FreezeState: ...

    @property
    def freeze_states(self) -> Mapping[str, FreezeState]: ...

    @property
    def backprop_cut(self) -> CutView: ...

    def units(self, adapter_name: str | None = None) -> list[AdapterUnit]: ...

    def frozen_prefix(self) -> FrozenPrefix | None: ...

    def apply_freeze_state(self, optimizer: torch.optim.Optimizer | None = None) -> None: ...

    def set_freeze_state(self, adapter_name: str, state: FreezeState) -> None: ...

    @property
    def adapter_units(self) -> list[str]: ...

    @property
    def frozen_units(self) -> list[str]: ...

    @property
    def importance(self) -> dict[str, float]: ...

    def threshold(self, t: float) -> float: ...

    def update_and_freeze(self, t: float, probe_batches: Any, optimizer: Any = None) -> list[str]: ...

    # nn.Module's, used by the state-dict hooks
    def get_extra_state(self) -> Any: ...

    def register_load_state_dict_pre_hook(self, hook: Any) -> Any: ...
