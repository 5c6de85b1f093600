"""FLOPs counted by torch's own :class:`torch.utils.flop_counter.FlopCounterMode`.

torch has no formula for the CPU flash-attention kernels (``aten._scaled_dot_product_flash_attention_for_cpu``
and its backward), which ``F.scaled_dot_product_attention`` dispatches to on CPU, so attention FLOPs would
silently count as zero there. :func:`flop_counter` registers formulas for them, built from torch's own
``sdpa_flop_count`` and ``sdpa_backward_flop_count`` (the helpers behind the CUDA flash and efficient
kernels' formulas).

bitsandbytes' 4-bit matmul kernel ``bitsandbytes::gemv_4bit`` (and ``gemm_4bit`` where a release has one) is a
custom op with no formula either. Training steps do not reach it (bitsandbytes dequantizes and calls ``aten.mm``,
which torch counts), but no-grad forwards do: a single row on GPUs, and every forward on CPUs with AVX512-BF16
once the weights are repacked. It is counted as the dense matmul it computes, ``2 * rows * out * in``.

:func:`flop_counter`, which makes every counter of this package, registers these formulas first; nothing is
registered on import. Registration is skipped for any kernel that already has a formula, so registering twice is
harmless and a future torch or bitsandbytes that adds its own formula wins. These shims are the only
hand-written part.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter as torch_flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

__all__ = ["flop_counter", "register_bitsandbytes_flop_formulas", "register_cpu_attention_flop_formulas"]

_aten = torch.ops.aten


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu(query, key, value, ...)``: Q K^T and P V."""
    # Like torch's formulas for the CUDA kernels, causal masking is not discounted.
    return torch_flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, ...)``."""
    return torch_flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    formulas: dict[Any, Callable[..., int]] = {}
    # Older or stripped-down torch builds may lack a kernel; there is nothing to count then.
    forward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:
        formulas[forward] = _cpu_flash_attention_flop
    if backward is not None:
        formulas[backward] = _cpu_flash_attention_backward_flop
    return formulas


def _four_bit_matmul_flop(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``gemv_4bit(A, B, shapeB, ...)``: ``A [..., in]`` times the dequantized ``[out, in]`` weight."""
    return 2 * math.prod(a_shape[:-1]) * shape_b[0] * shape_b[1]


def _bitsandbytes_formulas() -> dict[Any, Callable[..., int]]:
    namespace = getattr(torch.ops, "bitsandbytes", None)
    formulas: dict[Any, Callable[..., int]] = {}
    for name in ("gemv_4bit", "gemm_4bit"):
        try:
            op = getattr(namespace, name) if namespace is not None else None
        except (AttributeError, RuntimeError):  # an op this bitsandbytes release does not define
            op = None
        if op is not None:
            formulas[op] = _four_bit_matmul_flop
    return formulas


def register_bitsandbytes_flop_formulas() -> list[str]:
    """Register FLOP formulas for bitsandbytes' 4-bit matmul kernels (when bitsandbytes is imported).

    Called by :func:`flop_counter`; calling it again does nothing. The ops exist once ``bitsandbytes`` is
    imported, which loading a 4-bit model does; without it there is nothing to register.

    Returns:
        The names of the kernels registered by this call.
    """
    return _register(_bitsandbytes_formulas())


def register_cpu_attention_flop_formulas() -> list[str]:
    """Register FLOP formulas for the CPU flash-attention kernels that have none yet.

    Called by :func:`flop_counter`; calling it again does nothing. A
    :class:`FlopCounterMode` copies the formula registry when it is constructed, so only counters created
    after registration see the new formulas.

    Returns:
        The names of the kernels registered by this call (empty when all were registered already).
    """
    return _register(_cpu_attention_formulas())


def _register(formulas: dict[Any, Callable[..., int]]) -> list[str]:
    registered = []
    for kernel, formula in formulas.items():
        if kernel in torch_flop_counter.flop_registry:
            continue
        register_flop_formula(kernel)(formula)
        registered.append(str(kernel))
    return registered


def flop_counter() -> FlopCounterMode:
    """A silent :class:`FlopCounterMode` that knows every formula this package adds.

    The formulas are registered here, not on import: importing :mod:`peft_safe` leaves torch's FLOP registry as
    it is, and only code that counts FLOPs (every counter of this package is made by this function) changes it.
    """
    register_cpu_attention_flop_formulas()
    register_bitsandbytes_flop_formulas()
    counter = FlopCounterMode(display=False)
    # Totals only: torch's per-module breakdown hooks every module and, through backward hooks on their outputs,
    # keeps graphs alive that would otherwise be freed (a detached block's, as SAFE's memory budget measures
    # blocks), so a FLOP-counted step would hold more memory than the same step uncounted.
    counter.mod_tracker = _NoModules()
    return counter


class _NoModules:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP is counted under ``"Global"`` alone."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None
