"""SAFEConfig.memory_budget: blocks checkpointed so a step fits, the same training, and freezing paying for it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from tiny_models import load_4bit_llama, tiny_bert

from peft_safe import SAFEConfig
from peft_safe.measure.memory import PeakMemoryMeter, SavedTensorMeter

LAYERS = 6


def bert_safe(tiny, budget, **kwargs):
    """A 6-block tiny BERT under SAFE in training mode (dropout on: the measuring forward must not shift it)."""
    base = tiny_bert(LAYERS, seed=0, hidden=64, positions=64)
    torch.manual_seed(1)
    return get_peft_model(base, tiny.safe_config("bert", memory_budget=budget, **kwargs)).train()


def batch(seed: int = 1, rows: int = 8, seq: int = 32):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (rows, seq), generator=generator)
    return {"input_ids": ids, "labels": torch.randint(0, 2, (rows,), generator=generator)}


def train_step(model, data, optimizer=None):
    """One step; returns (loss, adapter grads, saved-activation peak, everything-held peak)."""
    with PeakMemoryMeter(model, optimizer) as peak, SavedTensorMeter(exclude=model) as saved:
        loss = model(**data).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, saved.peak_activation_bytes, peak.peak_bytes


def blocks(model):
    return list(model.base_model.model.bert.encoder.layer)


def test_off_by_default_nothing_is_checkpointed_and_no_hook_is_added(tiny):
    model = bert_safe(tiny, None)
    assert model.base_model.checkpoint_budget is None
    train_step(model, batch())
    assert not any(block.gradient_checkpointing for block in blocks(model))
    assert model.base_model.freeze_state.block_costs is None


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3])
def test_a_budget_gives_the_same_losses_and_gradients_and_fits_the_step(tiny, fraction):
    plain = bert_safe(tiny, None)
    loss0, grads0, saved0, peak0 = train_step(plain, batch())
    model = bert_safe(tiny, fraction)
    loss, grads, _, peak = train_step(model, batch())
    assert torch.equal(loss, loss0)  # same dropout masks: the measuring forward restored the RNG
    assert grads.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-7)
    budget = model.base_model.checkpoint_budget
    costs = model.base_model.freeze_state.block_costs
    assert costs is not None and len(costs["saved"]) == LAYERS
    assert sum(costs["saved"]) + costs["outside"] == saved0  # the measured costs add up to the step's activations
    checkpointed = [block.gradient_checkpointing for block in blocks(model)]
    assert checkpointed == budget.checkpointed
    if fraction == 1.0:
        assert not any(checkpointed)
    else:
        assert any(checkpointed) and checkpointed == sorted(checkpointed, reverse=True)  # the lowest ones
    # what the whole step held at once (recompute included), over what it saved, stays within the budget
    rest = peak0 - saved0  # gradients, optimizer state, temporaries of the plain step
    assert peak <= fraction * saved0 + rest * 1.05
    assert peak < peak0 or fraction == 1.0


def test_freezing_the_bottom_stops_checkpointing_from_the_top_and_never_checkpoints_frozen_blocks(tiny):
    model = bert_safe(tiny, 0.4)
    safe = model.base_model
    train_step(model, batch())
    warm = list(safe.checkpoint_budget.checkpointed)
    safe.freeze([0, 1, 2])
    _, _, _, peak_frozen = train_step(model, batch())
    frozen = [block.gradient_checkpointing for block in blocks(model)]
    assert not any(frozen[:3])
    assert sum(frozen) < sum(warm)
    assert safe.checkpoint_budget.predicted_bytes <= safe.checkpoint_budget.budget_bytes(safe.checkpoint_budget.costs)


def test_a_longer_batch_is_measured_again_and_a_shorter_one_reuses_the_costs(tiny):
    model = bert_safe(tiny, 0.5)
    safe = model.base_model
    train_step(model, batch(seq=16))
    assert safe.freeze_state.block_costs["tokens"] == 8 * 16
    train_step(model, batch(seq=8))
    assert safe.freeze_state.block_costs["tokens"] == 8 * 16
    train_step(model, batch(seq=32))
    assert safe.freeze_state.block_costs["tokens"] == 8 * 32


def test_an_unreachable_budget_checkpoints_everything_and_warns_once(tiny):
    model = bert_safe(tiny, 1)  # one byte
    with pytest.warns(RuntimeWarning, match="cannot be met"):
        train_step(model, batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_step(model, batch())
    assert all(block.gradient_checkpointing for block in blocks(model))


def test_evaluation_and_scoring_are_not_measured_and_not_planned(tiny):
    model = bert_safe(tiny, 0.5)
    model.eval()
    with torch.no_grad():
        model(**batch())
    assert model.base_model.freeze_state.block_costs is None
    model.train()
    with torch.no_grad():
        model(**batch())
    assert model.base_model.freeze_state.block_costs is None


def test_the_costs_travel_with_the_checkpoint_and_a_reload_plans_the_same_blocks(tiny, tmp_path):
    from peft import PeftModel

    model = bert_safe(tiny, 0.4)
    train_step(model, batch())
    saved_costs = model.base_model.freeze_state.block_costs
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(LAYERS, seed=0, hidden=64, positions=64), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].memory_budget == 0.4
    assert loaded.base_model.freeze_state.block_costs == saved_costs
    loaded.train()
    loaded(**batch(seed=5, seq=16))  # fewer tokens than measured: planned from the saved costs, not measured again
    assert loaded.base_model.freeze_state.block_costs == saved_costs
    assert loaded.base_model.checkpoint_budget.checkpointed == [b.gradient_checkpointing for b in blocks(loaded)]


@pytest.mark.parametrize("reentrant", [True, False])
def test_transformers_checkpointing_keeps_its_function_and_gives_the_same_gradients(tiny, reentrant):
    kwargs = {"use_reentrant": reentrant}
    plain = bert_safe(tiny, None)
    plain.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _, grads0, _, _ = train_step(plain, batch())
    model = bert_safe(tiny, 0.5)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _, grads, _, _ = train_step(model, batch())
    checkpointed = [block.gradient_checkpointing for block in blocks(model)]
    assert any(checkpointed) and not all(checkpointed)  # the budget took over transformers' every-block setting
    assert all(block._gradient_checkpointing_func.keywords == kwargs for block in blocks(model))
    assert grads.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-7)


def test_a_4bit_llama_prepared_for_kbit_training_fits_the_budget(tiny, tmp_path):
    from peft import prepare_model_for_kbit_training

    tiny.llama(layers=4).save_pretrained(tmp_path)

    def build(budget):
        base = load_4bit_llama(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        torch.manual_seed(1)
        return get_peft_model(base, tiny.safe_config("llama", memory_budget=budget)).train()

    ids = tiny.ids(batch=4, seq=32)
    data = {"input_ids": ids, "labels": ids}
    plain = build(None)
    loss0, grads0, saved0, peak0 = train_step(plain, data)
    model = build(0.4)
    loss, grads, _, peak = train_step(model, data)
    torch.testing.assert_close(loss, loss0)
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-4, atol=1e-6)
    assert any(model.base_model.checkpoint_budget.checkpointed)
    assert peak <= 0.4 * saved0 + (peak0 - saved0) * 1.05


@pytest.mark.parametrize("value", [0.0, 1.5, -1, "half", True])
def test_bad_budgets_are_refused_by_the_config(tiny, value):
    with pytest.raises(ValueError, match="memory_budget"):
        tiny.safe_config("bert", memory_budget=value)


def test_an_assigned_bad_budget_is_refused_and_not_kept(tiny):
    config = tiny.safe_config("bert", memory_budget=0.5)
    with pytest.raises(ValueError, match="memory_budget"):
        config.memory_budget = 2.0
    assert config.memory_budget == 0.5


def test_an_encoder_decoder_model_is_refused_with_the_fix(tiny):
    from peft import LoraConfig
    from transformers import T5Config, T5ForConditionalGeneration

    base = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2))
    config = SAFEConfig(adapter_config=LoraConfig(target_modules=["q", "v"]), memory_budget=0.5)
    with pytest.raises(ValueError, match="memory_budget=None"):
        get_peft_model(base, config)


def test_cached_flops_do_not_reuse_the_step_that_measured_the_blocks(tiny):
    from peft_safe.measure.meter import TrainingMeter

    def run(flops):
        model = bert_safe(tiny, 0.5)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        meter = TrainingMeter(model, optimizer, measure_every=1, flops=flops)
        for step in range(4):
            with meter.step(step, batch=batch()):
                model(**batch()).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return [r.flops for r in meter.records]

    cached, counted = run("cached"), run("measured")
    assert counted[0] > counted[1] == counted[2] == counted[3]  # the first step ran the measuring forward too
    assert cached == counted


@pytest.mark.parametrize("built, new", [(None, 0.3), (0.5, None)], ids=["switched-on", "switched-off"])
def test_switching_the_budget_on_or_off_after_the_build_is_refused_with_the_fix(tiny, built, new):
    # issue 21.2: 0.3 set after a build without a budget was ignored; None set after one crashed the next forward
    model = bert_safe(tiny, built) if built is not None else tiny.safe("bert", layers=4)
    config = model.peft_config["default"]
    with pytest.raises(ValueError, match=f"memory_budget={new!r}.*decided when the model is built.*new model"):
        config.memory_budget = new
    assert config.memory_budget == built
    model.train()
    batch = tiny.batch()
    model(**batch, labels=torch.zeros(2, dtype=torch.long)).loss.backward()  # the model trains as it was built


def test_another_budget_after_the_build_takes_effect(tiny):
    model = bert_safe(tiny, 0.9)
    model.peft_config["default"].memory_budget = 0.3
    assert model.base_model.checkpoint_budget is not None and model.base_model.safe_config.memory_budget == 0.3
    fresh = copy.deepcopy(model.peft_config["default"])
    fresh.memory_budget = None  # a copy belongs to no model: anything valid goes
    assert fresh.memory_budget is None


def test_blocks_path_changed_after_the_build_is_refused(tiny):
    model = tiny.safe("bert", layers=2)
    with pytest.raises(ValueError, match="blocks_path is read when the model is built.*get_peft_model"):
        model.peft_config["default"].blocks_path = "bert.encoder"
    assert model.peft_config["default"].blocks_path is None
