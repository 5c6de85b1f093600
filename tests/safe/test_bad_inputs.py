"""Hostile inputs to the public entry points: each fails with an error naming the bad value and the fix.

Only what tests/test_config.py and tests/tuners/test_safe_model.py do not already cover: the seed, a scoring
interval longer than the schedule, scoring times, probe sets, freeze arguments, targets that match nothing, and
SAFECallback's arguments. A refused call leaves the model and its freeze state as they were.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model

from peft_safe import BitFitConfig, HoulsbyConfig, SAFECallback, SAFEConfig
from peft_safe.core.policy import SchedulePolicy
from peft_safe.core.state import FreezeState

pytestmark = pytest.mark.usefixtures("single_thread_torch")


# ---------------------------------------------------------------------------------------------- SAFEConfig
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"seed": "a"}, ["seed", "'a'"]),
        ({"seed": -1}, ["seed", "-1"]),
        ({"seed": 1.5}, ["seed", "1.5"]),
        ({"seed": True}, ["seed", "True"]),
        ({"scoring_interval": 6, "final_freeze_time": 5}, ["scoring_interval", "6", "final_freeze_time", "5"]),
    ],
)
def test_config_refuses_bad_values_naming_them(tiny, kwargs, words):
    with pytest.raises(ValueError) as info:
        SAFEConfig(adapter_config=tiny.lora(), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_scoring_interval_equal_to_the_schedule_length_is_accepted(tiny):
    assert SAFEConfig(adapter_config=tiny.lora(), scoring_interval=5, final_freeze_time=5).scoring_interval == 5


# ---------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize(
    "adapter",
    [
        lambda tiny: tiny.lora(target_modules=["no_such_layer"]),
        lambda tiny: HoulsbyConfig(target_modules=["no_such_layer"]),
        lambda tiny: BitFitConfig(target_modules=["no_such_layer"]),
    ],
    ids=["lora", "houlsby", "bitfit"],
)
def test_target_modules_matching_nothing_raise_naming_them_and_real_layers(tiny, adapter):
    config = SAFEConfig(adapter_config=adapter(tiny), task_type="SEQ_CLS")
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny.bert(), config)
    message = str(info.value)
    assert "no_such_layer" in message and "query" in message and "dense" in message


# ---------------------------------------------------------------------------------------------- scoring time
@pytest.mark.parametrize("t", [math.nan, math.inf, -math.inf, -1, "1", True, None])
def test_update_and_freeze_refuses_bad_times_and_changes_nothing(tiny, t):
    safe = tiny.safe("bert").base_model
    safe.update_and_freeze(0, [tiny.batch()])
    before = safe.freeze_state.to_dict()
    with pytest.raises(ValueError) as info:
        safe.update_and_freeze(t, [tiny.batch()])
    assert repr(t) in str(info.value) and "finite number >= 0" in str(info.value)
    assert safe.freeze_state.to_dict() == before


@pytest.mark.parametrize(
    ("t", "scores"),
    [(math.nan, {"a": 0.1}), (math.inf, {"a": 0.1}), (1, {"a": math.nan}), (1, {"a": -0.5}), (1, {"a": math.inf})],
)
def test_schedule_step_refuses_bad_input_before_changing_the_state(t, scores):
    state = FreezeState(units=["a"])
    policy = SchedulePolicy(tau=0.5, final_freeze_time=2, warmup_cap=1)
    policy.advance(state, 0, {"a": 0.2})
    before = state.to_dict()
    with pytest.raises(ValueError):
        policy.advance(state, t, scores)
    assert state.to_dict() == before


# ---------------------------------------------------------------------------------------------- probe sets
def _probe_cases(tiny):
    ids = tiny.ids()
    return {
        "single-dict": (tiny.batch(), ValueError, ["single batch", "input_ids", "[batch]"]),
        "none": (None, TypeError, ["NoneType", "iterable of batches"]),
        "a-path": ("probe.jsonl", TypeError, ["str", "iterable of batches"]),
        "float-ids": ([{"input_ids": ids.float()}], TypeError, ["input_ids", "float32", "integer"]),
        "empty-batch": ([{"input_ids": ids[:0]}], ValueError, ["input_ids", "empty", "(0, 8)"]),
        "ids-as-list": ([{"input_ids": ids.tolist()}], TypeError, ["input_ids", "list", "return_tensors"]),
        # issue 13.19: these gave torch's own errors ("not enough values to unpack", an embedding's index error)
        "1d-ids": ([{"input_ids": ids[0]}], ValueError, ["input_ids", "2-D", "(8,)", "unsqueeze(0)"]),
        "3d-ids": ([{"input_ids": ids[None]}], ValueError, ["input_ids", "2-D", "(1, 2, 8)"]),
        "uint8-ids": ([{"input_ids": ids.to(torch.uint8)}], TypeError, ["input_ids", "torch.uint8", "long()"]),
        "ids-beyond-vocab": ([{"input_ids": ids + 100}], ValueError, ["input_ids", "vocabulary", "[0, 100)"]),
        "negative-ids": ([{"input_ids": ids - 200}], ValueError, ["input_ids", "vocabulary"]),
    }


PROBE_CASES = ["single-dict", "none", "a-path", "float-ids", "empty-batch", "ids-as-list", "1d-ids", "3d-ids",
               "uint8-ids", "ids-beyond-vocab", "negative-ids"]


@pytest.mark.parametrize("case", PROBE_CASES)
def test_bad_probe_sets_raise_naming_what_is_wrong(tiny, case):
    probe, error, words = _probe_cases(tiny)[case]
    model = tiny.safe("bert")
    before = model.base_model.freeze_state.to_dict()
    with pytest.raises(error) as info:
        model.base_model.update_and_freeze(0, probe)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert model.base_model.freeze_state.to_dict() == before


def test_probe_set_of_padding_only_raises(tiny):
    ids = tiny.ids()
    with pytest.raises(ValueError, match="no real token"):
        tiny.safe("bert").base_model.compute_importance([{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])


# ---------------------------------------------------------------------------------------------- freeze arguments
@pytest.mark.parametrize(("units", "optimizer", "word"), [(None, None, "None"), ([0], "adam", "str"), ([0], 3, "int")])
def test_freeze_refuses_bad_arguments_and_freezes_nothing(tiny, units, optimizer, word):
    model = tiny.safe("bert")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=word):
        model.base_model.freeze(units, optimizer=optimizer)
    assert model.base_model.frozen_units == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_freezing_the_last_trainable_units_by_hand_is_refused_on_a_causal_lm(tiny):
    # issue 13.24: every unit frozen on a causal LM left nothing trainable; the next backward died
    model = tiny.safe("llama", layers=3)
    safe = model.base_model
    safe.freeze([0, 1])
    with pytest.raises(ValueError, match="no parameter of the model trainable"):
        safe.freeze([2])
    with pytest.raises(ValueError, match="no parameter of the model trainable"):
        safe.freeze(safe.adapter_units)
    assert safe.frozen_units == safe.adapter_units[:2]
    loss = model(input_ids=tiny.ids(), labels=tiny.ids()).loss
    loss.backward()  # still trains
    # a classifier's head trains on, so there every unit may freeze
    bert = tiny.safe("bert", layers=2)
    assert bert.base_model.freeze([0, 1]) == bert.base_model.adapter_units


def test_update_and_freeze_refuses_a_non_optimizer_before_scoring(tiny):
    safe = tiny.safe("bert").base_model
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        safe.update_and_freeze(0, [tiny.batch()], optimizer=list(safe.parameters()))
    assert safe.freeze_state.history == []


# ---------------------------------------------------------------------------------------------- SAFECallback
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"probe_size": 2.5}, ValueError, ["probe_size", "2.5"]),
        ({"probe_size": "3"}, ValueError, ["probe_size", "'3'"]),
        ({"probe_size": True}, ValueError, ["probe_size", "True"]),
        ({"batch_size": None}, ValueError, ["batch_size", "None"]),
        ({"probe_dataset": "data.jsonl"}, TypeError, ["str", "data.jsonl", "tokenize"]),
        ({"probe_dataset": 5}, TypeError, ["int", "5"]),
    ],
)
def test_callback_refuses_bad_arguments_naming_them(tiny, kwargs, error, words):
    kwargs.setdefault("probe_dataset", [tiny.batch()])
    with pytest.raises(error) as info:
        SAFECallback(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_callback_refuses_ddp_that_waits_for_gradients_of_frozen_units(tiny):
    model = tiny.safe("bert")
    callback = SAFECallback(probe_dataset=[tiny.batch()])
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=False)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        callback.on_train_begin(args, None, None, model=model)
    # one process, or DDP left to the Trainer's default (True for peft models): accepted
    for args in (SimpleNamespace(world_size=1, ddp_find_unused_parameters=False),
                 SimpleNamespace(world_size=2, ddp_find_unused_parameters=None)):
        callback.on_train_begin(args, None, None, model=model)
