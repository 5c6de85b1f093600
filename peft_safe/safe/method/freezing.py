"""What keeps frozen units frozen: the freeze state applied to ``requires_grad``, and peft's setters overridden.

peft turns ``requires_grad`` back on in several places (``set_adapter``, ``enable_adapter_layers``,
``set_requires_grad``, marking adapters trainable on injection); each is overridden here to re-apply the freeze
state afterwards, and the backprop cut (:mod:`.truncation`) follows the frozen set. :class:`FrozenUnitsMixin` is
a base of :class:`~peft_safe.safe.model.SAFEModel`, before the wrapped tuner in the method order, so ``super()``
reaches the wrapped tuner's own methods.

Imports: torch, and of this package ``core.state`` and the ``safe`` siblings ``optimizer`` and ``units``.
Under DeepSpeed ZeRO the frozen parameters are also held still (:mod:`.zero`), through the tuner's ``_zero_hold``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ...core.state import FreezeState
from .frozen_prefix import FrozenPrefix, locate_frozen_prefix
from .optimizer import drop_from_optimizer
from .units import AdapterUnit, find_adapter_units, unit_parameters

__all__ = ["FrozenUnitsMixin", "check_something_trains", "drop_package_hooks"]


def check_something_trains(model: nn.Module, leaving: list[nn.Parameter]) -> None:
    """Refuse to freeze ``leaving`` when they are the last parameters of ``model`` that train.

    Raises:
        ValueError: saying why (the next backward would fail) and what to do instead.
    """
    ids = {id(param) for param in leaving}
    trainable = [param for param in model.parameters() if param.requires_grad]
    if trainable and all(id(param) in ids for param in trainable):
        raise ValueError(
            "freezing these units would leave no parameter of the model trainable, and the next backward would "
            "fail with 'element 0 of tensors does not require grad'. Keep at least one unit trainable (SAFE's "
            "schedule always does), or end training instead of freezing the rest. Nothing was frozen."
        )


def drop_package_hooks(model: nn.Module) -> None:
    """Remove every forward hook this package put on ``model`` or its submodules (driver, cache, budget, cut)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                owner = getattr(hook, "__self__", None) or getattr(getattr(hook, "func", None), "__self__", None)
                origin = type(owner).__module__ if owner is not None else getattr(hook, "__module__", "") or ""
                if origin.startswith("peft_safe."):
                    del hooks[key]
                    for flags in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                                  module._forward_hooks_always_called):
                        flags.pop(key, None)


class FrozenUnitsMixin:
    """The part of the SAFE tuner that applies the freeze state (mixed into :class:`SAFEModel`)."""

    _freeze_states: dict[str, FreezeState]
    _backprop_cut: Any
    _frozen_prefix_at: tuple[Any, FrozenPrefix | None]  # (the freeze state it was located under, the prefix)
    _zero_hold: Any  # zero.ZeroHold: frozen parameters a DeepSpeed ZeRO optimizer owns, held still
    _units_memo: dict[str, list[AdapterUnit]] | None = None  # while _units_found_once: adapter -> its units
    auto_driver: Any  # driver.AutoDriver

    def _units(self, adapter_name: str | None = None) -> list[AdapterUnit]:
        adapter_name = adapter_name or self.safe_adapter_name
        memo = self._units_memo
        if memo is not None and adapter_name in memo:
            return memo[adapter_name]
        units = find_adapter_units(self.model, adapter_name, self.peft_config[adapter_name].blocks_path)
        if memo is not None:
            memo[adapter_name] = units
        return units

    @contextlib.contextmanager
    def _units_found_once(self) -> Iterator[None]:
        """Within: each adapter's units are found once (a walk of the whole model) and reused; for a call that
        changes no adapter layer, such as one scoring and freezing. Nested uses share the outer one's."""
        if self._units_memo is not None:
            yield
            return
        self._units_memo = {}
        try:
            yield
        finally:
            self._units_memo = None

    def _replace_freeze_state(self, adapter_name: str, state: FreezeState) -> None:
        # Units the old state froze that the new one trains become trainable again (unless the adapter is
        # loaded for inference, where nothing trains).
        previous = self._freeze_states.get(adapter_name)
        self._freeze_states[adapter_name] = state
        if previous is not None and not getattr(self.peft_config.get(adapter_name), "inference_mode", True):
            for unit in self._units(adapter_name):
                if unit.name in previous.frozen and unit.name not in state.frozen:
                    for param in unit_parameters(unit, adapter_name):
                        param.requires_grad_(True)
        self._apply_freeze_state()

    def _apply_freeze_state(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        frozen_params = []
        for adapter_name, state in self._freeze_states.items():
            if not state.frozen:
                continue
            for unit in self._units(adapter_name):
                if unit.name in state.frozen:
                    frozen_params.extend(unit_parameters(unit, adapter_name))
        for param in frozen_params:
            param.requires_grad_(False)
            param.grad = None
        self._zero_hold.hold_exactly(frozen_params)  # under ZeRO, requires_grad alone would not stop its updates
        if optimizer is not None and frozen_params:
            drop_from_optimizer(optimizer, frozen_params)
        self._update_backprop_cut()

    def _update_backprop_cut(self) -> None:
        # Backprop stops at the lowest trainable block even when an input-require-grads hook (k-bit preparation,
        # gradient checkpointing) keeps the chain below alive; see truncation.py. The freeze state was just applied:
        # the prefix is located afresh.
        self._frozen_prefix_at = (None, None)
        self._backprop_cut.update(self.frozen_prefix())

    def frozen_prefix(self) -> FrozenPrefix | None:
        """The frozen bottom of the model under the active adapter's freeze state (:mod:`.frozen_prefix`): the cut
        block and the blocks below it, which the backprop cut and the prefix cache read. Located
        again when the frozen set changes, when the freeze state is applied, and when a block below the cut was
        made trainable by hand; ``None`` when nothing SAFE froze lies below a trainable block.
        """
        adapter = self.active_safe_adapter
        state = self._freeze_states.get(adapter) if adapter is not None else None
        if state is None or not state.frozen:
            return None
        key = (adapter, id(state), frozenset(state.frozen))
        at, prefix = getattr(self, "_frozen_prefix_at", (None, None))
        if at != key or (prefix is not None and prefix.thawed()):
            prefix = locate_frozen_prefix(self.model, self._units(), state.frozen)
            self._frozen_prefix_at = (key, prefix)
        return prefix

    # ------------------------------------------------------------------ the parts' view (tuner_view.TunerView)
    @property
    def active_safe_adapter(self) -> str | None:
        """The active adapter's name while it is one of this tuner's; ``None`` when no adapter is active or the
        active one was deleted. Every part asks this before it acts (``safe_adapter_name`` raises instead)."""
        active = self.active_adapters
        return active[0] if active and active[0] in self.peft_config else None

    def units(self, adapter_name: str | None = None) -> list[AdapterUnit]:
        """The adapter units of ``adapter_name`` (default: the active SAFE adapter), input side first: each with its
        block module and adapted layers."""
        return self._units(adapter_name)

    @property
    def freeze_states(self) -> Mapping[str, FreezeState]:
        """Every adapter's :class:`FreezeState`, read-only (``freeze_state`` is the active adapter's)."""
        return MappingProxyType(self._freeze_states)

    def set_freeze_state(self, adapter_name: str, state: FreezeState) -> None:
        """Replace an adapter's freeze state (a loaded checkpoint's) and apply it: units it does not freeze that the
        old one did train again, unless the adapter is loaded for inference."""
        self._replace_freeze_state(adapter_name, state)

    def apply_freeze_state(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply the freeze states again: ``requires_grad`` off on every frozen unit, and their state dropped from
        ``optimizer`` (one built before the last freeze)."""
        self._apply_freeze_state(optimizer)

    @property
    def backprop_cut(self) -> Any:
        """The tuner's backprop cut, a :class:`~peft_safe.safe.savings.truncation.BackpropCut`."""
        return self._backprop_cut

    @property
    def backprop_cut_block(self) -> str | None:
        """The block whose input SAFE detaches so that backprop stops there; ``None`` when there is no cut."""
        return self._backprop_cut.block_name

    @contextlib.contextmanager
    def without_backprop_cut(self) -> Iterator[None]:
        """Run the model without SAFE's backprop cut, to measure what the cut saves (docs/qlora.md).

        Inside, backprop below the lowest trainable block runs as it would without SAFE (an input-require-grads
        hook keeps the frozen blocks on the backward path); the cut returns on exit, under the freeze state then.

        Example:
            >>> with safe.without_backprop_cut():
            ...     loss = model(**batch).loss; loss.backward()   # the frozen bottom blocks are backpropagated
        """
        self._backprop_cut.remove()
        try:
            yield
        finally:
            self._update_backprop_cut()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._apply_freeze_state()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._apply_freeze_state()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._apply_freeze_state()

    def enable_adapter_layers(self) -> None:
        super().enable_adapter_layers()
        self._apply_freeze_state()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._apply_freeze_state()

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        # merge_and_unload / unload hand the base model back: nothing of SAFE may stay on it (issue 21.16: a
        # pickled merged model failed in the prefix cache's hooks).
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self.auto_driver.stand_down("the adapters were unloaded")
        self._backprop_cut.remove()
        self._zero_hold.hold_exactly([])
        drop_package_hooks(model)
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._freeze_states.pop(adapter_name, None)
        self._apply_freeze_state()  # the cut (and what ZeRO holds) follow the adapters left

