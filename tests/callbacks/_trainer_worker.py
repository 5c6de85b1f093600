"""One rank of a tiny SAFE Trainer run, launched by test_distributed_trainer.py (torchrun / accelerate launch).

Usage: python -m torch.distributed.run --nproc_per_node 2 --master_port PORT _trainer_worker.py OUT_DIR

Trains a 2-block, 32-wide random BERT with LoRA under SAFE for MAX_STEPS steps with a step schedule that
freezes a unit by step FINAL_FREEZE, probing on data that differs per rank, saving a checkpoint at the end.
Every rank then reloads the checkpoint and writes what it saw to OUT_DIR/rank{RANK}.json; the test compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import peft_safe.safe.model as safe_model  # noqa: E402
from peft_safe import SAFECallback, SAFEConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared synthetic task
from tiny_models import SEQ, marker_examples, tiny_bert  # noqa: E402

LAYERS = 2
UNITS = [f"bert.encoder.layer.{i}" for i in range(LAYERS)]
MAX_STEPS = 10
FINAL_FREEZE = 6  # tau=1 on the normalized scale: every unit but the top scorer is frozen from step 6 on
SCHEDULE = dict(
    schedule_unit="step", scoring_interval=2, final_freeze_time=FINAL_FREEZE, warmup_cap=2, tau=1.0,
    importance_scale="normalized",
)


def examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The synthetic task of tests/marker_task.py, shared with tests/callbacks/test_safe_callback.py."""
    return marker_examples(n, seed, SEQ)


def base_model() -> BertForSequenceClassification:
    return tiny_bert(LAYERS, 0)


def unit_params(peft_model, unit: str) -> dict[str, torch.nn.Parameter]:
    prefix = f"base_model.model.{unit}."
    return {n: p for n, p in peft_model.named_parameters() if n.startswith(prefix) and ".lora_" in n}


def digest(params) -> list[float]:
    return [float(p.detach().double().sum()) for p in params]


class Watcher(TrainerCallback):
    """Runs after SAFECallback: the steps trained, the wrapper, and each frozen unit's weights when it froze."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.wrapper = ""
        self.find_unused = None
        self.at_freeze: dict[str, list[float]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(state.global_step)
        for unit in self.peft_model.base_model.frozen_units:
            self.at_freeze.setdefault(unit, digest(unit_params(self.peft_model, unit).values()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))



def main(out_dir: Path) -> None:
    peft_model = get_peft_model(
        base_model(),
        SAFEConfig(adapter_config=LoraConfig(r=4, target_modules=["query", "value"]), task_type="SEQ_CLS", **SCHEDULE),
    )
    args = TrainingArguments(
        output_dir=str(out_dir / "run"), use_cpu=True, report_to=[], dataloader_num_workers=0, disable_tqdm=True,
        seed=0, data_seed=0, max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=MAX_STEPS, logging_steps=1,
    )
    rank = args.process_index
    assert args.world_size == 2 and dist.is_initialized(), (args.world_size, dist.is_initialized())

    # each rank probes on its own data, so its local scores differ from the other rank's
    local_scores: list[dict] = []
    agree = safe_model.agree_on_scores  # patched where SAFEModel.update_and_freeze looks it up

    def recording_agree(scores, t):
        local_scores.append({"t": t, "scores": dict(scores)})
        return agree(scores, t)

    safe_model.agree_on_scores = recording_agree
    saves = []
    save_pretrained = PeftModel.save_pretrained

    def counting_save(self, save_directory, *a, **k):
        saves.append(str(save_directory))
        return save_pretrained(self, save_directory, *a, **k)

    PeftModel.save_pretrained = counting_save

    callback = SAFECallback(probe_dataset=examples(8, seed=100 + rank), batch_size=8)
    watcher = Watcher(peft_model)
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=examples(4 * 2 * MAX_STEPS, seed=1), callbacks=[callback, watcher]
    )
    trainer.train()
    safe = peft_model.base_model
    wrapped = trainer.model_wrapped
    dist.barrier()  # rank 0 has finished writing the checkpoint

    checkpoints = sorted(p.name for p in (out_dir / "run").iterdir() if p.name.startswith("checkpoint-"))
    reloaded = PeftModel.from_pretrained(base_model(), out_dir / "run" / checkpoints[-1], is_trainable=True)
    reloaded_requires_grad = {
        unit: sorted({p.requires_grad for p in unit_params(reloaded, unit).values()}) for unit in UNITS
    }
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "wrapper": type(wrapped).__name__,
        "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
        "accelerate_env": sorted(k for k in os.environ if k.startswith("ACCELERATE_")),  # set by accelerate launch
        "steps": watcher.steps,
        "losses": watcher.losses,
        "global_step": trainer.state.global_step,
        "state": safe.freeze_state.to_dict(),
        "local_scores": local_scores,
        "scorings": [{k: v for k, v in r.items() if k != "epoch"} for r in callback.scorings],
        "params": digest(p for n, p in peft_model.named_parameters() if ".lora_" in n or "modules_to_save" in n),
        "at_freeze": watcher.at_freeze,
        "at_end": {u: digest(unit_params(peft_model, u).values()) for u in watcher.at_freeze},
        "requires_grad": {u: sorted({p.requires_grad for p in unit_params(peft_model, u).values()}) for u in UNITS},
        "saves": saves,
        "checkpoints": checkpoints,
        "checkpoint_files": sorted(os.listdir(out_dir / "run" / checkpoints[-1])),
        "reloaded_state": reloaded.base_model.freeze_state.to_dict(),
        "reloaded_requires_grad": reloaded_requires_grad,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
