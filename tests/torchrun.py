"""Launching a test worker on 2 CPU processes with torchrun (gloo), for the FSDP tests (not a test module), and
what each worker calls first (``start_rank``) and last (``finish_rank``)."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_rank() -> None:
    """A rank that crashes in C++ (SIGABRT, SIGSEGV) prints every thread's Python stack into the launch log."""
    faulthandler.enable(all_threads=True)


def finish_rank() -> None:
    """End a rank once its report is written: wait for the other, tear the process group down, exit at once.

    Exiting with ``os._exit`` skips the interpreter's finalization, where gloo's C++ threads can abort the process
    ("terminate called without an active exception", pytorch/pytorch#65231) after all the work is done and checked.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_two_ranks(worker: Path, out_dir: Path, *args: str, log_name: str = "launch.log", timeout: int = 300) -> None:
    """Run ``worker out_dir *args`` on 2 ranks in a clean environment; fail with the log's tail unless both succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(worker), str(out_dir), *args]
    log_path = out_dir / log_name
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
    assert returncode == 0, log_path.read_text(errors="replace")[-4000:]
