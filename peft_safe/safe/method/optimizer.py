"""Taking frozen parameters out of the optimizer that trains them, state (Adam moments) included.

``requires_grad=False`` alone stops updates but frees nothing an optimizer holds: its per-parameter state stays
allocated and the parameter stays in its groups. Removing both means an optimizer rebuilt from the parameters
that require grad (as the Trainer does on resume) has exactly the layout of this one, so its saved state loads.

Imports: torch only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["check_optimizer", "drop_from_optimizer"]


def check_optimizer(optimizer: Any) -> None:
    """Refuse anything but a torch optimizer or ``None``.

    Raises:
        TypeError: naming the type that was passed.
    """
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (the one training this model) or None, "
            f"got {type(optimizer).__name__}."
        )


def drop_from_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Delete the state of ``params`` and take them out of the optimizer's parameter groups.

    A group built from named parameters (``param_names`` beside ``params``, torch >= 2.6) loses the names of the
    parameters it loses, so every name left still belongs to its parameter (``optimizer.state_dict()`` keys
    Adam's moments by them).
    """
    ids = {id(p) for p in params}
    for param in params:
        optimizer.state.pop(param, None)
    for group in optimizer.param_groups:
        keep = [id(p) not in ids for p in group["params"]]
        names = group.get("param_names")
        if names is not None and len(names) == len(keep):
            group["param_names"] = [name for name, kept in zip(names, keep) if kept]
        group["params"] = [p for p, kept in zip(group["params"], keep) if kept]
