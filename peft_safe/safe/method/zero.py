"""Frozen units held still under DeepSpeed ZeRO (stages 1, 2 and 3, with or without optimizer offload).

ZeRO's optimizer steps flat fp32 partitions of every parameter it was built with. A unit whose ``requires_grad``
SAFE turns off gets zeros for gradients there, and Adam's moments and weight decay keep moving its weights: the
unit would be frozen only on paper. So when a unit freezes, :class:`ZeroHold` copies, for each of its parameters,
this rank's slice of the fp32 master weights and of every optimizer state (``exp_avg``, ``exp_avg_sq``), and after
every step of ZeRO's inner torch optimizer (a step post-hook, so before ZeRO copies the fp32 weights into the model's
own and gathers them) writes them back. That inner optimizer is found by what it steps: ZeRO-3's is the
parameter's ``_z3_optimizer.optimizer``; ZeRO-1/2's is the one whose parameters include the flat fp32 partition the
parameter's fragment views (``_hp_mapping.hp_fragment._base``), seen through torch's global step hook. The frozen
weights, their master copy and their optimizer state therefore do not change, bit for bit, at any step after the
freeze, whatever the learning rate, schedule or weight decay.
Their memory is not freed (ZeRO's flat buffers keep their slots); the backprop cut (:mod:`.truncation`) works as
without DeepSpeed, so the activation memory below the lowest trainable block is saved.

DeepSpeed's public accessors are used (``deepspeed.utils.safe_get_local_fp32_param`` and friends for ZeRO-3, the
``_hp_mapping`` fragments they read for ZeRO-1/2). ZeRO-3's accessors refuse a parameter that does not require
grad (DeepSpeed 0.19.8, ``stage3.py`` ``get_local_fp32_param``), so a frozen parameter requires grad for the length
of each call, and only then. Parameters outside DeepSpeed (no ``ds_id``, no ``_hp_mapping``) are left alone.

Imports: torch only; DeepSpeed is imported only once a parameter shows it is in use.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["ZeroHold", "is_zero_param", "requiring_grad"]


def is_zero_param(param: nn.Parameter) -> bool:
    """Whether a DeepSpeed ZeRO optimizer owns ``param`` (ZeRO-3 ``ds_id``, ZeRO-1/2 ``_hp_mapping``)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


@contextlib.contextmanager
def requiring_grad(param: nn.Parameter) -> Iterator[None]:
    """``param`` requires grad inside, as before after: what DeepSpeed's ZeRO-3 accessors need to read a frozen one."""
    before = param.requires_grad
    param.requires_grad_(True)
    try:
        yield
    finally:
        param.requires_grad_(before)


def _state_keys(inner: Any) -> list[str]:
    """The per-element optimizer states of ZeRO's inner torch optimizer (Adam: exp_avg, exp_avg_sq)."""
    keys = set()
    for state in getattr(inner, "state", {}).values():
        keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() > 1)
    return sorted(keys)


class _Slices:
    """How to read and write one parameter's local slices: ZeRO-3 through DeepSpeed's accessors, ZeRO-1/2 through
    the fragment views its ``_hp_mapping`` holds."""

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param
        self.z3 = hasattr(param, "ds_id")
        owner = getattr(param, "_z3_optimizer" if self.z3 else "_zero_optimizer", None)
        self.inner = getattr(owner, "optimizer", None)  # the torch optimizer that steps the flat partitions

    def stepped_by(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` steps this parameter's fp32 slice."""
        if self.z3 or self.inner is not None:
            return optimizer is self.inner
        flat = self.param._hp_mapping.hp_fragment._base
        return any(p is flat for group in optimizer.param_groups for p in group["params"])

    def state_keys(self) -> list[str]:
        """The optimizer states held per element (Adam: exp_avg, exp_avg_sq), once the optimizer has any."""
        if self.z3:
            return _state_keys(self.inner)
        return sorted(self.param._hp_mapping.optim_fragment or {})  # linked at ZeRO-1/2's first step

    def local(self) -> bool:
        return self.z3 or getattr(self.param, "_hp_mapping", None) is not None

    def read(self, key: str | None) -> torch.Tensor | None:
        if self.z3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            with requiring_grad(self.param):
                value = (safe_get_local_fp32_param(self.param) if key is None
                         else safe_get_local_optimizer_state(self.param, key))
            return None if value is None else value.detach().clone()
        mapping = self.param._hp_mapping
        if key is not None and (mapping.optim_fragment is None or key not in mapping.optim_fragment):
            return None
        return mapping.get_hp_fragment(key).detach().clone()

    def write(self, key: str | None, value: torch.Tensor) -> None:
        if self.z3:
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

            with requiring_grad(self.param):
                if key is None:
                    safe_set_local_fp32_param(self.param, value)
                else:
                    safe_set_local_optimizer_state(self.param, value, key)
            return
        self.param._hp_mapping.get_hp_fragment(key).data.copy_(value)


class ZeroHold:
    """The frozen parameters of a SAFE model that a ZeRO optimizer owns, held at their values when they froze."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[Any, dict[str | None, torch.Tensor]]] = {}  # id(param) -> (slices, values)
        self._owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> steps a held slice
        self._hook: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copy belongs to no ZeRO optimizer until it is built into one

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def __len__(self) -> int:
        return len(self._held)

    def hold_exactly(self, params: Iterable[nn.Parameter]) -> None:
        """Hold ``params`` (those a ZeRO optimizer owns): new ones at their values now; others are let go."""
        params = list(params)
        wanted = {id(param) for param in params}
        for key in [key for key in self._held if key not in wanted]:
            del self._held[key]  # thawed (restart_schedule, another freeze state loaded)
        for param in params:
            if id(param) in self._held or not is_zero_param(param):
                continue
            slices = _Slices(param)
            if not slices.local():
                continue  # ZeRO-1/2: another rank owns this parameter's slice and holds it; the gather brings it
            try:
                values = {None: slices.read(None)}
                for key in slices.state_keys():
                    value = slices.read(key)
                    if value is not None:
                        values[key] = value
            except (KeyError, AttributeError):
                continue  # frozen before the optimizer was built: it is not in it, and nothing moves it
            if values[None] is None:
                continue
            self._held[id(param)] = (slices, values)
        self._owners = weakref.WeakKeyDictionary()
        if self._held and self._hook is None:
            self._hook = register_optimizer_step_post_hook(_AfterStep(self))
        elif not self._held and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def restore(self) -> None:
        """Write every held slice back: the frozen parameters as they were when they froze."""
        for slices, values in self._held.values():
            for key, value in values.items():
                slices.write(key, value)

    def _after_step(self, optimizer: Any) -> None:
        owns = self._owners.get(optimizer)
        if owns is None:
            owns = self._owners[optimizer] = any(slices.stepped_by(optimizer) for slices, _ in self._held.values())
        if owns:
            self.restore()


class _AfterStep:
    """torch's global optimizer step post-hook, holding the :class:`ZeroHold` weakly."""

    def __init__(self, hold: ZeroHold) -> None:
        self._hold = weakref.ref(hold)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        hold = self._hold()
        if hold is not None:
            hold._after_step(optimizer)
