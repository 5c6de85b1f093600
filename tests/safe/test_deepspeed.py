"""SAFE under DeepSpeed ZeRO 1, 2 and 3 (2 with and 3 with optimizer offload) through the transformers Trainer,
2 CPU processes (gloo, DeepSpeed's CPU accelerator): tests/safe/_deepspeed_worker.py (issue 22.8).

With ``SAFEConfig`` alone the schedule follows the Trainer's step (before, the driver saw no torch optimizer step
of SAFE's parameters and stood down), and a frozen unit's weights, fp32 master copy and Adam moments do not change
at any later step, bit for bit (before, ZeRO's optimizer kept moving them), while the backprop cut stands.

Marked ``deepspeed``: the default run skips them; CI runs them once (``bash scripts/test.sh -m deepspeed``). The
first launch on a machine builds DeepSpeed's CPU communication op (about a minute and a half).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from torchrun import run_two_ranks

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.deepspeed

WORKER = Path(__file__).resolve().with_name("_deepspeed_worker.py")
CASES = [(1, False), (2, False), (3, False), (2, True), (3, True)]


@pytest.mark.parametrize("stage, offload", CASES, ids=[f"zero{s}{'-offload' if o else ''}" for s, o in CASES])
def test_frozen_units_stay_frozen_bit_for_bit_under_zero(tmp_path, stage, offload):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    run_two_ranks(WORKER, tmp_path, str(stage), "1" if offload else "0", timeout=600)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert first["engine"] == "DeepSpeedEngine" and first["zero_stage"] == stage
    # the automatic schedule followed the Trainer: scored at 2, 4, ..., 10 on both ranks, the same decisions
    assert first["driver_active"] and [h["t"] for h in first["history"]] == [2, 4, 6, 8, 10]
    assert first["history"] == second["history"] and first["frozen"] == second["frozen"]
    assert len(first["frozen"]) >= 2 and "model.layers.0" in first["frozen"]
    for rank in (first, second):
        # every frozen tensor was read at the start of each later step: weights, fp32 master, exp_avg, exp_avg_sq
        assert rank["checks"] > 0 and len(rank["max_change"]) == 4 * 4 * len(rank["frozen"])
        moved = {name: change for name, change in rank["max_change"].items() if change != 0.0}
        assert not moved, moved
        assert rank["frozen_with_grad"] == 0
        assert rank["cut"][-1] == "model.layers.1"  # block 0 frozen: backprop stops at block 1's input
    assert first["held"] + second["held"] >= 4 * len(first["frozen"])  # each slice held by the rank owning it
