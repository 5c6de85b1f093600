"""SAFE's automatic schedule inside a transformers Trainer follows the Trainer's own step (issue 22): a resumed run,
gradient accumulation and a second run keep scoring, a schedule longer than the run is a warning, and the automatic
path makes SAFECallback's decisions. Tiny random BERTs and the synthetic task of test_safe_callback, CPU."""

from __future__ import annotations

import pytest
import torch
from test_safe_callback import (
    STEP_SCHEDULE,
    adapter_weights,
    examples,
    optimizer_param_ids,
    safe_model,
    safe_records,
    training_args,
    unit_params,
)
from transformers import Trainer

from peft_safe import SAFECallback, SAFEConfig
from peft_safe.safe.method.driver import PROBE_FILE, schedule_length_warning

pytestmark = pytest.mark.usefixtures("single_thread_torch")

MAX_STEPS = 14


def auto_run(output_dir, resume_from=None, accumulation=1, callbacks=(), **schedule):
    """SAFE with nothing but its config (no SAFECallback), checkpointing every 4 optimizer steps."""
    model = safe_model(**{**STEP_SCHEDULE, "final_freeze_time": 10, "warmup_cap": 4, **schedule})
    args = training_args(output_dir, max_steps=MAX_STEPS, save_strategy="steps", save_steps=4,
                         per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation)
    trainer = Trainer(model=model, args=args, train_dataset=examples(64, seed=1), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume_from)
    return model, trainer


def times(model) -> list[float]:
    return [h["t"] for h in model.base_model.freeze_state.history]


@pytest.fixture(scope="module", params=[1, 2], ids=["no-accumulation", "accumulation-2"])
def uninterrupted(request, tmp_path_factory, single_thread_torch):
    folder = tmp_path_factory.mktemp(f"full{request.param}")
    model, trainer = auto_run(folder, accumulation=request.param)
    return folder, request.param, model, trainer


def test_the_automatic_schedule_scores_at_the_trainers_steps(uninterrupted):
    _, _, model, trainer = uninterrupted
    assert times(model) == [2, 4, 6, 8, 10, 12, 14]
    assert model.base_model.auto_driver.active and model.base_model.frozen_units
    assert [r["safe/t"] for r in safe_records(trainer.state.log_history)] == [2, 4, 6, 8, 10, 12, 14]


@pytest.mark.parametrize("checkpoint", [4, 8], ids=["before-the-first-freeze", "after-it"])
def test_a_resumed_run_freezes_and_trains_exactly_as_the_uninterrupted_one(uninterrupted, tmp_path, checkpoint):
    # issue 22.1: the resumed driver saw global_step N and no optimizer step, blamed DeepSpeed and stood down
    folder, accumulation, full, _ = uninterrupted
    full_state = full.base_model.freeze_state
    first_freeze = min(full_state.frozen.values())
    assert first_freeze > checkpoint if checkpoint == 4 else first_freeze <= checkpoint  # the scenario holds
    resume = folder / f"checkpoint-{checkpoint}"
    assert (resume / PROBE_FILE.format(rank=0)).is_file()  # the probe set travels with the Trainer checkpoint
    with pytest.warns() as caught:
        resumed, trainer = auto_run(tmp_path, resume_from=str(resume), accumulation=accumulation)
    assert not [w for w in caught if "DeepSpeed" in str(w.message)]
    state = resumed.base_model.freeze_state
    assert resumed.base_model.auto_driver.active
    assert state.history == full_state.history and state.frozen == full_state.frozen
    assert state.warmup_end == full_state.warmup_end
    full_weights, weights = adapter_weights(full), adapter_weights(resumed)
    for name, value in full_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-7, msg=name)
    frozen = {id(p) for unit in state.frozen for p in unit_params(resumed, unit).values()}
    assert frozen and not frozen & optimizer_param_ids(trainer.optimizer)


def test_the_automatic_path_and_safecallback_make_the_same_decisions(tmp_path):
    # the driver's probe set (its first kept training batches) handed to SAFECallback: same scores, same freezing
    schedule = {"probe_tokens": 2 * 8 * 12}  # two batches of 8 x 12 tokens: full before the first scoring
    auto, _ = auto_run(tmp_path / "auto", **schedule)
    probe = auto.base_model.auto_driver.probe
    assert len(probe) == 2
    by_callback, _ = auto_run(tmp_path / "callback", callbacks=[SAFECallback(probe_dataset=probe)], **schedule)
    assert not by_callback.base_model.auto_driver.active
    assert auto.base_model.freeze_state.to_dict() == by_callback.base_model.freeze_state.to_dict()
    assert auto.base_model.frozen_units
    weights, other = adapter_weights(auto), adapter_weights(by_callback)
    assert all(torch.equal(weights[name], other[name]) for name in weights)


def test_a_second_run_after_restart_schedule_scores_from_its_own_first_step(tmp_path):
    # issue 22.3: the driver acted at the new run's first forward with the old Trainer's step and a stale flag,
    # ended warm-up and reached tau on that one score, then never scored again
    model, _ = auto_run(tmp_path / "first")
    assert model.base_model.frozen_units
    model.base_model.restart_schedule()
    args = training_args(tmp_path / "second", max_steps=8)
    trainer = Trainer(model=model, args=args, train_dataset=examples(64, seed=3))
    trainer.train()
    assert times(model) == [2, 4, 6, 8]
    records = safe_records(trainer.state.log_history)
    assert records[0]["safe/frozen_units"] == 0  # one score cannot end warm-up


@pytest.mark.parametrize("with_callback", [False, True], ids=["automatic", "SAFECallback"])
def test_a_schedule_longer_than_the_run_is_a_warning_naming_both_figures(tmp_path, with_callback):
    # issue 22.7: the default config (t_f = 5 epochs) under the Trainer's 3 epochs froze nothing, silently
    model = safe_model()  # every schedule default: epochs, final_freeze_time=5
    assert model.base_model.safe_config.final_freeze_time == 5
    args = training_args(tmp_path, num_train_epochs=3)
    callbacks = [SAFECallback(probe_dataset=examples(8, seed=2))] if with_callback else []
    trainer = Trainer(model=model, args=args, train_dataset=examples(16, seed=1), callbacks=callbacks)
    with pytest.warns(UserWarning, match=r"final_freeze_time=5 epoch.*trains 3 epoch.*final_freeze_time=") as caught:
        trainer.train()
    assert sum("longer than this run" in str(w.message) for w in caught) == 1


def test_a_schedule_within_the_run_is_no_warning():
    config = SAFEConfig(adapter_config={"peft_type": "LORA", "target_modules": ["query"]}, schedule_unit="step",
                        scoring_interval=2, final_freeze_time=10)
    assert schedule_length_warning(config, 10) is None
    assert "final_freeze_time=10" in schedule_length_warning(config, 9)
    assert "scoring_interval=2" in schedule_length_warning(config, 1)
    assert schedule_length_warning(config, None) is None
