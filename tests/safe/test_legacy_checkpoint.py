"""A checkpoint written by peft_safe 0.1.0 as first laid out (commit 508a4e1) loads and trains as today's would.

The fixture is the adapter that ``legacy_recipe.py`` saved with that code. Today's code runs the same recipe:
what it saves must hold the same tensors and the same freeze decisions, and the old checkpoint, loaded and
trained on, must follow exactly the losses and weights of today's checkpoint loaded and trained on.
"""

from __future__ import annotations

import json
import os
import shutil

import legacy_recipe as recipe
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("single_thread_torch")

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "safe_checkpoint_v0_1")
STATE_KEY = "base_model.safe_freeze_state"


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


def test_todays_code_writes_what_the_old_code_wrote(todays_checkpoint):
    old = load_file(os.path.join(FIXTURE, "adapter_model.safetensors"))
    new = load_file(os.path.join(todays_checkpoint, "adapter_model.safetensors"))
    assert sorted(old) == sorted(new)
    assert _freeze_state(old) == _freeze_state(new)
    assert _freeze_state(old)["frozen"], "the fixture must hold frozen units to test anything"
    for key in old:
        if key != STATE_KEY:
            assert torch.equal(old[key], new[key]), key


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
    assert old_losses == new_losses
    assert sorted(old_weights) == sorted(new_weights)
    for name in old_weights:
        assert torch.equal(old_weights[name], new_weights[name]), name


def test_an_old_config_loads_with_the_behaviour_it_was_saved_with():
    """Fields added since (the scoring site, the freeze order) load as the old code behaved, not as today's default."""
    from peft_safe import SAFEConfig

    config = SAFEConfig.from_pretrained(FIXTURE)
    assert (config.scoring_site, config.freeze_order, config.importance_scale) == ("block_output", "any", "normalized")
    assert SAFEConfig(adapter_config=config.adapter_config).freeze_order == "prefix"  # today's default, for contrast
