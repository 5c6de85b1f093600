"""One rank of a SAFE run under DeepSpeed ZeRO through the transformers Trainer, launched by test_deepspeed.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 _deepspeed_worker.py OUT_DIR STAGE OFFLOAD

A 4-block random LLaMA with LoRA on q/v under ``SAFEConfig`` alone (the automatic schedule, no SAFECallback;
block 0 frozen by hand at step 2, so the backprop cut is exercised too), DeepSpeed's CPU accelerator, gloo, AdamW
with weight decay. At the start of every step after a unit froze, each
frozen unit's full weights, fp32 master copy and Adam moments are gathered (collectives: every rank reads the same
things in the same order) and compared with their values at the start of the step after it froze. Each rank writes
what it saw to OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from peft_safe import SAFEConfig  # noqa: E402
from peft_safe.safe.method.zero import requiring_grad  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the launcher's start and finish
from torchrun import finish_rank, start_rank  # noqa: E402

LAYERS = 4
MAX_STEPS = 10
SCHEDULE = dict(schedule_unit="step", scoring_interval=2, final_freeze_time=6, warmup_cap=2, tau=1.0,
                importance_scale="normalized", freeze_order="any")
HAND_FROZEN_AT = 2  # block 0 is frozen by hand at this step's end, so that the backprop cut is there too


def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, SAFEConfig(adapter_config=lora, task_type="CAUSAL_LM", **SCHEDULE))


def rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 12), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def full_values(param, stage: int) -> dict[str, torch.Tensor]:
    """The parameter's full weights, fp32 master and Adam moments, gathered from every rank."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    with requiring_grad(param):
        values = {"master": safe_get_full_fp32_param(param).clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            state = safe_get_full_optimizer_state(param, key)
            if state is not None:
                values[key] = state.clone()
    if stage == 3:
        with deepspeed.zero.GatheredParameters([param]):
            values["weight"] = param.detach().clone()
    else:
        values["weight"] = param.detach().clone()
    return values


class Watcher(TrainerCallback):
    def __init__(self, peft_model, stage: int):
        self.peft_model, self.stage = peft_model, stage
        self.at_freeze: dict[str, dict[str, torch.Tensor]] = {}
        self.max_change: dict[str, float] = {}
        self.checks = 0
        self.cut: list[str | None] = []
        self.frozen_with_grad = 0

    def on_step_begin(self, args, state, control, **kwargs):
        safe = self.peft_model.base_model
        self.cut.append(safe.backprop_cut_block)
        names = [n for n, p in self.peft_model.named_parameters() if "lora_" in n]
        params = dict(self.peft_model.named_parameters())
        for unit in safe.frozen_units:
            for name in (n for n in names if f"{unit}." in n):
                values = full_values(params[name], self.stage)
                if name not in self.at_freeze:
                    self.at_freeze[name] = values
                    continue
                self.checks += 1
                for key in values:
                    change = float((values[key] - self.at_freeze[name][key]).abs().max())
                    label = f"{name}:{key}"
                    self.max_change[label] = max(self.max_change.get(label, 0.0), change)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == HAND_FROZEN_AT:
            self.peft_model.base_model.freeze([0])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        safe = self.peft_model.base_model
        frozen = [p for n, p in self.peft_model.named_parameters()
                  if "lora_" in n and any(f"{unit}." in n for unit in safe.frozen_units)]
        self.frozen_with_grad += sum(p.grad is not None for p in frozen)


def main(out_dir: str, stage: int, offload: bool) -> None:
    start_rank()
    peft_model = model()
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    deepspeed_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                        "zero_optimization": zero, "zero_allow_untested_optimizer": True,
                        "zero_force_ds_cpu_optimizer": False}
    args = TrainingArguments(output_dir=out_dir, max_steps=MAX_STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="no",
                             deepspeed=deepspeed_config, disable_tqdm=True, seed=0, logging_steps=1000)
    watcher = Watcher(peft_model, stage)
    trainer = Trainer(model=peft_model, args=args, train_dataset=rows(64, seed=1), callbacks=[watcher])
    trainer.train()
    safe = peft_model.base_model
    rank = int(os.environ.get("RANK", 0))
    report = {
        "engine": type(trainer.model_wrapped).__name__,
        "zero_stage": trainer.model_wrapped.zero_optimization_stage(),
        "driver_active": safe.auto_driver.active,
        "history": safe.freeze_state.history,
        "frozen": safe.frozen_units,
        "held": len(safe._zero_hold),
        "checks": watcher.checks,
        "max_change": watcher.max_change,
        "cut": watcher.cut,
        "frozen_with_grad": watcher.frozen_with_grad,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finish_rank()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
