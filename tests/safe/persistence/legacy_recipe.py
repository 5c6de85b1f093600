"""A SAFE training recipe that any peft_safe since 0.1.0 runs the same way, through the public API only.

It wrote ``tests/fixtures/safe_checkpoint_v0_1/`` with the code of commit 508a4e1 (before the package was laid
out anew), and ``test_legacy_checkpoint.py`` runs it again with today's code, so the test compares a checkpoint
written by the old code with what the new code writes and trains. Regenerate the fixture only on purpose:

    python tests/safe/persistence/legacy_recipe.py tests/fixtures/safe_checkpoint_v0_1

The old config field names (``final_freeze_epoch``, ``max_warmup``) are used on purpose: they are what
checkpoints of that version hold.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import peft_safe  # noqa: F401  (registers the SAFE peft type)
from peft_safe import SAFEConfig

STEPS_BEFORE_SAVE = 4
STEPS_AFTER_LOAD = 3
SEQ = 8


def base_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


# Defaults that changed after 0.1 (where importance is measured, which units may freeze, the score scale): the
# recipe pins 0.1's behaviour, through fields that the code it runs on has.
OLD_DEFAULTS = {"scoring_site": "block_output", "freeze_order": "any", "importance_scale": "normalized"}


def safe_config() -> SAFEConfig:
    fields = {f.name for f in dataclasses.fields(SAFEConfig)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old names, deprecated since
        return SAFEConfig(
            adapter_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]),
            tau=0.6, final_freeze_epoch=4, max_warmup=2, schedule_unit="step", task_type="SEQ_CLS",
            **{name: value for name, value in OLD_DEFAULTS.items() if name in fields},
        )


def batches(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return {
        "input_ids": torch.randint(1, 100, (4, SEQ), generator=generator),
        "attention_mask": torch.ones(4, SEQ, dtype=torch.long),
        "labels": torch.randint(0, 2, (4,), generator=generator),
    }


PROBE = [{"input_ids": torch.randint(1, 100, (4, SEQ), generator=torch.Generator().manual_seed(7))}]


def new_model():
    base = base_model()
    torch.manual_seed(1)
    return get_peft_model(base, safe_config())


def train(model, first_step: int, steps: int) -> list[float]:
    """``steps`` optimizer steps of AdamW from a fresh optimizer, SAFE scoring after each; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for step in range(first_step, first_step + steps):
        torch.manual_seed(step)
        loss = model(**batches(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.base_model.update_and_freeze(step + 1, PROBE, optimizer=optimizer)
        losses.append(loss.item())
    return losses


def main(folder: str) -> None:
    torch.set_num_threads(1)
    model = new_model()
    train(model, 0, STEPS_BEFORE_SAVE)
    model.save_pretrained(folder)
    print("frozen:", model.base_model.frozen_units)


if __name__ == "__main__":
    main(sys.argv[1])
