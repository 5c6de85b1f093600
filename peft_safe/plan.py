"""``peft-safe plan``: the memory of LoRA and SAFE fine-tuning of a LLaMA-style model, planned from its shape.

The planner needs no weights: the shape of the model (a built-in preset such as ``llama-2-7b``, or any local
``config.json``/model folder) and the training setup (base-weight bits, batch, sequence length, LoRA rank and
targets, gradient checkpointing) give the bytes of the base weights, the adapter parameters, their gradients,
AdamW's state and the activations autograd saves for backward, for plain LoRA and for SAFE with each number
``k`` of frozen bottom blocks.

The activation formulas follow what autograd saves in transformers' ``LlamaDecoderLayer`` (SDPA attention,
RMSNorm, SwiGLU MLP, rotary embedding), peft's LoRA layers and the causal-LM loss, found with
:func:`torch.autograd.graph.saved_tensors_hooks`. They are written as a walk through one block that tracks
which tensors require grad and names every saved storage, so storages shared by several operations count
once and nothing is saved where no gradient flows (the frozen bottom blocks, the part of the lowest trainable
block before its first adapter). :func:`validate` builds tiny LLaMA models, trains one step and compares the
plan with the measured figures; ``docs/plan.md`` lists the formulas, assumptions and the comparison.

Example:
    >>> shape = resolve_model("llama-2-7b")
    >>> rows = plan_memory(shape, PlanSettings(bits=4, batch_size=4, seq_len=512))
    >>> print(format_table(shape, PlanSettings(bits=4, batch_size=4, seq_len=512), rows))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PRESETS",
    "MemoryRow",
    "ModelShape",
    "PlanSettings",
    "ValidationCase",
    "ValidationRow",
    "default_validation_cases",
    "format_table",
    "format_validation",
    "held_saved_bytes",
    "measure_case",
    "plan_json",
    "plan_memory",
    "resolve_model",
    "slice_7b_cases",
    "validate",
]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
DEFAULT_TARGETS = ("q_proj", "v_proj")
SUPPORTED_BITS = (4, 8, 16, 32)
# model_type values of configs with LLaMA's block (RMSNorm, rotary, SwiGLU MLP, q/k/v/o projections)
LLAMA_STYLE_MODEL_TYPES = ("llama", "mistral")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FLOAT32 = 4
_INT64 = 8
# bitsandbytes 4-bit: one absmax per 64 weights; double quantization stores those absmax in 8 bits with one
# float32 absmax per 256 of them, plus a 256-entry float32 code and a float32 offset per layer.
_BNB4_BLOCKSIZE = 64
_BNB4_NESTED_BLOCKSIZE = 256
_BNB4_CODE_ENTRIES = 16  # the NF4/FP4 code held by every layer's quant state


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
        """A ``transformers.LlamaConfig`` of this shape (for building a model to measure)."""
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
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}; use --bits 4, 8, 16 or 32.")
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
            if getattr(self, name) not in _DTYPE_BYTES:
                raise ValueError(f"{name} must be one of {list(_DTYPE_BYTES)}, got {getattr(self, name)!r}.")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class MemoryRow:
    """The planned memory of one setting, in bytes.

    Attributes:
        method: ``"lora"`` (plain LoRA as peft sets it up) or ``"safe"``.
        frozen_blocks: Bottom blocks whose adapters SAFE froze (0 for plain LoRA).
        weight_bytes: Base model weights (quantized projections with their statistics, the rest unquantized).
        adapter_bytes: All LoRA parameters, frozen ones included.
        gradient_bytes: Gradients of the trainable LoRA parameters.
        optimizer_bytes: AdamW state: two moments per trainable parameter and a float32 step per tensor.
        activation_bytes: The most bytes of saved-for-backward tensors alive at once. Without checkpointing,
            what the forward saves; with it, the larger of that and block inputs plus one block's recompute.
        activation_held_bytes: Saved-for-backward bytes alive when the forward pass ends.
    """

    method: str
    frozen_blocks: int
    weight_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    activation_held_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


# ---------------------------------------------------------------------------------------------- the formulas
def _block_saved(shape: ModelShape, settings: PlanSettings, input_requires_grad: bool) -> tuple[dict[str, int], bool]:
    """Storages one ``LlamaDecoderLayer`` with LoRA saves for backward, by name, and whether its q or k needs
    grad (then the shared rotary cos/sin are saved too).

    Every rule below was read off ``saved_tensors_hooks`` on transformers' LLaMA with peft's LoRA; a storage
    saved by several operations (the normed input shared by q/k/v's LoRA, SDPA's output that o_proj's LoRA
    reads) is named once.
    """
    tokens = settings.tokens
    act = _DTYPE_BYTES[settings.dtype]
    adapter = _DTYPE_BYTES[settings.adapter_dtype]
    projections = shape.projection_shapes()
    saved: dict[str, int] = {}

    def save(name: str, nbytes: int) -> None:
        saved.setdefault(name, nbytes)

    def linear(name: str, input_name: str, input_requires_grad: bool) -> bool:
        in_features = projections[name][0]
        if settings.bits == 8 and input_requires_grad:
            # bitsandbytes' MatMul8bitLt keeps its input on ctx for the input gradient (on a GPU)
            save(input_name, tokens * in_features * act)
        adapted = name in settings.target_modules
        if adapted:
            if adapter == act:  # lora_A saves the very tensor the projection reads
                save(input_name, tokens * in_features * act)
            else:  # peft casts the input to the adapter's dtype, one copy per adapted layer
                save(f"{name}.lora_input", tokens * in_features * adapter)
            save(f"{name}.lora_B_input", tokens * settings.lora_r * adapter)
        return input_requires_grad or adapted

    def rms_norm(name: str) -> None:  # the float32 input and the reciprocal RMS per token
        save(f"{name}.input", tokens * shape.hidden_size * _FLOAT32)
        save(f"{name}.rsqrt", tokens * _FLOAT32)

    if input_requires_grad:
        rms_norm("input_layernorm")
    q = linear("q_proj", "attention_input", input_requires_grad)
    k = linear("k_proj", "attention_input", input_requires_grad)
    v = linear("v_proj", "attention_input", input_requires_grad)
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attention = q or k or v
    if attention:  # fused SDPA (flash / memory-efficient): q, k, v, output and log-sum-exp
        save("sdpa.query", tokens * q_width * act)
        save("sdpa.key", tokens * kv_width * act)
        save("sdpa.value", tokens * kv_width * act)
        save("attention_output", tokens * q_width * act)
        save("sdpa.logsumexp", tokens * shape.num_heads * _FLOAT32)
    o = linear("o_proj", "attention_output", attention)
    residual = input_requires_grad or o
    if residual:
        rms_norm("post_attention_layernorm")
    gate = linear("gate_proj", "mlp_input", residual)
    up = linear("up_proj", "mlp_input", residual)
    width = tokens * shape.intermediate_size * act
    if gate:
        save("silu.input", width)  # SiLU saves its input
        save("up_proj.output", width)  # act * up saves up for act's gradient
    if up:
        save("silu.output", width)  # ... and act for up's gradient
    linear("down_proj", "mlp_product", gate or up)
    return saved, q or k


def _plan_activations(shape: ModelShape, settings: PlanSettings, frozen: int, input_requires_grad: bool) -> tuple[int, int]:
    """(peak, held at the end of the forward) saved-for-backward bytes with the bottom ``frozen`` blocks frozen."""
    if frozen >= shape.num_layers:
        return 0, 0
    tokens = settings.tokens
    act = _DTYPE_BYTES[settings.dtype]
    blocks = []
    requires_grad = input_requires_grad
    rope = False
    for index in range(shape.num_layers):
        if index < frozen and not requires_grad:
            continue  # nothing requires grad here: nothing is saved
        saved, uses_rope = _block_saved(shape, settings, requires_grad)
        blocks.append(sum(saved.values()))
        rope = rope or uses_rope
        requires_grad = True
    # the final norm, then the loss: log_softmax of the float32 logits, the labels, the mean's weight
    head = tokens * shape.hidden_size * _FLOAT32 + tokens * _FLOAT32
    # the loss shifts the labels by padding one column and slicing it off: with one sequence the slice is
    # contiguous already, so the padded (seq + 1) storage is what autograd keeps
    labels = (settings.seq_len + 1 if settings.batch_size == 1 else tokens) * _INT64
    head += tokens * shape.vocab_size * _FLOAT32 + labels + _FLOAT32
    rope_bytes = 2 * settings.seq_len * shape.head_dim * act if rope else 0
    if not settings.gradient_checkpointing:
        held = sum(blocks) + rope_bytes + head
        return held, held
    # checkpointing keeps each trainable block's input; backward recomputes one block at a time, after the
    # head's saved tensors have been used and freed
    inputs = len(blocks) * tokens * shape.hidden_size * act
    held = inputs + head
    return max(held, inputs + max(blocks) + rope_bytes), held


def _weight_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    dense = _DTYPE_BYTES[settings.dtype]
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    total = (embeddings + norms) * dense
    for in_features, out_features in shape.projection_shapes().values():
        numel = in_features * out_features
        if settings.bits == 4:
            blocks = math.ceil(numel / _BNB4_BLOCKSIZE)
            layer = math.ceil(numel / 2) + _BNB4_CODE_ENTRIES * _FLOAT32
            if settings.double_quant:
                layer += blocks + math.ceil(blocks / _BNB4_NESTED_BLOCKSIZE) * _FLOAT32 + 256 * _FLOAT32 + _FLOAT32
            else:
                layer += blocks * _FLOAT32
        elif settings.bits == 8:
            layer = numel + out_features * _FLOAT32  # int8 weight and a float32 scale per row
        else:
            layer = numel * settings.bits // 8
        total += layer * shape.num_layers
    return total


def _adapter_block(shape: ModelShape, settings: PlanSettings) -> tuple[int, int]:
    """(parameters, parameter tensors) of LoRA in one block."""
    projections = shape.projection_shapes()
    numel = sum(settings.lora_r * sum(projections[name]) for name in settings.target_modules)
    return numel, 2 * len(settings.target_modules)


def plan_memory(shape: ModelShape, settings: PlanSettings) -> list[MemoryRow]:
    """Plan the memory of plain LoRA and of SAFE with ``k = 0 .. L`` frozen bottom blocks.

    Plain LoRA is planned as peft and transformers set it up: with 4/8-bit weights (``prepare_model_for_kbit_
    training``) or gradient checkpointing they make the embedding output require grad, so the first block
    saves its input norm too. SAFE rows assume SAFE cuts that hook below the lowest trainable block, so
    nothing is saved below it.

    Args:
        shape: The model's shape (:func:`resolve_model`).
        settings: The training setup.

    Returns:
        One row for plain LoRA, then one per ``k`` for SAFE.
    """
    adapter_numel, adapter_tensors = _adapter_block(shape, settings)
    adapter_bytes = _DTYPE_BYTES[settings.adapter_dtype]
    weights = _weight_bytes(shape, settings)
    rows = []
    lora_hook = settings.bits in (4, 8) or settings.gradient_checkpointing
    for method, frozen, hook in [("lora", 0, lora_hook)] + [("safe", k, False) for k in range(shape.num_layers + 1)]:
        trainable = shape.num_layers - frozen
        peak, held = _plan_activations(shape, settings, frozen, hook)
        rows.append(MemoryRow(
            method=method,
            frozen_blocks=frozen,
            weight_bytes=weights,
            adapter_bytes=shape.num_layers * adapter_numel * adapter_bytes,
            gradient_bytes=trainable * adapter_numel * adapter_bytes,
            optimizer_bytes=trainable * (2 * adapter_numel * adapter_bytes + adapter_tensors * _FLOAT32),
            activation_bytes=peak,
            activation_held_bytes=held,
        ))
    return rows


# ---------------------------------------------------------------------------------------------- output
def _human(nbytes: int) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.2f} GiB"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f} MiB"
    if nbytes >= 1 << 10:
        return f"{nbytes / (1 << 10):.1f} KiB"
    return f"{nbytes} B"


def format_table(shape: ModelShape, settings: PlanSettings, rows: Sequence[MemoryRow]) -> str:
    """The plan as a human-readable table (GiB/MiB), one line per row of :func:`plan_memory`."""
    header = (
        f"{shape.name}: {shape.num_layers} blocks, hidden {shape.hidden_size}, intermediate "
        f"{shape.intermediate_size}, {shape.num_heads} heads ({shape.num_kv_heads} kv), vocab {shape.vocab_size}\n"
        f"{settings.bits}-bit base{' (double quant)' if settings.bits == 4 and settings.double_quant else ''}, "
        f"batch {settings.batch_size} x seq {settings.seq_len}, LoRA r={settings.lora_r} on "
        f"{','.join(settings.target_modules)}, checkpointing {'on' if settings.gradient_checkpointing else 'off'}, "
        f"activations {settings.dtype}, adapters {settings.adapter_dtype}, AdamW\n"
    )
    columns = ("setting", "weights", "adapter", "gradients", "optimizer", "activations", "total", "saved")
    lines = [columns]
    baseline = rows[0].total_bytes
    for row in rows:
        label = "LoRA" if row.method == "lora" else f"SAFE k={row.frozen_blocks}"
        saved = baseline - row.total_bytes
        lines.append((label, *(_human(b) for b in (row.weight_bytes, row.adapter_bytes, row.gradient_bytes,
                                                     row.optimizer_bytes, row.activation_bytes, row.total_bytes)),
                      "" if row.method == "lora" else _human(saved) if saved >= 0 else f"-{_human(-saved)}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    body = "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)
    return header + body


def plan_json(shape: ModelShape, settings: PlanSettings, rows: Sequence[MemoryRow]) -> dict[str, Any]:
    """The plan as a JSON-serialisable dict: the shape, the settings and the rows in bytes."""
    return {"model": dataclasses.asdict(shape), "settings": dataclasses.asdict(settings),
            "rows": [row.to_dict() for row in rows]}


# ---------------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class ValidationCase:
    """One tiny model and setup to build, train one step and compare with the plan.

    Args:
        shape: The model's shape (random weights of this shape are built).
        settings: The setup (``bits`` 32 or 4; 4 is measured on bitsandbytes' CPU kernels).
        frozen_blocks: Bottom blocks frozen with ``SAFEModel.freeze`` before the step.
    """

    shape: ModelShape
    settings: PlanSettings
    frozen_blocks: int = 0

    @property
    def label(self) -> str:
        s = self.settings
        targets = "all" if s.target_modules == ALL_PROJECTIONS else ",".join(t.removesuffix("_proj") for t in s.target_modules)
        return (f"L{self.shape.num_layers} h{self.shape.hidden_size} i{self.shape.intermediate_size} "
                f"{self.shape.num_heads}/{self.shape.num_kv_heads}h {s.bits}bit B{s.batch_size} S{s.seq_len} "
                f"r{s.lora_r} {targets} gc={'on' if s.gradient_checkpointing else 'off'} k={self.frozen_blocks}")


@dataclass
class ValidationRow:
    """Planned against measured bytes of one :class:`ValidationCase` (activations held at the end of forward)."""

    case: ValidationCase
    planned: dict[str, int] = field(default_factory=dict)
    measured: dict[str, int] = field(default_factory=dict)

    def error(self, key: str) -> float:
        """Relative error of the plan, ``(planned - measured) / measured`` (0 when both are 0)."""
        planned, measured = self.planned[key], self.measured[key]
        if measured == 0:
            return 0.0 if planned == 0 else math.inf
        return (planned - measured) / measured

    @property
    def max_abs_error(self) -> float:
        return max(abs(self.error(key)) for key in self.measured)


def held_saved_bytes(model: Any, batch: Mapping[str, Any]) -> int:
    """Run ``model(**batch)`` and return the bytes of saved-for-backward tensors still held when it returns.

    Unlike :class:`peft_safe.measure.SavedTensorMeter`, which adds up every storage ever saved, this counts
    only the storages autograd still holds after the forward: under non-reentrant checkpointing a frozen
    block's input is saved and dropped at once, and does not count. The model's parameters and buffers are
    not activations and do not count. The graph is freed before returning.
    """
    import torch

    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    aliases: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        alias = tensor.detach()
        aliases.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda alias: alias):
        output = model(**batch)
    gc.collect()
    held: dict[int, int] = {}
    for ref in aliases:
        alias = ref()
        if alias is None:
            continue
        storage = alias.untyped_storage()
        if storage.data_ptr() not in excluded:
            held[storage.data_ptr() or id(storage)] = storage.nbytes()
    del output
    return sum(held.values())


def _build_model(case: ValidationCase, workdir: str) -> Any:
    """A random LLaMA of the case's shape in the case's precision, with SAFE over LoRA, ready to train."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaForCausalLM

    from .safe.config import SAFEConfig

    settings = case.settings
    config = case.shape.to_llama_config(max_position_embeddings=max(64, settings.seq_len))
    torch.manual_seed(0)
    if settings.bits == 32:
        model = LlamaForCausalLM(config)
    elif settings.bits == 16:
        model = LlamaForCausalLM(config).to(getattr(torch, settings.dtype))
    elif settings.bits == 4:
        from transformers import BitsAndBytesConfig

        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(workdir)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=settings.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = LlamaForCausalLM.from_pretrained(workdir, quantization_config=quantization, dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        raise ValueError(f"validation builds 4-, 16- and 32-bit models, got bits={settings.bits}; use 4, 16 or 32.")
    expected_dtype = settings.dtype if settings.bits == 16 else "float32"
    if settings.dtype != expected_dtype or settings.adapter_dtype != "float32":
        raise ValueError(
            "validation builds models as peft trains them: float32 adapters, and float32 activations for 4 and 32 "
            f"bits; got bits={settings.bits}, dtype={settings.dtype!r}, adapter_dtype={settings.adapter_dtype!r}."
        )
    lora = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, target_modules=list(settings.target_modules),
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, SAFEConfig(adapter_config=lora, task_type="CAUSAL_LM"))
    if case.frozen_blocks:
        peft_model.base_model.freeze(list(range(case.frozen_blocks)))
    if settings.gradient_checkpointing:
        inner = peft_model.get_base_model()
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers' name from 5.x on
            inner.activation_checkpointing_enable({"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # SAFE's cut: the embedding output does not require grad, so nothing below the lowest trainable block is
    # saved (transformers' checkpointing enables peft's input-require-grads hook; take it off)
    peft_model.base_model.model.disable_input_require_grads()
    return peft_model


def measure_case(case: ValidationCase) -> ValidationRow:
    """Build the case's model, run one AdamW training step and return the plan next to the measurement.

    Activations are the saved-for-backward bytes held at the end of the forward (:func:`held_saved_bytes`);
    gradients and optimizer state come from :func:`peft_safe.measure.measure_training_step`.
    """
    import tempfile

    import torch

    from .measure import measure_training_step

    if not 0 <= case.frozen_blocks < case.shape.num_layers:
        raise ValueError(f"frozen_blocks must be in [0, {case.shape.num_layers - 1}] to train a step, got "
                         f"{case.frozen_blocks}.")
    settings = case.settings
    with tempfile.TemporaryDirectory() as workdir:
        model = _build_model(case, workdir)
        model.train()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1, case.shape.vocab_size, (settings.batch_size, settings.seq_len), generator=generator)
        batch = {"input_ids": ids, "labels": ids}
        held = held_saved_bytes(model, batch)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = measure_training_step(model, batch, optimizer, timed=False)
        weights, adapters = _weight_and_adapter_bytes(model)
    row = next(r for r in plan_memory(case.shape, settings) if r.method == "safe" and r.frozen_blocks == case.frozen_blocks)
    return ValidationRow(
        case=case,
        planned={"weights": row.weight_bytes, "adapter": row.adapter_bytes, "activations": row.activation_held_bytes,
                 "gradients": row.gradient_bytes, "optimizer": row.optimizer_bytes},
        measured={"weights": weights, "adapter": adapters, "activations": held, "gradients": step.gradient_bytes,
                  "optimizer": step.optimizer_state_bytes},
    )


def _weight_and_adapter_bytes(model: Any) -> tuple[int, int]:
    """Bytes of the base weights (with bitsandbytes' quantization statistics) and of the adapter parameters.

    Adapter parameters are found structurally, in the adapter containers of peft's tuner layers.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_ids = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr, None)
                if isinstance(container, torch.nn.ModuleDict):
                    adapter_ids.update(id(p) for p in container.parameters())
    weights = adapters = 0
    seen = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in adapter_ids:
            adapters += param.nbytes
            continue
        weights += param.nbytes
        quant_state = getattr(param, "quant_state", None)
        while quant_state is not None:  # absmax, code and offset of each (nested) quantization level
            weights += sum(t.nbytes for t in (quant_state.absmax, quant_state.code, getattr(quant_state, "offset", None))
                           if isinstance(t, torch.Tensor))
            quant_state = getattr(quant_state, "state2", None)
    return weights, adapters


def _tiny(name: str, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int = 128) -> ModelShape:
    return ModelShape(name=name, num_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab)


def default_validation_cases() -> list[ValidationCase]:
    """The cases of ``peft-safe plan --validate``: several depths and widths, 32 and 4 bits, checkpointing on
    and off, LoRA on q/v and on all projections, nothing, the bottom block and all but the top block frozen."""
    cases = []
    shapes = [_tiny("tiny-a", 2, 32, 64, 2, 1), _tiny("tiny-b", 4, 64, 176, 4, 4), _tiny("tiny-c", 6, 128, 344, 8, 2)]
    for shape in shapes:
        for bits in (32, 4):
            for checkpointing in (False, True):
                for targets in (DEFAULT_TARGETS, ALL_PROJECTIONS):
                    settings = PlanSettings(bits=bits, batch_size=2, seq_len=16, lora_r=4, target_modules=targets,
                                            gradient_checkpointing=checkpointing)
                    for frozen in sorted({0, 1, shape.num_layers - 1}):
                        cases.append(ValidationCase(shape, settings, frozen))
    return cases


def slice_7b_cases(layers: int = 2, seq_len: int = 32) -> list[ValidationCase]:
    """A ``layers``-block slice of LLaMA-2 7B's shape in 4 bits (LoRA r=8 on all projections), checkpointing
    off and on, with 0 and ``layers - 1`` bottom blocks frozen."""
    shape = dataclasses.replace(PRESETS["llama-2-7b"], name=f"llama-2-7b[:{layers}]", num_layers=layers)
    cases = []
    for checkpointing in (False, True):
        settings = PlanSettings(bits=4, batch_size=1, seq_len=seq_len, lora_r=8, target_modules=ALL_PROJECTIONS,
                                gradient_checkpointing=checkpointing)
        for frozen in sorted({0, layers - 1}):
            cases.append(ValidationCase(shape, settings, frozen))
    return cases


def validate(cases: Sequence[ValidationCase] | None = None) -> list[ValidationRow]:
    """Measure every case (default: :func:`default_validation_cases`) and return plan-versus-measured rows."""
    return [measure_case(case) for case in (default_validation_cases() if cases is None else cases)]


def format_validation(rows: Sequence[ValidationRow]) -> str:
    """A Markdown table of planned and measured bytes and the plan's error per quantity."""
    keys = ("weights", "adapter", "activations", "gradients", "optimizer")
    lines = ["| case | " + " | ".join(f"{key} plan / measured | err" for key in keys) + " |",
             "|---" * (1 + 2 * len(keys)) + "|"]
    for row in rows:
        cells = [row.case.label]
        for key in keys:
            cells += [f"{row.planned[key]:,} / {row.measured[key]:,}", f"{100 * row.error(key):+.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-safe plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-2-7b",
                   help=f"a preset ({', '.join(PRESETS)}), a config.json or a model folder (default llama-2-7b)")
    p.add_argument("--bits", type=int, default=4, help="bits of the base weights: 4 (NF4), 8, 16 or 32")
    p.add_argument("--no-double-quant", action="store_true", help="4 bits without double quantization")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated projections with LoRA")
    p.add_argument("--all-projections", action="store_true", help="LoRA on q,k,v,o,gate,up,down_proj")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default=None,
                   help="activations and unquantized weights (default float32 for 4/8/32 bits, bfloat16 for 16)")
    p.add_argument("--adapter-dtype", choices=sorted(_DTYPE_BYTES), default="float32")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.add_argument("--validate", action="store_true",
                   help="measure tiny LLaMA models on this machine and print planned vs measured")
    p.add_argument("--slice-7b", type=int, default=0, metavar="LAYERS",
                   help="with --validate: measure a LAYERS-block slice of LLaMA-2 7B in 4 bits instead (slow)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.validate:
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "64")))))
        rows = validate(slice_7b_cases(args.slice_7b) if args.slice_7b else None)
        if args.json:
            print(json.dumps([{"case": r.case.label, "planned": r.planned, "measured": r.measured} for r in rows],
                             indent=1))
        else:
            print(format_validation(rows))
            print(f"\nlargest error: {100 * max(r.max_abs_error for r in rows):.2f} %")
        return 0
    try:
        shape = resolve_model(args.model)
        targets = ALL_PROJECTIONS if args.all_projections else tuple(t.strip() for t in args.targets.split(",") if t.strip())
        settings = PlanSettings(
            bits=args.bits, double_quant=not args.no_double_quant, batch_size=args.batch_size,
            seq_len=args.seq_len, lora_r=args.rank, target_modules=targets,
            gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, adapter_dtype=args.adapter_dtype,
        )
    except ValueError as exc:
        build_parser().error(str(exc))
    rows = plan_memory(shape, settings)
    print(json.dumps(plan_json(shape, settings, rows), indent=1) if args.json else format_table(shape, settings, rows))
    return 0
