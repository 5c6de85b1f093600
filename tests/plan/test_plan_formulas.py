"""The planner's formulas and inputs (``peft_safe.plan.shapes``, ``peft_safe.plan.formulas``): how the plan
moves with frozen blocks, checkpointing and bits, the 7B preset, reading configs, and bad settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
from plan_cases import TINY_B, TINY_C, settings
from transformers import LlamaConfig

from peft_safe.plan.formulas import plan_memory
from peft_safe.plan.shapes import DEFAULT_TARGETS, PRESETS, ModelShape, PlanSettings, resolve_model


def test_freezing_bottom_blocks_shrinks_activations_gradients_and_optimizer_state():
    rows = plan_memory(TINY_C, settings(bits=4))
    safe = [row for row in rows if row.method == "safe"]
    assert [row.frozen_blocks for row in safe] == list(range(TINY_C.num_layers + 1))
    for lower, higher in zip(safe, safe[1:]):
        assert higher.activation_bytes < lower.activation_bytes
        assert higher.gradient_bytes < lower.gradient_bytes
        assert higher.optimizer_bytes < lower.optimizer_bytes
        assert (higher.weight_bytes, higher.adapter_bytes) == (lower.weight_bytes, lower.adapter_bytes)
    everything_frozen = safe[-1]
    assert (everything_frozen.activation_bytes, everything_frozen.gradient_bytes,
            everything_frozen.optimizer_bytes) == (0, 0, 0)


def test_plain_lora_with_peft_input_grad_hook_saves_more_than_safe_with_nothing_frozen():
    # k-bit preparation makes the embedding output require grad: block 0 then saves its input norm too
    lora, safe_k0 = plan_memory(TINY_B, settings(bits=4))[:2]
    assert lora.activation_bytes > safe_k0.activation_bytes
    lora, safe_k0 = plan_memory(TINY_B, settings(bits=32))[:2]
    assert lora.activation_bytes == safe_k0.activation_bytes


def test_checkpointing_keeps_block_inputs_plus_one_recompute():
    plain = plan_memory(TINY_C, settings(bits=4))
    checkpointed = plan_memory(TINY_C, settings(bits=4, gradient_checkpointing=True))
    for without, with_checkpointing in zip(plain[1:-1], checkpointed[1:-1]):
        assert with_checkpointing.activation_held_bytes < with_checkpointing.activation_bytes
        assert with_checkpointing.activation_bytes < without.activation_bytes
    # the saving of SAFE under checkpointing per frozen block is one block input (batch x seq x hidden float32)
    held = [row.activation_held_bytes for row in checkpointed[1:-1]]
    step = 2 * 16 * TINY_C.hidden_size * 4
    assert all(a - b == step for a, b in zip(held, held[1:]))


def test_double_quantization_shrinks_4bit_weights_and_bits_order_weights():
    weights = {bits: plan_memory(TINY_C, settings(bits=bits))[0].weight_bytes for bits in (4, 8, 16, 32)}
    single = plan_memory(TINY_C, settings(bits=4, double_quant=False))[0].weight_bytes
    assert weights[4] < single < weights[8] < weights[16] < weights[32]


def test_llama_2_7b_preset_is_the_published_shape():
    # transformers' LlamaConfig defaults are LLaMA-2 7B's published hyper-parameters
    preset = PRESETS["llama-2-7b"]
    assert dataclasses.replace(ModelShape.from_config(LlamaConfig()), name=preset.name) == preset
    assert resolve_model("llama-2-7b") is preset


def test_resolve_model_reads_a_config_file_and_a_model_folder(tmp_path):
    config = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=300)
    config.save_pretrained(tmp_path)
    from_folder = resolve_model(str(tmp_path))
    from_file = resolve_model(str(tmp_path / "config.json"))
    assert from_folder == dataclasses.replace(from_file, name=from_folder.name)
    assert (from_file.num_layers, from_file.hidden_size, from_file.intermediate_size, from_file.num_heads,
            from_file.num_kv_heads, from_file.head_dim, from_file.vocab_size) == (3, 96, 160, 6, 2, 16, 300)


def test_a_config_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        resolve_model(str(tmp_path / "config.json"))


@pytest.mark.parametrize("bits", [0, 3, 12, 64, True])
def test_settings_refuse_bits_outside_4_8_16_32(bits):
    with pytest.raises(ValueError, match=f"got {bits!r}"):
        PlanSettings(bits=bits)


def test_default_targets_are_lora_on_q_and_v():
    assert PlanSettings().target_modules == DEFAULT_TARGETS == ("q_proj", "v_proj")

