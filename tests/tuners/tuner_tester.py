"""What the tests of the adapter tuners this package adds (Houlsby, Pfeiffer, BitFit) share: tiny random models
built here, their inputs, a training loop, a 4-bit loader, and :data:`TUNERS`, what differs between the tuners
for the behaviours every tuner must have (``test_tuners_common.py``, parametrized over them as peft's own tests
share one tester across its tuners). Each tuner's own file keeps what only it does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertModel, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import peft_safe  # noqa: F401  (registers the BOTTLENECK and BITFIT peft types)
from peft_safe import BitFitConfig, BitFitModel, BottleneckModel, HoulsbyConfig, PfeifferConfig
from peft_safe.tuners.bitfit.layer import BitFitLayer
from peft_safe.tuners.bottleneck.layer import BottleneckLayer

VOCAB = 100
LAYERS = 2
ARCHS = ["bert", "gpt2", "llama"]


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_config(model_type: str):
    if model_type in ("bert", "roberta", "xlm-roberta", "mpnet"):
        return AutoConfig.for_model(
            model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
            intermediate_size=64,
        )
    if model_type == "distilbert":
        return AutoConfig.for_model(model_type, vocab_size=VOCAB, dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=64)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=2, bos_token_id=0, eos_token_id=0)
    extra = {"head_dim": 8} if model_type == "qwen3" else {}
    return AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, **extra,
    )


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny model in eval mode (no dropout); the same seed gives the same weights."""
    torch.manual_seed(seed)
    if arch == "bert":
        model = BertModel(tiny_config("bert"))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(tiny_config("gpt2"))
    elif arch == "llama":
        model = LlamaForCausalLM(tiny_config("llama"))
    else:
        model = AutoModel.from_config(tiny_config(arch))
    return model.eval()


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def loss_of(out: torch.Tensor) -> torch.Tensor:
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return (out.float() * target).sum()


def train_steps(peft_model: nn.Module, ids: torch.Tensor, steps: int = 2) -> None:
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(run(peft_model, ids)).backward()
        optimizer.step()


def load_4bit_llama(path) -> tuple[nn.Module, Any]:
    """The tiny LLaMA saved at ``path`` in NF4 (float32 compute), in train mode, and bitsandbytes; skips where the
    build does not run 4-bit."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    try:
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
        run(model, input_ids())
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes 4-bit does not run on this machine: {exc}")
    # train mode: bitsandbytes repacks 4-bit weights for CPU inference in eval mode, which would blur the
    # "base weights unchanged" check; the tiny LLaMA has no dropout, so outputs are the same in both modes
    return model.train(), bnb


# ---------------------------------------------------------------------------------------------- the tuners
def _bitfit_may_stay(arch: str, layer: str) -> bool:
    # BERT's pooler does not feed last_hidden_state, and a key bias shifts all attention logits of a query
    # equally, so its gradient is zero up to rounding
    return layer == "pooler.dense" or layer.endswith(".key")


@dataclass(frozen=True)
class Tuner:
    """One tuner as the shared tests see it."""

    name: str
    config_cls: type
    model_cls: type
    layer_cls: type
    is_adapter_param: Callable[[str], bool]
    # kwargs of a non-default config for the save / load round trip, and the fields it must load back with
    saved_kwargs: dict[str, Any] = field(default_factory=dict)
    saved_fields: tuple[str, ...] = ("target_modules",)
    # (arch, layer name) of an adapter a training step may leave unchanged: its output reaches no loss
    may_stay: Callable[[str, str], bool] = lambda arch, layer: False

    def __str__(self) -> str:
        return self.name


_BOTTLENECK_FIELDS = ("preset", "reduction_factor", "bottleneck_size", "non_linearity", "scaling", "target_modules")
_BOTTLENECK_SAVED = {"reduction_factor": 8, "non_linearity": "gelu", "scaling": 0.5}

TUNERS = [
    Tuner("houlsby", HoulsbyConfig, BottleneckModel, BottleneckLayer,
          lambda n: ".bottleneck_down." in n or ".bottleneck_up." in n, _BOTTLENECK_SAVED, _BOTTLENECK_FIELDS),
    Tuner("pfeiffer", PfeifferConfig, BottleneckModel, BottleneckLayer,
          lambda n: ".bottleneck_down." in n or ".bottleneck_up." in n, _BOTTLENECK_SAVED, _BOTTLENECK_FIELDS),
    Tuner("bitfit", BitFitConfig, BitFitModel, BitFitLayer, lambda n: n.endswith(".bitfit_bias.default"),
          {}, ("target_modules", "exclude_modules", "init_weights"), _bitfit_may_stay),
]


def adapter_params(peft_model: nn.Module, tuner: Tuner) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if tuner.is_adapter_param(n)}


def wrapped(peft_model: nn.Module, layer_cls: type) -> set[str]:
    """The names (relative to the base model) of the layers wrapped by ``layer_cls``."""
    return {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, layer_cls)
    }
