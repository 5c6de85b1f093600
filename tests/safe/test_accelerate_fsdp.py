"""SAFE under accelerate's FSDP2 integration, 2 CPU processes (gloo): tests/safe/_accelerate_fsdp_worker.py.

accelerate itself does not select FSDP on a CPU (the first test pins that: ``Accelerator(cpu=True, fsdp_plugin=...)``
is ``MULTI_CPU`` and would wrap in DDP), so the worker sets ``DistributedType.FSDP`` on accelerate's shared state
after building the Accelerator; prepare, the sharding, the optimizer's parameter swap and the checkpoints are then
accelerate's own FSDP2 code. tests/safe/test_fsdp.py covers ``fully_shard`` without accelerate.

Both ranks freeze the same units; the frozen DTensors and their state leave the optimizer accelerate prepared;
``save_state`` resumes in fresh processes to the weights and freeze state of the uninterrupted run, with
accelerate's ``FULL_STATE_DICT`` and with its default ``SHARDED_STATE_DICT`` (where
``torch.distributed.checkpoint`` loads into the fresh model's tensors and refuses any whose size differs from the
saved one: SAFE's extra state has one size whatever it holds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from torchrun import run_two_ranks

WORKER = Path(__file__).resolve().with_name("_accelerate_fsdp_worker.py")


def _launch(out_dir: Path, phase: str, state_dict_type: str) -> list[dict]:
    run_two_ranks(WORKER, out_dir, phase, state_dict_type, log_name=f"{phase}.log")
    return [json.loads((out_dir / f"{phase}{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    cache = {}

    def run(state_dict_type: str) -> dict:
        if state_dict_type not in cache:
            out_dir = tmp_path_factory.mktemp(state_dict_type.lower())
            cache[state_dict_type] = {phase: _launch(out_dir, phase, state_dict_type) for phase in ("train", "resume")}
        return cache[state_dict_type]

    return run


def test_accelerate_does_not_select_fsdp_on_a_cpu(runs):
    # if this fails, accelerate runs FSDP on a CPU by itself: drop the override in the worker
    for rank in runs("FULL_STATE_DICT")["train"]:
        assert rank["selected"] == "DistributedType.MULTI_CPU"


def test_every_rank_freezes_the_same_units_and_the_frozen_dtensors_leave_the_prepared_optimizer(runs):
    first, second = runs("FULL_STATE_DICT")["train"]
    assert first["prepared"] == "FSDPPeftModelForCausalLM" and first["sharded"]
    assert first["frozen_units"] and first["frozen_units"] == second["frozen_units"]
    assert first["history"] == second["history"]
    assert [h["t"] for h in first["history"]] == [2, 4, 6]
    for rank in (first, second):
        assert rank["frozen_params"] > 0 and rank["frozen_sharded"]
        assert rank["frozen_in_optimizer"] == 0 and rank["frozen_with_state"] == 0


def _check_resume(run: dict) -> None:
    for trained, resumed in zip(run["train"], run["resume"]):
        assert resumed["load_state"] == "ok"
        assert resumed["frozen_units"] == trained["frozen_units"]
        assert resumed["history"] == trained["history"]
        assert resumed["loaded_weights_equal"] and resumed["final_weights_equal"]
        assert resumed["final_frozen_units"] == trained["frozen_units"]
        # The fresh optimizer was prepared over every adapter parameter before load_state froze units: the frozen
        # ones stay in its groups, but get no gradient, so no step and no state (what makes the weights equal)
        assert resumed["frozen_with_state"] == 0


def test_save_state_with_a_full_state_dict_resumes_like_an_uninterrupted_run(runs):
    _check_resume(runs("FULL_STATE_DICT"))


def test_save_state_with_a_sharded_state_dict_resumes_like_an_uninterrupted_run(runs):
    # issue 22.9: torch.distributed.checkpoint refused SAFE's extra-state tensor (its size followed its content)
    _check_resume(runs("SHARDED_STATE_DICT"))
