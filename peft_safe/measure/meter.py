"""Measure a whole training run, step by step, cheaply enough to leave switched on.

:class:`TrainingMeter` wraps each optimizer step of a loop. Every ``measure_every``-th step (and the first step
after the set of trainable parameters changes, e.g. when SAFE freezes units) it records the bytes autograd saved
for backward, the gradient and optimizer-state bytes, and on CUDA ``torch.cuda.max_memory_allocated``; every
step it records the wall time. FLOPs are counted on request, either on every measured step or once per
distinct step (same trainable parameters, same batch shapes) and reused, which gives a run's total FLOPs at the
cost of one counted step per freeze. :meth:`TrainingMeter.summary` reduces the records to the run's average,
the average after the last change of the trainable set (after the last freeze) and the peak.

Built on :class:`~peft_safe.measure.memory.SavedTensorMeter` and torch's
:class:`~torch.utils.flop_counter.FlopCounterMode`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batch import cuda_device
from .cache import CacheReader, summarize_cache
from .flops import flop_counter
from .memory import PeakMemoryMeter, SavedTensorMeter, gradient_bytes, optimizer_state_bytes

__all__ = ["FLOP_MODES", "TrainingSummary", "StepRecord", "TrainingMeter"]

FLOP_MODES = ("none", "measured", "cached")


@dataclass
class StepRecord:
    """What one tracked training step cost.

    Attributes:
        step: The step's index (as given to :meth:`TrainingMeter.step`, or counted from 0).
        wall_time_s: Seconds from the start to the end of the step (CUDA synchronised). Includes the meters'
            own overhead on measured and FLOP-counted steps.
        measured: Whether memory was measured on this step; the byte fields are None when it was not.
        activation_bytes: The most bytes autograd held saved for backward during the step (each storage once,
            the model's parameters and buffers excluded).
        gradient_bytes: Bytes of ``.grad`` tensors just before ``optimizer.step()`` (or at the end of the step
            without an optimizer).
        optimizer_state_bytes: Bytes of the optimizer's state just after ``optimizer.step()`` (or at the end of
            the step when no step was seen).
        trainable_parameter_bytes: Bytes of the parameters that required grad during the step.
        cuda_max_memory_allocated: Peak CUDA memory allocated during a measured step; None off CUDA.
        flops: FLOPs of the step (forward, backward and optimizer, as ``FlopCounterMode`` counts them); None
            when not counted.
        flops_counted: Whether ``flops`` was counted on this very step rather than reused from an identical one.
        peak_bytes: The most bytes held at once during a measured step, parameters and buffers excluded:
            activations with checkpointing's recompute, temporaries, gradients and optimizer state
            (:class:`~peft_safe.measure.memory.PeakMemoryMeter`); None when not measured.
        cache_served, cache_row_hits, cache_row_lookups, cache_bytes: what SAFE's prefix cache did in the step
            (:mod:`.cache`): a forward served from it, examples found and looked up, bytes held; None without one.
    """

    step: int
    wall_time_s: float
    measured: bool = False
    activation_bytes: int | None = None
    gradient_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    trainable_parameter_bytes: int | None = None
    cuda_max_memory_allocated: int | None = None
    flops: int | None = None
    flops_counted: bool = False
    peak_bytes: int | None = None
    cache_served: bool | None = None
    cache_row_hits: int | None = None
    cache_row_lookups: int | None = None
    cache_bytes: int | None = None

    @property
    def training_bytes(self) -> int | None:
        """Activations + gradients + optimizer state; None on an unmeasured step."""
        if not self.measured:
            return None
        return (self.activation_bytes or 0) + (self.gradient_bytes or 0) + (self.optimizer_state_bytes or 0)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus ``training_bytes``, JSON-serialisable."""
        return {**dataclasses.asdict(self), "training_bytes": self.training_bytes}


@dataclass
class TrainingSummary:
    """A run's records reduced to the figures worth reporting; byte figures are over measured steps.

    Attributes:
        steps: Number of tracked steps.
        measured_steps: Number of steps whose memory was measured.
        avg_training_bytes: Mean training bytes (activations + gradients + optimizer state) over the run.
        after_training_bytes: Mean training bytes over the measured steps from ``after_step`` on.
        peak_training_bytes: Largest training bytes of any measured step.
        avg_activation_bytes: Mean saved-activation bytes over the run.
        after_activation_bytes: Mean saved-activation bytes from ``after_step`` on.
        peak_activation_bytes: Largest saved-activation bytes of any measured step.
        after_step: First step of the "after" window: by default the last step at which the trainable set
            changed (the first step after the last freeze), or 0 when it never changed.
        total_flops: Sum of the steps' FLOPs; None unless every step has a FLOP figure (``flops="cached"``).
        wall_time_s: Total wall time of the tracked steps.
        mean_unmetered_step_s: Mean wall time of the steps that ran without any meter (the fairest step time);
            None when every step was metered.
        peak_cuda_max_memory_allocated: Largest ``torch.cuda.max_memory_allocated`` of a measured step; None off
            CUDA.
        peak_step_bytes: Largest :attr:`StepRecord.peak_bytes` (everything held at once, recompute included).
        cache_served_steps, cache_hit_rate, peak_cache_bytes: steps served from SAFE's prefix cache, its hit rate
            over the examples looked up and the most bytes it held (memory and disk); None without a cache.
    """

    steps: int
    measured_steps: int
    avg_training_bytes: float | None
    after_training_bytes: float | None
    peak_training_bytes: int | None
    avg_activation_bytes: float | None
    after_activation_bytes: float | None
    peak_activation_bytes: int | None
    after_step: int
    total_flops: int | None
    wall_time_s: float
    mean_unmetered_step_s: float | None
    peak_cuda_max_memory_allocated: int | None
    peak_step_bytes: int | None = None
    cache_served_steps: int | None = None
    cache_hit_rate: float | None = None
    peak_cache_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



def check_meter_options(measure_every: Any, flops: Any) -> None:
    """Validate the options a :class:`TrainingMeter` (or a callback building one) takes.

    Raises:
        ValueError: If ``measure_every`` is not an integer >= 1 or ``flops`` is not one of ``FLOP_MODES``.
    """
    if isinstance(measure_every, bool) or not isinstance(measure_every, int) or measure_every < 1:
        raise ValueError(f"measure_every must be an integer >= 1, got {measure_every!r}.")
    if flops not in FLOP_MODES:
        raise ValueError(f"flops must be one of {FLOP_MODES}, got {flops!r}.")

class TrainingMeter:
    """Record memory, FLOPs and time of each step of a training loop.

    Wrap each optimizer step (forward, backward, ``optimizer.step()``, ``zero_grad``) in :meth:`step`, or call
    :meth:`begin_step` and :meth:`end_step` around it where a context manager does not fit (a Trainer callback).
    Gradient bytes are read just before ``optimizer.step()`` and optimizer-state bytes just after it, through
    optimizer hooks, so ``zero_grad`` (or freezing) may run inside the step; call :meth:`record_gradients` and
    :meth:`record_optimizer_state` yourself when the hooks cannot see the step (an optimizer wrapped by another
    object).

    A measured step runs under a :class:`SavedTensorMeter` (a Python call per saved tensor) and, when FLOPs are
    counted, under ``FlopCounterMode`` (a Python call per operation); an unmeasured step only reads the clock
    and which parameters require grad.

    Example:
        >>> meter = TrainingMeter(model, optimizer, measure_every=10)  # doctest: +SKIP
        >>> for step, batch in enumerate(loader):  # doctest: +SKIP
        ...     with meter.step(batch=batch):
        ...         model(**batch).loss.backward()
        ...         optimizer.step()
        ...         optimizer.zero_grad(set_to_none=True)
        >>> meter.summary().avg_training_bytes  # doctest: +SKIP

    Args:
        model: The model being trained; its parameters and buffers are not counted as activations.
        optimizer: The optimizer, for its state bytes and to read gradients just before its step; None to read
            gradients at the end of the step and count no optimizer state.
        measure_every: Measure memory on every this many steps (steps 0, N, 2N, ...), and also on the first
            step after the trainable set changed.
        flops: ``"none"``; ``"measured"`` to count FLOPs on measured steps; ``"cached"`` to count the first two
            steps of each distinct kind (trainable set, checkpointed blocks, whether a prefix cache served it and,
            when ``batch`` is passed to :meth:`step`, the batch's tensor shapes) and reuse the second's count for
            the later ones (the first may do one-off work), so every step has a figure.

    Attributes:
        records: One :class:`StepRecord` per tracked step, in order.
        changes: Steps at which the set of trainable parameters differed from the step before.

    Raises:
        TypeError: If ``model`` is not a module or ``optimizer`` not an optimizer.
        ValueError: If ``measure_every`` < 1 or ``flops`` is not one of ``FLOP_MODES``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        measure_every: int = 1,
        flops: str = "none",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}.")
        check_meter_options(measure_every, flops)
        self.model = model
        self.optimizer = optimizer
        self.measure_every = measure_every
        self.flops = flops
        self.records: list[StepRecord] = []
        self.changes: list[int] = []
        self._flop_cache: dict[Any, int] = {}
        self._flop_pending: dict[Any, list[StepRecord]] = {}  # served steps whose key was not counted yet
        self._flop_seen: set[Any] = set()  # keys counted once (see end_step)
        self._cache = CacheReader(model)
        self._last_trainable: tuple[int, ...] | None = None
        self._open: dict[str, Any] | None = None
        self._hooks = []
        if optimizer is not None:
            self._hooks = [
                optimizer.register_step_pre_hook(lambda *_: self.record_gradients()),
                optimizer.register_step_post_hook(lambda *_: self.record_optimizer_state()),
            ]

    # ------------------------------------------------------------------ one step
    @contextlib.contextmanager
    def step(
        self, step: int | None = None, *, batch: Any = None, measure: bool | None = None
    ) -> Iterator[TrainingMeter]:
        """Track the step run inside the ``with`` block; see :meth:`begin_step` for the arguments."""
        self.begin_step(step, batch=batch, measure=measure)
        try:
            yield self
        except BaseException:
            self.abort_step()
            raise
        self.end_step()

    def begin_step(self, step: int | None = None, *, batch: Any = None, measure: bool | None = None) -> None:
        """Start tracking a step.

        Args:
            step: The step's index; by default one more than the last tracked step (0 at first).
            batch: The step's input; its tensors' shapes tell ``flops="cached"`` which steps are identical.
            measure: Force memory measurement on (True) or off (False) for this step; None follows
                ``measure_every`` and the trainable-set changes.

        Raises:
            RuntimeError: If a step is already open.
        """
        if self._open is not None:
            raise RuntimeError("a step is already being tracked; call end_step() before begin_step().")
        index = step if step is not None else (self.records[-1].step + 1 if self.records else 0)
        trainable = tuple(id(p) for p in self.model.parameters() if p.requires_grad)
        changed = self._last_trainable is not None and trainable != self._last_trainable
        if changed:
            self.changes.append(index)
        self._last_trainable = trainable
        if measure is None:
            measure = index % self.measure_every == 0 or changed
        # Which blocks are gradient-checkpointed changes the work (SAFE's memory budget changes it as units freeze).
        flop_key = (trainable, _shapes(batch), _checkpointed(self.model))
        # A step served from a prefix cache costs less than one that is not: the served flag joins the key once the
        # step is over. Whether it will be served is the cache's guess now; a served step of a kind not counted yet
        # that was guessed wrong is filled in by the next one counted.
        served = self.flops == "cached" and self._cache.would_serve(batch)
        count_flops = self.flops == "measured" and measure or (
            self.flops == "cached" and ((flop_key, served) not in self._flop_cache or flop_key in self._flop_pending)
        )
        stack = contextlib.ExitStack()
        meter = counter = peak = None
        cuda = cuda_device(self.model)
        if measure:
            if cuda is not None:
                torch.cuda.synchronize(cuda)
                torch.cuda.reset_peak_memory_stats(cuda)
            peak = stack.enter_context(PeakMemoryMeter(self.model, self.optimizer))
            meter = stack.enter_context(SavedTensorMeter(exclude=self.model))
        if count_flops:
            counter = stack.enter_context(flop_counter())
        self._cache.begin()
        self._open = {
            "step": index, "measure": measure, "meter": meter, "counter": counter, "stack": stack,
            "flop_key": flop_key, "gradient_bytes": 0, "optimizer_state_bytes": None, "cuda": cuda,
            "peak": peak, "start": time.perf_counter(),
            "trainable_bytes": sum(p.nbytes for p in self.model.parameters() if p.requires_grad),
        }

    def record_gradients(self) -> None:
        """Read the gradient bytes now (the largest reading of the step is kept); call it before ``zero_grad``."""
        if self._open is not None and self._open["measure"]:
            self._open["gradient_bytes"] = max(self._open["gradient_bytes"], gradient_bytes(self.model))

    def record_optimizer_state(self) -> None:
        """Read the optimizer-state bytes now; call it right after ``optimizer.step()``.

        Read after the step, before anything else (SAFE freezing units at the end of the step) can drop state.
        Without a reading, the state is read when the step ends.
        """
        if self._open is not None and self._open["measure"] and self.optimizer is not None:
            self._open["optimizer_state_bytes"] = optimizer_state_bytes(self.optimizer)

    def end_step(self) -> StepRecord:
        """Finish the open step and return its record.

        Raises:
            RuntimeError: If no step is open.
        """
        if self._open is None:
            raise RuntimeError("no step is being tracked; call begin_step() first.")
        state = self._open
        if state["measure"] and self.optimizer is None:
            self.record_gradients()
        cuda = state["cuda"]
        if cuda is not None:
            torch.cuda.synchronize(cuda)
        wall = time.perf_counter() - state["start"]
        state["stack"].close()
        self._open = None
        record = StepRecord(step=state["step"], wall_time_s=wall, measured=state["measure"], **self._cache.end())
        if state["measure"]:
            meter: SavedTensorMeter = state["meter"]
            record.activation_bytes = meter.peak_activation_bytes
            record.gradient_bytes = state["gradient_bytes"]
            record.optimizer_state_bytes = state["optimizer_state_bytes"]
            if record.optimizer_state_bytes is None:
                record.optimizer_state_bytes = optimizer_state_bytes(self.optimizer) if self.optimizer else 0
            record.trainable_parameter_bytes = state["trainable_bytes"]
            record.cuda_max_memory_allocated = torch.cuda.max_memory_allocated(cuda) if cuda is not None else None
            record.peak_bytes = state["peak"].peak_bytes
        key = (state["flop_key"], bool(record.cache_served))
        if state["counter"] is not None:
            record.flops = state["counter"].get_total_flops()
            record.flops_counted = True
            # A key's first step may do one-off work (SAFE's memory budget measures its blocks there, a lazy
            # initialisation...): it keeps its own count, and the key's count is cached from its second step.
            # Served steps waiting for a count take the first one of their kind (the run may end before a second).
            if self.flops == "cached" and key not in self._flop_seen:
                self._flop_seen.add(key)
            elif self.flops == "cached":
                self._flop_cache[key] = record.flops
            if self.flops == "cached":
                pending = self._flop_pending.get(state["flop_key"], [])
                for earlier in [r for r in pending if bool(r.cache_served) == key[1]]:
                    earlier.flops = record.flops
                    pending.remove(earlier)
                if not pending:
                    self._flop_pending.pop(state["flop_key"], None)
        elif self.flops == "cached":
            record.flops = self._flop_cache.get(key)
            if record.flops is None:
                self._flop_pending.setdefault(state["flop_key"], []).append(record)
        self.records.append(record)
        return record

    def abort_step(self) -> None:
        """Close the open step without recording it (the step raised)."""
        if self._open is not None:
            self._open["stack"].close()
            self._open = None

    def close(self) -> None:
        """Remove the optimizer hooks; the records stay."""
        self.abort_step()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ------------------------------------------------------------------ the run
    @property
    def measured(self) -> list[StepRecord]:
        """The records of the measured steps."""
        return [r for r in self.records if r.measured]

    @property
    def last_change(self) -> int | None:
        """The last step at which the trainable set changed (the first step after the last freeze), or None."""
        return self.changes[-1] if self.changes else None

    def summary(self, after_step: int | None = None) -> TrainingSummary:
        """Reduce the records to averages over the run, after a given step, and peaks.

        Args:
            after_step: First step of the "after" window; by default :attr:`last_change` (0 if none). Pass
                another run's ``last_change`` to compare two runs over the same window.

        Raises:
            ValueError: If no step was tracked.
        """
        if not self.records:
            raise ValueError("no step was tracked; wrap the training steps in meter.step() first.")
        after_step = after_step if after_step is not None else (self.last_change or 0)
        measured = self.measured
        after = [r for r in measured if r.step >= after_step]
        unmetered = [r.wall_time_s for r in self.records if not r.measured and not r.flops_counted]
        cuda = [r.cuda_max_memory_allocated for r in measured if r.cuda_max_memory_allocated is not None]
        flops = [r.flops for r in self.records]
        return TrainingSummary(
            steps=len(self.records),
            measured_steps=len(measured),
            avg_training_bytes=_mean(r.training_bytes for r in measured),
            after_training_bytes=_mean(r.training_bytes for r in after),
            peak_training_bytes=max((r.training_bytes for r in measured), default=None),
            avg_activation_bytes=_mean(r.activation_bytes for r in measured),
            after_activation_bytes=_mean(r.activation_bytes for r in after),
            peak_activation_bytes=max((r.activation_bytes for r in measured), default=None),
            after_step=after_step,
            total_flops=sum(flops) if all(f is not None for f in flops) else None,
            wall_time_s=sum(r.wall_time_s for r in self.records),
            mean_unmetered_step_s=statistics.fmean(unmetered) if unmetered else None,
            peak_cuda_max_memory_allocated=max(cuda, default=None),
            peak_step_bytes=max((r.peak_bytes for r in measured if r.peak_bytes is not None), default=None),
            **summarize_cache(self.records),
        )


def _mean(values: Any) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def _checkpointed(model: nn.Module) -> tuple[bool, ...]:
    """Which modules with transformers' ``gradient_checkpointing`` flag have it set."""
    return tuple(bool(m.gradient_checkpointing) for m in model.modules() if hasattr(m, "gradient_checkpointing"))


def _shapes(batch: Any) -> Any:
    """A hashable description of a batch's tensor shapes (what a step's FLOPs depend on besides the model)."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape)
    if isinstance(batch, Mapping):
        return tuple(sorted((str(k), _shapes(v)) for k, v in batch.items()))
    if isinstance(batch, (tuple, list)):
        return tuple(_shapes(v) for v in batch)
    return None


# The name before 0.2, when the summary held memory only; it now holds FLOPs and time as well.
MemorySummary = TrainingSummary
