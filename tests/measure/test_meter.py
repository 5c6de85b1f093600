"""TrainingMeter over a loop: a single Linear's figures worked out by hand, cadence, FLOP caching, and memory
falling once SAFE units are frozen on a tiny random BERT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_safe.measure import SavedTensorMeter, TrainingMeter, flop_counter

F32 = 4  # bytes per float32 element
BATCH, D_IN, D_OUT = 3, 5, 7


def linear_loop(meter: TrainingMeter, layer: nn.Linear, optimizer, steps: int, batch: int = BATCH, **step_kwargs):
    for _ in range(steps):
        x = torch.randn(batch, D_IN)
        with meter.step(batch=x, **step_kwargs):
            layer(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # inside the step: gradients are read before it


def test_single_linear_with_adam_matches_the_hand_formulas():
    torch.manual_seed(0)
    layer = nn.Linear(D_IN, D_OUT)
    optimizer = torch.optim.Adam(layer.parameters())
    meter = TrainingMeter(layer, optimizer, flops="measured")
    linear_loop(meter, layer, optimizer, steps=2)

    param_bytes = (D_IN * D_OUT + D_OUT) * F32
    for record in meter.records:
        assert record.measured
        assert record.activation_bytes == BATCH * D_IN * F32  # the saved input; the weight is no activation
        assert record.gradient_bytes == param_bytes  # read before zero_grad, although it ran in the step
        assert record.optimizer_state_bytes == 2 * param_bytes + 2 * F32  # exp_avg, exp_avg_sq, step per param
        assert record.trainable_parameter_bytes == param_bytes
        assert record.training_bytes == record.activation_bytes + record.gradient_bytes + record.optimizer_state_bytes
        # forward 2*b*in*out, backward only the weight's gradient (the input needs none): the same again
        assert record.flops == 2 * (2 * BATCH * D_IN * D_OUT)
        assert record.cuda_max_memory_allocated is None
        assert record.wall_time_s > 0
    assert [r.step for r in meter.records] == [0, 1]


def test_without_optimizer_gradients_are_read_at_the_end_and_state_is_zero():
    layer = nn.Linear(D_IN, D_OUT)
    meter = TrainingMeter(layer)
    with meter.step():
        layer(torch.randn(BATCH, D_IN)).sum().backward()
    (record,) = meter.records
    assert record.gradient_bytes == (D_IN * D_OUT + D_OUT) * F32
    assert record.optimizer_state_bytes == 0


def test_measures_every_nth_step_and_the_first_after_a_change_of_the_trainable_set():
    layer = nn.Linear(D_IN, D_OUT)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    meter = TrainingMeter(layer, optimizer, measure_every=4)
    linear_loop(meter, layer, optimizer, steps=6)
    layer.bias.requires_grad_(False)  # "freeze" part of the model before step 6
    linear_loop(meter, layer, optimizer, steps=4)
    assert [r.step for r in meter.measured] == [0, 4, 6, 8]
    assert meter.changes == [6] and meter.last_change == 6
    unmeasured = [r for r in meter.records if not r.measured]
    assert all(r.activation_bytes is None and r.training_bytes is None for r in unmeasured)
    assert meter.records[6].gradient_bytes == D_IN * D_OUT * F32  # the frozen bias has no gradient any more


def test_forced_measurement_overrides_the_cadence():
    layer = nn.Linear(D_IN, D_OUT)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    meter = TrainingMeter(layer, optimizer, measure_every=100)
    linear_loop(meter, layer, optimizer, steps=1, measure=False)
    linear_loop(meter, layer, optimizer, steps=1, measure=True)
    assert [r.measured for r in meter.records] == [False, True]


def test_cached_flops_count_the_first_two_steps_of_each_kind_and_give_the_run_total():
    layer = nn.Linear(D_IN, D_OUT)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    meter = TrainingMeter(layer, optimizer, measure_every=100, flops="cached")
    linear_loop(meter, layer, optimizer, steps=3)
    linear_loop(meter, layer, optimizer, steps=1, batch=1)  # a smaller last batch is a new kind of step
    linear_loop(meter, layer, optimizer, steps=2)
    counted = [r.step for r in meter.records if r.flops_counted]
    assert counted == [0, 1, 3]  # a kind's first step may do one-off work: its count is taken from the second

    def step_flops(batch):
        x = torch.randn(batch, D_IN)
        with flop_counter() as counter:
            layer(x).sum().backward()
        return counter.get_total_flops()

    expected = 5 * step_flops(BATCH) + step_flops(1)
    assert meter.summary().total_flops == expected
    assert TrainingMeter(layer, flops="none").flops == "none"


def test_summary_average_after_and_peak():
    layer = nn.Linear(D_IN, D_OUT)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)  # no state: training bytes = activations + grads
    meter = TrainingMeter(layer, optimizer)
    linear_loop(meter, layer, optimizer, steps=2, batch=4)
    linear_loop(meter, layer, optimizer, steps=2, batch=2)
    layer.weight.requires_grad_(False)
    linear_loop(meter, layer, optimizer, steps=2, batch=2)  # only the bias learns: nothing saved at all
    full = (D_IN * D_OUT + D_OUT) * F32
    per_step = [4 * D_IN * F32 + full] * 2 + [2 * D_IN * F32 + full] * 2 + [D_OUT * F32] * 2
    summary = meter.summary()
    assert summary.steps == summary.measured_steps == 6
    assert summary.avg_training_bytes == pytest.approx(sum(per_step) / 6)
    assert summary.peak_training_bytes == max(per_step)
    assert summary.after_step == 4
    assert summary.after_training_bytes == pytest.approx(D_OUT * F32)
    assert summary.after_activation_bytes == 0
    assert meter.summary(after_step=2).after_training_bytes == pytest.approx(sum(per_step[2:]) / 4)
    assert summary.total_flops is None  # FLOPs were not asked for
    assert summary.mean_unmetered_step_s is None  # every step was metered
    assert summary.wall_time_s == pytest.approx(sum(r.wall_time_s for r in meter.records))


def test_gradient_accumulation_counts_the_activations_held_at_once():
    layer = nn.Linear(D_IN, D_OUT)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    meter = TrainingMeter(layer, optimizer)
    with meter.step():
        for _ in range(3):  # three micro-batches, each graph freed by its backward
            layer(torch.randn(BATCH, D_IN)).sum().backward()
        optimizer.step()
    assert meter.records[0].activation_bytes == BATCH * D_IN * F32  # one micro-batch's input, not three


def test_saved_tensor_meter_peak_is_what_is_held_at_once():
    layer = nn.Linear(D_IN, D_OUT)
    with SavedTensorMeter(exclude=layer) as meter:
        first = layer(torch.randn(2, D_IN)).sum()
        second = layer(torch.randn(3, D_IN)).sum()  # both graphs alive: 2 + 3 rows held
        first.backward()
        second.backward()
        layer(torch.randn(4, D_IN)).sum().backward()  # alone: 4 rows
    assert meter.activation_bytes == (2 + 3 + 4) * D_IN * F32
    assert meter.peak_activation_bytes == (2 + 3) * D_IN * F32


def test_a_failed_step_is_not_recorded_and_the_meter_stays_usable():
    layer = nn.Linear(D_IN, D_OUT)
    meter = TrainingMeter(layer)
    with pytest.raises(ZeroDivisionError), meter.step():
        layer(torch.randn(BATCH, D_IN))
        raise ZeroDivisionError
    assert meter.records == []
    with meter.step():
        layer(torch.randn(BATCH, D_IN)).sum().backward()
    assert len(meter.records) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(measure_every=0), "measure_every must be an integer >= 1, got 0"),
        (dict(flops="always"), "flops must be one of"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingMeter(nn.Linear(2, 2), **kwargs)


def test_bad_types_and_misuse_are_named():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        TrainingMeter("model")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        TrainingMeter(nn.Linear(2, 2), optimizer="adam")
    meter = TrainingMeter(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no step was tracked"):
        meter.summary()
    with pytest.raises(RuntimeError, match="no step is being tracked"):
        meter.end_step()
    meter.begin_step()
    with pytest.raises(RuntimeError, match="already being tracked"):
        meter.begin_step()


def test_memory_falls_after_freezing_the_bottom_units(tiny, single_thread_torch):
    model = tiny.safe("bert", layers=4)
    safe = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    meter = TrainingMeter(model, optimizer, measure_every=1)
    batch = {**tiny.batch(batch=4, seq=16), "labels": torch.tensor([0, 1, 0, 1])}
    model.train()

    def train(steps):
        for _ in range(steps):
            with meter.step(batch=batch):
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    train(2)
    safe.freeze([0, 1, 2], optimizer=optimizer)
    train(2)
    before, after = meter.records[1], meter.records[3]
    assert meter.changes == [2]
    assert after.activation_bytes < 0.6 * before.activation_bytes  # backprop stops below block 3
    assert after.gradient_bytes < before.gradient_bytes
    assert after.optimizer_state_bytes < before.optimizer_state_bytes
    summary = meter.summary()
    assert summary.after_training_bytes == pytest.approx((meter.records[2].training_bytes + after.training_bytes) / 2)
    assert summary.after_training_bytes < summary.avg_training_bytes < summary.peak_training_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_recorded_on_measured_steps():
    layer = nn.Linear(D_IN, D_OUT).cuda()
    meter = TrainingMeter(layer, measure_every=2)
    for _ in range(3):
        with meter.step():
            layer(torch.randn(BATCH, D_IN, device="cuda")).sum().backward()
    peaks = [r.cuda_max_memory_allocated for r in meter.records]
    assert peaks[0] > 0 and peaks[1] is None and peaks[2] > 0
    assert meter.summary().peak_cuda_max_memory_allocated == max(peaks[0], peaks[2])
