"""Measure one real training step: activation, parameter, gradient and optimizer-state bytes, FLOPs, time.

Everything is measured on the step itself; nothing is estimated from the architecture. Built on
:mod:`peft_safe.measure.memory` and torch's :class:`~torch.utils.flop_counter.FlopCounterMode`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batch import cuda_device, model_call
from .flops import flop_counter
from .memory import SavedTensorMeter, gradient_bytes, optimizer_state_bytes, parameter_bytes

__all__ = ["StepMeasurement", "measure_training_step"]


@dataclass
class StepMeasurement:
    """What one training step cost.

    Attributes:
        activation_bytes: Bytes autograd saved for backward during the forward pass, each storage once,
            the model's own parameters and buffers excluded.
        parameter_bytes: Bytes of all parameters.
        trainable_parameter_bytes: Bytes of the parameters that require grad.
        gradient_bytes: Bytes of the ``.grad`` tensors present after backward.
        optimizer_state_bytes: Bytes of the optimizer's state after its step (0 without an optimizer).
        forward_flops: FLOPs of the forward pass (as counted by ``FlopCounterMode``).
        backward_flops: FLOPs of the backward pass.
        wall_time_s: Seconds of the timed step (forward, backward, optimizer step), measured with
            ``time.perf_counter`` without the meters that slow the counted step down.
        cuda_max_memory_allocated: Peak CUDA memory allocated during the timed step, in bytes; None when
            the model is not on a CUDA device.

    Example:
        >>> m = measure_training_step(model, batch, optimizer)  # doctest: +SKIP
        >>> m.training_bytes, m.flops  # doctest: +SKIP
    """

    activation_bytes: int
    parameter_bytes: int
    trainable_parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    forward_flops: int
    backward_flops: int
    wall_time_s: float
    cuda_max_memory_allocated: int | None = None

    @property
    def training_bytes(self) -> int:
        """Memory that training adds on top of the weights: activations, gradients and optimizer state."""
        return self.activation_bytes + self.gradient_bytes + self.optimizer_state_bytes

    @property
    def flops(self) -> int:
        """Forward plus backward FLOPs."""
        return self.forward_flops + self.backward_flops

    def to_dict(self) -> dict[str, int | float | None]:
        """Return the fields and the two derived totals as a flat, JSON-serialisable dict."""
        return {**dataclasses.asdict(self), "training_bytes": self.training_bytes, "flops": self.flops}


def measure_training_step(
    model: nn.Module,
    batch: Mapping[str, Any] | tuple | list | torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    timed: bool = True,
) -> StepMeasurement:
    """Run a real training step on ``batch`` and measure what it costs.

    The counted step runs the forward pass under a :class:`SavedTensorMeter` (``exclude=model``) and a
    ``FlopCounterMode``, then the backward pass under a second ``FlopCounterMode`` so the two are split.
    Gradient bytes are read right after backward, then ``optimizer.step()`` runs and the optimizer state is
    read, then the gradients are set to None (``zero_grad(set_to_none=True)``) as in an ordinary loop, with
    or without an optimizer, so repeated calls measure the same thing.

    The meters add Python work to every operation, so the time of the counted step says little. When
    ``timed`` is True a second, unmetered step (forward, backward, optimizer step, zero_grad) is timed with
    ``time.perf_counter`` (synchronising CUDA), and on CUDA its peak memory is read with
    ``torch.cuda.max_memory_allocated``. That second step runs with the optimizer state already allocated,
    as every step after the first does. Both steps update the weights.

    The model is put in training mode for the steps and left in the mode it was in.

    Example:
        >>> optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)  # doctest: +SKIP
        >>> m = measure_training_step(model, {"input_ids": ids, "labels": labels}, optimizer)  # doctest: +SKIP
        >>> m.activation_bytes, m.backward_flops  # doctest: +SKIP

    Args:
        model: The model to train.
        batch: A mapping passed as ``model(**batch)``, a tuple or list passed as ``model(*batch)``, or a
            single tensor passed as ``model(batch)``.
        optimizer: The optimizer to step; None to measure forward and backward only.
        loss_fn: Maps the model's output to the scalar loss. By default the loss is ``output.loss`` or
            ``output["loss"]``, as Hugging Face models return when given labels.
        timed: Whether to time a second, unmetered step. When False, ``wall_time_s`` is the time of the
            metered step and ``cuda_max_memory_allocated`` its peak.

    Returns:
        The :class:`StepMeasurement`.

    Raises:
        TypeError: If ``model`` is not a module, ``batch`` is of an unsupported type or the loss is not a
            tensor.
        ValueError: If the output holds no loss and no ``loss_fn`` was given, the loss is not a scalar, or
            the loss does not require grad (no parameter requires grad).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}.")
    call = model_call(model, batch)
    device = cuda_device(model, batch)
    was_training = model.training
    model.train()
    try:
        _reset_cuda_peak(device)
        start = time.perf_counter()
        with flop_counter() as forward_counter, SavedTensorMeter(exclude=model) as meter:
            loss = _loss_of(call(), loss_fn)
        with flop_counter() as backward_counter:
            loss.backward()
        del loss
        grad_bytes = gradient_bytes(model)
        _finish_step(model, optimizer)
        state_bytes = optimizer_state_bytes(optimizer) if optimizer is not None else 0
        wall_time_s = _elapsed(start, device)
        cuda_peak = _cuda_peak(device)

        if timed:
            _reset_cuda_peak(device)
            start = time.perf_counter()
            _loss_of(call(), loss_fn).backward()
            _finish_step(model, optimizer)
            wall_time_s = _elapsed(start, device)
            cuda_peak = _cuda_peak(device)
    finally:
        model.train(was_training)

    all_bytes, trainable_bytes = parameter_bytes(model)
    return StepMeasurement(
        activation_bytes=meter.activation_bytes,
        parameter_bytes=all_bytes,
        trainable_parameter_bytes=trainable_bytes,
        gradient_bytes=grad_bytes,
        optimizer_state_bytes=state_bytes,
        forward_flops=forward_counter.get_total_flops(),
        backward_flops=backward_counter.get_total_flops(),
        wall_time_s=wall_time_s,
        cuda_max_memory_allocated=cuda_peak,
    )


def _loss_of(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(output)
    else:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if loss is None:
            raise ValueError(
                f"the model's output ({type(output).__name__}) has no loss; pass labels in the batch or "
                "loss_fn=lambda output: ... that returns the scalar loss."
            )
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss must be a tensor, got {type(loss).__name__}; make loss_fn return a tensor.")
    if loss.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar, got shape {tuple(loss.shape)}; reduce it (e.g. .mean()) in loss_fn."
        )
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not require grad: no parameter requires grad (everything is frozen) or the forward "
            "ran under torch.no_grad(); unfreeze at least one parameter to measure a training step."
        )
    return loss


def _finish_step(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Step the optimizer if there is one, then set the gradients to None as a training loop would."""
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def _reset_cuda_peak(device: torch.device | None) -> None:
    if device is not None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak(device: torch.device | None) -> int | None:
    return None if device is None else torch.cuda.max_memory_allocated(device)


def _elapsed(start: float, device: torch.device | None) -> float:
    if device is not None:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
