"""MeasureCallback inside a real transformers Trainer: a single Linear's figures worked out by hand, the log
entries, and memory falling in the logs once SAFE units freeze (tiny random BERT, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_safe.callbacks.measure import MeasureCallback

F32 = 4
BATCH, D_IN, D_OUT = 4, 5, 3


pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


class SumOfLinear(nn.Module):
    """A Linear whose loss is the sum of its outputs: autograd saves exactly its input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D_IN, D_OUT)

    def forward(self, x, labels=None):
        return {"loss": self.linear(x).sum()}


def trainer_args(tmp_path, steps: int, batch: int = BATCH, accumulation: int = 1) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-2,
        gradient_accumulation_steps=accumulation, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, optim="adamw_torch", dataloader_num_workers=0,
    )


def linear_rows(n: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [{"x": torch.randn(D_IN), "labels": torch.tensor(0)} for _ in range(n)]


def memory_entries(trainer: Trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "memory/training_bytes" in e]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_linear_figures_match_the_hand_formulas(tmp_path, accumulation):
    callback = MeasureCallback(measure_every=1, flops="measured")
    trainer = Trainer(model=SumOfLinear(), args=trainer_args(tmp_path, steps=3, accumulation=accumulation),
                      train_dataset=linear_rows(3 * BATCH * accumulation), callbacks=[callback])
    trainer.train()

    param_bytes = (D_IN * D_OUT + D_OUT) * F32
    entries = memory_entries(trainer)
    assert [e["step"] for e in entries] == [1, 2, 3]  # the Trainer's global step once each step is done
    for entry in entries:
        # one micro-batch's input, however many micro-batches the step accumulates
        assert entry["memory/activation_bytes"] == BATCH * D_IN * F32
        assert entry["memory/gradient_bytes"] == param_bytes  # read before the Trainer's zero_grad
        assert entry["memory/optimizer_state_bytes"] == 2 * param_bytes + 2 * F32  # AdamW moments + steps
        assert entry["memory/training_bytes"] == (
            entry["memory/activation_bytes"] + entry["memory/gradient_bytes"] + entry["memory/optimizer_state_bytes"]
        )
        # per micro-batch: forward 2*b*in*out, backward the weight's gradient only (the input needs none)
        assert entry["memory/flops"] == accumulation * 2 * (2 * BATCH * D_IN * D_OUT)
    summary = callback.summary()
    assert summary.steps == 3 and summary.peak_activation_bytes == BATCH * D_IN * F32


def test_log_lines_carry_the_latest_figures_in_mib(tmp_path):
    seen = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = Trainer(model=SumOfLinear(), args=trainer_args(tmp_path, steps=2), train_dataset=linear_rows(2 * BATCH),
                      callbacks=[MeasureCallback(), Spy()])
    trainer.train()
    with_loss = [line for line in seen if "loss" in line]
    assert with_loss and all("memory/training_mib" in line for line in with_loss)
    entry = memory_entries(trainer)[-1]
    assert with_loss[-1]["memory/training_mib"] == pytest.approx(entry["memory/training_bytes"] / 2**20, abs=1e-3)


def test_measure_every_sets_which_steps_are_logged(tmp_path):
    trainer = Trainer(model=SumOfLinear(), args=trainer_args(tmp_path, steps=5), train_dataset=linear_rows(5 * BATCH),
                      callbacks=[MeasureCallback(measure_every=2)])
    trainer.train()
    assert [e["step"] for e in memory_entries(trainer)] == [1, 3, 5]


class FreezeBottomAt(TrainerCallback):
    """Freeze the bottom units of a SAFE model by hand at the end of a given step."""

    def __init__(self, step: int, units: list[int]) -> None:
        self.step, self.units = step, units

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step:
            model.base_model.freeze(self.units, optimizer=optimizer)


def test_memory_falls_in_the_logs_after_safe_freezes(tmp_path, tiny):
    model = tiny.safe("bert", layers=4)
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(i % 2)}
        for i, ids in enumerate(torch.randint(1, tiny.vocab, (6 * 4, 16), generator=generator))
    ]
    callback = MeasureCallback(measure_every=1)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, steps=6, batch=4), train_dataset=rows,
                      callbacks=[FreezeBottomAt(step=3, units=[0, 1, 2]), callback])
    trainer.train()

    entries = {e["step"]: e for e in memory_entries(trainer)}
    assert sorted(entries) == list(range(1, 7))
    before, after = entries[3], entries[4]  # the units froze at the end of global_step 3
    assert after["memory/activation_bytes"] < 0.6 * before["memory/activation_bytes"]
    assert after["memory/gradient_bytes"] < before["memory/gradient_bytes"]
    assert after["memory/optimizer_state_bytes"] < before["memory/optimizer_state_bytes"]
    assert after["memory/trainable_parameter_bytes"] < before["memory/trainable_parameter_bytes"]
    summary = callback.summary()
    assert summary.after_step == 3
    assert summary.after_training_bytes < summary.avg_training_bytes < summary.peak_training_bytes


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="measure_every must be an integer >= 1, got 0"):
        MeasureCallback(measure_every=0)
    with pytest.raises(ValueError, match="flops must be one of"):
        MeasureCallback(flops="yes")
    with pytest.raises(ValueError, match="call trainer.train"):
        MeasureCallback().summary()
