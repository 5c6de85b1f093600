"""SAFE under FSDP2 (``torch.distributed.fsdp.fully_shard``) with 2 CPU processes (gloo), issue 14.7.

tests/safe/_fsdp_worker.py trains a sharded tiny LLaMA with SAFE's automatic schedule, each rank on its own data:
every rank must freeze the same units at the same times, the frozen (sharded) parameters and their state must
leave the optimizer, and the full state dict must load into a freshly sharded model with its freeze state.

accelerate's own FSDP is not what runs here: with ``Accelerator(cpu=True)`` (the only way it runs on a CPU)
accelerate 1.15 sets ``DistributedType.MULTI_CPU`` and wraps the model in DDP, ignoring the FSDP plugin (checked
in this environment), so accelerate's FSDP path needs GPUs. FSDP2 itself, which accelerate's ``fsdp_version=2``
applies, runs on gloo and is tested directly. The DDP wrapper accelerate uses there is the last check: without
``find_unused_parameters=True`` SAFE warns and does not freeze (DDP would wait forever for frozen gradients).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from torchrun import run_two_ranks

WORKER = Path(__file__).resolve().with_name("_fsdp_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out_dir = tmp_path_factory.mktemp("fsdp")
    run_two_ranks(WORKER, out_dir)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_rank_freezes_the_same_units_at_the_same_times(ranks):
    first, second = ranks
    assert first["frozen_units"] and first["frozen_units"] == second["frozen_units"]
    assert first["history"] == second["history"]  # the ranks' mean scores, bitwise the same
    assert [h["t"] for h in first["history"]] == [2, 4, 6]


def test_frozen_sharded_parameters_and_their_state_leave_the_optimizer(ranks):
    for rank in ranks:
        assert rank["sharded"] and rank["frozen_params"] > 0
        assert rank["frozen_in_optimizer"] == 0 and rank["frozen_with_state"] == 0


def test_the_full_state_dict_loads_into_a_freshly_sharded_model(ranks):
    for rank in ranks:
        assert rank["loaded_frozen_units"] == ranks[0]["frozen_units"]
        assert rank["loaded_weights_equal"]


def test_ddp_without_find_unused_parameters_warns_and_does_not_freeze(ranks):
    for rank in ranks:
        assert rank["ddp_warnings"] and "find_unused_parameters=True" in rank["ddp_warnings"][0]
        assert rank["ddp_driver_active"] is False
