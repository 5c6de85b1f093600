"""SavedTensorMeter and the byte counters, checked against sizes worked out by hand from the shapes."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from peft_safe.measure import SavedTensorMeter, gradient_bytes, optimizer_state_bytes, parameter_bytes

F32 = 4  # bytes per float32 element


def test_linear_saves_only_its_input_as_activation():
    batch, d_in, d_out = 3, 5, 7
    layer = nn.Linear(d_in, d_out)
    x = torch.randn(batch, d_in)
    with SavedTensorMeter(exclude=layer) as meter:
        layer(x).sum()
    assert meter.activation_bytes == batch * d_in * F32
    assert meter.total_bytes == batch * d_in * F32


def test_weight_saved_for_backward_is_excluded_from_activations():
    batch, d_in, d_out = 3, 5, 7
    layer = nn.Linear(d_in, d_out)
    x = torch.randn(batch, d_in, requires_grad=True)  # grad wrt x needs the weight
    with SavedTensorMeter(exclude=layer) as meter:
        layer(x).sum()
    assert meter.activation_bytes == batch * d_in * F32
    assert meter.total_bytes == batch * d_in * F32 + d_in * d_out * F32


def test_exclude_accepts_an_iterable_of_tensors_and_none():
    layer = nn.Linear(5, 7)
    x = torch.randn(3, 5, requires_grad=True)
    with SavedTensorMeter(exclude=list(layer.parameters())) as by_list:
        layer(x)
    with SavedTensorMeter() as nothing_excluded:
        layer(x)
    assert by_list.activation_bytes == 3 * 5 * F32
    assert nothing_excluded.activation_bytes == nothing_excluded.total_bytes == (3 * 5 + 5 * 7) * F32


def test_frozen_first_layer_removes_the_activations_below_the_first_trainable_layer():
    batch, d_in, hidden, d_out = 4, 6, 10, 3
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    x = torch.randn(batch, d_in)

    with SavedTensorMeter(exclude=mlp) as trainable:
        mlp(x).sum()
    mlp[0].requires_grad_(False)
    with SavedTensorMeter(exclude=mlp) as frozen:
        mlp(x).sum()

    # Trainable: x (for W1's grad) and the ReLU output (ReLU's backward and W2's grad share it).
    assert trainable.activation_bytes == batch * d_in * F32 + batch * hidden * F32
    # Frozen first layer: nothing below layer 2 needs a gradient, only layer 2's input is kept.
    assert frozen.activation_bytes == batch * hidden * F32
    assert trainable.activation_bytes - frozen.activation_bytes == batch * d_in * F32


def test_tensor_saved_twice_counts_once():
    x = torch.randn(8, 4, requires_grad=True)
    with SavedTensorMeter() as meter:
        x * x  # mul saves both operands: the same tensor twice
    assert meter.count == 2
    assert meter.storage_count == 1
    assert meter.total_bytes == 8 * 4 * F32


def test_views_of_one_storage_count_once_at_the_full_storage_size():
    x = torch.randn(8, 4, requires_grad=True)
    with SavedTensorMeter() as meter:
        x[:2] * x[4:6]  # two saved views, one storage
    assert meter.count == 2
    assert meter.storage_count == 1
    assert meter.total_bytes == 8 * 4 * F32


def test_meta_tensors_without_data_are_not_merged():
    a = torch.empty(8, 4, device="meta", requires_grad=True)
    b = torch.empty(8, 4, device="meta", requires_grad=True)
    with SavedTensorMeter() as meter:
        outputs = [a * b, a * a]  # kept alive so autograd still holds the first saves during the second
    assert meter.count == 4
    assert meter.storage_count == 2
    assert meter.total_bytes == 2 * 8 * 4 * F32
    del outputs


def test_meter_keeps_no_saved_tensor_alive():
    x = torch.randn(64, requires_grad=True)
    with SavedTensorMeter() as meter:
        hidden = x.exp()  # exp saves its output
        out = hidden.exp().sum()
        watcher = weakref.ref(hidden)
        del hidden, out
        gc.collect()
        assert watcher() is None
    assert meter.total_bytes == 2 * 64 * F32


def test_storage_freed_and_reused_inside_the_context_counts_again():
    x = torch.randn(1024, requires_grad=True)
    with SavedTensorMeter() as meter:
        for _ in range(10):
            y = x.exp()  # saves y
            del y  # frees y and its graph; the allocator is free to hand the same memory to the next y
    assert meter.storage_count == 10
    assert meter.total_bytes == 10 * 1024 * F32


def test_backward_through_the_meter_matches_backward_without_it():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 3))
    x = torch.randn(4, 6)
    mlp(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    with SavedTensorMeter(exclude=mlp):
        loss = mlp(x).pow(2).sum()
    loss.backward()
    for param, grad in zip(mlp.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad)


def test_in_place_change_of_a_saved_tensor_is_still_detected():
    x = torch.randn(10, requires_grad=True)
    with SavedTensorMeter():
        y = x.exp()
        y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_entering_again_resets_the_counts():
    x = torch.randn(8, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        x.exp()
        x.exp()
    assert meter.storage_count == 2
    with meter:
        x.exp()
    assert meter.storage_count == 1
    assert meter.total_bytes == 8 * F32


def test_exclude_of_the_wrong_type_raises():
    with pytest.raises(TypeError, match="exclude must be"):
        SavedTensorMeter(exclude=3)
    with pytest.raises(TypeError, match="exclude must hold tensors"), SavedTensorMeter(exclude=["weight"]):
        pass


def test_parameter_and_gradient_bytes():
    lin1, lin2 = nn.Linear(5, 7), nn.Linear(7, 2)
    model = nn.Sequential(lin1, nn.ReLU(), lin2)
    lin1.requires_grad_(False)
    all_bytes = (5 * 7 + 7 + 7 * 2 + 2) * F32
    trainable_bytes = (7 * 2 + 2) * F32
    assert parameter_bytes(model) == (all_bytes, trainable_bytes)

    assert gradient_bytes(model) == 0
    model(torch.randn(3, 5)).sum().backward()
    assert gradient_bytes(model) == trainable_bytes
    model.zero_grad(set_to_none=False)
    assert gradient_bytes(model) == trainable_bytes  # zeroed gradients still hold memory
    model.zero_grad(set_to_none=True)
    assert gradient_bytes(model) == 0


def test_tied_parameters_count_once():
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.ModuleList([embed, head])
    assert parameter_bytes(model) == (10 * 4 * F32, 10 * 4 * F32)


def test_half_precision_parameters_count_two_bytes_each():
    model = nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    assert parameter_bytes(model) == (4 * 3 * 2, 4 * 3 * 2)


def test_adam_state_is_two_moments_and_a_scalar_step_per_parameter():
    d_in, d_out = 5, 7
    layer = nn.Linear(d_in, d_out)
    optimizer = torch.optim.Adam(layer.parameters())
    assert optimizer_state_bytes(optimizer) == 0
    layer(torch.randn(3, d_in)).sum().backward()
    optimizer.step()
    param_bytes = (d_in * d_out + d_out) * F32
    step_bytes = 2 * F32  # one float32 scalar "step" tensor for the weight and one for the bias
    assert optimizer_state_bytes(optimizer) == 2 * param_bytes + step_bytes


def test_sgd_momentum_state_is_one_buffer_per_parameter():
    layer = nn.Linear(5, 7)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(3, 5)).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == (5 * 7 + 7) * F32


def test_counters_reject_the_wrong_types():
    with pytest.raises(TypeError, match="nn.Module"):
        parameter_bytes([torch.zeros(3)])
    with pytest.raises(TypeError, match="nn.Module"):
        gradient_bytes("model")
    with pytest.raises(TypeError, match="state_dict"):
        optimizer_state_bytes({"state": {}})
