"""SAFE's automatic schedule (safe/method/driver.py) in plain PyTorch loops: it drives itself, counts optimizer steps,
takes frozen parameters out of the optimizer, and stands down for a loop that calls update_and_freeze itself."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread_torch")

# scoring every 2 optimizer steps, warm-up capped at 2, tau=1 reached at 6: all but the top unit freeze by step 6
STEP = dict(schedule_unit="step", scoring_interval=2, final_freeze_time=6, warmup_cap=2, tau=1.0,
            importance_scale="normalized", freeze_order="any")


def lm_model(tiny, **schedule):
    model = tiny.safe("llama", layers=4, **{**STEP, **schedule})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def train(model, optimizer, tiny, steps, accumulation=1, after_step=None):
    for step in range(1, steps + 1):
        for micro in range(accumulation):
            batch = tiny.batch(seed=100 * step + micro)
            (model(**batch, labels=batch["input_ids"]).loss / accumulation).backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()


def optimizer_ids(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_a_safe_model_drives_its_own_schedule_in_a_plain_loop(tiny):
    # issue 14.1: a SAFEConfig alone (no SAFECallback, no update_and_freeze) used to train as plain LoRA
    model, optimizer = lm_model(tiny)
    train(model, optimizer, tiny, steps=7)
    safe = model.base_model
    assert [h["t"] for h in safe.freeze_state.history] == [2, 4, 6]  # scored at the forward after steps 2, 4 and 6
    assert safe.frozen_units and len(safe.frozen_units) == 3
    frozen = [p for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad]
    assert frozen and not optimizer_ids(optimizer) & {id(p) for p in frozen}  # out of the optimizer
    assert not set(optimizer.state) & set(frozen)  # and so is their Adam state
    assert safe.auto_driver.optimizer is optimizer and safe.auto_driver.active
    assert 0 < len(safe.auto_driver.probe) <= 8  # kept from the training batches


def test_gradient_accumulation_counts_optimizer_steps_not_forwards(tiny):
    model, optimizer = lm_model(tiny)
    train(model, optimizer, tiny, steps=5, accumulation=3)
    safe = model.base_model
    assert safe.auto_driver.steps == 5
    assert [h["t"] for h in safe.freeze_state.history] == [2, 4]


def test_eval_and_no_grad_forwards_neither_act_nor_feed_the_probe_set(tiny):
    model, optimizer = lm_model(tiny)
    train(model, optimizer, tiny, steps=2)
    model.eval()
    with torch.no_grad():
        model(**tiny.batch(seed=7))
    model.train()
    with torch.no_grad():
        model(**tiny.batch(seed=8))
    safe = model.base_model
    assert safe.freeze_state.history == [] and len(safe.auto_driver.probe) == 2


def test_another_optimizer_is_not_taken_for_safes(tiny):
    model, optimizer = lm_model(tiny)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    model(**tiny.batch(), labels=tiny.batch()["input_ids"]).loss.backward()
    other.step()
    optimizer.step()
    assert model.base_model.auto_driver.optimizer is optimizer and model.base_model.auto_driver.steps == 1


def test_a_loop_calling_update_and_freeze_after_the_step_behaves_exactly_as_without_the_driver(tiny):
    runs = []
    for driver_on in (True, False):
        model, optimizer = lm_model(tiny)
        safe = model.base_model
        if not driver_on:
            safe.auto_driver.stand_down("the test: the behaviour before issue 14")
        probe = [tiny.batch(seed=999)]

        def score(step, safe=safe, optimizer=optimizer, probe=probe):
            if step % 2 == 0:
                safe.update_and_freeze(step, probe, optimizer=optimizer)

        train(model, optimizer, tiny, steps=7, after_step=score)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        runs.append((safe.freeze_state.to_dict(), weights, safe.auto_driver.active))
    (state_a, weights_a, active_a), (state_b, weights_b, _) = runs
    assert not active_a  # the loop's first update_and_freeze stood it down
    assert state_a == state_b and state_a["frozen"]
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_b)


def test_epoch_schedule_in_a_plain_loop_warns_at_the_first_training_step_naming_the_fix(tiny):
    model, optimizer = lm_model(tiny, schedule_unit="epoch", scoring_interval=1, final_freeze_time=6, warmup_cap=2)
    batch = tiny.batch()
    with pytest.warns(UserWarning, match="cannot drive schedule_unit='epoch'.*'step'.*update_and_freeze"):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        train(model, optimizer, tiny, steps=3)
    assert not model.base_model.auto_driver.active and model.base_model.freeze_state.history == []


def test_copies_of_a_model_carry_their_own_driver(tiny):
    model, optimizer = lm_model(tiny)
    train(model, optimizer, tiny, steps=1)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        driver = copied.base_model.auto_driver
        assert driver._safe_ref() is copied.base_model and driver.steps == 1 and driver.probe == []
        assert driver.optimizer is None  # the original's optimizer does not train the copy


def test_under_a_trainer_an_epoch_schedule_scores_at_epoch_ends(tiny, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny.safe("llama", layers=4, **{**STEP, "schedule_unit": "epoch", "scoring_interval": 1,
                                             "final_freeze_time": 2, "warmup_cap": 1})
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for ids in torch.randint(1, tiny.vocab, (12, 8), generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    safe = model.base_model
    # the Trainer's clock: scored at each epoch's end, the last one included, as SAFECallback does
    assert [h["t"] for h in safe.freeze_state.history] == [1, 2, 3]
    assert safe.frozen_units
    records = [e for e in trainer.state.log_history if "safe/t" in e]
    assert [(r["safe/t"], r["step"]) for r in records] == [(1, 3), (2, 6), (3, 9)]


# ------------------------------------------------------------------ issue 22: the one-line path holds
def history_times(model) -> list[float]:
    return [h["t"] for h in model.base_model.freeze_state.history]


def test_a_replaced_optimizer_is_followed(tiny):
    # issue 22.3: a loop that replaces its optimizer kept the driver bound to the first one (one scoring in 13)
    model, first = lm_model(tiny)
    train(model, first, tiny, steps=4)
    second = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, second, tiny, steps=5)
    assert history_times(model) == [2, 4, 6, 8]
    assert model.base_model.auto_driver.optimizer is second
    frozen = {id(p) for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad}
    assert frozen and not optimizer_ids(second) & frozen  # the units frozen later left the new optimizer


def test_a_plain_loop_resumed_through_from_pretrained_counts_on(tiny, tmp_path):
    # issue 22.2: the loaded driver counted from 0, so the steps up to the saved last scoring were skipped
    from peft import PeftModel

    model, optimizer = lm_model(tiny)
    train(model, optimizer, tiny, steps=7)
    assert history_times(model) == [2, 4, 6] and model.base_model.auto_driver.steps == 7
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny.llama(layers=4), tmp_path, is_trainable=True).train()
    assert loaded.base_model.auto_driver.steps == 7
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    train(loaded, optimizer, tiny, steps=4)  # steps 8-11: scored at the forwards after steps 8 and 10
    assert history_times(loaded) == [2, 4, 6, 8, 10]


def test_restart_schedule_counts_the_plain_loop_from_zero(tiny):
    model, optimizer = lm_model(tiny)
    train(model, optimizer, tiny, steps=7)
    model.base_model.restart_schedule()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, optimizer, tiny, steps=3)
    assert history_times(model) == [2]  # the new run's step 2, not the old run's step 8 seen as past t_f
    assert not model.base_model.frozen_units  # one scoring: still warming up


def test_without_task_type_the_schedule_still_runs(tiny):
    # issue 22.4: a plain PeftModel calls the wrapped model directly, past the tuner's hook: nothing was scored
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    config = tiny.safe_config("llama", lora=lora, task_type=None, **STEP)
    model = get_peft_model(tiny.llama(layers=4), config).train()
    assert type(model).__name__ == "PeftModel"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 8):
        batch = tiny.batch(seed=step)
        logits = model(**batch).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert history_times(model) == [2, 4, 6] and model.base_model.frozen_units


def test_with_a_task_type_a_forward_is_seen_once(tiny):
    model, optimizer = lm_model(tiny)
    batch = tiny.batch()
    model(**batch, labels=batch["input_ids"])
    assert len(model.base_model.auto_driver.probe) == 1  # the tuner's hook and the wrapped model's: one acts


def test_training_in_eval_mode_runs_the_schedule(tiny):
    # issue 22.5: model.eval() with gradients on (dropout off) is training; the driver saw no training forward
    model, optimizer = lm_model(tiny)
    model.eval()
    train(model, optimizer, tiny, steps=7)
    assert history_times(model) == [2, 4, 6] and model.base_model.frozen_units


def test_forwards_under_disable_adapter_neither_score_nor_feed_the_probe(tiny):
    # issue 22.6: a KL-to-reference forward (adapters off, gradients on) was where the driver scored: every score 0
    model, optimizer = lm_model(tiny)
    for step in range(1, 8):
        batch = tiny.batch(seed=step)
        with model.disable_adapter():
            reference = model(**batch).logits.detach()
        logits = model(**batch).logits
        loss = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                          reduction="batchmean")
        (loss + model(**batch, labels=batch["input_ids"]).loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    history = model.base_model.freeze_state.history
    assert [h["t"] for h in history] == [2, 4, 6]
    assert all(score > 0 for h in history for score in h["scores"].values())
    assert len(model.base_model.auto_driver.probe) == 8  # two adapter-on forwards a step, none of the reference's


def test_freezing_keeps_the_names_of_an_optimizer_built_from_named_parameters(tiny):
    # issue 22.10: param_names kept every name, so Adam's moments were saved under the wrong names
    model, _ = lm_model(tiny)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(named, lr=1e-2)
    train(model, optimizer, tiny, steps=7)
    assert model.base_model.frozen_units
    by_id = {id(p): n for n, p in model.named_parameters()}
    group = optimizer.param_groups[0]
    assert len(group["param_names"]) == len(group["params"]) < len(named)
    assert group["param_names"] == [by_id[id(p)] for p in group["params"]]
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["param_names"] == group["param_names"]
