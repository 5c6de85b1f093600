"""SAFECallback in a real multi-process Trainer run: 2 CPU processes (gloo), launched by torchrun and accelerate.

Each launch runs tests/callbacks/_trainer_worker.py: a tiny random BERT (2 blocks, 32 wide) with LoRA under
SAFE, a step schedule that freezes a unit at step 4, each rank probing on its own data, DDP through the
Trainer, one checkpoint at the last step (10). Every rank writes what it saw to rank{R}.json; the assertions
run here. One launch costs ~20 s on 2 busy cores (process start-up and imports dominate).

accelerate: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's multi-CPU launcher
needs ``mpirun``, ``--mpirun_hostfile``), so the accelerate run uses a config with ``distributed_type: MULTI_GPU``
(accelerate's torchrun-based launcher) and the script's ``TrainingArguments(use_cpu=True)`` picks gloo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().with_name("_trainer_worker.py")
WORLD = 2
MAX_STEPS = 10  # _trainer_worker.MAX_STEPS
UNITS = [f"bert.encoder.layer.{i}" for i in range(2)]
TIMEOUT_S = 300

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
gpu_ids: all
mixed_precision: 'no'
dynamo_config: {}
debug: false
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip_reason(launcher: str) -> str | None:
    if not (dist.is_available() and dist.is_gloo_available()):
        return "torch.distributed with the gloo backend is not available"
    if importlib.util.find_spec("torch.distributed.run") is None:
        return "torchrun (torch.distributed.run) is not available"
    if launcher == "accelerate" and importlib.util.find_spec("accelerate.commands.launch") is None:
        return "accelerate launch (accelerate.commands.launch) is not available"
    return None


def _command(launcher: str, out_dir: Path) -> list[str]:
    port = str(_free_port())
    if launcher == "torchrun":
        # torchrun --nproc_per_node 2 --master_port PORT _trainer_worker.py OUT_DIR
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                "--master_addr", "127.0.0.1", "--master_port", port, str(WORKER), str(out_dir)]
    config = out_dir / "accelerate_config.yaml"
    config.write_text(ACCELERATE_CONFIG)
    # accelerate launch --config_file CONFIG --main_process_port PORT _trainer_worker.py OUT_DIR
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(WORLD), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
            str(WORKER), str(out_dir)]


def _launch(launcher: str, out_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log_path = out_dir / "launch.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(_command(launcher, out_dir), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
            proc.wait()
            returncode = None
    log_text = log_path.read_text(errors="replace")
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    return {"launcher": launcher, "returncode": returncode, "log": log_text, "ranks": ranks}


@pytest.fixture(scope="module", params=["torchrun", "accelerate"])
def run(request, tmp_path_factory):
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return _launch(request.param, tmp_path_factory.mktemp(request.param))


def _ranks(run) -> list[dict]:
    assert run["returncode"] == 0, f"{run['launcher']} exited with {run['returncode']}:\n{run['log'][-4000:]}"
    ranks = run["ranks"]
    assert [r["rank"] for r in ranks] == list(range(WORLD)), f"ranks that finished: {[r['rank'] for r in ranks]}"
    return ranks


def test_both_ranks_finish_a_distributed_gloo_run(run):
    ranks = _ranks(run)
    for r in ranks:
        assert r["world_size"] == WORLD and r["backend"] == "gloo"
        assert r["wrapper"] == "DistributedDataParallel" and r["find_unused_parameters"] is True
        assert r["global_step"] == MAX_STEPS and r["steps"] == list(range(1, MAX_STEPS + 1))
    # the launcher named is the one that ran: accelerate launch exports its settings to the ranks
    assert bool(ranks[0]["accelerate_env"]) == (run["launcher"] == "accelerate")


def test_ranks_probe_on_different_data(run):
    ranks = _ranks(run)
    # the premise: each rank's own scores differ, so left alone the ranks would record different histories
    assert ranks[0]["local_scores"][0]["scores"] != ranks[1]["local_scores"][0]["scores"]


def test_every_rank_freezes_the_same_units_at_the_same_steps_with_the_same_history(run):
    ranks = _ranks(run)
    state = ranks[0]["state"]
    assert state["frozen"], "nothing froze: the run does not exercise DDP after freezing"
    assert max(state["frozen"].values()) < MAX_STEPS
    for r in ranks[1:]:
        assert r["state"] == state  # frozen units and times, warm-up end, history: bitwise equal
        assert r["scorings"] == ranks[0]["scorings"]  # what SAFECallback logged into the Trainer's history
    assert [h["t"] for h in state["history"]] == list(range(2, MAX_STEPS + 1, 2))
    for r in ranks:
        assert r["requires_grad"] == {u: [False] if u in state["frozen"] else [True] for u in UNITS}


def test_the_agreed_scores_are_the_mean_of_the_ranks_own_scores(run):
    ranks = _ranks(run)
    for i, entry in enumerate(ranks[0]["state"]["history"]):
        local = [r["local_scores"][i] for r in ranks]
        assert all(scoring["t"] == entry["t"] for scoring in local)
        for unit, agreed in entry["scores"].items():
            mean = sum(scoring["scores"][unit] for scoring in local) / WORLD
            assert agreed == pytest.approx(mean, rel=1e-12, abs=1e-18)


def test_ddp_keeps_training_after_freezing_and_replicas_stay_equal(run):
    ranks = _ranks(run)
    # DDP's errors for a parameter that stopped producing gradients
    assert "finished reduction" not in run["log"] and "were not used in producing loss" not in run["log"]
    last_freeze = max(ranks[0]["state"]["frozen"].values())
    assert ranks[0]["steps"][-1] > last_freeze  # steps after the freeze went through DDP
    assert ranks[0]["params"] == ranks[1]["params"]
    for r in ranks:
        assert r["at_end"] == r["at_freeze"]  # frozen units did not move after they froze


def test_the_checkpoint_is_written_once_by_rank_zero_and_reloads_with_the_frozen_units_frozen(run):
    ranks = _ranks(run)
    assert [len(r["saves"]) for r in ranks] == [1, 0]
    assert Path(ranks[0]["saves"][0]).name == f"checkpoint-{MAX_STEPS}"
    for r in ranks:
        assert r["checkpoints"] == [f"checkpoint-{MAX_STEPS}"]
        assert "adapter_model.safetensors" in r["checkpoint_files"]
        # PeftModel.from_pretrained(..., is_trainable=True): the agreed state, frozen units still frozen
        assert r["reloaded_state"] == ranks[0]["state"]
        assert r["reloaded_requires_grad"] == r["requires_grad"]
