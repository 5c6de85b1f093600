"""BitFit layers: the wrapped layer's output plus a trainable bias delta."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import BitFitConfig


def bias_shape(layer: nn.Module) -> tuple[int, ...]:
    """Shape of ``layer``'s bias (whether or not it has one), for the layer types BitFit supports.

    Raises:
        TypeError: for other layer types, and for a LayerNorm without affine parameters.
    """
    if isinstance(layer, nn.Linear):  # includes bitsandbytes Linear4bit and Linear8bitLt
        return (layer.out_features,)
    if isinstance(layer, Conv1D):
        return (layer.weight.shape[1],)
    if isinstance(layer, nn.LayerNorm):
        if layer.weight is None:
            raise TypeError("BitFit needs a LayerNorm with elementwise_affine=True; this one has no parameters.")
        return tuple(layer.normalized_shape)
    raise TypeError(
        f"BitFit trains the bias of torch.nn.Linear, transformers Conv1D and torch.nn.LayerNorm layers "
        f"(bitsandbytes 4/8-bit Linear included); got {type(layer).__name__}. Remove it from target_modules."
    )


def _new_bias_dtype(layer: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The dtype of a bias created on merge: the layer's compute dtype (4-bit) or its weight's dtype."""
    compute_dtype = getattr(layer, "compute_dtype", None)
    if compute_dtype is not None:
        return compute_dtype
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return fallback


class BitFitLayer(BaseTunerLayer):
    """A layer whose output gets ``+ bitfit_bias[adapter]`` for each active adapter.

    Merging writes the deltas into the base bias; the bias as it was before the first merge is kept (a reference,
    biases are small) so that ``unmerge`` restores it bit for bit, including "no bias at all".
    """

    adapter_layer_names = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.bitfit_bias = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self._bias_before_merge: torch.Tensor | None = None  # meaningful only while self.merged
        self.delta_shape = bias_shape(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: BitFitConfig, **kwargs: Any) -> None:
        """Add adapter ``adapter_name``'s bias delta, and make the active adapters trainable."""
        delta = torch.zeros(self.delta_shape)
        if not config.init_weights:
            nn.init.normal_(delta, mean=0.0, std=0.02)
        self.bitfit_bias[adapter_name] = nn.Parameter(delta)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: the active adapters) into the base layer's bias.

        A layer without a bias gets one.

        Args:
            safe_merge: check the merged bias for NaN/inf before writing it.
            adapter_names: adapters to merge; ``None`` merges the active ones.

        Raises:
            ValueError: with ``safe_merge``, when the merged bias is not finite.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_layer = self.get_base_layer()
        for name in adapter_names:
            if name not in self.bitfit_bias:
                continue
            delta = self.bitfit_bias[name].detach()
            if base_layer.bias is None:
                merged = delta.to(_new_bias_dtype(base_layer, delta.dtype)).clone()
            else:
                merged = base_layer.bias.detach() + delta.to(base_layer.bias.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging BitFit adapter {name!r} gives a non-finite bias; the adapter is broken.")
            if not self.merged:
                self._bias_before_merge = None if base_layer.bias is None else base_layer.bias.data
            if base_layer.bias is None:
                base_layer.bias = nn.Parameter(merged, requires_grad=False)
            else:
                base_layer.bias.data = merged  # a new tensor: the one kept in _bias_before_merge is untouched
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base bias exactly as it was before merging (removing a bias that merging created)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_layer = self.get_base_layer()
        if self._bias_before_merge is None:
            base_layer.bias = None
        else:
            base_layer.bias.data = self._bias_before_merge.to(base_layer.bias.device)
        self._bias_before_merge = None
        self.merged_adapters = []


class BitFitWrapper(nn.Module, BitFitLayer):
    """BitFit on one layer: ``nn.Linear`` (bitsandbytes 4/8-bit included), ``Conv1D`` or affine ``nn.LayerNorm``.

    One wrapper serves all three: BitFit only adds to the layer's output (and, on merge, writes its bias, which
    bitsandbytes keeps unquantized), so nothing depends on the layer type but the bias shape (:func:`bias_shape`).
    On a 4-bit layer the delta lives in the layer's compute dtype.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BitFitConfig, **kwargs: Any) -> None:
        super().__init__()
        BitFitLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.bitfit_bias and name not in self.merged_adapters:
                result = result + self.bitfit_bias[name].to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bitfit." + super().__repr__()
