"""SAFE under torch.distributed: 2 CPU processes (gloo), DistributedDataParallel, different probe data per rank.

One spawn of two processes runs the whole scenario (process start-up dominates the cost); each rank writes
what it saw to a JSON file and the assertions run here, in the test process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

TESTS_DIR = str(Path(__file__).resolve().parents[2])
WORLD = 2
LAYERS = 3
TIMES = (0, 1, 2)  # warm-up capped at t=1, threshold reaches tau at t=2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _param_digest(model) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: score on its own probe data, freeze on the schedule, train through DDP, save on rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, TESTS_DIR)
    from conftest import TinyModels
    from peft import PeftModel

    from peft_safe.safe.method.distributed import agree_on_scores, check_ddp

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        tiny = TinyModels()
        model = tiny.safe("bert", layers=LAYERS, tau=0.9, final_freeze_time=2, warmup_cap=1)
        safe = model.base_model
        probe = [tiny.batch(batch=2, seq=8, seed=100 + rank)]  # each rank probes on other data
        model.train()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        check_ddp(ddp)
        refused = ""
        try:
            check_ddp(DistributedDataParallel(model, find_unused_parameters=False))
        except ValueError as err:
            refused = str(err)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        labels = torch.tensor([0, 1])
        local_scores, newly = [], []
        for t in TIMES:
            local_scores.append(safe.compute_importance(probe, units=[u for u in safe.adapter_units
                                                                     if u not in safe.frozen_units]))
            newly.append(safe.update_and_freeze(t, probe, optimizer=optimizer))
            for step in range(2):  # training goes on through DDP after units stop requiring grad
                batch = tiny.batch(batch=2, seq=8, seed=10 * t + step + 1000 * rank)
                ddp(**batch, labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        disagreement = ""
        try:
            agree_on_scores({f"unit-of-rank-{rank}": 0.5}, t=TIMES[-1] + 1)
        except RuntimeError as err:
            disagreement = str(err)
        ckpt = Path(out_dir) / "ckpt"
        if rank == 0:
            model.save_pretrained(ckpt)
        dist.barrier()
        reloaded = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), ckpt, is_trainable=True)
        result = {
            "local_scores": local_scores,
            "agreed_history": safe.freeze_state.history,
            "state": safe.freeze_state.to_dict(),
            "reloaded_state": reloaded.base_model.freeze_state.to_dict(),
            "newly": newly,
            "params": _param_digest(model),
            "refused": refused,
            "disagreement": disagreement,
            "files": sorted(os.listdir(ckpt)),
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_ranks_score_different_probe_data(ranks):
    # the premise: left alone, the ranks would see different scores
    assert ranks[0]["local_scores"][0] != ranks[1]["local_scores"][0]


def test_scores_are_averaged_over_the_ranks(ranks):
    for i, entry in enumerate(ranks[0]["agreed_history"]):
        local = [r["local_scores"][i] for r in ranks]
        for unit, agreed in entry["scores"].items():
            assert agreed == pytest.approx(sum(scores[unit] for scores in local) / WORLD, rel=1e-12, abs=1e-15)


def test_every_rank_makes_the_same_freeze_decisions(ranks):
    assert ranks[0]["state"] == ranks[1]["state"]  # history, warm-up end, frozen units and times: bitwise equal
    assert ranks[0]["newly"] == ranks[1]["newly"]
    assert ranks[0]["state"]["frozen"], "the schedule froze nothing: the scenario does not exercise DDP after freezing"


def test_ddp_keeps_training_and_replicas_stay_equal_after_freezing(ranks):
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-6, abs=1e-7)


def test_check_ddp_refuses_a_wrapper_that_would_hang_on_frozen_units(ranks):
    assert "find_unused_parameters" in ranks[0]["refused"]


def test_ranks_scoring_different_units_fail_clearly_instead_of_hanging(ranks):
    for r in ranks:
        assert "disagree" in r["disagreement"] and "update_and_freeze on every rank" in r["disagreement"]


def test_checkpoint_saved_once_by_rank_zero_holds_the_agreed_state(ranks):
    assert "adapter_model.safetensors" in ranks[0]["files"]
    for r in ranks:
        assert r["reloaded_state"] == ranks[0]["state"]


def test_agree_on_scores_is_the_identity_outside_a_process_group():
    from peft_safe.safe.method.distributed import agree_on_scores, is_distributed

    assert not is_distributed()
    scores = {"a": 0.25, "b": 0.5}
    assert agree_on_scores(scores, t=1) is scores
