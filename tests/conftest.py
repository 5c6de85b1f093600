"""Shared fixtures for the SAFE tests: tiny random transformers built in the test, never downloaded.

The helpers are reached through one fixture, ``tiny`` (a :class:`TinyModels`), so test modules need no
imports from this file and no fixture name here can collide with a helper defined in another test module.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, adapter_params, tiny_bert
from torch import nn
from transformers import (
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import peft_safe  # noqa: F401  (registers the SAFE peft type)
from peft_safe import SAFEConfig

ARCHS = ("bert", "gpt2", "llama")

# LoRA targets and peft task type per architecture; the unit (block list) path is what the issue promises.
_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
_TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}
BLOCKS = {"bert": "bert.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}


class TinyModels:
    """Factories for tiny seeded models, LoRA/SAFE configs, batches and parameter views."""

    vocab = VOCAB
    archs = ARCHS
    blocks = BLOCKS

    # ------------------------------------------------------------------ base models
    @staticmethod
    def bert(layers: int = 2, seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
        return tiny_bert(layers, seed, hidden, positions=64).eval()

    @staticmethod
    def gpt2(layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config).eval()

    @staticmethod
    def llama(layers: int = 2, seed: int = 0, kv_heads: int = 1) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=kv_heads,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config).eval()

    def model(self, arch: str, layers: int = 2, seed: int = 0) -> nn.Module:
        return getattr(self, arch)(layers=layers, seed=seed)

    # ------------------------------------------------------------------ adapter configs
    @staticmethod
    def lora(arch: str = "bert", **kwargs) -> LoraConfig:
        """A LoRA config for ``arch``; ``init_lora_weights=False`` so the adapters are not a no-op."""
        kwargs.setdefault("r", 4)
        kwargs.setdefault("lora_alpha", 8)
        kwargs.setdefault("target_modules", list(_TARGETS[arch]))
        kwargs.setdefault("init_lora_weights", False)
        if arch == "gpt2":
            kwargs.setdefault("fan_in_fan_out", True)
        return LoraConfig(task_type=_TASK[arch], **kwargs)

    def safe_config(self, arch: str = "bert", lora: LoraConfig | None = None, **kwargs) -> SAFEConfig:
        kwargs.setdefault("task_type", _TASK[arch])
        return SAFEConfig(adapter_config=lora if lora is not None else self.lora(arch), **kwargs)

    def safe(self, arch: str = "bert", layers: int = 2, seed: int = 0, adapter_seed: int = 1, lora=None, **kwargs):
        """``get_peft_model(tiny base, SAFEConfig(...))`` with seeded adapter initialisation."""
        base = self.model(arch, layers=layers, seed=seed)
        config = self.safe_config(arch, lora=lora, **kwargs)
        torch.manual_seed(adapter_seed)
        return get_peft_model(base, config)

    # ------------------------------------------------------------------ inputs and outputs
    @staticmethod
    def ids(batch: int = 2, seq: int = 8, seed: int = 1, low: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(low, VOCAB, (batch, seq), generator=generator)

    def batch(self, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
        ids = self.ids(batch, seq, seed)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @staticmethod
    def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eval-mode logits; the model's training flag is restored."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(**batch).logits.detach().clone()
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ parameter views
    adapter_params = staticmethod(adapter_params)

    @staticmethod
    def in_unit(param_name: str, unit: str) -> bool:
        """Whether a PeftModel parameter name lies inside the unit (a module path of the base model)."""
        return f".{unit}." in f".{param_name.removeprefix('base_model.model.')}"


@pytest.fixture(scope="session")
def tiny() -> TinyModels:
    return TinyModels()



@pytest.fixture(scope="module")
def single_thread_torch():
    """One intra-op thread: tiny matrices gain nothing from threads, and on a busy machine their spin-waiting
    makes a forward pass of a 12-block toy model take seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
