"""Exact, measured costs of a training step: activation, gradient and optimizer memory, FLOPs, time.

:func:`measure_training_step` measures one step; :class:`TrainingMeter` follows a whole run (every N steps).

Importing this package registers FLOP formulas for torch's CPU flash-attention kernels (see
:mod:`peft_safe.measure.flops`), which torch's ``FlopCounterMode`` would otherwise count as zero.
"""

from .flops import count_flops, register_cpu_attention_flop_formulas
from .memory import SavedTensorMeter, gradient_bytes, optimizer_state_bytes, parameter_bytes
from .step import StepMeasurement, measure_training_step
from .meter import MemorySummary, StepRecord, TrainingMeter

__all__ = [
    "MemorySummary",
    "SavedTensorMeter",
    "StepMeasurement",
    "StepRecord",
    "TrainingMeter",
    "count_flops",
    "gradient_bytes",
    "measure_training_step",
    "optimizer_state_bytes",
    "parameter_bytes",
    "register_cpu_attention_flop_formulas",
]
