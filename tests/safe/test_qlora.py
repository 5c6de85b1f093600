"""SAFE on bitsandbytes 4-bit bases prepared with peft's ``prepare_model_for_kbit_training`` (QLoRA).

``test_safe_adapter_matrix.py`` already runs every adapter on an NF4 LLaMA with float32 compute, without k-bit
preparation. This module covers the rest of what a QLoRA user does: both quantization types, double
quantization on and off, bfloat16 and float32 compute, ``prepare_model_for_kbit_training`` with reentrant and
non-reentrant gradient checkpointing, scoring and freezing on the schedule, and reloading the adapter onto a
freshly quantized and prepared base. The cases form a pairwise table over (adapter, quant type, double quant,
compute dtype, checkpointing): every pair of values of two factors occurs in some case.

bitsandbytes runs 4-bit on the CPU; the models stay in train mode (bitsandbytes repacks 4-bit weights for CPU
inference in eval mode, which changes rounding), and LLaMA has no dropout, so train-mode outputs are exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from tiny_models import PAPER_RULE, load_4bit_llama
from torch import nn

from peft_safe import HoulsbyConfig, PfeifferConfig, SAFEConfig, SAFEModel
from peft_safe.measure import measure_training_step

pytestmark = pytest.mark.usefixtures("single_thread_torch")

LAYERS = 4
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class QCase:
    adapter: str
    quant_type: str
    double_quant: bool
    compute_dtype: torch.dtype
    reentrant: bool

    @property
    def id(self) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        checkpointing = "reentrant" if self.reentrant else "non-reentrant"
        return f"{self.adapter}-{self.quant_type}-dq{int(self.double_quant)}-{dtype}-{checkpointing}"


# pairwise: each pair of values of any two factors appears at least once
CASES = [
    QCase("lora", "nf4", False, torch.float32, True),
    QCase("lora", "fp4", True, torch.bfloat16, False),
    QCase("houlsby", "nf4", True, torch.bfloat16, True),
    QCase("houlsby", "fp4", False, torch.float32, False),
    QCase("pfeiffer", "nf4", False, torch.bfloat16, False),
    QCase("pfeiffer", "fp4", True, torch.float32, True),
]


def test_case_table_is_pairwise():
    factors = [
        ("adapter", {"lora", "houlsby", "pfeiffer"}),
        ("quant_type", {"nf4", "fp4"}),
        ("double_quant", {False, True}),
        ("compute_dtype", {torch.float32, torch.bfloat16}),
        ("reentrant", {False, True}),
    ]
    for i, (first, first_values) in enumerate(factors):
        for second, second_values in factors[i + 1 :]:
            seen = {(getattr(c, first), getattr(c, second)) for c in CASES}
            missing = {(a, b) for a in first_values for b in second_values} - seen
            assert not missing, f"no case has ({first}, {second}) in {missing}"


# ---------------------------------------------------------------------------------------------- building
@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A tiny full-precision LLaMA saved once; skips when bitsandbytes cannot run 4-bit here."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        pytest.skip(f"bitsandbytes is not importable ({exc})")
    directory = tmp_path_factory.mktemp("tiny-llama-qlora")
    tiny.llama(layers=LAYERS).save_pretrained(directory)
    return str(directory)


def quantized_base(path: str, case: QCase, checkpointing: bool = True) -> nn.Module:
    """The saved LLaMA quantized as ``case`` says, prepared by ``prepare_model_for_kbit_training``."""
    model = load_4bit_llama(path, case.quant_type, case.double_quant, case.compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renamed gradient_checkpointing_enable
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": case.reentrant},
        )
    return model.train()


def adapter_config(adapter: str) -> object:
    if adapter == "lora":
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False, task_type="CAUSAL_LM"
        )
    preset = {"houlsby": HoulsbyConfig, "pfeiffer": PfeifferConfig}[adapter]
    return preset(init_weights=False, reduction_factor=4, task_type="CAUSAL_LM")


def safe_model(base: nn.Module, adapter: str) -> PeftModel:
    torch.manual_seed(1)
    config = SAFEConfig(
        adapter_config=adapter_config(adapter), tau=1.0, final_freeze_time=3, warmup_cap=1, task_type="CAUSAL_LM",
        **PAPER_RULE,
    )
    return get_peft_model(base, config)


def inputs(tiny, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = tiny.ids(batch=2, seq=8, seed=seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def step(model: PeftModel, batch: dict, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """One training step; returns the gradients it computed, by parameter name."""
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    return grads


def logits(model: PeftModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.detach().clone()


def requires_grad_pattern(model: nn.Module) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()}


def adapter_parameter_names(tiny, model: PeftModel) -> set[str]:
    return {name for name, p in model.named_parameters() if any(p is q for q in tiny.adapter_params(model).values())}


# ---------------------------------------------------------------------------------------------- lifecycle
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_qlora_train_score_freeze_save_and_reload_onto_a_fresh_quantized_base(tiny, checkpoint, case, tmp_path):
    import bitsandbytes as bnb

    model = safe_model(quantized_base(checkpoint, case), case.adapter)
    safe = model.base_model
    assert isinstance(safe, SAFEModel)
    assert safe.adapter_units == [f"model.layers.{i}" for i in range(LAYERS)]
    # the adapters wrap the quantized layers, quantized as asked
    wrapped = [
        m.get_base_layer()
        for m in safe.model.modules()
        if hasattr(m, "get_base_layer") and m is not m.get_base_layer()
    ]
    assert wrapped and all(isinstance(layer, bnb.nn.Linear4bit) for layer in wrapped)
    for layer in wrapped:
        assert layer.weight.quant_type == case.quant_type
        assert layer.weight.quant_state.nested is case.double_quant
        assert layer.compute_dtype == case.compute_dtype
    assert all(block.gradient_checkpointing for block in safe.model.model.layers)  # prepared with checkpointing

    # training: only adapter parameters train; the packed 4-bit weights never change
    adapters = adapter_parameter_names(tiny, model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters
    packed = {name: p.detach().clone() for name, p in model.named_parameters() if p.dtype == torch.uint8}
    assert packed, "no 4-bit weights found: the base is not quantized"
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name in adapters}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in (1, 2):
        grads = step(model, inputs(tiny, seed), optimizer)
        assert grads.keys() == adapters and all(torch.isfinite(g).all() for g in grads.values())
    after = dict(model.named_parameters())
    assert all(torch.equal(packed[name], after[name]) for name in packed)
    assert all(not torch.equal(before[name], after[name]) for name in adapters)

    # scoring and the schedule: tau = 1 on normalised scores freezes every unit but the most important one
    probe = [inputs(tiny, seed=3)]
    assert safe.update_and_freeze(1, probe, optimizer=optimizer) == []  # warm-up
    newly = safe.update_and_freeze(3, probe, optimizer=optimizer)
    scores = safe.importance
    assert set(scores) == set(safe.adapter_units) and all(0.0 <= s <= 1.0 for s in scores.values())
    top = max(scores, key=scores.get)
    assert sorted(newly) == sorted(u for u in safe.adapter_units if u != top)
    assert safe.frozen_units == [u for u in safe.adapter_units if u != top]
    frozen_names = {n for n in adapters if any(tiny.in_unit(n, u) for u in safe.frozen_units)}
    assert frozen_names and all(not after[n].requires_grad for n in frozen_names)
    frozen_values = {n: after[n].detach().clone() for n in frozen_names}
    grads = step(model, inputs(tiny, 4), optimizer)
    assert grads.keys() == adapters - frozen_names
    assert all(torch.equal(frozen_values[n], after[n]) for n in frozen_names)

    # save, then reload onto a freshly quantized and prepared base: same outputs, same freeze state
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_base(checkpoint, case), tmp_path, is_trainable=True)
    batch = inputs(tiny, 5)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)
    assert loaded.base_model.freeze_state.to_dict() == safe.freeze_state.to_dict()
    assert requires_grad_pattern(loaded) == requires_grad_pattern(model)
    assert loaded.base_model.backprop_cut_block == safe.backprop_cut_block
    # the next step computes the same gradients, and the frozen units stay frozen through peft's toggles
    with loaded.disable_adapter():
        pass
    assert requires_grad_pattern(loaded) == requires_grad_pattern(model)
    expected, actual = step(model, batch), step(loaded, batch)
    assert actual.keys() == expected.keys() == adapters - frozen_names
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- truncation
def cut_removed(model: PeftModel):
    """The model as peft alone would run it: SAFE's cut hooks taken off, put back on exit."""
    return model.base_model.without_backprop_cut()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_qlora_checkpointed_training_truncates_below_the_lowest_trainable_unit(tiny, checkpoint, reentrant):
    case = QCase("lora", "nf4", True, torch.float32, reentrant)
    batch = inputs(tiny)
    labelled = {**batch, "labels": batch["input_ids"]}
    all_trainable = measure_training_step(safe_model(quantized_base(checkpoint, case), "lora"), labelled, timed=False)
    model = safe_model(quantized_base(checkpoint, case), "lora")
    safe = model.base_model
    safe.freeze(safe.adapter_units[: LAYERS // 2])
    assert safe.backprop_cut_block == f"model.layers.{LAYERS // 2}"
    frozen = measure_training_step(model, labelled, timed=False)
    with cut_removed(model):
        frozen_without_cut = measure_training_step(model, labelled, timed=False)
    # bitsandbytes' 4-bit forward kernel has no FLOP formula, but its backward (dequantize + matmul) is counted
    share = (LAYERS - LAYERS // 2) / LAYERS
    ratio = frozen.backward_flops / all_trainable.backward_flops
    assert abs(ratio - share) < 0.05 * share, (ratio, share)
    assert frozen_without_cut.backward_flops > 0.9 * all_trainable.backward_flops
    # and the gradients are those peft alone computes
    expected = step(model, batch)
    with cut_removed(model):
        actual = step(model, batch)
    assert expected.keys() == actual.keys() and any(f"layers.{LAYERS // 2}." in n for n in expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
