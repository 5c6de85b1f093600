"""SAFE in a plain PyTorch loop: no Trainer, no callback, one call to ``update_and_freeze`` per scoring interval.

    python examples/plain_loop.py                 # all-MiniLM-L6-v2 on Rotten Tomatoes (offline), ~3 min on 2 cores
    python examples/plain_loop.py --tiny          # a tiny random BERT and random data: seconds, no assets needed

The loop is ordinary LoRA fine-tuning. SAFE adds three things:
1. the model is built with ``SAFEConfig(adapter_config=LoraConfig(...))`` instead of the ``LoraConfig``;
2. every ``scoring_interval`` optimizer steps, ``safe.update_and_freeze(step, probe_batches, optimizer)`` scores the
   units on a small probe set, advances the schedule and freezes the units below the threshold; passing the
   optimizer drops the frozen parameters and their Adam moments from it;
3. nothing else: frozen parameters no longer require grad, so backward stops below the lowest trainable unit.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from peft import LoraConfig, get_peft_model

import peft_safe  # noqa: F401  (registers the SAFE peft type)
from peft_safe import SAFEConfig


def tiny_setup(n_train: int, seed: int):
    """A 6-block random BERT and random token data: shows the mechanics without any download or asset."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128, num_labels=2
    )
    model = BertForSequenceClassification(config)
    ids = torch.randint(1, 100, (n_train + 64, 16))
    labels = (ids[:, 0] > 50).long()  # a learnable rule
    mask = torch.ones(1, 16, dtype=torch.long)
    data = [{"input_ids": ids[i : i + 1], "attention_mask": mask, "labels": labels[i : i + 1]}
            for i in range(len(ids))]
    def collate(rows):
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    return model, data[:n_train], data[n_train:], collate


def minilm_setup(n_train: int, seed: int, max_length: int = 64):
    """all-MiniLM-L6-v2 (6 blocks) on Rotten Tomatoes snippets, from the offline asset packages."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peft_safe.assets import load_rotten_tomatoes, minilm_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, test = load_rotten_tomatoes(seed=seed)
    train, test = train[:n_train], test[:500]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)

    def encode(rows):
        texts = [t for t, _ in rows]
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return [{"input_ids": enc["input_ids"][i : i + 1], "attention_mask": enc["attention_mask"][i : i + 1],
                 "labels": torch.tensor([label])} for i, (_, label) in enumerate(rows)]

    def collate(rows):
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    return model, encode(train), encode(test), collate


def accuracy(model, rows, collate, batch_size=64) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size])
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="random tiny BERT and data instead of MiniLM / Rotten Tomatoes")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--score-every", type=int, default=8, help="optimizer steps between scorings")
    parser.add_argument("--probe-size", type=int, default=64)
    parser.add_argument("--tau", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    setup = tiny_setup if args.tiny else minilm_setup
    model, train, test, collate = setup(args.train_size, args.seed)
    steps_per_epoch = -(-len(train) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    config = SAFEConfig(
        adapter_config=LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"),
        tau=args.tau,                            # on the normalised scale: freeze units below 30 % of the top one
        final_freeze_time=int(total_steps * 0.6),     # t_f: the threshold reaches tau at 60 % of the run
        schedule_unit="step",                          # LLM-style short runs: schedule in optimizer steps
        scoring_interval=args.score_every,
        task_type="SEQ_CLS",
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    model = get_peft_model(model, config)
    safe = model.base_model                            # the SAFEModel tuner
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    probe_end = min(args.probe_size, len(train))
    probe = [collate(train[i : i + args.batch_size]) for i in range(0, probe_end, args.batch_size)]
    probe = [{k: v for k, v in batch.items() if k != "labels"} for batch in probe]

    print(f"units: {safe.adapter_units}")
    print(f"accuracy before: {accuracy(model, test, collate):.4f}")
    generator = torch.Generator().manual_seed(args.seed)
    step, started = 0, time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for i in range(0, len(order), args.batch_size):
            batch = collate([train[j] for j in order[i : i + args.batch_size]])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.scoring_interval == 0:
                newly = safe.update_and_freeze(step, probe, optimizer=optimizer)
                if newly:
                    print(f"step {step}: froze {newly} (threshold {safe.threshold(step):.3f})")
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, frozen {len(safe.frozen_units)}/{len(safe.adapter_units)}")
    print(f"trained {step} steps in {time.perf_counter() - started:.1f} s")
    print(f"accuracy after: {accuracy(model, test, collate):.4f}")
    print(f"importance (normalised): { {u: round(v, 4) for u, v in safe.importance.items()} }")
    print(f"frozen at step: {safe.freeze_state.frozen}")


if __name__ == "__main__":
    main()
