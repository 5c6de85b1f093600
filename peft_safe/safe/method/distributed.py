"""SAFE in multi-process training: every rank makes the same freeze decisions.

Under DistributedDataParallel each rank scores importance on its own probe batches, so left alone the ranks
would compute different scores and could freeze different units: their models would then stop being
replicas (a unit frozen on one rank keeps training on another). :meth:`SAFEModel.update_and_freeze` therefore
passes its scores through :func:`agree_on_scores` before the schedule sees them:

- the ranks first check that they score the same units at the same time (a rank that diverged, e.g. resumed
  from another checkpoint, is an error instead of a silent disagreement, and never a hang in a later collective);
- the per-unit scores are averaged over the ranks (one all-reduce of one float64 per unit), so the decision
  uses every rank's probe data at the cost of a few bytes of communication;
- rank 0's average is broadcast, so the scores, and with them the history, the end of warm-up and the frozen
  units, are bitwise identical on every rank, whatever order a backend sums in.

Averaging scores was preferred over pooling the CKA statistics (exact over the union of the probe sets, but
d x d cross-products per unit to reduce: 3 x 16 M floats per block of a 4096-wide model) and over deciding on
rank 0 alone (the other ranks' probe data would be wasted).

Outside ``torch.distributed`` (or with one process) :func:`agree_on_scores` returns the scores unchanged.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["agree_on_scores", "check_ddp", "check_trainer_ddp", "is_distributed"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and MPI) take CPU tensors.
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_scores(scores: dict[str, float], t: float) -> dict[str, float]:
    """The scores every rank uses: the mean over the ranks of each rank's scores, as rank 0 computed it.

    Every rank must call this (through ``update_and_freeze``) at the same scoring time with the same units.

    Args:
        scores: this rank's raw importance per unit, in unit order.
        t: the scoring time, checked to be the same on every rank.

    Returns:
        unit name -> importance averaged over the ranks; ``scores`` itself when not distributed.

    Raises:
        RuntimeError: if the ranks score different units or at different times.
    """
    if not is_distributed():
        return scores
    device = _collective_device()
    names = list(scores)
    signature = torch.tensor(
        [float(t), float(len(names)), float(zlib.crc32("\n".join(names).encode("utf-8")))],
        dtype=torch.float64,
        device=device,
    )
    low, high = signature.clone(), signature.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"SAFE ranks disagree on what to score at t={t}: rank {dist.get_rank()} scores {len(names)} units "
            f"{names[:4]}{'...' if len(names) > 4 else ''}. Call update_and_freeze on every rank with the same t, and "
            "start every rank from the same model and checkpoint, so that they freeze the same units."
        )
    if not names:
        return {}
    values = torch.tensor([scores[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= dist.get_world_size()
    dist.broadcast(values, src=0)
    return {name: float(value) for name, value in zip(names, values.tolist())}


def check_ddp(model: nn.Module) -> None:
    """Raise if ``model`` is a DistributedDataParallel wrapper that breaks once SAFE freezes units.

    DDP builds its reducer from the parameters that require grad when it wraps the model, and by default waits
    for a gradient of every one of them at each backward. Frozen parameters get none, so the next iteration
    fails with "Expected to have finished reduction in the prior iteration". With
    ``find_unused_parameters=True`` DDP marks them ready itself and training goes on; ``static_graph=True``
    forbids the set of used parameters to change and fails the same way.

    Args:
        model: the wrapped model (anything else passes).

    Raises:
        ValueError: if it is a DDP wrapper without ``find_unused_parameters=True``, or with ``static_graph``.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return
    find_unused = getattr(model, "find_unused_parameters", None)
    static_graph = getattr(model, "static_graph", False)
    if static_graph or not find_unused:
        raise ValueError(
            f"this DistributedDataParallel wrapper has find_unused_parameters={find_unused!r}, "
            f"static_graph={static_graph!r}; {_FROZEN_UNITS_UNDER_DDP}"
        )


def check_trainer_ddp(world_size: int, ddp_find_unused_parameters: bool | None) -> None:
    """The check of :func:`check_ddp` on a Trainer's arguments, before the Trainer wraps the model.

    Raises:
        ValueError: if the run is distributed and ``ddp_find_unused_parameters`` is ``False``.
    """
    if world_size > 1 and ddp_find_unused_parameters is False:
        raise ValueError(
            "SAFE under DistributedDataParallel needs ddp_find_unused_parameters=True (or unset: the Trainer's "
            f"default for peft models), got False; {_FROZEN_UNITS_UNDER_DDP}"
        )


_FROZEN_UNITS_UNDER_DDP = (
    "SAFE stops gradients of frozen units, which DDP then waits for forever. Wrap with "
    "DistributedDataParallel(model, find_unused_parameters=True) (accelerate: "
    "DistributedDataParallelKwargs(find_unused_parameters=True); Trainer: ddp_find_unused_parameters=True, "
    "its default for peft models)."
)

