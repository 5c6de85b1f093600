"""One rank of one phase of test_accelerate_fsdp.py:
torchrun --nproc_per_node 2 _accelerate_fsdp_worker.py OUT_DIR PHASE STATE_DICT_TYPE.

accelerate's FSDP2 integration (``FullyShardedDataParallelPlugin(fsdp_version=2)``, ``Accelerator.prepare``,
``save_state`` / ``load_state``) on 2 CPU processes (gloo). accelerate does not select FSDP on a CPU:
``Accelerator(cpu=True)`` gets ``DistributedType.MULTI_CPU`` from ``PartialState._prepare_backend`` and
``AcceleratorState.__init__`` switches to ``DistributedType.FSDP`` only from the ``MULTI_<accelerator>`` types
(accelerate 1.15, ``accelerate/state.py``), so prepare() would wrap in DDP. Where that happens, the worker sets
``DistributedType.FSDP`` and the plugin on the shared state itself (three assignments, what the GPU path ends with);
everything after that is accelerate's own FSDP2 code: ``fsdp2_prepare_model`` (auto-wrap of every decoder layer,
``fully_shard``), the optimizer's parameters swapped for the DTensors, ``save_fsdp_model`` / ``save_fsdp_optimizer``
and their loaders.

PHASE ``train``: 7 steps (units freeze at steps 2, 4, 6), ``save_state``, then 3 more steps: the uninterrupted run.
PHASE ``resume``: a fresh model and optimizer, prepared, ``load_state``, the same 3 steps. Each rank writes
OUT_DIR/{PHASE}{RANK}.json; rank 0 of ``train`` writes the adapter weights (full state dict) to OUT_DIR/weights.pt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from accelerate import Accelerator, FullyShardedDataParallelPlugin  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the tiny models
from conftest import TinyModels  # noqa: E402
from torchrun import finish_rank, start_rank  # noqa: E402

start_rank()

SCHEDULE = dict(schedule_unit="step", scoring_interval=2, final_freeze_time=6, warmup_cap=2, tau=1.0,
                importance_scale="normalized", freeze_order="any")


def main(out_dir: str, phase: str, state_dict_type: str) -> None:
    out = Path(out_dir)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            state_dict_type=state_dict_type)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    report = {"selected": str(accelerator.distributed_type)}
    if accelerator.distributed_type != DistributedType.FSDP:
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    rank = accelerator.process_index
    tiny = TinyModels()

    model = tiny.safe("llama", layers=4, **SCHEDULE).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    report["prepared"] = type(model).__name__
    report["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())

    def train(steps) -> None:
        for step in steps:
            batch = tiny.batch(batch=2, seed=100 * step + rank)  # each rank its own data
            accelerator.backward(model(**batch, labels=batch["input_ids"]).loss)
            optimizer.step()
            optimizer.zero_grad()

    def adapter_weights() -> dict:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.clone() for k, v in full.items() if "lora_" in k}  # rank 0 only; empty elsewhere

    def freeze_report(prefix: str) -> None:
        safe = accelerator.unwrap_model(model).base_model
        frozen = [p for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        report.update({  # copies: training goes on after this
            f"{prefix}frozen_units": list(safe.frozen_units),
            f"{prefix}history": json.loads(json.dumps(safe.freeze_state.history)),
            f"{prefix}frozen_params": len(frozen),
            f"{prefix}frozen_sharded": all(isinstance(p, DTensor) for p in frozen),
            f"{prefix}frozen_in_optimizer": sum(id(p) in in_optimizer for p in frozen),
            f"{prefix}frozen_with_state": sum(p in optimizer.optimizer.state for p in frozen),
        })

    checkpoint = out / "checkpoint"
    if phase == "train":
        train(range(1, 8))
        freeze_report("")
        accelerator.save_state(str(checkpoint))
        saved = adapter_weights()
        train(range(8, 11))
        final = adapter_weights()
        if rank == 0:
            torch.save({"saved": saved, "final": final}, out / "weights.pt")
    else:
        try:
            accelerator.load_state(str(checkpoint))
            report["load_state"] = "ok"
        except BaseException as exc:  # recorded: the test names what failed (DCP's CheckpointException is a
            if isinstance(exc, KeyboardInterrupt):  # BaseException holding each rank's error)
                raise
            failures = getattr(exc, "failures", None)  # rank -> (exception, traceback)
            causes = [failure[0] for failure in failures.values()] if failures else [exc]
            report["load_state"] = "; ".join(f"{type(e).__name__}: {e}" for e in causes)[:2000]
        else:
            expected = torch.load(out / "weights.pt")
            freeze_report("")
            loaded = adapter_weights()  # a collective: every rank gathers
            report["loaded_weights_equal"] = rank != 0 or _equal(loaded, expected["saved"])
            train(range(8, 11))
            final = adapter_weights()
            report["final_weights_equal"] = rank != 0 or _equal(final, expected["final"])
            report["final_frozen_units"] = accelerator.unwrap_model(model).base_model.frozen_units
    (out / f"{phase}{rank}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish_rank()


def _equal(got: dict, expected: dict) -> bool:
    same_keys = bool(expected) and got.keys() == expected.keys()
    return same_keys and all(torch.equal(got[k], v) for k, v in expected.items())


if __name__ == "__main__":
    main(*sys.argv[1:4])
