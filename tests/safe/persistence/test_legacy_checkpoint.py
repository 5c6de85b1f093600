"""A checkpoint written by peft_safe 0.1.0 as first laid out (commit 508a4e1) loads and trains as today's would.

The fixture is the adapter that ``legacy_recipe.py`` saved with that code. Today's code runs the same recipe:
what it saves must hold the same tensors and the same freeze decisions, and the old checkpoint, loaded and
trained on, must follow the losses and weights of today's checkpoint loaded and trained on.

The fixture's floats were computed on another CPU than the one running the test (CI may be Intel or AMD, with other
vector units, so other summation orders in the same kernels): they are compared within the tolerances below, never
bit for bit. The decisions (which units froze, when, the schedule's phase, the tensors' names and shapes) are
compared exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import legacy_recipe as recipe
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("single_thread_torch")

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "safe_checkpoint_v0_1")
STATE_KEY = "base_model.safe_freeze_state"

# Importance is 1 - CKA with CKA close to 1, accumulated in float64 from float32 activations: another CPU's kernels
# moved the fixture's scores by a relative 2e-6 (1.2516124890837865e-05 on the machine that wrote it,
# 1.2516101553727843e-05 on an AMD EPYC). A change to the method moves them by orders of magnitude more.
SCORE_RTOL, SCORE_ATOL = 1e-4, 1e-12
# LoRA weights are O(0.1-0.3) and AdamW at lr 5e-2 moves each by up to 5e-2 a step; the same recipe on two CPUs
# ended 3e-6 apart after 4 steps. 1e-4 is 30x that and 500x below one step.
WEIGHT_ATOL = 1e-4
LOSS_RTOL = 1e-5


def _freeze_state(tensors: dict[str, torch.Tensor]) -> dict:
    record = json.loads(bytes(tensors[STATE_KEY].tolist()).decode("utf-8"))
    record.pop("integrity")  # digests of the same tensors; compared through the tensors themselves
    record.pop("format_version")  # 2 since the integrity record seals the state (the state's layout is the same)
    return record


@pytest.fixture(scope="module")
def todays_checkpoint(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    model = recipe.new_model()
    recipe.train(model, 0, recipe.STEPS_BEFORE_SAVE)
    folder = str(tmp_path_factory.mktemp("today"))
    model.save_pretrained(folder)
    return folder


def _assert_same_record(old: object, new: object, where: str = "freeze state") -> None:
    """Equal structure, keys, strings and ints; floats (the importance history) within the score tolerance."""
    assert type(old) is type(new), f"{where}: {old!r} != {new!r}"
    if isinstance(old, dict):
        assert sorted(old) == sorted(new), where
        for key in old:
            _assert_same_record(old[key], new[key], f"{where}.{key}")
    elif isinstance(old, list):
        assert len(old) == len(new), where
        for i, (a, b) in enumerate(zip(old, new)):
            _assert_same_record(a, b, f"{where}[{i}]")
    elif isinstance(old, float):
        assert math.isclose(old, new, rel_tol=SCORE_RTOL, abs_tol=SCORE_ATOL), f"{where}: {old!r} != {new!r}"
    else:
        assert old == new, f"{where}: {old!r} != {new!r}"


def _assert_close_weights(old: torch.Tensor, new: torch.Tensor, name: str) -> None:
    assert old.dtype == new.dtype and old.shape == new.shape, name
    torch.testing.assert_close(new, old, rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"{name}: {m}")


def test_todays_code_writes_what_the_old_code_wrote(todays_checkpoint):
    old = load_file(os.path.join(FIXTURE, "adapter_model.safetensors"))
    new = load_file(os.path.join(todays_checkpoint, "adapter_model.safetensors"))
    assert sorted(old) == sorted(new)
    _assert_same_record(_freeze_state(old), _freeze_state(new))
    assert _freeze_state(old)["frozen"], "the fixture must hold frozen units to test anything"
    for key in old:
        if key != STATE_KEY:
            _assert_close_weights(old[key], new[key], key)


def test_the_comparison_fails_on_a_changed_score_or_weight():
    """The tolerances above are tight enough to see a change to the method, not only to the bits."""
    state = _freeze_state(load_file(os.path.join(FIXTURE, "adapter_model.safetensors")))
    changed = json.loads(json.dumps(state))
    first = changed["history"][0]["scores"]
    unit = sorted(first)[0]
    first[unit] *= 1.01
    with pytest.raises(AssertionError, match=unit):
        _assert_same_record(state, changed)
    weight = torch.full((2, 2), 0.2)
    with pytest.raises(AssertionError, match="w"):
        _assert_close_weights(weight, weight + 1e-3, "w")


def _load_and_train(folder: str) -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
    model = PeftModel.from_pretrained(recipe.base_model(), folder, is_trainable=True)
    frozen = list(model.base_model.frozen_units)
    losses = recipe.train(model, recipe.STEPS_BEFORE_SAVE, recipe.STEPS_AFTER_LOAD)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "classifier" in n}
    return losses, weights, frozen


def test_old_checkpoint_loads_frozen_and_trains_exactly_as_todays(todays_checkpoint, tmp_path):
    # copy: loading must not write into the committed fixture
    old_folder = shutil.copytree(FIXTURE, tmp_path / "old")
    old_losses, old_weights, old_frozen = _load_and_train(str(old_folder))
    new_losses, new_weights, new_frozen = _load_and_train(todays_checkpoint)
    assert old_frozen == new_frozen == ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.3"]
    # the two starting points differ by the fixture's cross-CPU rounding (see WEIGHT_ATOL), and training carries it
    assert old_losses == pytest.approx(new_losses, rel=LOSS_RTOL)
    assert sorted(old_weights) == sorted(new_weights)
    for name in old_weights:
        _assert_close_weights(old_weights[name], new_weights[name], name)


def test_the_same_checkpoint_trains_bit_for_bit_the_same_twice(todays_checkpoint):
    """What one machine computes twice stays equal to the bit: loading and training is deterministic."""
    first_losses, first_weights, _ = _load_and_train(todays_checkpoint)
    second_losses, second_weights, _ = _load_and_train(todays_checkpoint)
    assert first_losses == second_losses
    for name in first_weights:
        assert torch.equal(first_weights[name], second_weights[name]), name


def test_an_old_config_loads_with_the_behaviour_it_was_saved_with():
    """Fields added since (the scoring site, the freeze order) load as the old code behaved, not as today's default."""
    from peft_safe import SAFEConfig

    config = SAFEConfig.from_pretrained(FIXTURE)
    assert (config.scoring_site, config.freeze_order, config.importance_scale) == ("block_output", "any", "normalized")
    assert SAFEConfig(adapter_config=config.adapter_config).freeze_order == "prefix"  # today's default, for contrast
