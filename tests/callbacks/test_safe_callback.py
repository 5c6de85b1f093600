"""SAFECallback inside a real transformers Trainer: scoring times, logs, freezing, optimizer, exact resume.

Tiny random BERTs built here (no downloads), a synthetic learnable task (label 1 iff token 7 occurs), CPU.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import PAPER_RULE, SEQ, marker_examples, tiny_bert
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import peft_safe  # noqa: F401  (registers the SAFE peft type)
from peft_safe import SAFECallback, SAFEConfig

LAYERS = 4
UNITS = [f"bert.encoder.layer.{i}" for i in range(LAYERS)]

# Step schedule: scoring every 2 steps, warm-up capped at step 4, threshold reaches tau=1 at step 8. With
# normalized scores and tau=1, every unit but the top scorer is frozen from t_f on.
STEP_SCHEDULE = dict(
    schedule_unit="step", scoring_interval=2, final_freeze_time=8, warmup_cap=4, tau=1.0,
    importance_scale="normalized",
)
# Epoch schedule: warm-up capped at epoch 2, then T(3) = 0.578, T(4) = 0.875, T(5) = 0.984, T(6) = tau = 1.
EPOCH_SCHEDULE = dict(
    schedule_unit="epoch", scoring_interval=1, final_freeze_time=6, warmup_cap=2, tau=1.0,
    importance_scale="normalized",
)


# ---------------------------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


# ---------------------------------------------------------------------------------------------- builders
def examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Tokenized examples of the synthetic task (tests/marker_task.py)."""
    return marker_examples(n, seed, SEQ)


def as_batches(rows: list[dict[str, torch.Tensor]], size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {key: torch.stack([row[key] for row in rows[i : i + size]]) for key in rows[0]}
        for i in range(0, len(rows), size)
    ]


def safe_model(seed: int = 0, **schedule):
    base = tiny_bert(LAYERS, seed)
    config = SAFEConfig(
        adapter_config=LoraConfig(r=4, target_modules=["query", "value"]), task_type="SEQ_CLS",
        **{**PAPER_RULE, "scoring_site": "block_output", **schedule},  # the scenarios were built on 0.1's scores
    )
    return get_peft_model(base, config)


def training_args(output_dir, **kwargs) -> TrainingArguments:
    kwargs.setdefault("per_device_train_batch_size", 8)
    kwargs.setdefault("per_device_eval_batch_size", 8)
    kwargs.setdefault("learning_rate", 1e-2)
    kwargs.setdefault("save_strategy", "no")
    kwargs.setdefault("logging_steps", 1000)
    return TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, report_to=[], dataloader_num_workers=0, disable_tqdm=True,
        seed=0, data_seed=0, **kwargs,
    )


def unit_params(peft_model, unit: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters inside one transformer block (a unit), by name."""
    prefix = f"base_model.model.{unit}."
    return {n: p for n, p in peft_model.named_parameters() if n.startswith(prefix) and ".lora_" in n}


def adapter_weights(peft_model) -> dict[str, torch.Tensor]:
    """Every parameter that training may change: LoRA weights and the classifier copy."""
    return {
        n: p.detach().clone() for n, p in peft_model.named_parameters() if ".lora_" in n or "modules_to_save" in n
    }


def optimizer_param_ids(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def optimizer_state_ids(optimizer) -> set[int]:
    return {id(p) for p in optimizer.state}


def cubic(t: float, t_w: float, t_f: float, tau: float) -> float:
    """The schedule's threshold, written out from the paper (not from the package)."""
    if t < t_w:
        return 0.0
    if t >= t_f or t_w >= t_f:
        return tau
    return tau * (1 - (1 - (t - t_w) / (t_f - t_w)) ** 3)


def safe_records(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "safe/frozen_units" in entry]


class FreezeWatcher(TrainerCallback):
    """Runs after SAFECallback: snapshots each unit's parameters at the step it froze and looks at the optimizer."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.snapshots: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self.optimizer_checks: list[tuple[int, str, bool, bool]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        safe = self.peft_model.base_model
        for unit in safe.frozen_units:
            if unit in self.snapshots:
                continue
            params = unit_params(self.peft_model, unit)
            self.snapshots[unit] = (state.global_step, {n: p.detach().clone() for n, p in params.items()})
            in_groups = bool(optimizer_param_ids(optimizer) & {id(p) for p in params.values()})
            in_state = bool(optimizer_state_ids(optimizer) & {id(p) for p in params.values()})
            self.optimizer_checks.append((state.global_step, unit, in_groups, in_state))


def run_step_trainer(output_dir, probe, max_steps=12, watch=False, **kwargs):
    peft_model = safe_model(**STEP_SCHEDULE)
    callback = SAFECallback(probe_dataset=probe, batch_size=8)
    callbacks = [callback]
    watcher = FreezeWatcher(peft_model) if watch else None
    if watcher is not None:
        callbacks.append(watcher)
    trainer = Trainer(
        model=peft_model,
        args=training_args(output_dir, max_steps=max_steps, **kwargs),
        train_dataset=examples(64, seed=1),
        callbacks=callbacks,
    )
    trainer.train()
    return peft_model, trainer, callback, watcher


# ---------------------------------------------------------------------------------------------- 1. a run
@pytest.fixture(scope="module")
def step_run(tmp_path_factory, single_thread_torch):
    peft_model, trainer, callback, watcher = run_step_trainer(
        tmp_path_factory.mktemp("step_run"), probe=examples(16, seed=2), max_steps=12, watch=True
    )
    return peft_model, trainer, callback, watcher


def test_callback_scores_every_scoring_interval_steps_and_logs_it(step_run):
    peft_model, trainer, callback, _ = step_run
    records = safe_records(trainer.state.log_history)
    assert [r["safe/t"] for r in records] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    frozen_so_far: set[str] = set()
    history = peft_model.base_model.freeze_state.history
    assert len(history) == len(records)
    for record, scoring in zip(records, history):
        # every unit is logged; frozen units are not scored again and keep the score they froze on
        logged = {k.removeprefix("safe/importance/") for k in record if k.startswith("safe/importance/")}
        assert logged == set(UNITS)
        assert set(scoring["scores"]) == set(UNITS) - frozen_so_far
        assert all(0.0 <= record[f"safe/importance/{u}"] <= 1.0 for u in logged)
        # normalized scale: the most important unit scores exactly 1
        assert max(record[f"safe/importance/{u}"] for u in logged) == pytest.approx(1.0)
        frozen_so_far |= {u for u in record["safe/newly_frozen"].split(",") if u}
    assert frozen_so_far, "the run must freeze units for the test to see frozen ones logged"
    last_raw = {}
    for scoring in history:
        last_raw.update(scoring["scores"])
    assert peft_model.base_model.raw_importance == last_raw
    # the log carries what the tuner holds
    history = peft_model.base_model.freeze_state.history
    assert [h["t"] for h in history] == [2, 4, 6, 8, 10, 12]
    assert callback.scorings == records


def test_callback_threshold_follows_the_cubic_schedule(step_run):
    peft_model, trainer, _, _ = step_run
    state = peft_model.base_model.freeze_state
    # warm-up is capped at warmup_cap=4 at the latest
    assert state.warmup_end is not None and state.warmup_end <= STEP_SCHEDULE["warmup_cap"]
    for record in safe_records(trainer.state.log_history):
        expected = cubic(record["safe/t"], state.warmup_end, STEP_SCHEDULE["final_freeze_time"], 1.0)
        assert record["safe/threshold"] == pytest.approx(expected, abs=1e-12)


def test_callback_freezes_exactly_the_units_below_the_threshold(step_run):
    peft_model, trainer, _, _ = step_run
    frozen_at = peft_model.base_model.freeze_state.frozen
    frozen_so_far: set[str] = set()
    previous_count = 0
    for record in safe_records(trainer.state.log_history):
        t, threshold = record["safe/t"], record["safe/threshold"]
        newly = {u for u in record["safe/newly_frozen"].split(",") if u}
        scores = {u: record[f"safe/importance/{u}"] for u in UNITS if u not in frozen_so_far}
        assert newly == {u for u in scores if scores[u] < threshold}
        assert all(frozen_at[u] == t for u in newly)
        frozen_so_far |= newly
        assert record["safe/frozen_units"] == len(frozen_so_far) >= previous_count
        previous_count = record["safe/frozen_units"]
        if t >= STEP_SCHEDULE["final_freeze_time"]:
            # tau = 1 on the normalized scale: every unit but the top scorer is frozen from t_f on
            top = max(scores, key=scores.get)
            assert set(UNITS) - {top} <= frozen_so_far
    assert set(frozen_at) == frozen_so_far
    # freezing happened before the end of training, not only at its last step
    assert frozen_so_far and max(frozen_at.values()) < 12


def test_frozen_parameters_stop_training_and_leave_the_optimizer(step_run):
    peft_model, trainer, _, watcher = step_run
    safe = peft_model.base_model
    frozen = set(safe.frozen_units)
    assert frozen and frozen != set(UNITS)
    assert set(watcher.snapshots) == frozen
    optimizer = trainer.optimizer
    in_groups, in_state = optimizer_param_ids(optimizer), optimizer_state_ids(optimizer)
    for unit in UNITS:
        params = unit_params(peft_model, unit)
        assert len(params) == 4  # lora_A and lora_B of query and value
        for name, param in params.items():
            if unit in frozen:
                step, snapshot = watcher.snapshots[unit]
                assert step == safe.freeze_state.frozen[unit]
                assert not param.requires_grad, name
                assert param.grad is None, name
                assert torch.equal(param.detach(), snapshot[name]), f"{name} changed after its unit froze at {step}"
                assert id(param) not in in_groups and id(param) not in in_state, name
            else:
                assert param.requires_grad, name
                assert id(param) in in_groups and id(param) in in_state, name
    # at the very step each unit froze, it had already left the optimizer's groups and state
    assert all(not groups and not state for _, _, groups, state in watcher.optimizer_checks)
    # the wrapped torch optimizer agrees with the Trainer's (accelerate) wrapper
    inner = getattr(optimizer, "optimizer", optimizer)
    assert optimizer_param_ids(inner) == in_groups and optimizer_state_ids(inner) == in_state


def test_probe_examples_and_ready_batches_give_the_same_scores(tmp_path):
    rows = examples(16, seed=2)
    _, trainer_a, _, _ = run_step_trainer(tmp_path / "a", probe=rows, max_steps=2)
    _, trainer_b, _, _ = run_step_trainer(tmp_path / "b", probe=as_batches(rows, 8), max_steps=2)
    record_a, = safe_records(trainer_a.state.log_history)
    record_b, = safe_records(trainer_b.state.log_history)
    for unit in UNITS:
        assert record_a[f"safe/importance/{unit}"] == pytest.approx(record_b[f"safe/importance/{unit}"], abs=1e-12)


# ---------------------------------------------------------------------------------------------- 2. resume
def run_resumable(output_dir, variant: str, resume_from=None):
    """Train with checkpoints; the step variant checkpoints every 6 steps, the epoch one every epoch."""
    if variant == "step":
        peft_model = safe_model(**STEP_SCHEDULE)
        args = training_args(output_dir, max_steps=12, save_strategy="steps", save_steps=6)
        train = examples(64, seed=1)
    else:
        peft_model = safe_model(**EPOCH_SCHEDULE)
        args = training_args(output_dir, num_train_epochs=6, save_strategy="epoch")
        train = examples(32, seed=1)  # 4 steps per epoch
    callback = SAFECallback(probe_dataset=examples(16, seed=2), batch_size=8)
    trainer = Trainer(model=peft_model, args=args, train_dataset=train, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume_from)
    return peft_model, trainer, callback


# (variant, checkpoint directory, the schedule time that checkpoint was written at)
RESUME_CASES = [("step", "checkpoint-6", 6), ("epoch", "checkpoint-12", 3.0)]


@pytest.mark.parametrize("variant, checkpoint, k", RESUME_CASES, ids=["step", "epoch"])
def test_resume_from_checkpoint_freezes_and_trains_exactly_as_uninterrupted(tmp_path, variant, checkpoint, k):
    full_model, full_trainer, _ = run_resumable(tmp_path / "full", variant)
    full_state = full_model.base_model.freeze_state
    full_weights = adapter_weights(full_model)
    # the checkpoint lies inside the freezing stage: some units froze before it, others after it
    before = {u for u, t in full_state.frozen.items() if t <= k}
    after = {u for u, t in full_state.frozen.items() if t > k}
    assert before and after, f"scenario does not straddle the checkpoint: {full_state.frozen}"

    resumed_model, resumed_trainer, resumed_callback = run_resumable(
        tmp_path / "resumed", variant, resume_from=str(tmp_path / "full" / checkpoint)
    )
    resumed_state = resumed_model.base_model.freeze_state

    assert resumed_state.frozen == full_state.frozen
    assert resumed_state.warmup_end == full_state.warmup_end
    assert resumed_state.history == full_state.history
    # the resumed run scores only after the checkpoint, never again at k
    assert [r["safe/t"] for r in resumed_callback.scorings] == [h["t"] for h in full_state.history if h["t"] > k]
    resumed_weights = adapter_weights(resumed_model)
    assert resumed_weights.keys() == full_weights.keys()
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=1e-7, msg=name)
    # the log history (restored from trainer_state.json, then continued) matches too
    assert safe_records(resumed_trainer.state.log_history) == safe_records(full_trainer.state.log_history)
    # units frozen before and after the checkpoint are all out of the resumed optimizer
    frozen_ids = {id(p) for u in full_state.frozen for p in unit_params(resumed_model, u).values()}
    assert frozen_ids and not frozen_ids & optimizer_param_ids(resumed_trainer.optimizer)
    assert not frozen_ids & optimizer_state_ids(resumed_trainer.optimizer)
    assert all(not p.requires_grad for u in full_state.frozen for p in unit_params(resumed_model, u).values())


# ---------------------------------------------------------------------------------------------- 3. lazy optimizer
def test_units_frozen_before_train_never_enter_the_trainers_optimizer(tmp_path):
    peft_model = safe_model(**STEP_SCHEDULE)
    newly = peft_model.base_model.freeze([0, 1])
    assert newly == UNITS[:2]
    frozen = {n: p for u in UNITS[:2] for n, p in unit_params(peft_model, u).items()}
    trainable = {n: p for u in UNITS[2:] for n, p in unit_params(peft_model, u).items()}
    before = {n: p.detach().clone() for n, p in {**frozen, **trainable}.items()}

    trainer = Trainer(
        model=peft_model, args=training_args(tmp_path, max_steps=4), train_dataset=examples(32, seed=1)
    )
    assert trainer.optimizer is None  # built lazily inside train()
    trainer.train()

    in_groups = optimizer_param_ids(trainer.optimizer)
    in_state = optimizer_state_ids(trainer.optimizer)
    for name, param in frozen.items():
        assert not param.requires_grad, name
        assert id(param) not in in_groups and id(param) not in in_state, name
        assert torch.equal(param.detach(), before[name]), name
    for name, param in trainable.items():
        assert param.requires_grad and id(param) in in_groups and id(param) in in_state, name
    # lora_B starts at zero, so a trained unit's lora_B must have moved
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainable.items() if ".lora_B." in n)
    assert peft_model.base_model.frozen_units == UNITS[:2]


# ---------------------------------------------------------------------------------------------- 4. probe set, errors
def test_for_trainer_probes_on_the_first_examples_of_the_eval_set(tmp_path):
    eval_rows = examples(12, seed=3)
    peft_model = safe_model(**STEP_SCHEDULE)
    trainer = Trainer(
        model=peft_model,
        args=training_args(tmp_path, max_steps=2, per_device_eval_batch_size=4),
        train_dataset=examples(16, seed=1),
        eval_dataset=eval_rows,
    )
    callback = SAFECallback.for_trainer(trainer, probe_size=6)
    batches = callback.probe_dataset
    assert isinstance(batches, list) and batches and all(isinstance(b, dict) for b in batches)
    probed_ids = torch.cat([b["input_ids"] for b in batches])
    assert torch.equal(probed_ids, torch.stack([row["input_ids"] for row in eval_rows[:6]]))

    trainer.add_callback(callback)
    trainer.train()
    safe = peft_model.base_model
    assert [h["t"] for h in safe.freeze_state.history] == [2]
    # training ended at the scoring step, so scoring the same examples by hand must give the same importance
    by_hand = safe.compute_importance(as_batches(eval_rows[:6], 4))
    assert by_hand == pytest.approx(safe.raw_importance, abs=1e-12)


def test_for_trainer_without_eval_set_raises(tmp_path):
    trainer = Trainer(
        model=safe_model(**STEP_SCHEDULE), args=training_args(tmp_path, max_steps=1), train_dataset=examples(8, 1)
    )
    with pytest.raises(ValueError, match="eval_dataset"):
        SAFECallback.for_trainer(trainer)


@pytest.mark.parametrize("empty", ["examples", "eval_set"])
def test_empty_probe_set_raises_at_train_begin(tmp_path, empty):
    peft_model = safe_model(**STEP_SCHEDULE)
    if empty == "examples":
        trainer = Trainer(
            model=peft_model, args=training_args(tmp_path, max_steps=2), train_dataset=examples(16, 1),
            callbacks=[SAFECallback(probe_dataset=[])],
        )
    else:
        trainer = Trainer(
            model=peft_model, args=training_args(tmp_path, max_steps=2), train_dataset=examples(16, 1),
            eval_dataset=[],
        )
        trainer.add_callback(SAFECallback.for_trainer(trainer))
    before = adapter_weights(peft_model)
    with pytest.raises(ValueError, match="empty"):
        trainer.train()
    # refused before any training step
    after = adapter_weights(peft_model)
    assert all(torch.equal(after[n], v) for n, v in before.items())


def test_model_without_safe_raises_at_train_begin(tmp_path):
    base = tiny_bert(2, 0)
    plain_lora = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    trainer = Trainer(
        model=plain_lora, args=training_args(tmp_path, max_steps=2), train_dataset=examples(16, 1),
        callbacks=[SAFECallback(probe_dataset=examples(4, 2))],
    )
    with pytest.raises(ValueError, match="SAFEConfig"):
        trainer.train()


def test_callback_rejects_bad_probe_sizes():
    with pytest.raises(ValueError, match="probe_size"):
        SAFECallback(probe_dataset=examples(2, 0), probe_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        SAFECallback(probe_dataset=examples(2, 0), batch_size=0)



# ---------------------------------------------------------------------------------------------- 5. issue 13
def test_fractional_epoch_interval_is_refused_at_train_begin(tmp_path):
    # issue 13.5: scoring_interval=0.5 with the epoch unit scored once per epoch (the callback sees epoch ends)
    peft_model = safe_model(**{**EPOCH_SCHEDULE, "scoring_interval": 0.5})
    trainer = Trainer(
        model=peft_model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=examples(16, 1),
        callbacks=[SAFECallback(probe_dataset=examples(4, 2))],
    )
    before = adapter_weights(peft_model)
    with pytest.raises(ValueError, match=r"whole number of epochs, got 0.5.*schedule_unit='step'"):
        trainer.train()
    after = adapter_weights(peft_model)
    assert all(torch.equal(after[n], v) for n, v in before.items())


def test_a_new_train_on_an_already_scored_adapter_warns_and_restart_schedule_scores_again(tmp_path):
    # issue 13.6: a new train() on a loaded SAFE checkpoint never scored (every t <= last_scored is skipped)
    peft_model = safe_model(**STEP_SCHEDULE)
    safe = peft_model.base_model
    probe = as_batches(examples(8, 2), 8)
    for t in (2, 4, 6):
        safe.update_and_freeze(t, probe)
    safe.freeze([0])

    def train():
        trainer = Trainer(
            model=peft_model, args=training_args(tmp_path, max_steps=4), train_dataset=examples(32, 1),
            callbacks=[SAFECallback(probe_dataset=probe)],
        )
        trainer.train()

    with pytest.warns(UserWarning, match=r"scored up to t=6.*restart_schedule\(\)"):
        train()
    assert [h["t"] for h in safe.freeze_state.history] == [2, 4, 6]  # nothing scored, as the warning says
    safe.restart_schedule()
    assert safe.freeze_state.history == [] and safe.frozen_units == []
    assert all(p.requires_grad for p in unit_params(peft_model, UNITS[0]).values())
    train()
    assert [h["t"] for h in safe.freeze_state.history] == [2, 4]


def test_best_model_loaded_at_end_with_fewer_frozen_units_is_logged(tmp_path, caplog):
    # issue 13.13: load_best_model_at_end restores a checkpoint from before freezing; say so
    peft_model = safe_model(**STEP_SCHEDULE)
    callback = SAFECallback(probe_dataset=examples(16, 2), batch_size=8)
    trainer = Trainer(
        model=peft_model,
        args=training_args(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                           save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                           greater_is_better=False),
        train_dataset=examples(64, seed=1), eval_dataset=examples(8, seed=9), callbacks=[callback],
    )

    class WorstFirst(TrainerCallback):  # make the first checkpoint (nothing frozen yet) the "best" one
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_loss"] = float(state.global_step)

    trainer.add_callback(WorstFirst())
    with caplog.at_level("WARNING", logger="peft_safe.callbacks.safe"):
        trainer.train()
    logged = callback.scorings[-1]["safe/frozen_units"]
    assert logged > 0 and peft_model.base_model.frozen_units == []
    assert any("load_best_model_at_end" in r.message and "checkpoint-2" in r.message for r in caplog.records)


def test_tokenizer_batch_encodings_are_ready_batches(tmp_path):
    # issue 13.20: a BatchEncoding is not a dict, so ready batches were re-collated into 3-D tensors
    from transformers import BatchEncoding

    rows = examples(16, 2)
    encodings = [BatchEncoding({k: v for k, v in b.items() if k != "labels"}) for b in as_batches(rows, 8)]
    peft_model = safe_model(**STEP_SCHEDULE)
    callback = SAFECallback(probe_dataset=encodings)
    trainer = Trainer(model=peft_model, args=training_args(tmp_path, max_steps=2), train_dataset=examples(16, 1),
                      callbacks=[callback])
    trainer.train()
    assert [h["t"] for h in peft_model.base_model.freeze_state.history] == [2]
    assert all(b["input_ids"].dim() == 2 for b in callback._probe_batches)


def test_a_dataloader_gives_its_batches_as_probe_batches(tmp_path):
    # issue 21.11: a DataLoader was taken for examples: "probe batch 'input_ids' must be 2-D ... (4, 4, 12)"
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    loader = DataLoader(examples(40, 2), batch_size=8, collate_fn=default_data_collator)
    peft_model = safe_model(**STEP_SCHEDULE)
    callback = SAFECallback(probe_dataset=loader, probe_size=20)
    trainer = Trainer(model=peft_model, args=training_args(tmp_path, max_steps=2), train_dataset=examples(16, 1),
                      callbacks=[callback])
    trainer.train()
    assert [h["t"] for h in peft_model.base_model.freeze_state.history] == [2]
    assert [tuple(b["input_ids"].shape) for b in callback._probe_batches] == [(8, SEQ)] * 3  # 24 >= 20 examples


@pytest.mark.parametrize(
    ("probe", "words"),
    [
        ([{"text": "a raw sentence", "label": 1}] * 4, ["['label', 'text']", "tokenize"]),
        ([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}], ["padding", "DataCollatorWithPadding"]),
        ([{"input_ids": torch.tensor([1, 500, 3])}] * 2, ["500", "vocabulary"]),
    ],
    ids=["raw-text", "ragged-ids", "ids-beyond-vocab"],
)
def test_unusable_probe_examples_are_refused_at_train_begin(tmp_path, probe, words):
    # issues 13.19 and 13.21: refused only at the first scoring, an epoch into training, or with torch's errors
    peft_model = safe_model(**EPOCH_SCHEDULE)
    trainer = Trainer(model=peft_model, args=training_args(tmp_path, num_train_epochs=1),
                      train_dataset=examples(16, 1), callbacks=[SAFECallback(probe_dataset=probe)])
    before = adapter_weights(peft_model)
    with pytest.raises(ValueError) as info:
        trainer.train()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    after = adapter_weights(peft_model)
    assert all(torch.equal(after[n], v) for n, v in before.items())  # before any step


def test_every_unit_scoring_under_the_threshold_on_a_causal_lm_leaves_one_training(tmp_path, tiny):
    # issue 13.24: raw scores all under tau froze every unit and the next backward died mid-training
    model = tiny.safe("llama", layers=3, schedule_unit="step", scoring_interval=1, final_freeze_time=2,
                      warmup_cap=1, tau=1.0, importance_scale="raw")
    rows = [{"input_ids": ids, "labels": ids} for ids in tiny.ids(batch=16, seq=8)]
    callback = SAFECallback(probe_dataset=rows[:4], batch_size=4)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=5, per_device_train_batch_size=4),
                      train_dataset=rows, callbacks=[callback])
    trainer.train()  # no "element 0 of tensors does not require grad"
    safe = model.base_model
    assert safe.frozen_units == safe.adapter_units[:-1]
    assert any(p.requires_grad for p in model.parameters())
