"""Exact, measured costs of a training step: activation, gradient and optimizer memory, FLOPs, time.

:func:`measure_training_step` measures one step; :class:`TrainingMeter` follows a whole run (every N steps).
FLOPs come from torch's ``FlopCounterMode``, made by :func:`~peft_safe.measure.flops.flop_counter`, which first
registers the formulas torch lacks (its CPU flash-attention kernels, bitsandbytes' 4-bit matmul); importing this
package registers nothing.

Imports: torch and :mod:`peft_safe.batch`; never peft, transformers or the SAFE tuner (it measures any model).
"""

from .flops import flop_counter, register_bitsandbytes_flop_formulas, register_cpu_attention_flop_formulas
from .memory import MIB, SavedTensorMeter, gradient_bytes, optimizer_state_bytes, parameter_bytes
from .meter import MemorySummary, StepRecord, TrainingMeter, TrainingSummary
from .step import StepMeasurement, measure_training_step

__all__ = [
    "MIB",
    "MemorySummary",
    "SavedTensorMeter",
    "StepMeasurement",
    "StepRecord",
    "TrainingMeter",
    "TrainingSummary",
    "flop_counter",
    "gradient_bytes",
    "measure_training_step",
    "optimizer_state_bytes",
    "parameter_bytes",
    "register_bitsandbytes_flop_formulas",
    "register_cpu_attention_flop_formulas",
]
