"""Checking the plan against real training steps of tiny LLaMA models (``peft-safe plan --validate``).

Owns :class:`ValidationCase` and :class:`ValidationRow`, building a random LLaMA of a case's shape with SAFE
over LoRA, measuring one AdamW step (:func:`measure_case`), the cases of ``--validate``
(:func:`default_validation_cases`, :func:`slice_7b_cases`), :func:`validate` and :func:`format_validation`.

It measures with the package's own tools and repeats none of them: activations with
:class:`~peft_safe.measure.memory.SavedTensorMeter`, gradients and optimizer state with
:func:`~peft_safe.measure.step.measure_training_step`, parameter bytes with
:func:`~peft_safe.measure.memory.parameter_bytes`, and the adapter parameters through
:mod:`peft_safe.safe.method.units`.

Imports: :mod:`peft_safe.plan.shapes`, :mod:`peft_safe.plan.formulas`, :mod:`peft_safe.measure`,
:mod:`peft_safe.safe`, torch; peft and transformers lazily, where a model is built. Never the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..measure.memory import SavedTensorMeter, parameter_bytes
from ..measure.step import measure_training_step
from ..safe.config import SAFEConfig
from ..safe.method.units import find_adapter_units, unit_parameters
from .formulas import plan_memory
from .shapes import ALL_PROJECTIONS, DEFAULT_TARGETS, PRESETS, ModelShape, PlanSettings

__all__ = [
    "ValidationCase",
    "ValidationRow",
    "default_validation_cases",
    "format_validation",
    "measure_case",
    "slice_7b_cases",
    "validate",
]


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
        """One line naming the shape, the setup and ``k``, for tables and test ids."""
        s = self.settings
        if s.target_modules == ALL_PROJECTIONS:
            targets = "all"
        else:
            targets = ",".join(t.removesuffix("_proj") for t in s.target_modules)
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
        """The largest ``abs(error(key))`` over the measured quantities."""
        return max(abs(self.error(key)) for key in self.measured)


def _build_model(case: ValidationCase, workdir: str, memory_budget: float | None = None) -> Any:
    """A random LLaMA of the case's shape in the case's precision, with SAFE over LoRA, ready to train.

    Args:
        case: The shape, setup and number of bottom blocks to freeze.
        workdir: An empty folder; 4-bit models are saved there in bfloat16 and loaded back quantized.
        memory_budget: SAFEConfig's ``memory_budget`` (none by default).

    Raises:
        ValueError: For 8 bits, or dtypes other than those peft trains with, naming the value and the fix.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaForCausalLM

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
    peft_model = get_peft_model(model, SAFEConfig(adapter_config=lora, task_type="CAUSAL_LM",
                                                  memory_budget=memory_budget))
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

    Activations are the saved-for-backward bytes autograd holds when the forward ends, read from a
    :class:`~peft_safe.measure.memory.SavedTensorMeter` as its ``peak_activation_bytes``: the forward only adds
    to what autograd holds, except for the tensors it saves and drops at once (under non-reentrant
    checkpointing, the input of each frozen block, where no gradient flows), and those are dropped before the
    lowest trainable block saves anything. The meter's ``activation_bytes`` would count them too. Gradients and
    optimizer state come from :func:`~peft_safe.measure.step.measure_training_step`.

    Args:
        case: The model, setup and frozen blocks to measure.

    Raises:
        ValueError: If every block is frozen (nothing would train), naming the allowed range.
    """
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
        with SavedTensorMeter(exclude=model) as meter:
            model(**batch)  # the output is dropped at once, and the graph with it
        held = meter.peak_activation_bytes
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = measure_training_step(model, batch, optimizer, timed=False)
        weights, adapters = _weight_and_adapter_bytes(model)
    row = next(r for r in plan_memory(case.shape, settings)
               if r.method == "safe" and r.frozen_blocks == case.frozen_blocks)
    return ValidationRow(
        case=case,
        planned={"weights": row.weight_bytes, "adapter": row.adapter_bytes, "activations": row.activation_held_bytes,
                 "gradients": row.gradient_bytes, "optimizer": row.optimizer_bytes},
        measured={"weights": weights, "adapter": adapters, "activations": held, "gradients": step.gradient_bytes,
                  "optimizer": step.optimizer_state_bytes},
    )


def _weight_and_adapter_bytes(model: Any) -> tuple[int, int]:
    """Bytes of the base weights (with bitsandbytes' quantization statistics) and of the adapter parameters.

    The adapter parameters are those of the SAFE adapter's units (:mod:`peft_safe.safe.method.units`), frozen ones
    included; every other parameter is a base weight.

    Args:
        model: The ``PeftModel`` built by :func:`_build_model` (its ``base_model`` is the ``SAFEModel``).
    """
    safe_model = model.base_model
    name = safe_model.safe_adapter_name
    units = find_adapter_units(safe_model.model, name, safe_model.safe_config.blocks_path)
    adapter = {id(p): p for unit in units for p in unit_parameters(unit, name)}
    adapters = sum(p.nbytes for p in adapter.values())
    weights = parameter_bytes(model)[0] - adapters
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        while quant_state is not None:  # absmax, code and offset of each (nested) quantization level
            tensors = (quant_state.absmax, quant_state.code, getattr(quant_state, "offset", None))
            weights += sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))
            quant_state = getattr(quant_state, "state2", None)
    return weights, adapters


def _tiny(
    name: str, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int = 128
) -> ModelShape:
    """A tiny shape of ``head_dim = hidden // heads`` for the default cases."""
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
