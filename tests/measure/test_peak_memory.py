"""PeakMemoryMeter: the most bytes held at once, recompute included, each storage once, parameters excluded."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from peft_safe.measure.memory import PeakMemoryMeter, SavedTensorMeter

MIB = 2**20
FLOATS_PER_MIB = MIB // 4


def test_freed_tensors_stop_counting_and_views_count_once():
    model = nn.Linear(4, 4)
    with PeakMemoryMeter(model) as meter:
        for _ in range(5):
            big = torch.ones(FLOATS_PER_MIB)  # 1 MiB, freed when the next one replaces it
            del big
        kept = torch.ones(2 * FLOATS_PER_MIB)
        views = [kept[:10], kept.view(2, -1), kept.t() if kept.dim() == 2 else kept[1:]]
    assert meter.peak_bytes == 2 * MIB
    del views


def test_parameters_are_excluded_and_the_optimizer_state_from_before_is_counted():
    model = nn.Linear(256, 256, bias=False)  # 256 KiB of weight
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    with PeakMemoryMeter(model, optimizer) as meter:
        pass
    assert meter.peak_bytes == state  # two moments of the weight (and Adam's step counter)
    with PeakMemoryMeter(model) as meter, torch.no_grad():
        model.weight.mul_(1.0)  # in place on a parameter: nothing new
    assert meter.peak_bytes == 0


def test_what_checkpointing_recomputes_in_backward_is_counted():
    """The saved-tensor meter sees only a checkpoint's input; the peak sees the recomputed intermediate."""
    weight = nn.Parameter(torch.ones(FLOATS_PER_MIB))
    holder = nn.Module()
    holder.weight = weight

    def inner(x):
        wide = (x * weight).repeat(4)  # 4 MiB, saved for the square's backward
        return (wide * wide).sum()

    x = torch.ones(FLOATS_PER_MIB)  # made before the meters: the saved-tensor meter counts it, the peak does not
    with PeakMemoryMeter(holder) as peak, SavedTensorMeter(exclude=holder) as saved:
        checkpoint(inner, x, use_reentrant=False).backward()
    assert saved.activation_bytes == x.nbytes  # of the forward, only the checkpoint's input was kept
    # backward recomputed the 4 MiB intermediate and, while it was held, made its 4 MiB gradient
    assert peak.peak_bytes >= 8 * MIB
    with PeakMemoryMeter(holder) as plain:
        inner(x).backward()
    assert plain.peak_bytes >= 8 * MIB


def test_a_training_step_peak_is_at_least_its_saved_activations_plus_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(4)])
    data = torch.randn(512, 128)
    with PeakMemoryMeter(model) as peak, SavedTensorMeter(exclude=model) as saved:
        model(data).pow(2).mean().backward()
    grads = sum(p.grad.nbytes for p in model.parameters())
    assert peak.peak_bytes >= saved.activation_bytes
    assert peak.peak_bytes <= saved.activation_bytes + grads + 3 * data.nbytes  # plus a few temporaries


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        PeakMemoryMeter("model")
