"""AdaLoRA under SAFE: rank allocation skips frozen units, the callback drives it, orthogonality still applies."""

from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_safe import SAFECallback, SAFEConfig

LAYERS = 4
TOTAL = 12
UNITS = [f"bert.encoder.layer.{i}" for i in range(LAYERS)]


def adalora(**kwargs) -> AdaLoraConfig:
    kwargs.setdefault("orth_reg_weight", 0.5)
    return AdaLoraConfig(
        init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=TOTAL, lora_alpha=8,
        target_modules=["query", "value"], task_type="SEQ_CLS", **kwargs,
    )


def build(tiny, safe: bool, **kwargs):
    base = tiny.bert(layers=LAYERS)
    config = SAFEConfig(adapter_config=adalora(**kwargs), task_type="SEQ_CLS") if safe else adalora(**kwargs)
    torch.manual_seed(1)
    return get_peft_model(base, config)


def batch(tiny, step: int) -> dict[str, torch.Tensor]:
    data = tiny.batch(batch=4, seq=8, seed=100 + step)
    data["labels"] = torch.tensor([0, 1, 1, 0])
    return data


def train(tiny, model, steps, freeze_at=None, freeze=(), optimizer=None):
    """AdaLoRA's documented loop: backward, step, update_and_allocate, zero_grad."""
    model.train()
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        if step == freeze_at:
            model.base_model.freeze(list(freeze), optimizer=optimizer)
        torch.manual_seed(step)  # the same dropout masks in every run
        model(**batch(tiny, step)).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def singular_values(tiny, model, unit: str) -> dict[str, torch.Tensor]:
    params = tiny.adapter_params(model).items()
    return {n: p.detach().clone() for n, p in params if "lora_E" in n and tiny.in_unit(n, unit)}


def adapter_state(tiny, model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.detach().clone() for n, p in tiny.adapter_params(model).items()}


def test_without_frozen_units_allocation_is_adaloras_own(tiny, single_thread_torch):
    plain, safe = build(tiny, safe=False), build(tiny, safe=True)
    train(tiny, plain, TOTAL)
    train(tiny, safe, TOTAL)
    expected, got = adapter_state(tiny, plain), adapter_state(tiny, safe)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert safe.base_model.peft_config["default"].rank_pattern == plain.base_model.peft_config["default"].rank_pattern


def test_peft_allocator_alone_fails_on_the_gradients_frozen_units_no_longer_have(tiny, single_thread_torch):
    # what SAFE's own update_and_allocate exists for: AdaLoRA's allocator reads p.grad of every adapter parameter
    model = build(tiny, safe=True)
    model.base_model.freeze(UNITS[:2])
    model.train()
    model(**batch(tiny, 0)).loss.backward()
    with pytest.raises(TypeError):
        model.base_model.rankallocator.update_and_allocate(model.base_model.model, 0)


def test_frozen_units_keep_their_ranks_and_trainable_units_are_cut_to_their_budget(tiny, single_thread_torch):
    model = build(tiny, safe=True)
    frozen = UNITS[:2]
    train(tiny, model, 3)
    before = {u: singular_values(tiny, model, u) for u in frozen}
    train(tiny, model, TOTAL - 3, freeze_at=0, freeze=frozen)  # steps 0..8 again: the schedule restarts, harmless
    safe = model.base_model
    for unit in frozen:
        after = singular_values(tiny, model, unit)
        for name, value in before[unit].items():
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    # trainable units: 2 layers each (query, value), init_r 6 -> AdaLoRA's final budget of target_r per layer
    trainable_layers = 2 * (LAYERS - len(frozen))
    in_use = sum(int((e != 0).sum()) for u in UNITS[2:] for e in singular_values(tiny, model, u).values())
    assert in_use <= 2 * trainable_layers < 6 * trainable_layers
    # the allocator keeps no statistics of frozen parameters
    assert not any(tiny.in_unit(n, u) for n in safe.rankallocator.ipt for u in frozen)
    # the saved rank pattern keeps every rank of the frozen units
    pattern = safe.peft_config["default"].rank_pattern
    assert pattern and all(all(v) for k, v in pattern.items() if any(f"{u}." in k for u in frozen))


def test_allocated_and_frozen_adalora_round_trips_through_save_and_load(tiny, tmp_path, single_thread_torch):
    model = build(tiny, safe=True)
    train(tiny, model, TOTAL, freeze_at=4, freeze=UNITS[:2])
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path, is_trainable=True)
    probe = tiny.batch(batch=3, seq=8, seed=7)
    torch.testing.assert_close(tiny.logits(reloaded, probe), tiny.logits(model, probe), rtol=0, atol=1e-6)
    assert reloaded.base_model.frozen_units == UNITS[:2]


def test_orthogonality_loss_still_reaches_the_trainable_units(tiny, single_thread_torch):
    grads = {}
    for weight in (0.0, 0.5):
        model = build(tiny, safe=True, orth_reg_weight=weight)
        model.base_model.freeze(UNITS[:2])
        model.train()
        model(**batch(tiny, 0)).loss.backward()
        params = tiny.adapter_params(model).items()
        grads[weight] = {n: p.grad.clone() for n, p in params if "lora_A" in n and p.grad is not None}
    assert grads[0.0].keys() == grads[0.5].keys()
    assert all(any(tiny.in_unit(n, u) for u in UNITS[2:]) for n in grads[0.5])  # only trainable units
    assert all(not torch.equal(grads[0.0][n], grads[0.5][n]) for n in grads[0.5])


@pytest.mark.parametrize("with_callback", [True, False], ids=["SAFECallback", "automatic"])
def test_callback_allocates_ranks_at_every_optimizer_step_while_units_freeze(tiny, tmp_path, single_thread_torch,
                                                                               with_callback):
    base = tiny.bert(layers=LAYERS)
    config = SAFEConfig(
        adapter_config=adalora(), task_type="SEQ_CLS", schedule_unit="step", scoring_interval=2,
        final_freeze_time=6, warmup_cap=2, tau=1.0,
    )
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    rows = [{k: v[i] for k, v in batch(tiny, i % 4).items()} for i in range(4) for _ in range(8)]
    for i, row in enumerate(rows):
        row["labels"] = torch.tensor(i % 2)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=TOTAL, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1000,
    )
    probe = [{k: v for k, v in r.items() if k != "labels"} for r in rows[:8]]
    callbacks = [SAFECallback(probe_dataset=probe, batch_size=4)] if with_callback else []  # else: the driver's clock
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
    trainer.train()
    safe = model.base_model
    frozen = safe.frozen_units
    assert frozen and set(frozen) != set(UNITS)
    # the allocator ran to its final mask: a rank pattern exists and trainable units are cut to target_r
    assert safe.peft_config["default"].rank_pattern
    for unit in set(UNITS) - set(frozen):
        for name, e in singular_values(tiny, model, unit).items():
            assert int((e != 0).sum()) <= 2 * 2, name  # a unit's share of the budget, at most its two layers' target
