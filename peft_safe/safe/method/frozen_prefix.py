"""The frozen bottom of the model under the active freeze state: one object, :class:`FrozenPrefix`, that says where
the cut is (the block list, the cut block, the blocks below it), kept by the tuner (``SAFEModel.frozen_prefix()``).

The backprop cut (:mod:`.truncation`) and the prefix cache (:mod:`.prefix_cache`) read it instead of working it out.
The cut block is the lowest block holding a trainable parameter (:func:`first_live_block`, the one rule, which the
memory budget (:mod:`.budget`) plans from too, with or without a frozen prefix), and there is a frozen prefix only
when SAFE froze a unit below it, the units lying in one block list.

Imports torch and :mod:`.units` only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .units import AdapterUnit

__all__ = ["FrozenPrefix", "first_live_block", "has_trainable", "locate_frozen_prefix", "unit_block_lists"]


@dataclass(frozen=True, eq=False)
class FrozenPrefix:
    """Where the model is cut under one freeze state.

    Attributes:
        model: the model holding the blocks (``SAFEModel.model``).
        path: the block list's path in ``model``.
        blocks: the block list (an ``nn.ModuleList`` or ``nn.Sequential``).
        cut: the index of the cut block, the lowest holding a trainable parameter (>= 1).
        frozen: the frozen units it was located under.
    """

    model: nn.Module
    path: str
    blocks: nn.Module
    cut: int
    frozen: frozenset[str]

    @property
    def name(self) -> str:
        """The cut block's name, ``model.layers.3``."""
        return f"{self.path}.{self.cut}"

    @property
    def below(self) -> tuple[nn.Module, ...]:
        """The blocks below the cut, input side first: no trainable parameter, no graph recorded."""
        return tuple(self.blocks[i] for i in range(self.cut))

    @property
    def live(self) -> tuple[nn.Module, ...]:
        """The blocks from the cut block up: those backprop runs through."""
        return tuple(self.blocks[i] for i in range(self.cut, len(self.blocks)))

    def thawed(self) -> bool:
        """Whether a block below the cut holds a trainable parameter now (set by hand since): locate it again."""
        return any(has_trainable(block) for block in self.below)


def unit_block_lists(model: nn.Module, units: Iterable[AdapterUnit]) -> dict[str, nn.Module]:
    """The block lists (``nn.ModuleList`` / ``nn.Sequential``) that hold whole units, by their path."""
    lists = {}
    for unit in units:
        parent, _, index = unit.name.rpartition(".")
        if not parent or not index.isdigit():
            continue
        try:
            container = model.get_submodule(parent)
        except AttributeError:
            continue
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and container[int(index)] is unit.module:
            lists[parent] = container
    return lists


def has_trainable(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` requires grad (the blocks below the cut have none)."""
    return any(param.requires_grad for param in module.parameters())


def first_live_block(blocks: nn.Module) -> int:
    """Index of the lowest block holding a trainable parameter (``len(blocks)`` when none does): the blocks below it
    record no graph. The cut block of a :class:`FrozenPrefix`, and what the memory budget plans from."""
    return next((i for i, block in enumerate(blocks) if has_trainable(block)), len(blocks))


def locate_frozen_prefix(model: nn.Module, units: list[AdapterUnit], frozen: Iterable[str]) -> FrozenPrefix | None:
    """The :class:`FrozenPrefix` of ``model`` under ``frozen``: where backprop can stop.

    Args:
        model: the model holding the units.
        units: the adapter units, input side first.
        frozen: names of the frozen units.

    Returns:
        The prefix, or ``None`` when there is nothing to cut: no unit is frozen, no frozen unit lies below the
        lowest trainable block, the units are not in one block list, or no block holds a trainable parameter.
    """
    frozen = frozenset(frozen)
    if not frozen:
        return None
    lists = unit_block_lists(model, units)
    if len(lists) != 1:
        return None
    (path, blocks), = lists.items()
    cut = first_live_block(blocks)
    if cut in (0, len(blocks)):
        return None
    below = {f"{path}.{i}" for i in range(cut)}
    if not any(unit.name in below and unit.name in frozen for unit in units):
        return None  # nothing SAFE froze lies below: leave the model as it was
    return FrozenPrefix(model, path, blocks, cut, frozen)
