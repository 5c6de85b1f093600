"""What a batch is to this package: a mapping of model inputs, a tuple or list of arguments, or one tensor.

Scoring (:mod:`peft_safe.safe.method.scoring`) and measurement (:mod:`peft_safe.measure`) both call a model on batches
of any of these forms; the one dispatch lives here. A leaf module: it imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["batch_tensors", "call_model", "cuda_device", "model_call", "real_tokens", "to_device"]


def model_call(model: nn.Module, batch: Any, **overrides: Any) -> Callable[[], Any]:
    """A thunk that runs ``model`` on ``batch`` the way its type says: ``model(**batch)``, ``model(*batch)`` or
    ``model(batch)``; the batch's type is checked now, before anything runs.

    Args:
        model: the module to call.
        batch: a mapping of keyword arguments, a tuple or list of positional arguments, or a tensor.
        **overrides: keyword arguments added to (or replacing those of) a mapping batch.

    Raises:
        TypeError: if ``batch`` is none of these, or ``overrides`` are given with a non-mapping batch.
    """
    if isinstance(batch, Mapping):
        kwargs = {**batch, **overrides}
        return lambda: model(**kwargs)
    if overrides:
        raise TypeError(f"keyword overrides {sorted(overrides)} need a mapping batch, got {type(batch).__name__}.")
    if isinstance(batch, (tuple, list)):
        return lambda: model(*batch)
    if isinstance(batch, torch.Tensor):
        return lambda: model(batch)
    raise TypeError(
        f"batch must be a mapping (passed as model(**batch)), a tuple or list (model(*batch)) or a tensor, "
        f"got {type(batch).__name__}."
    )


def call_model(model: nn.Module, batch: Any, **overrides: Any) -> Any:
    """``model_call(model, batch, **overrides)()``: run the model on the batch now."""
    return model_call(model, batch, **overrides)()


def batch_tensors(batch: Any) -> Iterator[torch.Tensor]:
    """The tensors of a batch (or any nest of mappings, tuples and lists, e.g. optimizer state), at any depth."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from batch_tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from batch_tensors(value)


def to_device(batch: Any, device: torch.device) -> Any:
    """A copy of ``batch`` with every tensor moved to ``device`` (mappings become dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def cuda_device(model: nn.Module, batch: Any = None) -> torch.device | None:
    """The CUDA device a step of ``model`` on ``batch`` runs on, or ``None`` when it runs elsewhere."""
    tensors = [*model.parameters(), *model.buffers(), *batch_tensors(batch)]
    return next((t.device for t in tensors if t.device.type == "cuda"), None)


def real_tokens(batch: Any) -> int:
    """Tokens in a batch: the attention mask's sum, else the first tensor's (batch, sequence) size; 0 without one."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, (tuple, list)):
        batch = next((v for v in batch if isinstance(v, torch.Tensor)), None)
    if not isinstance(batch, torch.Tensor):
        return 0
    return int(batch.shape[:2].numel()) if batch.dim() >= 2 else int(batch.numel())
