"""Which blocks to checkpoint so that a training step's activations fit a memory budget.

A training step holds, at its largest, the tensors every block saved for backward, plus those saved outside
the blocks (the head and the loss). Checkpointing a block replaces what it saves by its input, kept until
backward recomputes the block, and adds one recompute: while a checkpointed block is backpropagated its saved
tensors exist again. Blocks below the backprop cut record no graph at all and cost nothing.

The plan checkpoints the lowest live blocks first and stops checkpointing as soon as the rest fits, so freezing
(which moves the cut up) gives back speed before anything else: the top blocks are the first to run without
checkpointing again. Backward runs top down, so by the time the highest checkpointed block is recomputed every
block above it has been backpropagated and freed:

    peak = max(outside + sum(kept of checkpointed) + sum(saved of the others),
               max over checkpointed i of (kept of checkpointed blocks up to i) + saved of i)

Pure: imports only the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BlockCosts", "check_memory_budget", "plan_checkpointing", "predicted_peak"]


@dataclass
class BlockCosts:
    """What the blocks of one model save for backward, measured on one batch.

    Attributes:
        tokens: input tokens (batch x sequence) of the measured batch; the bytes scale with it.
        saved: per block, input side first: bytes it saves for backward when it is not checkpointed.
        kept: per block: bytes it keeps when checkpointed (its hidden-state input).
        outside: bytes saved for backward outside the blocks (head, loss).
    """

    tokens: int
    saved: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    outside: int = 0

    @property
    def unchecked_bytes(self) -> int:
        """Saved-activation bytes of a step without checkpointing and nothing frozen."""
        return self.outside + sum(self.saved)

    def scaled(self, tokens: int) -> BlockCosts:
        """The costs for a batch of ``tokens`` tokens, assuming bytes proportional to tokens (rounded up)."""
        factor = tokens / self.tokens
        def scale(values: list[int]) -> list[int]:
            return [math.ceil(b * factor) for b in values]

        return BlockCosts(tokens, scale(self.saved), scale(self.kept), math.ceil(self.outside * factor))

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "saved": list(self.saved), "kept": list(self.kept), "outside": self.outside}

    @classmethod
    def from_dict(cls, data: Any, blocks: int | None = None) -> BlockCosts:
        """Rebuild saved costs, checking them.

        Raises:
            ValueError: if the data is malformed, or holds another number of blocks than ``blocks``.
        """
        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        lists = all(isinstance(data.get(k), list) and all(count(v) for v in data[k]) for k in ("saved", "kept")) \
            if isinstance(data, dict) else False
        ok = (lists and count(data.get("tokens")) and data["tokens"] > 0 and count(data.get("outside"))
              and len(data["saved"]) == len(data["kept"]))
        if not ok:
            raise ValueError(f"SAFE block costs must be {{'tokens': n > 0, 'saved': [bytes], 'kept': [bytes], "
                             f"'outside': bytes}} with one entry per block, got {data!r}; the checkpoint is "
                             "corrupt.")
        if blocks is not None and len(data["saved"]) != blocks:
            raise ValueError(f"SAFE block costs were measured on {len(data['saved'])} blocks; this model has "
                             f"{blocks}: the checkpoint belongs to another model.")
        return cls(data["tokens"], list(data["saved"]), list(data["kept"]), data["outside"])


def check_memory_budget(value: Any) -> int | float | None:
    """A valid ``memory_budget``: None (off), a fraction in (0, 1] or a positive number of bytes (an int).

    Raises:
        ValueError: for a fraction outside (0, 1], a byte count < 1, or anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"memory_budget must be None, a fraction in (0, 1] of the step's activations without "
                         f"checkpointing, or a number of bytes (an int), got {value!r}.")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"memory_budget={value!r} bytes leaves nothing; give at least 1 byte, or a fraction "
                             "such as 0.4.")
        return value
    if not 0.0 < value <= 1.0:
        if value <= 0.0:  # no budget is negative or zero: the advice is a fraction, or None for no budget
            raise ValueError(f"memory_budget={value!r}: a budget must be positive; give a fraction in (0, 1] of the "
                             "step's activations without checkpointing (such as 0.4), a number of bytes (an int), or "
                             "None for no budget.")
        raise ValueError(f"memory_budget={value!r}: a fraction must lie in (0, 1]; give bytes as an int "
                         f"(memory_budget={int(value)}) or a fraction such as 0.4.")
    return float(value)


def predicted_peak(costs: BlockCosts, first_live: int, checkpointed: Sequence[bool]) -> int:
    """Saved-activation peak of a step whose blocks from ``first_live`` on record a graph (see module doc).

    Exact when the checkpointed blocks are a bottom run of the live ones (what :func:`plan_checkpointing`
    makes); a checkpointed block above an unchecked one is recomputed while the latter's tensors are still held,
    which the formula does not count.
    """
    live = range(first_live, len(costs.saved))
    kept = sum(costs.kept[i] for i in live if checkpointed[i])
    end_of_forward = costs.outside + kept + sum(costs.saved[i] for i in live if not checkpointed[i])
    peak, below = end_of_forward, 0
    # recomputing checkpointed block i: the inputs kept up to it and its own saved tensors (the head's were freed
    # by its backward, the unchecked blocks' above by theirs)
    for i in live:
        if checkpointed[i]:
            below += costs.kept[i]
            peak = max(peak, below + costs.saved[i])
    return peak


def plan_checkpointing(costs: BlockCosts, first_live: int, budget: int) -> tuple[list[bool], int]:
    """Checkpoint the fewest live blocks, lowest first, that bring the predicted peak within ``budget`` bytes.

    Args:
        costs: the measured block costs (for the batch size planned for).
        first_live: index of the lowest block that records a graph (the backprop cut; 0 when nothing is cut).
        budget: bytes the saved activations may take at once.

    Returns:
        ``(checkpointed, peak)``: per block whether to checkpoint it, and the predicted peak. When even
        checkpointing every live block exceeds the budget, every live block is checkpointed and the returned
        peak is over ``budget``: the caller tells the user.
    """
    blocks = len(costs.saved)
    first_live = min(max(first_live, 0), blocks)
    checkpointed = [False] * blocks
    peak = predicted_peak(costs, first_live, checkpointed)
    for i in range(first_live, blocks):
        if peak <= budget:
            break
        checkpointed[i] = True
        peak = predicted_peak(costs, first_live, checkpointed)
    return checkpointed, peak
