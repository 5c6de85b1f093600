"""Shapes and settings shared by the planner's tests (imported as ``plan_cases``; not a test module)."""

from __future__ import annotations

from peft_safe.plan.shapes import ModelShape, PlanSettings


def shape(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int = 128) -> ModelShape:
    return ModelShape(name="tiny", num_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab)


def settings(**kwargs) -> PlanSettings:
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("seq_len", 16)
    kwargs.setdefault("lora_r", 4)
    return PlanSettings(**kwargs)


# Several depths and widths, GQA and not.
TINY_A = shape(2, 32, 64, 2, 1)
TINY_B = shape(4, 64, 176, 4, 4)
TINY_C = shape(6, 128, 344, 8, 2, vocab=200)
