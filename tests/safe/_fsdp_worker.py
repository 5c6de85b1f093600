"""One rank of the FSDP test (test_fsdp.py): torchrun --nproc_per_node 2 _fsdp_worker.py OUT_DIR.

A tiny random LLaMA under SAFE (LoRA), sharded with FSDP2 (``fully_shard`` on every block and on the root), trained
by a plain loop with SAFE's automatic schedule, each rank on its own batches; then the full state dict
(``torch.distributed.checkpoint.state_dict``) is loaded into a freshly sharded model, and finally a DDP wrapper
without ``find_unused_parameters`` is tried. Each rank writes what it saw to OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the tiny models
from conftest import TinyModels  # noqa: E402
from torchrun import finish_rank, start_rank  # noqa: E402

start_rank()

STEPS = 7
SCHEDULE = dict(schedule_unit="step", scoring_interval=2, final_freeze_time=6, warmup_cap=2, tau=1.0,
                importance_scale="normalized", freeze_order="any")


def sharded(tiny):
    model = tiny.safe("llama", layers=4, **SCHEDULE).train()
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tiny = TinyModels()
    model = sharded(tiny)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, STEPS + 1):
        batch = tiny.batch(batch=2, seed=100 * step + rank)  # each rank its own data, and so its own probe set
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    safe = model.base_model
    frozen = [p for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    report = {
        "frozen_units": safe.frozen_units,
        "history": safe.freeze_state.history,
        "sharded": all(isinstance(p, DTensor) for p in frozen),
        "frozen_params": len(frozen),
        "frozen_in_optimizer": sum(id(p) in in_optimizer for p in frozen),
        "frozen_with_state": sum(p in optimizer.state for p in frozen),
    }
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)  # on rank 0 (gathered), empty on the others
    expected = {k: v.clone() for k, v in full.items() if "lora_" in k}
    fresh = sharded(tiny)
    set_model_state_dict(fresh, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    report["loaded_frozen_units"] = fresh.base_model.frozen_units
    gathered = get_model_state_dict(fresh, options=options)
    report["loaded_weights_equal"] = rank != 0 or (
        bool(expected) and all(torch.equal(gathered[k], v) for k, v in expected.items())
    )

    ddp = DistributedDataParallel(tiny.safe("llama", layers=2, **SCHEDULE).train())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = tiny.batch(batch=2, seed=rank)
        ddp(**batch, labels=batch["input_ids"]).loss.backward()
    report["ddp_warnings"] = [str(w.message) for w in caught if "SAFE will not freeze" in str(w.message)]
    report["ddp_driver_active"] = ddp.module.base_model.auto_driver.active
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finish_rank()


if __name__ == "__main__":
    main(sys.argv[1])
