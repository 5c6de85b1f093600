"""Exact byte counts of what a training step keeps in memory.

Activation memory is measured, not estimated: :class:`SavedTensorMeter` sees every tensor autograd saves for
backward through :class:`torch.autograd.graph.saved_tensors_hooks` and counts each underlying storage once.
Parameter, gradient and optimizer-state bytes are sums of :attr:`torch.Tensor.nbytes`.

Hand-written here, because torch offers no public equivalent: the accounting on top of the hooks (dedup by
storage, excluding a model's own parameters and buffers, forgetting storages once autograd frees them) and
the walk over ``optimizer.state``. What the meter cannot see, the most bytes held at once through a step
(checkpointing's recompute included), :class:`PeakMemoryMeter` follows through a dispatch mode; its docstring
says why torch's private ``MemTracker`` is not used.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..batch import batch_tensors

__all__ = [
    "MIB",
    "PeakMemoryMeter",
    "SavedTensorMeter",
    "gradient_bytes",
    "optimizer_state_bytes",
    "parameter_bytes",
]

MIB = 2**20  # bytes in a mebibyte, the unit every report of this package prints memory in

# A storage is identified by its device and data pointer; tensors without data (meta, fake, zero-size) all
# share data pointer 0, so they are told apart by their StorageImpl instead.
_StorageKey = tuple[str, int | None, str, int]


def _storage_key_and_bytes(tensor: torch.Tensor) -> tuple[_StorageKey, int]:
    """Return a key naming ``tensor``'s underlying storage and the storage's size in bytes.

    Views of one storage get the same key. Tensors whose storage cannot be read (sparse, some tensor
    subclasses) are keyed by their own identity and sized by :attr:`torch.Tensor.nbytes`.
    """
    device = (tensor.device.type, tensor.device.index)
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return (*device, "tensor", id(tensor)), tensor.nbytes
    data_ptr = storage.data_ptr()
    if data_ptr == 0:
        return (*device, "storage", storage._cdata), storage.nbytes()
    return (*device, "data", data_ptr), storage.nbytes()


def _module_storage_keys(tensors: Iterable[torch.Tensor]) -> set[_StorageKey]:
    return {_storage_key_and_bytes(t)[0] for t in tensors}


class SavedTensorMeter:
    """Count the bytes autograd saves for backward while the context is open.

    Every tensor saved for backward passes through the meter's pack hook. Each underlying storage is counted
    once, however many tensors or views of it are saved, at its full size (a saved slice keeps its whole
    storage alive). Storages that belong to the parameters or buffers of ``exclude`` are counted in
    :attr:`total_bytes` but not in :attr:`activation_bytes`: weights saved for backward are not activation
    memory. A storage counts once for as long as autograd holds it; if a graph is freed inside the context
    and its memory reused for a new saved tensor, the new storage is counted too.

    The meter keeps no saved tensor alive: it records keys and sizes, and follows each saved tensor through a
    weak reference so a freed storage is forgotten. The pack hook returns a detached alias of the tensor (the
    same storage, no copy), as torch advises to avoid a reference cycle through the graph, and the unpack hook
    restores autograd's check that a saved tensor was not modified in place, which custom hooks otherwise
    switch off.

    Entering the context resets the counts. Only one pair of saved-tensor hooks is active at a time, so
    tensors saved under an inner ``saved_tensors_hooks`` (non-reentrant activation checkpointing, CPU
    offloading) are not seen.

    Example:
        >>> layer = nn.Linear(8, 4)
        >>> with SavedTensorMeter(exclude=layer) as meter:
        ...     loss = layer(torch.randn(2, 8)).sum()
        >>> meter.activation_bytes  # the saved input: 2 * 8 float32
        64

    Args:
        exclude: A module whose parameters and buffers are not activations, or an iterable of such tensors.
            Read when the context is entered.

    Attributes:
        activation_bytes: Bytes of the distinct saved storages that are not parameters or buffers of
            ``exclude``.
        total_bytes: Bytes of all distinct saved storages.
        count: Number of tensors saved (a tensor saved twice counts twice).
        storage_count: Number of distinct storages behind them.
        peak_activation_bytes: The most activation bytes autograd held at any one time while the context was
            open. Equal to ``activation_bytes`` for one forward and backward; smaller when several graphs are
            built and freed in turn (gradient accumulation), where ``activation_bytes`` adds them all up.

    Raises:
        TypeError: If ``exclude`` is neither a module, an iterable of tensors, nor None.
    """

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] | None = None) -> None:
        if exclude is not None and not isinstance(exclude, (nn.Module, Iterable)):
            raise TypeError(
                f"exclude must be an nn.Module, an iterable of tensors or None, got {type(exclude).__name__}; "
                "pass the model being trained (exclude=model)."
            )
        self._exclude = exclude
        self._excluded_keys: set[_StorageKey] = set()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._reset()

    def _reset(self) -> None:
        self.activation_bytes = 0
        self.total_bytes = 0
        self.count = 0
        self.storage_count = 0
        self.peak_activation_bytes = 0
        self._live_activation_bytes = 0
        # key -> number of saved tensors on that storage that autograd still holds
        self._live: dict[_StorageKey, int] = {}
        # key -> activation bytes it adds while held (0 for excluded storages)
        self._live_bytes: dict[_StorageKey, int] = {}
        self._watchers: list[weakref.ref] = []

    def _excluded_tensors(self) -> Iterator[torch.Tensor]:
        if self._exclude is None:
            return iter(())
        if isinstance(self._exclude, nn.Module):
            return iter([*self._exclude.parameters(), *self._exclude.buffers()])
        tensors = list(self._exclude)
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"exclude must hold tensors, got an element of type {type(tensor).__name__}; "
                    "pass the model itself (exclude=model) or its parameters."
                )
        return iter(tensors)

    def _forget(self, key: _StorageKey) -> None:
        remaining = self._live.get(key, 0) - 1
        if remaining > 0:
            self._live[key] = remaining
        else:
            self._live.pop(key, None)
            self._live_activation_bytes -= self._live_bytes.pop(key, 0)

    def _pack(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        key, nbytes = _storage_key_and_bytes(tensor)
        self.count += 1
        if key not in self._live:
            self.storage_count += 1
            self.total_bytes += nbytes
            activation = 0 if key in self._excluded_keys else nbytes
            self.activation_bytes += activation
            self._live_bytes[key] = activation
            self._live_activation_bytes += activation
            self.peak_activation_bytes = max(self.peak_activation_bytes, self._live_activation_bytes)
        self._live[key] = self._live.get(key, 0) + 1
        alias = tensor.detach()
        self._watchers.append(weakref.ref(alias, lambda _ref, key=key: self._forget(key)))
        return alias, tensor._version

    @staticmethod
    def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
        tensor, version = packed
        if tensor._version != version:
            raise RuntimeError(
                "one of the tensors saved for backward has been modified by an inplace operation: "
                f"{tensor.type()} {list(tensor.shape)} is at version {tensor._version}; expected version "
                f"{version} instead. Clone it before modifying it in place."
            )
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        if self._hooks is not None:
            raise RuntimeError("SavedTensorMeter is not reentrant; use a new meter for a nested measurement.")
        self._reset()
        self._excluded_keys = _module_storage_keys(self._excluded_tensors())
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._hooks is None:
            return
        self._hooks.__exit__(*exc_info)
        self._hooks = None
        # The counts are final; stop following the saved tensors.
        self._watchers = []
        self._live = {}
        self._live_bytes = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(activation_bytes={self.activation_bytes}, total_bytes={self.total_bytes}, "
            f"count={self.count}, storage_count={self.storage_count})"
        )


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """Return the bytes of all of ``model``'s parameters and of those that require grad.

    Shared (tied) parameters count once.

    Args:
        model: The module to measure.

    Returns:
        ``(all_bytes, trainable_bytes)``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
    """
    _check_module(model)
    total = trainable = 0
    for param in model.parameters():
        total += param.nbytes
        if param.requires_grad:
            trainable += param.nbytes
    return total, trainable


def gradient_bytes(model: nn.Module) -> int:
    """Return the bytes of the ``.grad`` tensors that exist on ``model``'s parameters.

    A gradient that was set to None (``zero_grad(set_to_none=True)``) or never computed counts nothing; a
    zeroed gradient still holds its memory and counts.

    Args:
        model: The module to measure.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
    """
    _check_module(model)
    return sum(param.grad.nbytes for param in model.parameters() if param.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Return the bytes of every tensor in ``optimizer.state`` (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``...).

    The state is empty until the first ``optimizer.step()``.

    Args:
        optimizer: The optimizer to measure.

    Raises:
        TypeError: If ``optimizer`` is not a ``torch.optim.Optimizer``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
            "pass the optimizer itself, not its state_dict()."
        )
    unique = {id(t): t for t in batch_tensors(list(optimizer.state.values()))}
    return sum(t.nbytes for t in unique.values())


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")


class PeakMemoryMeter(TorchDispatchMode):
    """The most bytes held at once while the context is open, the model's parameters and buffers excluded.

    Counts everything a step allocates and holds together: saved activations, what gradient checkpointing
    recomputes during backward, temporaries, gradients, and the optimizer state (the part allocated before the
    context too). A dispatch mode sees every operation, forward and backward; each new storage an operation
    returns is counted until it is freed (followed through a weak reference), each storage once however many
    views share it. Storages that existed before the context are not followed, except the optimizer state and
    gradients, which are counted throughout.

    Hand-written: torch's ``MemTracker`` (``torch.distributed._tools``, private) does the same accounting, but
    keeps freed storages alive when a block's output is detached and fed on (torch 2.13), which is exactly how
    SAFE's memory budget measures blocks, and it registers hooks on frozen parameters, which fails.

    Example:
        >>> with PeakMemoryMeter(model, optimizer) as peak:  # doctest: +SKIP
        ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        >>> peak.peak_bytes  # doctest: +SKIP

    Attributes:
        peak_bytes: the peak so far (final once the context is closed).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__()
        _check_module(model)
        self._model, self._optimizer = model, optimizer
        self._owned: set[_StorageKey] = set()
        self._live: dict[_StorageKey, int] = {}
        self._held = 0
        self._finalizers: list[weakref.finalize] = []
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemoryMeter:
        self._owned = _module_storage_keys([*self._model.parameters(), *self._model.buffers()])
        self._live = {}
        base = gradient_bytes(self._model)
        base += optimizer_state_bytes(self._optimizer) if self._optimizer is not None else 0
        self._held = self.peak_bytes = base
        return super().__enter__()

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        for finalizer in self._finalizers:  # the peak is final; storages still alive need not call back
            finalizer.detach()
        self._finalizers, self._live = [], {}

    def _follow(self, tensor: torch.Tensor) -> None:
        key, nbytes = _storage_key_and_bytes(tensor)
        if nbytes == 0 or key in self._live or key in self._owned:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # a subclass without one: cannot be followed
            return
        self._live[key] = nbytes
        self._held += nbytes
        self.peak_bytes = max(self.peak_bytes, self._held)
        self._finalizers.append(weakref.finalize(storage, self._forget, key))

    def _forget(self, key: _StorageKey) -> None:
        self._held -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in batch_tensors(out):
            self._follow(tensor)
        return out
