"""Every forward hook SAFE keeps on a module, installed and removed in one place and run in one documented order.

Four parts of a SAFE tuner hook the same modules, and the order they run in matters:

======================  =========================================================================================
owner (:data:`ORDER`)   what it hooks, and why it runs where it does
======================  =========================================================================================
``driver``              the tuner and the model it wraps (before each forward): the automatic schedule scores and
                        freezes at the training forward after a step that ends an interval, so it runs first and
                        every part after it sees the cut that freeze moved (:mod:`.driver`)
``prefix_cache``        the tuner and the model (around each forward), the first block (its input and output) and
                        the cut block (its input): it serves the frozen blocks' cached output to the cut block, so
                        it runs before the backprop cut there, which then sees the states served (:mod:`.prefix_cache`)
``backprop_cut``        the first block and the cut block (their inputs) and the input embeddings (their output):
                        the input below the frozen prefix is detached, the cut block's given a gradient again where
                        a reentrant checkpoint needs one (:mod:`.truncation`)
``budget``              the model (before each forward): plans which blocks to checkpoint from the first live block,
                        after the driver's freeze (:mod:`.budget`)
======================  =========================================================================================

Each (module, kind) gets one torch hook (a slot) through :func:`add_hook`, which calls the owners' callbacks in
:data:`ORDER`; removing an owner's last callback from a slot removes the torch hook. Kinds: ``"pre"``
(``fn(module, args, kwargs)``, may return new ``(args, kwargs)``), ``"post"`` (``fn(module, args, output)``, may
return a new output) and ``"post_always"`` (the same, run even when the forward raised).

Hooks that live within one call are installed and removed by their owner inside it and are not kept here: the
scoring's probe pass (:mod:`.scoring`), the budget's measuring forward, and the prefix cache's recorder of the
modules that run before the first block during one forward.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["KINDS", "ORDER", "add_hook", "callbacks", "owners"]

#: The owners, in the order their callbacks run on any one module.
ORDER = ("driver", "prefix_cache", "backprop_cut", "budget")

#: The hook kinds: a forward pre-hook (with kwargs), a forward hook, a forward hook run even when the forward raised.
KINDS = ("pre", "post", "post_always")


class _Slot:
    """The one torch hook of a (module, kind): calls its callbacks in :data:`ORDER`, threading what they return.

    It keeps its module and its key in the module's hook dicts, not a torch handle: a deep copy of the module copies
    the slot with it, and the copy's slot then removes itself from the copy (a copied handle would still point to
    the original's dicts).
    """

    def __init__(self, module: nn.Module, kind: str) -> None:
        self.module, self.kind = module, kind
        self.callbacks: list[tuple[str, Callable[..., Any]]] = []
        if kind == "pre":
            self.key = module.register_forward_pre_hook(self, with_kwargs=True).id
        else:
            self.key = module.register_forward_hook(self, always_call=kind == "post_always").id

    def __call__(self, module: nn.Module, args: tuple, *rest: Any) -> Any:
        if self.kind == "pre":
            (kwargs,) = rest
            changed = False
            for _, fn in list(self.callbacks):
                result = fn(module, args, kwargs)
                if result is not None:
                    args, kwargs = result
                    changed = True
            return (args, kwargs) if changed else None
        (output,) = rest
        changed = False
        for _, fn in list(self.callbacks):
            result = fn(module, args, output)
            if result is not None:
                output, changed = result, True
        return output if changed else None

    def detach(self) -> None:
        """Take this slot's torch hook off its module."""
        module = self.module
        for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(module, name, {}).pop(self.key, None)


class _Handle:
    """Removes one callback from its slot (and the slot's torch hook with its last callback)."""

    def __init__(self, slot: _Slot, entry: tuple[str, Callable[..., Any]]) -> None:
        self._slot, self._entry = slot, entry

    def remove(self) -> None:
        slot, self._slot = self._slot, None
        if slot is None:
            return
        if self._entry in slot.callbacks:
            slot.callbacks.remove(self._entry)
        if not slot.callbacks:
            slot.detach()


def _slot_of(module: nn.Module, kind: str) -> _Slot | None:
    hooks = module._forward_pre_hooks if kind == "pre" else module._forward_hooks
    return next((h for h in hooks.values() if isinstance(h, _Slot) and h.kind == kind), None)


def add_hook(owner: str, module: nn.Module, kind: str, fn: Callable[..., Any]) -> _Handle:
    """Run ``fn`` as ``owner``'s ``kind`` hook on ``module``, at ``owner``'s place in :data:`ORDER`.

    Returns:
        A handle whose ``remove()`` takes ``fn`` off again.

    Raises:
        ValueError: for an owner not in :data:`ORDER` or a kind not in :data:`KINDS`.
    """
    if owner not in ORDER:
        raise ValueError(f"unknown hook owner {owner!r}; add it to ORDER ({ORDER}) at the place it must run.")
    if kind not in KINDS:
        raise ValueError(f"unknown hook kind {kind!r}; choose one of {KINDS}.")
    slot = _slot_of(module, kind) or _Slot(module, kind)
    entry = (owner, fn)
    slot.callbacks.append(entry)
    slot.callbacks.sort(key=lambda e: ORDER.index(e[0]))  # stable: one owner's callbacks keep their order
    return _Handle(slot, entry)


def callbacks(module: nn.Module, kind: str) -> list[tuple[str, Callable[..., Any]]]:
    """``(owner, fn)`` of every ``kind`` callback on ``module``, in the order they run."""
    slot = _slot_of(module, kind)
    return [] if slot is None else list(slot.callbacks)


def owners(module: nn.Module, kind: str) -> list[str]:
    """The owners whose ``kind`` callbacks run on ``module``, in the order they run."""
    return [owner for owner, _ in callbacks(module, kind)]
