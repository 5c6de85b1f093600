"""accelerate's save_state / load_state carry SAFE's freeze state (it is in model.state_dict(),
safe/persistence/state_dict.py): a run saved after freezing and resumed in a fresh process ends with the weights
and freeze state of an uninterrupted run. Issue 14.5: model.state_dict() had no freeze state, and the fresh
optimizer, built over every adapter parameter, did not match the saved one (which had lost the frozen ones)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().with_name("_accelerate_worker.py")
REPO = Path(__file__).resolve().parents[2]


def run(mode: str, out: Path, checkpoint: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(WORKER), mode, str(out), str(checkpoint)], capture_output=True,
                            text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def test_save_state_after_freezing_resumes_in_a_fresh_process_like_an_uninterrupted_run(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    full = run("full", tmp_path / "full.pt", checkpoint)
    first = run("first", tmp_path / "first.pt", checkpoint)
    assert first["state"]["frozen"], "nothing froze before the save: the test would not test the freeze state"
    resumed = run("resume", tmp_path / "resumed.pt", checkpoint)
    assert resumed["state"] == full["state"]
    assert len(full["state"]["history"]) > len(first["state"]["history"])  # scoring went on after the resume
    assert resumed["weights"].keys() == full["weights"].keys()
    for name, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=0, msg=name)


def test_the_freeze_state_and_the_step_count_round_trip_through_state_dict(tiny):
    model = tiny.safe("llama", layers=4)
    model.base_model.freeze([0, 1])
    model.base_model.auto_driver.steps = 7
    state = model.state_dict()
    assert state["base_model._extra_state"].dtype == torch.uint8  # torch's extra state: DCP and FSDP know the key
    fresh = tiny.safe("llama", layers=4)
    fresh.load_state_dict(state)  # strict: the SAFE keys are taken out before torch matches keys
    assert fresh.base_model.frozen_units == ["model.layers.0", "model.layers.1"]
    assert fresh.base_model.auto_driver.steps == 7
    frozen = [p for n, p in fresh.named_parameters() if "layers.0." in n and "lora_" in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_a_freeze_state_of_another_config_is_refused_and_the_old_one_kept(tiny):
    model = tiny.safe("llama", layers=4)
    model.base_model.freeze([0])
    state = model.state_dict()
    other = tiny.safe("llama", layers=4, tau=0.9)  # another config: the sealed record names the difference
    with pytest.raises(ValueError, match="SAFE freeze state of adapter 'default'.*tau"):
        other.load_state_dict(state)
    assert other.base_model.frozen_units == []


def test_a_state_dict_saved_without_the_freeze_state_still_loads_strictly(tiny):
    model = tiny.safe("llama", layers=4)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    fresh = tiny.safe("llama", layers=4)
    fresh.base_model.freeze([0])
    fresh.load_state_dict(state)  # strict
    assert fresh.base_model.frozen_units == ["model.layers.0"]  # nothing to apply: the state is kept


def test_the_extra_state_has_one_size_whatever_it_holds(tiny):
    # issue 22.9: sharded checkpoints (torch.distributed.checkpoint) load into the fresh model's own tensors
    from peft_safe.safe.persistence.state_dict import EXTRA_STATE_BYTES

    fresh = tiny.safe("llama", layers=4).state_dict()["base_model._extra_state"]
    model = tiny.safe("llama", layers=4)
    model.base_model.freeze([0, 1], at=3.0)
    model.base_model.freeze_state.history.extend({"t": t, "scores": {"model.layers.3": 0.5}} for t in range(500))
    trained = model.state_dict()["base_model._extra_state"]
    assert fresh.shape == trained.shape == (EXTRA_STATE_BYTES,)
    target = tiny.safe("llama", layers=4)
    target.load_state_dict({"base_model._extra_state": trained}, strict=False)
    assert target.base_model.frozen_units == ["model.layers.0", "model.layers.1"]
    assert len(target.base_model.freeze_state.history) == 500


def test_an_extra_state_written_before_the_fixed_size_still_loads(tiny):
    import json

    model = tiny.safe("llama", layers=4)
    model.base_model.freeze([0])
    from peft_safe.safe.persistence.checkpoint import encode_payload

    safe = model.base_model
    payload = bytes(encode_payload(safe.freeze_state, safe.peft_config["default"], {}).tolist()).decode("utf-8")
    record = {"safe_extra_state": 1, "adapters": {"default": payload}, "auto_steps": 5}
    old = torch.frombuffer(bytearray(json.dumps(record, sort_keys=True).encode("utf-8")), dtype=torch.uint8)
    target = tiny.safe("llama", layers=4)
    target.load_state_dict({"base_model._extra_state": old}, strict=False)
    assert target.base_model.frozen_units == ["model.layers.0"] and target.base_model.auto_driver.steps == 5


def test_a_freeze_state_too_large_for_the_fixed_size_is_refused_naming_the_fix(tiny, monkeypatch):
    from peft_safe.safe import state_dict

    monkeypatch.setattr(state_dict, "EXTRA_STATE_BYTES", 64)
    model = tiny.safe("llama", layers=4)
    with pytest.raises(ValueError, match="save_pretrained.*scoring_interval"):
        model.state_dict()
