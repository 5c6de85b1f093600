"""Gradient checkpointing per block under a memory budget, paid for by freezing (``SAFEConfig.memory_budget``).

transformers checkpoints each block on its own: a ``GradientCheckpointingLayer`` reruns its forward in backward
when its ``gradient_checkpointing`` flag is set (``gradient_checkpointing_enable`` sets it on every block;
``every_n_layers`` on some). :class:`CheckpointBudget` sets those flags itself, before every training forward:

1. On the first training batch (and again on a batch with more tokens than any measured), it runs one extra
   forward that measures, block by block, what each block saves for backward and what it would keep when
   checkpointed (its input). Each block's graph is freed as soon as it has run, so the measurement itself holds
   one block's activations at a time. The RNG state is restored afterwards: dropout draws the same masks as it
   would without the measurement.
2. From those bytes (scaled to the batch's tokens) and the backprop cut it plans the fewest checkpointed blocks,
   lowest trainable first, that keep the step's saved activations within the budget (:mod:`..core.budget`).
   Frozen blocks below the cut record no graph and are never checkpointed; as the cut rises, the top blocks stop
   being checkpointed first.

A model that was checkpointed already (``gradient_checkpointing_enable``, ``prepare_model_for_kbit_training``)
keeps its checkpointing function (reentrant or not); otherwise torch's non-reentrant checkpoint is used. The
measured costs are saved with the freeze state, so a resumed run plans the same blocks.

Imports: torch, and of this package ``core.budget``, ``measure.memory`` and the ``safe`` sibling ``truncation``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...core.budget import BlockCosts, plan_checkpointing
from ..method.frozen_prefix import first_live_block, unit_block_lists
from ..method.hooks import add_hook
from ..method.tuner_view import TunerView
from .truncation import hidden_state_of, with_hidden_state

__all__ = ["CheckpointBudget", "check_one_block_list"]


def _tokens(args: tuple, kwargs: dict) -> int:
    """Input tokens of a forward call: ``input_ids`` (or ``inputs_embeds`` without its last dimension)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if isinstance(ids, torch.Tensor):
        return max(ids.numel(), 1)
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return max(embeds.numel() // embeds.shape[-1], 1)
    return 1


def check_one_block_list(safe: TunerView, field: str, fix: str) -> dict[str, Any]:
    """The model's one block list holding adapter units, by path; refused for two (T5, BART: no frozen prefix).

    Raises:
        ValueError: naming ``field`` and ``fix``.
    """
    lists = unit_block_lists(safe.model, safe.units())
    if len(lists) != 1:
        raise ValueError(
            f"{field} needs the adapter units in one block list (a decoder-only or encoder-only model); this "
            f"model's units lie in {len(lists)} ({sorted(lists)}), with no frozen prefix across them. Set {fix}."
        )
    return lists


class CheckpointBudget:
    """Keeps a SAFE model's training steps within ``memory_budget`` by checkpointing blocks (module doc).

    Created by :class:`~peft_safe.SAFEModel` when its config has a budget.

    Attributes:
        blocks: the transformer blocks, input side first.
        checkpointed: per block, whether it is checkpointed now.
        predicted_bytes: the planned step's predicted saved-activation peak (None before the first plan).
    """

    def __init__(self, safe: TunerView) -> None:
        lists = check_one_block_list(safe, "memory_budget", "memory_budget=None, or checkpoint it yourself with "
                                                            "gradient_checkpointing_enable()")
        (self.path, blocks), = lists.items()
        self.blocks = list(blocks)
        refused = [f"{self.path}.{i}" for i, b in enumerate(self.blocks) if not hasattr(b, "gradient_checkpointing")]
        if refused:
            raise ValueError(
                f"memory_budget checkpoints blocks through transformers' per-layer flag (GradientCheckpointingLayer), "
                f"which {refused[:3]} lack ({type(self.blocks[0]).__name__}). Set memory_budget=None for this model."
            )
        self._safe = safe
        self.checkpointed = [bool(getattr(b, "gradient_checkpointing", False)) for b in self.blocks]
        self.predicted_bytes: int | None = None
        self._measuring = False
        self._warned_for: tuple | None = None
        self._handle = add_hook("budget", safe.model, "pre", self._before_forward)  # after the driver's freeze

    def remove(self) -> None:
        """Stop planning; the blocks keep their current flags."""
        self._handle.remove()

    # ------------------------------------------------------------------ state
    @property
    def costs(self) -> BlockCosts | None:
        """The measured block costs (kept in the freeze state), or None before the first training batch."""
        data = self._safe.freeze_state.block_costs
        return None if data is None else BlockCosts.from_dict(data, blocks=len(self.blocks))

    def budget_bytes(self, costs: BlockCosts) -> int:
        """The budget in bytes, for a batch of ``costs.tokens`` tokens."""
        budget = self._safe.safe_config.memory_budget
        return budget if isinstance(budget, int) else int(budget * costs.unchecked_bytes)

    def first_live(self) -> int:
        """Index of the lowest block with a trainable parameter: the blocks below it record no graph. The frozen
        prefix's cut block where SAFE froze the bottom, read afresh at every forward: it holds without a prefix too
        (adapters on the upper blocks only)."""
        return first_live_block(self.blocks)

    # ------------------------------------------------------------------ planning
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._measuring or not module.training or not torch.is_grad_enabled():
            return
        tokens = _tokens(args, kwargs)
        costs = self.costs
        if costs is None or tokens > costs.tokens:
            costs = self.measure(module, args, kwargs, tokens)
        self.plan(costs.scaled(tokens) if tokens != costs.tokens else costs)

    def plan(self, costs: BlockCosts) -> list[bool]:
        """Set every block's checkpointing flag for a batch with ``costs``; returns the flags."""
        first_live = self.first_live()
        budget = self.budget_bytes(costs)
        checkpointed, peak = plan_checkpointing(costs, first_live, budget)
        self.predicted_bytes = peak
        if peak > budget and self._warned_for != (first_live, costs.tokens):
            self._warned_for = (first_live, costs.tokens)
            warnings.warn(
                f"memory_budget: {budget} bytes cannot be met for a batch of {costs.tokens} tokens even with every "
                f"trainable block checkpointed (predicted {peak} bytes); raise the budget or lower the batch size.",
                RuntimeWarning, stacklevel=3,
            )
        for block, on in zip(self.blocks, checkpointed):
            if on and getattr(block, "_gradient_checkpointing_func", None) is None:
                block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            block.gradient_checkpointing = on
        self.checkpointed = checkpointed
        return checkpointed

    # ------------------------------------------------------------------ measuring
    def measure(self, module: nn.Module, args: tuple, kwargs: dict, tokens: int) -> BlockCosts:
        """Run one forward that measures each block's saved and kept bytes; store and return the costs."""
        from ...measure.memory import SavedTensorMeter  # here: ``import peft_safe`` loads no measurement code

        saved, kept = [0] * len(self.blocks), [0] * len(self.blocks)
        before: dict[int, int] = {}
        meter = SavedTensorMeter(exclude=module)

        def enter(index: int, block: nn.Module, b_args: tuple, b_kwargs: dict) -> tuple[tuple, dict] | None:
            found = hidden_state_of(b_args, b_kwargs)
            if found is None:
                return None
            where, hidden = found
            kept[index] = hidden.numel() * hidden.element_size()
            before[index] = meter.activation_bytes
            # A fresh leaf, so the graph of the block below is freed. Above the first block the input requires grad,
            # as it does in training below a trainable block; the first keeps what it was given.
            leaf = hidden.detach().requires_grad_(hidden.requires_grad or index > 0)
            return with_hidden_state(b_args, b_kwargs, where, leaf)

        def leave(index: int, block: nn.Module, b_args: Any, b_kwargs: Any, output: Any) -> Any:
            saved[index] = meter.activation_bytes - before.get(index, meter.activation_bytes)
            # the block's graph is freed now: the measurement holds one block's activations at a time
            if isinstance(output, torch.Tensor):
                return output.detach().requires_grad_(True)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (output[0].detach().requires_grad_(True), *output[1:])
            return None

        handles = []
        flags = [bool(getattr(b, "gradient_checkpointing", False)) for b in self.blocks]
        devices = [d for d in {p.device for p in module.parameters()} if d.type == "cuda"]
        self._measuring = True
        try:
            for i, block in enumerate(self.blocks):
                block.gradient_checkpointing = False  # measure what the block saves when it is not checkpointed
                handles.append(block.register_forward_pre_hook(functools.partial(enter, i), with_kwargs=True))
                handles.append(block.register_forward_hook(functools.partial(leave, i), with_kwargs=True))
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), meter:
                module(*args, **kwargs)
        finally:
            self._measuring = False
            for handle in handles:
                handle.remove()
            for block, flag in zip(self.blocks, flags):
                block.gradient_checkpointing = flag
        outside = max(meter.activation_bytes - sum(saved), 0)
        costs = BlockCosts(tokens, saved, kept, outside)
        self._safe.freeze_state.block_costs = costs.to_dict()
        return costs
