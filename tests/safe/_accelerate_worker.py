"""One process of the accelerate resume test (test_accelerate_resume.py): a custom loop on a tiny LLaMA under SAFE.

Usage: python _accelerate_worker.py MODE OUT_FILE CHECKPOINT_DIR, MODE one of
  full    train steps 1..STEPS uninterrupted;
  first   train steps 1..SAVE_AT, then Accelerator.save_state(CHECKPOINT_DIR);
  resume  the resume recipe (docs/reliability.md) in this fresh process, then steps SAVE_AT+1..STEPS.
Writes the LoRA weights and the freeze state to OUT_FILE (torch.save).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the tiny models
from conftest import TinyModels  # noqa: E402

STEPS, SAVE_AT = 10, 4
SCHEDULE = dict(schedule_unit="step", scoring_interval=2, final_freeze_time=8, warmup_cap=2, tau=1.0,
                importance_scale="normalized", freeze_order="any")


def main(mode: str, out_file: str, checkpoint: str) -> None:
    tiny = TinyModels()
    model = tiny.safe("llama", layers=4, **SCHEDULE).train()
    accelerator = Accelerator(cpu=True)
    start = 0
    if mode == "resume":
        # the recipe: the model's state first (weights and freeze state: the frozen units freeze again), then an
        # optimizer over what still trains, then prepare and load_state (optimizer state, RNG, the model again)
        model.load_state_dict(load_file(os.path.join(checkpoint, "model.safetensors")))
        start = SAVE_AT
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    if mode == "resume":
        accelerator.load_state(checkpoint)
    safe = accelerator.unwrap_model(model).base_model
    probe = [tiny.batch(batch=4, seed=999)]
    stop = SAVE_AT if mode == "first" else STEPS
    for step in range(start + 1, stop + 1):
        batch = tiny.batch(batch=4, seed=step)
        accelerator.backward(model(**batch, labels=batch["input_ids"]).loss)
        optimizer.step()
        if step % 2 == 0:
            safe.update_and_freeze(step, probe, optimizer=optimizer)
        optimizer.zero_grad()
    if mode == "first":
        accelerator.save_state(checkpoint)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    torch.save({"weights": weights, "state": safe.freeze_state.to_dict()}, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
