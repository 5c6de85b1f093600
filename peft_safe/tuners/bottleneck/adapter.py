"""The bottleneck adapter's maths, apart from where it is placed: ``h + scaling * up(act(down(h)))``.

Pure functions over tensors and ``nn.Linear`` modules; nothing here knows about transformer blocks, peft or
which sublayer ``h`` came from (that is :mod:`.placement` and :mod:`.layer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Non-linearity names accepted by BottleneckConfig. "swish" is AdapterHub's name for SiLU.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}


def bottleneck_width(features: int, reduction_factor: float, bottleneck_size: int | None = None) -> int:
    """Width of the bottleneck: ``bottleneck_size`` when given, else ``features // reduction_factor`` (at least 1).

    Args:
        features: width of the hidden state the adapter reads and writes.
        reduction_factor: ratio of ``features`` to the bottleneck width.
        bottleneck_size: explicit width; overrides ``reduction_factor``.

    Raises:
        ValueError: if the width exceeds ``features``.
    """
    width = bottleneck_size if bottleneck_size is not None else max(1, int(features // reduction_factor))
    if width > features:
        raise ValueError(
            f"the bottleneck would be {width} wide on a layer with {features} features; it must be at most "
            f"{features} (it compresses the hidden state): lower bottleneck_size or raise reduction_factor."
        )
    return width


def make_projections(features: int, width: int, init_weights: bool) -> tuple[nn.Linear, nn.Linear]:
    """The down (features -> width) and up (width -> features) projections of one adapter.

    Args:
        features: width of the hidden state.
        width: bottleneck width.
        init_weights: ``True``: down as a default ``nn.Linear`` (Kaiming-uniform), up all zeros, both biases zero,
            so the adapter is exactly the identity at initialisation. ``False``: AdapterHub's "bert" init,
            weights drawn from N(0, 0.02) and biases zero: near, but not exactly, the identity.
    """
    down, up = nn.Linear(features, width), nn.Linear(width, features)
    with torch.no_grad():
        if init_weights:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        else:
            nn.init.normal_(down.weight, mean=0.0, std=0.02)
            nn.init.normal_(up.weight, mean=0.0, std=0.02)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.bias)
    return down, up


def apply_bottleneck(
    hidden: torch.Tensor, down: nn.Linear, up: nn.Linear, non_linearity: str, scaling: float
) -> torch.Tensor:
    """Return ``hidden + scaling * up(act(down(hidden)))``.

    The adapter runs in its own dtype (float32 on a bfloat16 or 4-bit base, where peft keeps adapters in float32);
    ``hidden`` is cast to it and the correction cast back, so ``hidden`` itself is never rounded.

    Args:
        hidden: the sublayer output, features last.
        down: projection to the bottleneck.
        up: projection back to the features.
        non_linearity: a key of :data:`ACTIVATIONS`.
        scaling: factor on the correction.
    """
    x = hidden.to(down.weight.dtype)
    correction = up(ACTIVATIONS[non_linearity](down(x))) * scaling
    return hidden + correction.to(hidden.dtype)
