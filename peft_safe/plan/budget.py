"""SAFE under a memory budget in the plan: the blocks checkpointing needs at each frozen depth, and the largest batch.

For a GPU of ``memory`` bytes it plans plain LoRA (QLoRA), LoRA with every block checkpointed, and SAFE under
``SAFEConfig(memory_budget=...)`` at several frozen depths: the budget for activations is what the GPU leaves
after weights, adapters, gradients and optimizer state, and the blocks to checkpoint are chosen exactly as SAFE
chooses them (:func:`peft_safe.core.budget.plan_checkpointing`), from per-block costs planned by the formulas of
:mod:`.formulas` (the bytes SAFE measures on its first batch; ``tests/plan`` checks the two agree).

The largest batch each setting fits: SAFE's warm-up trains every block, so under a budget it fits the batch that
full checkpointing fits (its peak is never lower); what the budget buys is speed: fewer blocks recomputed, and
none once enough are frozen.

Imports: the standard library, :mod:`peft_safe.core.budget`, :mod:`.shapes` and :mod:`.formulas`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.budget import BlockCosts, plan_checkpointing
from .formulas import MemoryRow, block_costs, plan_memory
from .shapes import ModelShape, PlanSettings

__all__ = ["BudgetRow", "budget_json", "format_budget", "largest_batch", "plan_budget"]


@dataclass
class BudgetRow:
    """One setting on a GPU of a given size.

    Attributes:
        setting: ``"LoRA"``, ``"LoRA + checkpointing"`` or ``"SAFE k=<frozen>"`` (under the budget).
        frozen_blocks: bottom blocks frozen (0 for the LoRA rows).
        checkpointed_blocks: blocks checkpointed (all for the checkpointing row; the plan's choice for SAFE).
        activation_bytes: the planned activation peak, recompute included.
        total_bytes: weights, adapters, gradients, optimizer state and the activation peak.
        fits: whether ``total_bytes`` is within the GPU's memory.
    """

    setting: str
    frozen_blocks: int
    checkpointed_blocks: int
    activation_bytes: int
    total_bytes: int
    fits: bool


def _fixed_bytes(row: MemoryRow) -> int:
    return row.weight_bytes + row.adapter_bytes + row.gradient_bytes + row.optimizer_bytes


def _safe_row(shape: ModelShape, settings: PlanSettings, costs: BlockCosts, row: MemoryRow, memory: int) -> BudgetRow:
    budget = memory - _fixed_bytes(row)
    checkpointed, peak = plan_checkpointing(costs, row.frozen_blocks, max(budget, 0))
    total = _fixed_bytes(row) + peak
    return BudgetRow(f"SAFE k={row.frozen_blocks}", row.frozen_blocks, sum(checkpointed), peak, total, total <= memory)


def plan_budget(shape: ModelShape, settings: PlanSettings, memory: int, frozen: list[int] | None = None
                ) -> list[BudgetRow]:
    """Plan LoRA, LoRA + checkpointing and SAFE under a budget of ``memory`` bytes (frozen depths ``frozen``).

    ``settings.gradient_checkpointing`` is ignored: the rows set it themselves.
    """
    plain = dataclasses.replace(settings, gradient_checkpointing=False)
    checkpointed = dataclasses.replace(settings, gradient_checkpointing=True)
    lora = plan_memory(shape, plain)[0]
    lora_checkpointed = plan_memory(shape, checkpointed)[0]
    rows = [
        BudgetRow("LoRA", 0, 0, lora.activation_bytes, lora.total_bytes, lora.total_bytes <= memory),
        BudgetRow("LoRA + checkpointing", 0, shape.num_layers, lora_checkpointed.activation_bytes,
                  lora_checkpointed.total_bytes, lora_checkpointed.total_bytes <= memory),
    ]
    costs = block_costs(shape, plain)
    safe_rows = {r.frozen_blocks: r for r in plan_memory(shape, plain) if r.method == "safe"}
    depths = frozen if frozen is not None else sorted({0, shape.num_layers // 4, shape.num_layers // 2,
                                                       3 * shape.num_layers // 4})
    rows += [_safe_row(shape, plain, costs, safe_rows[k], memory) for k in depths if k < shape.num_layers]
    return rows


def largest_batch(shape: ModelShape, settings: PlanSettings, memory: int, setting: str, limit: int = 4096) -> int:
    """The largest batch size (at ``settings.seq_len``) whose ``setting`` row of :func:`plan_budget` fits; 0 if none.

    SAFE's rows fit what their warm-up (k=0) fits, which every SAFE run goes through.
    """
    def fits(batch: int) -> bool:
        rows = plan_budget(shape, dataclasses.replace(settings, batch_size=batch), memory, frozen=[0])
        return next(r for r in rows if r.setting == setting).fits

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, 2 * high
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low), not fits(high) (or high past the limit)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def format_budget(shape: ModelShape, settings: PlanSettings, memory: int, rows: list[BudgetRow]) -> str:
    """The budget section of ``peft-safe plan --memory``: a line per row, then the largest batch of each kind."""
    gib = 1 << 30
    lines = [f"on a GPU of {memory / gib:.1f} GiB, batch {settings.batch_size} x seq {settings.seq_len}:",
             f"{'setting':<22}{'checkpointed':>14}{'activations':>14}{'total':>12}  fits"]
    for row in rows:
        lines.append(f"{row.setting:<22}{row.checkpointed_blocks:>10}/{shape.num_layers:<3}"
                     f"{row.activation_bytes / gib:>11.2f} GiB{row.total_bytes / gib:>8.2f} GiB  "
                     f"{'yes' if row.fits else 'no'}")
    lines.append(f"largest batch at seq {settings.seq_len}: " + ", ".join(
        f"{name} {largest_batch(shape, settings, memory, name)}"
        for name in ("LoRA", "LoRA + checkpointing", "SAFE k=0")) + " (SAFE under the budget: its warm-up, k=0)")
    return "\n".join(lines)


def budget_json(rows: list[BudgetRow]) -> list[dict[str, Any]]:
    """The rows as JSON-serialisable dicts."""
    return [dataclasses.asdict(row) for row in rows]
