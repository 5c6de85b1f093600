"""``peft-safe plan``: the memory of LoRA and SAFE fine-tuning of a LLaMA-style model, planned from its shape.

The planner needs no weights: the shape of the model (a built-in preset such as ``llama-2-7b``, or any local
``config.json``/model folder) and the training setup (base-weight bits, batch, sequence length, LoRA rank and
targets, gradient checkpointing) give the bytes of the base weights, the adapter parameters, their gradients,
AdamW's state and the activations autograd saves for backward, for plain LoRA and for SAFE with each number
``k`` of frozen bottom blocks. :func:`validate` builds tiny LLaMA models, trains one step and compares the
plan with the measured figures; ``docs/plan.md`` lists the formulas, assumptions and the comparison.

Modules, each importing only those before it:

- :mod:`~peft_safe.plan.shapes`: :class:`ModelShape`, :data:`PRESETS`, :func:`resolve_model`, :class:`PlanSettings`.
- :mod:`~peft_safe.plan.formulas`: :class:`MemoryRow`, :func:`plan_memory`, :func:`format_table`,
  :func:`plan_json` (pure arithmetic).
- :mod:`~peft_safe.plan.validation`: the plan against real training steps, measured with
  :mod:`peft_safe.measure`.
- :mod:`~peft_safe.plan.cli`: ``peft-safe plan`` itself (:func:`main`).

This file only re-exports their public names; nothing in the package imports ``peft_safe.plan``.

Example:
    >>> shape = resolve_model("llama-2-7b")
    >>> rows = plan_memory(shape, PlanSettings(bits=4, batch_size=4, seq_len=512))
    >>> print(format_table(shape, PlanSettings(bits=4, batch_size=4, seq_len=512), rows))  # doctest: +SKIP
"""

from .cli import build_parser, main
from .formulas import MemoryRow, format_table, plan_json, plan_memory
from .shapes import ALL_PROJECTIONS, DEFAULT_TARGETS, PRESETS, ModelShape, PlanSettings, resolve_model
from .validation import (
    ValidationCase,
    ValidationRow,
    default_validation_cases,
    format_validation,
    measure_case,
    slice_7b_cases,
    validate,
)

__all__ = [
    "ALL_PROJECTIONS",
    "DEFAULT_TARGETS",
    "PRESETS",
    "MemoryRow",
    "ModelShape",
    "PlanSettings",
    "ValidationCase",
    "ValidationRow",
    "build_parser",
    "default_validation_cases",
    "format_table",
    "format_validation",
    "main",
    "measure_case",
    "plan_json",
    "plan_memory",
    "resolve_model",
    "slice_7b_cases",
    "validate",
]
