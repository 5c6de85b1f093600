"""The planner's arithmetic: the bytes a LoRA or SAFE training step keeps, from the model's shape alone.

Owns :class:`MemoryRow`, the byte formulas (base weights with bitsandbytes' quantization statistics, LoRA
parameters, their gradients, AdamW's state, and the activations autograd saves for backward) behind
:func:`plan_memory`, and the plan's two outputs, :func:`format_table` and :func:`plan_json`.

The activation formulas follow what autograd saves in transformers' ``LlamaDecoderLayer`` (SDPA attention,
RMSNorm, SwiGLU MLP, rotary embedding), peft's LoRA layers and the causal-LM loss, found with
:func:`torch.autograd.graph.saved_tensors_hooks`. They are written as a walk through one block that tracks
which tensors require grad and names every saved storage, so storages shared by several operations count
once and nothing is saved where no gradient flows (the frozen bottom blocks, the part of the lowest trainable
block before its first adapter). ``docs/plan.md`` lists the formulas and their assumptions.

Imports: the standard library, :mod:`peft_safe.plan.shapes` and the pure ``core.budget`` (the costs SAFE's memory
budget plans with). Pure arithmetic: never torch, peft, transformers, the SAFE tuner or the measurement code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.budget import BlockCosts
from .shapes import DTYPE_BYTES, ModelShape, PlanSettings

__all__ = ["MemoryRow", "block_costs", "format_table", "plan_json", "plan_memory"]

_FLOAT32 = 4
_INT64 = 8
# bitsandbytes 4-bit: one absmax per 64 weights; double quantization stores those absmax in 8 bits with one
# float32 absmax per 256 of them, plus a 256-entry float32 code and a float32 offset per layer.
_BNB4_BLOCKSIZE = 64
_BNB4_NESTED_BLOCKSIZE = 256
_BNB4_CODE_ENTRIES = 16  # the NF4/FP4 code held by every layer's quant state


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
        """Weights, adapters, gradients, optimizer state and the activation peak added up."""
        return (self.weight_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes)

    def to_dict(self) -> dict[str, Any]:
        """The fields and :attr:`total_bytes` as a JSON-serialisable dict."""
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
    act = DTYPE_BYTES[settings.dtype]
    adapter = DTYPE_BYTES[settings.adapter_dtype]
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


def _plan_activations(
    shape: ModelShape, settings: PlanSettings, frozen: int, input_requires_grad: bool
) -> tuple[int, int]:
    """(peak, held at the end of the forward) saved-for-backward bytes with the bottom ``frozen`` blocks frozen."""
    if frozen >= shape.num_layers:
        return 0, 0
    tokens = settings.tokens
    act = DTYPE_BYTES[settings.dtype]
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


def block_costs(shape: ModelShape, settings: PlanSettings) -> BlockCosts:
    """What each block saves and keeps when checkpointed, as SAFE's memory budget measures it on its first batch.

    Every block trains (warm-up); the first block's input requires grad only with 4/8-bit weights
    (``prepare_model_for_kbit_training``'s hook), the others' always. A checkpointed block keeps its input; the
    head, the loss and the rotary cos/sin are outside the blocks.
    """
    tokens = settings.tokens
    act = DTYPE_BYTES[settings.dtype]
    saved, rope = [], False
    for index in range(shape.num_layers):
        block, uses_rope = _block_saved(shape, settings, index > 0 or settings.bits in (4, 8))
        saved.append(sum(block.values()))
        rope = rope or uses_rope
    labels = (settings.seq_len + 1 if settings.batch_size == 1 else tokens) * _INT64
    head = tokens * shape.hidden_size * _FLOAT32 + tokens * _FLOAT32 + tokens * shape.vocab_size * _FLOAT32
    outside = head + labels + _FLOAT32 + (2 * settings.seq_len * shape.head_dim * act if rope else 0)
    return BlockCosts(tokens, saved, [tokens * shape.hidden_size * act] * shape.num_layers, outside)


def _weight_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """Bytes of the base weights: quantized projections with their statistics, the rest in ``settings.dtype``."""
    dense = DTYPE_BYTES[settings.dtype]
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
    adapter_bytes = DTYPE_BYTES[settings.adapter_dtype]
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
    """``nbytes`` for a table: in GiB, MiB or KiB from one of that unit up, else in bytes."""
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

