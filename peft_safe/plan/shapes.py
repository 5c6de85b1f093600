"""What the planner plans for: the shape of a LLaMA-style model and the training setup.

Owns :class:`ModelShape` (read from a preset, a ``config.json`` or a model folder by :func:`resolve_model`),
the :data:`PRESETS`, :class:`PlanSettings` and the projection and dtype tables the formulas share.

Imports: the standard library only; transformers lazily, inside :meth:`ModelShape.to_llama_config` and
:func:`resolve_model`. Never torch, peft, the SAFE tuner or the measurement code: a plan needs no weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALL_PROJECTIONS",
    "ATTENTION_PROJECTIONS",
    "DEFAULT_TARGETS",
    "DTYPE_BYTES",
    "LLAMA_STYLE_MODEL_TYPES",
    "MLP_PROJECTIONS",
    "PRESETS",
    "SUPPORTED_BITS",
    "ModelShape",
    "PlanSettings",
    "resolve_model",
]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
DEFAULT_TARGETS = ("q_proj", "v_proj")
SUPPORTED_BITS = (4, 8, 16, 32)
# model_type values of configs with LLaMA's block (RMSNorm, rotary, SwiGLU MLP, q/k/v/o projections)
LLAMA_STYLE_MODEL_TYPES = ("llama", "mistral")
# bytes per element of the dtypes activations, unquantized weights and adapters may have
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The shape of a LLaMA-style decoder: all the planner needs to know about a model.

    Args:
        name: A label for tables.
        num_layers: Number of transformer blocks (SAFE's units).
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU MLP.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention); equal to ``num_heads`` for LLaMA-2 7B.
        head_dim: Width of one head.
        vocab_size: Vocabulary size (rows of the embedding and of the LM head).
        tie_word_embeddings: Whether the LM head shares the embedding's weight.

    Raises:
        ValueError: If a size is not a positive integer, naming the field and the value.
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; check the model config.")

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelShape:
        """Read the shape from a transformers config (``LlamaConfig`` or any config with LLaMA's fields).

        Args:
            config: A transformers config object.
            name: The label for tables; by default the config's ``name_or_path`` or its model type.

        Raises:
            ValueError: If the config is not of a LLaMA-style model or lacks a field.
        """
        model_type = getattr(config, "model_type", None)
        if model_type not in LLAMA_STYLE_MODEL_TYPES:
            raise ValueError(
                f"the planner knows LLaMA-style blocks only (model_type in {list(LLAMA_STYLE_MODEL_TYPES)}), got "
                f"model_type={model_type!r}; pass a LLaMA-style config or the preset 'llama-2-7b'."
            )
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if getattr(config, k, None) is None]
        if missing:
            raise ValueError(f"the config lacks {missing}; a LLaMA-style config.json has all of them.")
        heads = config.num_attention_heads
        return cls(
            name=name or getattr(config, "name_or_path", None) or model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def to_llama_config(self, **overrides: Any) -> Any:
        """A ``transformers.LlamaConfig`` of this shape (for building a model to measure).

        Args:
            **overrides: Config fields to set on top of the shape's (``max_position_embeddings=...``).
        """
        from transformers import LlamaConfig

        kwargs = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=4096,
        )
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each projection of one block."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }


# The published LLaMA-2 7B shape (Touvron et al. 2023; meta-llama/Llama-2-7b-hf config.json).
PRESETS: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(
        name="llama-2-7b", num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32,
        num_kv_heads=32, head_dim=128, vocab_size=32000, tie_word_embeddings=False,
    ),
}


def resolve_model(model: str) -> ModelShape:
    """The shape of a preset name, a ``config.json`` file or a model folder holding one.

    Args:
        model: A key of :data:`PRESETS` (``"llama-2-7b"``), a path to a ``config.json``, or a model folder.

    Raises:
        ValueError: If ``model`` is neither a preset nor an existing path, or its config is not LLaMA-style.
    """
    if model in PRESETS:
        return PRESETS[model]
    if not os.path.exists(model):
        raise ValueError(
            f"unknown model {model!r}: not a preset ({sorted(PRESETS)}) and no such file or folder; pass a preset "
            "name, a config.json or a model folder."
        )
    from transformers import AutoConfig

    if os.path.isfile(model):
        with open(model) as f:
            config_dict = json.load(f)
        if "model_type" not in config_dict:
            raise ValueError(f"{model} has no 'model_type'; a transformers config.json names its model type.")
        config = AutoConfig.for_model(**config_dict)
    else:
        config = AutoConfig.from_pretrained(model)
    return ModelShape.from_config(config, name=os.path.basename(os.path.normpath(model)))


@dataclass(frozen=True)
class PlanSettings:
    """The training setup the plan is for.

    Args:
        bits: Bits of the base model's projection weights: 4 (bitsandbytes NF4/FP4), 8 (LLM.int8), 16, 32.
        double_quant: 4 bits only: bitsandbytes' double quantization of the absmax statistics.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence (no padding: the planner assumes full, unmasked sequences).
        lora_r: LoRA rank.
        target_modules: Projections with LoRA, among q/k/v/o_proj and gate/up/down_proj.
        gradient_checkpointing: Whether every block is checkpointed (non-reentrant).
        dtype: Dtype of the residual stream and of the weights that are not quantized (embedding, norms,
            LM head). None picks float32 for 4/8/32 bits (peft's ``prepare_model_for_kbit_training`` upcasts
            them) and bfloat16 for 16 bits.
        adapter_dtype: Dtype of the LoRA weights (peft upcasts adapters to float32 by default).

    Raises:
        ValueError: On any value outside its range, naming the value and what is allowed.
    """

    bits: int = 4
    double_quant: bool = True
    batch_size: int = 1
    seq_len: int = 512
    lora_r: int = 8
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    gradient_checkpointing: bool = False
    dtype: str | None = None
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}; use --bits 4, 8, 16 or 32."
            )
        for name in ("batch_size", "seq_len", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                flag = name.replace("_", "-")
                raise ValueError(f"{name} must be a positive integer, got {value!r}; pass --{flag} 1 or more.")
        targets = tuple(self.target_modules)
        unknown = [t for t in targets if t not in ALL_PROJECTIONS]
        if not targets or unknown:
            raise ValueError(
                f"target_modules must be a non-empty subset of {list(ALL_PROJECTIONS)}, got {list(targets)}; "
                "pass --targets q_proj,v_proj or --all-projections."
            )
        object.__setattr__(self, "target_modules", tuple(t for t in ALL_PROJECTIONS if t in targets))
        if self.dtype is None:
            object.__setattr__(self, "dtype", "bfloat16" if self.bits == 16 else "float32")
        for name in ("dtype", "adapter_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"{name} must be one of {list(DTYPE_BYTES)}, got {getattr(self, name)!r}.")

    @property
    def tokens(self) -> int:
        """Tokens per step: ``batch_size * seq_len``."""
        return self.batch_size * self.seq_len
