"""TRL's SFTTrainer and DPOTrainer (plain and 4-bit) with ``peft_config=SAFEConfig(...)`` on a tiny random LLaMA,
with and without SAFECallback: units freeze, frozen parameters leave the Trainer's optimizer, TRL's own metrics
stay on their loss lines, and DPO's reference (the adapters disabled) is the base model. Issue 14.1: before, the
run without the callback trained as plain LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from tiny_models import load_4bit_llama, tiny_texts, tiny_tokenizer

from peft_safe import SAFECallback, SAFEConfig

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("single_thread_torch")

LAYERS = 4
STEP = dict(schedule_unit="step", scoring_interval=2, final_freeze_time=6, warmup_cap=2, tau=1.0,
            importance_scale="normalized", freeze_order="any")


def safe_config() -> SAFEConfig:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return SAFEConfig(adapter_config=lora, task_type="CAUSAL_LM", **STEP)


def common_args(tmp_path, steps: int) -> dict:
    return dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", max_length=16,
                dataloader_num_workers=0, disable_tqdm=True, seed=0)


def probe(tokenizer) -> list[dict]:
    batch = tokenizer(tiny_texts(4, seed=9), return_tensors="pt", padding=True)
    return [{**batch, "labels": batch["input_ids"]}]


def check_frozen(trainer) -> None:
    safe = trainer.model.base_model
    assert safe.frozen_units, "no unit froze"
    frozen = {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n and not p.requires_grad}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert frozen and not frozen & in_optimizer
    records = [e for e in trainer.state.log_history if "safe/frozen_units" in e]
    assert records and records[-1]["safe/frozen_units"] == len(safe.frozen_units)


def sft(tmp_path, model, callbacks=()):
    tokenizer = tiny_tokenizer()
    args = trl.SFTConfig(**common_args(tmp_path, steps=7))
    dataset = datasets.Dataset.from_dict({"text": tiny_texts(32)})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=safe_config(), callbacks=[c(tokenizer) for c in callbacks])
    trainer.train()
    return trainer


@pytest.mark.parametrize("with_callback", [False, True], ids=["peft_config-only", "SAFECallback"])
def test_sft_trainer_freezes_units(tiny, tmp_path, with_callback):
    callbacks = [lambda tok: SAFECallback(probe(tok))] if with_callback else []
    trainer = sft(tmp_path, tiny.llama(layers=LAYERS).train(), callbacks)
    check_frozen(trainer)
    safe = trainer.model.base_model
    assert safe.auto_driver.active is (not with_callback)
    assert [h["t"] for h in safe.freeze_state.history] == [2, 4, 6]
    losses = [e for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 7 and all("mean_token_accuracy" in e for e in losses)  # TRL's metrics stay theirs


def four_bit_llama(tiny, path):
    """The tiny LLaMA saved to ``path`` and loaded back in 4 bits (bitsandbytes NF4): the same weights each call."""
    if not path.exists():
        tiny.llama(layers=LAYERS).save_pretrained(path)
    return load_4bit_llama(path)


def test_sft_trainer_on_a_4bit_base_freezes_units(tiny, tmp_path):
    trainer = sft(tmp_path / "run", four_bit_llama(tiny, tmp_path / "base").train())
    check_frozen(trainer)


@pytest.mark.parametrize("with_callback", [False, True], ids=["peft_config-only", "SAFECallback"])
def test_dpo_trainer_freezes_units(tiny, tmp_path, with_callback):
    tokenizer = tiny_tokenizer()
    dataset = datasets.Dataset.from_dict(
        {"prompt": tiny_texts(32, 6, 0), "chosen": tiny_texts(32, 4, 1), "rejected": tiny_texts(32, 4, 2)}
    )
    args = trl.DPOConfig(**common_args(tmp_path, steps=5))
    callbacks = [SAFECallback(probe(tokenizer))] if with_callback else []
    trainer = trl.DPOTrainer(model=tiny.llama(layers=LAYERS).train(), args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=safe_config(), callbacks=callbacks)
    trainer.train()
    check_frozen(trainer)
    assert trainer.model.base_model.auto_driver.active is (not with_callback)


def completion_logps(model, batch) -> torch.Tensor:
    """Summed log-probabilities of each row's completion tokens, from the model's full logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(dim=1)


def test_dpo_trainer_on_a_4bit_base_freezes_units_and_its_reference_is_the_base(tiny, tmp_path):
    # TRL's reference model for a peft_config run is the policy with its adapters disabled (peft's
    # disable_adapter): with units frozen, that must still be exactly the quantized base
    tokenizer = tiny_tokenizer()
    dataset = datasets.Dataset.from_dict(
        {"prompt": tiny_texts(32, 6, 0), "chosen": tiny_texts(32, 4, 1), "rejected": tiny_texts(32, 4, 2)}
    )
    args = trl.DPOConfig(**common_args(tmp_path / "run", steps=5))
    trainer = trl.DPOTrainer(model=four_bit_llama(tiny, tmp_path / "base").train(), args=args,
                             train_dataset=dataset, processing_class=tokenizer, peft_config=safe_config())
    trainer.train()
    check_frozen(trainer)
    assert trainer.model.base_model.auto_driver.active
    losses = [e for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 5 and all("rewards/chosen" in e for e in losses)  # DPO's metrics, from the reference

    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)  # TRL's reference path
    base = four_bit_llama(tiny, tmp_path / "base").eval()  # the same base, never wrapped
    expected = completion_logps(base, batch)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), expected, rtol=1e-4, atol=1e-4)
    policy = completion_logps(trainer.model, batch)
    assert not torch.allclose(policy, expected, rtol=1e-3, atol=1e-3)  # adapters on again: the policy differs
    assert trainer.model.base_model.frozen_units  # disabling and re-enabling the adapters kept the freeze state
