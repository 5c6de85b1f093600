"""AdaLoRA's rank allocation over the trainable units only, once SAFE has frozen some.

AdaLoRA's ``RankAllocator`` reads a model's ``named_parameters()`` to update sensitivities and allocate a
global rank budget on its own cubic schedule. Frozen units have no gradients and must not change, so while some
are frozen the allocator is handed a *view* of the model that lists only the trainable parameters, and a budget
set for those alone; the frozen units' statistics are dropped and their ``rank_pattern`` entries keep every rank
they were allowed or still use, so saving and loading (which cut ranks by the pattern) leave them exactly as
they are. While no unit is frozen AdaLoRA's own ``update_and_allocate`` runs unchanged (the caller's job).

This module reaches into AdaLoRA's allocator (``_set_budget_scheduler``, ``init_bgt``, ``name_set``): peft 0.21's
layout, pinned in pyproject.toml, and tested against AdaLoRA's own allocation in tests/safe/test_safe_adalora.py.

Imports: peft's AdaLoRA allocator (through the model), torch.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import nn

from .units import AdapterUnit, unit_parameters

__all__ = ["allocate_trainable_ranks"]


def allocate_trainable_ranks(
    model: nn.Module, allocator: Any, config: Any, frozen_units: list[AdapterUnit], adapter_name: str, global_step: int
) -> None:
    """One step of AdaLoRA's rank allocation over the parameters outside ``frozen_units``.

    Args:
        model: the model holding the AdaLoRA layers (``SAFEModel.model``).
        allocator: the tuner's ``RankAllocator``.
        config: the wrapped ``AdaLoraConfig``; its ``rank_pattern`` is updated as AdaLoRA's is.
        frozen_units: the units SAFE has frozen, at least one.
        adapter_name: the AdaLoRA adapter being trained.
        global_step: the current optimizer step, counted from 0.
    """
    frozen_ids = {id(p) for unit in frozen_units for p in unit_parameters(unit, adapter_name)}
    trainable = []
    for name, param in model.named_parameters():
        if id(param) not in frozen_ids:
            trainable.append((name, param))
            continue
        for stats in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc):
            stats.pop(name, None)
    view = SimpleNamespace(named_parameters=lambda: iter(trainable))  # all the allocator reads of a model
    final_step = config.total_step - config.tfinal
    budget = (allocator.init_bgt, allocator.target_bgt, allocator.name_set)
    allocator._set_budget_scheduler(view)  # the budget of the trainable units alone
    try:
        if not allocator.name_set:
            return  # every unit frozen: nothing left to allocate
        if global_step <= final_step:
            _, pattern = allocator.update_and_allocate(view, global_step, force_mask=global_step == final_step)
            if pattern:
                config.rank_pattern = {**_frozen_rank_pattern(model, config, frozen_units, adapter_name), **pattern}
            if global_step == final_step:
                allocator.reset_ipt()
        elif config.rank_pattern:
            allocator.mask_using_rank_pattern(view, config.rank_pattern)
    finally:
        allocator.init_bgt, allocator.target_bgt, allocator.name_set = budget


def _frozen_rank_pattern(
    model: nn.Module, config: Any, frozen_units: list[AdapterUnit], adapter_name: str
) -> dict[str, list[bool]]:
    """``rank_pattern`` entries of frozen AdaLoRA units: the ranks their pattern allowed, or still in use."""
    previous = config.rank_pattern or {}
    names = {id(p): n for n, p in model.named_parameters()}
    pattern = {}
    for unit in frozen_units:
        for layer in unit.layers:
            singular_values = layer.lora_E[adapter_name]
            name = names[id(singular_values)]
            # a saved checkpoint's pattern is keyed without the adapter name
            allowed = previous.get(name, previous.get(name.replace(f".{adapter_name}", "")))
            in_use = (singular_values.detach() != 0).view(-1).tolist()
            if allowed is None or len(allowed) != len(in_use):  # never masked, or already cut to its ranks
                pattern[name] = [True] * len(in_use)
            else:
                pattern[name] = [bool(a) or b for a, b in zip(allowed, in_use)]
    return pattern
