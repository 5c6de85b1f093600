"""MeasureCallback: training memory, FLOPs and time of a transformers Trainer run, in the Trainer's logs.

A thin shell over :class:`~peft_safe.measure.TrainingMeter`: each optimizer step is tracked from
``on_step_begin`` to ``on_step_end``, gradients are read in ``on_pre_optimizer_step`` (the Trainer zeroes them
before ``on_step_end``) and the optimizer state in ``on_optimizer_step`` (before other callbacks may freeze
units), and every measured step is logged through ``Trainer.log`` as ``{"memory/training_bytes": ..., ...}``
(``step`` is the Trainer's global step once that step is done), so ``trainer.state.log_history``, the printed log
lines and every ``report_to`` integration see memory falling as SAFE freezes units. The latest figures are also
added (in MiB) to each loss line the Trainer prints.
"""

from __future__ import annotations

import weakref
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..measure.memory import MIB
from ..measure.meter import StepRecord, TrainingMeter, TrainingSummary, check_meter_options
from ..reporting import find_trainer, follow_transformers_verbosity, log_to_trainer

__all__ = ["MeasureCallback"]

class MeasureCallback(TrainerCallback):
    """Record activation, gradient and optimizer-state bytes (and optionally FLOPs) during ``Trainer.train()``.

    Example:
        >>> callback = MeasureCallback(measure_every=10)
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=train,  # doctest: +SKIP
        ...                   callbacks=[SAFECallback(probe_dataset=val), callback])
        >>> trainer.train()  # doctest: +SKIP
        >>> callback.summary().after_training_bytes  # doctest: +SKIP

    Activation bytes are the most autograd held at once, so with ``gradient_accumulation_steps > 1`` they are
    those of one micro-batch, as in memory. Under gradient checkpointing the tensors saved inside checkpointed
    blocks are not seen (their own saved-tensor hooks take precedence).

    Args:
        measure_every: Measure every this many optimizer steps (and the first step after a freeze).
        flops: ``"none"``, ``"measured"`` or ``"cached"``, as for :class:`~peft_safe.measure.TrainingMeter`.
        prefix: Prefix of the keys written to the logs.

    Attributes:
        meter: The :class:`TrainingMeter` of the current (or last) run; None before training.

    Raises:
        ValueError: If ``measure_every`` < 1 or ``flops`` is unknown.
    """

    def __init__(self, measure_every: int = 1, flops: str = "none", prefix: str = "memory/") -> None:
        check_meter_options(measure_every, flops)
        self.measure_every = measure_every
        self.flops = flops
        self.prefix = prefix
        self.meter: TrainingMeter | None = None
        self._latest: dict[str, float] = {}
        self._trainer: Any = None

    def summary(self, after_step: int | None = None) -> TrainingSummary:
        """The run's :class:`~peft_safe.measure.TrainingSummary` (see :meth:`TrainingMeter.summary`).

        Raises:
            ValueError: If no step was tracked yet.
        """
        if self.meter is None:
            raise ValueError("MeasureCallback has tracked no step; call trainer.train() first.")
        return self.meter.summary(after_step)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        optimizer = kwargs.get("optimizer")
        # accelerate wraps the optimizer; its state and step hooks live on the wrapped one
        optimizer = getattr(optimizer, "optimizer", optimizer)
        if self.meter is not None:
            self.meter.close()
        follow_transformers_verbosity()
        trainer = find_trainer(holding=self)
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        self.meter = TrainingMeter(kwargs["model"], optimizer, measure_every=self.measure_every, flops=self.flops)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.meter.abort_step()  # a step left open by an interrupted loop is not recorded
        self.meter.begin_step(state.global_step)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.meter.record_gradients()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.meter.record_optimizer_state()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        record = self.meter.end_step()
        if not record.measured and record.flops is None:
            return
        figures = self._log_entry(record)
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            log_to_trainer(trainer, figures)
        else:
            state.log_history.append({"step": state.global_step, "epoch": state.epoch, **figures})
        if record.measured:
            self._latest = {
                f"{key.removesuffix('_bytes')}_mib": round(value / MIB, 3)
                for key, value in figures.items()
                if key.endswith("_bytes")
            }

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is not None and self._latest and "loss" in logs:
            logs.update(self._latest)  # shown by the progress printer, which runs after user callbacks

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.meter is not None:
            self.meter.close()

    def _log_entry(self, record: StepRecord) -> dict[str, Any]:
        fields = {
            "activation_bytes": record.activation_bytes,
            "gradient_bytes": record.gradient_bytes,
            "optimizer_state_bytes": record.optimizer_state_bytes,
            "training_bytes": record.training_bytes,
            "trainable_parameter_bytes": record.trainable_parameter_bytes,
            "cuda_max_memory_allocated": record.cuda_max_memory_allocated,
            "flops": record.flops,
            "wall_time_s": record.wall_time_s,
            # SAFE's prefix cache (cache_frozen): 1 when the step was served from it, and the bytes it holds
            "cache_served": None if record.cache_served is None else int(record.cache_served),
            "cache_bytes": record.cache_bytes,
        }
        return {f"{self.prefix}{name}": value for name, value in fields.items() if value is not None}
