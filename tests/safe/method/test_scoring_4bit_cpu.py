"""Scoring never makes bitsandbytes repack a 4-bit weight for CPU inference.

On a CPU with AVX512-BF16, ``Linear4bit`` repacks its weight at its first eval forward without grad and keeps it
packed; the packed kernel gives its input no gradient. SAFE's scoring is such a forward, so without the guard every
QLoRA step after the first scoring loses the gradient through the base weights (the gradients of every adapter
below the top layer change). Runs where bitsandbytes repacks (an AVX512-BF16 CPU, 64-wide rows); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import load_4bit_llama
from transformers import LlamaConfig, LlamaForCausalLM

from peft_safe import SAFEConfig

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture
def model(tmp_path, tiny):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    base = load_4bit_llama(tmp_path)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    default = getattr(bnb.nn.modules, "has_avx512bf16", lambda: 0)()  # an int in bitsandbytes 0.49-0.50
    if not default:
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    for layer in layers:  # bitsandbytes' own default, which load_4bit_llama turns off
        layer.support_avx512bf16_for_cpu = default
    lora = tiny.lora("llama", target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(1)
    return get_peft_model(base, SAFEConfig(adapter_config=lora, task_type="CAUSAL_LM")), layers, default


def _gradients(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_scoring_leaves_4bit_weights_unpacked_and_training_gradients_unchanged(model, tiny):
    model, layers, default = model
    ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before = _gradients(model, batch)
    model.base_model.compute_importance([batch])
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    assert all(layer.support_avx512bf16_for_cpu == default for layer in layers)  # the model's own, given back
    after = _gradients(model, batch)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
