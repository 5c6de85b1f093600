"""What a probe set must be before it is scored: an iterable of batches of the model's own inputs (keys, tensors,
token id dtype, shape and range), checked whole before the first forward so a bad batch leaves nothing half-scored.

Used by :mod:`.scoring` and by the Trainer callback, which checks the batches it keeps as its probe set.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["check_probe_batch", "check_probe_set"]

_MODEL_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values")


def check_probe_set(probe_batches: Any) -> None:
    """Raise if ``probe_batches`` is a single batch or not an iterable of batches."""
    if isinstance(probe_batches, Mapping):
        raise ValueError(
            f"probe_batches is a single batch (a dict with keys {sorted(probe_batches)}); pass a list of batches, "
            "e.g. [batch]."
        )
    if isinstance(probe_batches, (str, bytes)) or not isinstance(probe_batches, Iterable):
        raise TypeError(
            "probe_batches must be an iterable of batches (a list of dicts of tensors), "
            f"got {type(probe_batches).__name__}."
        )


def check_probe_batch(model: nn.Module, batch: Any) -> None:
    """Raise if ``batch`` is not a batch of the model's inputs (keys, tensors, id dtype, shape and range)."""
    if not isinstance(batch, Mapping):
        if isinstance(batch, (torch.Tensor, tuple, list)):
            return
        raise TypeError(
            f"a probe batch must be a dict of model inputs (or a tensor / tuple for plain modules), "
            f"got {type(batch).__name__}."
        )
    params = inspect.signature(model.forward).parameters
    expected = [name for name in _MODEL_INPUT_NAMES if name in params]
    if expected and not any(name in batch for name in expected):
        raise ValueError(
            f"probe batch has keys {sorted(batch)} but none of the model's inputs {expected}; "
            "pass tokenized batches, e.g. tokenizer(texts, return_tensors='pt', padding=True)."
        )
    for name in expected:
        value = batch.get(name)
        if not isinstance(value, torch.Tensor):
            if value is not None:
                raise TypeError(
                    f"probe batch {name!r} must be a tensor, got {type(value).__name__}; use return_tensors='pt'."
                )
            continue
        if value.numel() == 0:
            raise ValueError(f"probe batch {name!r} is empty (shape {tuple(value.shape)}); drop empty batches.")
        if value.is_meta:  # any other device is moved to the model's at the probe forward
            raise ValueError(f"probe batch {name!r} is on the meta device (shapes, no values); give it with its "
                             "values, on the model's device or the CPU (it is moved to the model's).")
        if name == "input_ids":
            _check_token_ids(model, value)


def _check_token_ids(model: nn.Module, ids: torch.Tensor) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"probe batch 'input_ids' must hold integer token ids as int64 (or int32), got dtype {ids.dtype}; "
            "use ids.long()."
        )
    if ids.dim() != 2:
        raise ValueError(
            f"probe batch 'input_ids' must be 2-D (batch, sequence), got shape {tuple(ids.shape)}; a single "
            "sequence is ids.unsqueeze(0); a probe set is a list of such batches, not one stacked tensor."
        )
    try:
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # a model without (or not telling) its input embeddings
        vocab = None
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        raise ValueError(
            f"probe batch 'input_ids' hold ids from {low} to {high}, outside the model's vocabulary "
            f"[0, {vocab}); tokenize the probe set with the model's own tokenizer."
        )
