"""Scoring never produces NaN or inf: half-precision models, constant activations, tiny and huge probe sets.

Each score must be a finite number in [0, 1]; where no score can be computed (a single token, activations that
overflowed) the tuner says so instead of returning a number.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_safe import SAFEConfig

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def assert_scores_valid(scores: dict[str, float], units: list[str]) -> None:
    assert list(scores) == units
    for unit, score in scores.items():
        assert isinstance(score, float) and math.isfinite(score) and 0.0 <= score <= 1.0, (unit, score)


def half_precision_safe(tiny, arch: str, dtype: torch.dtype):
    base = tiny.model(arch, layers=2).to(dtype)
    torch.manual_seed(1)
    return get_peft_model(base, tiny.safe_config(arch))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_half_precision_models_score_finite_and_close_to_float32(tiny, arch, dtype):
    model = half_precision_safe(tiny, arch, dtype)
    probe = [tiny.batch(batch=4, seq=16)]
    scores = model.base_model.compute_importance(probe)
    assert_scores_valid(scores, model.base_model.adapter_units)
    assert any(score > 0 for score in scores.values())  # the adapters (init_lora_weights=False) do something
    reference = tiny.safe(arch, layers=2).base_model.compute_importance(probe)
    for unit, score in scores.items():  # half precision moves the score, not its scale
        assert score == pytest.approx(reference[unit], rel=0.2, abs=1e-3), unit


class ConstantRows(nn.Module):
    """Blocks fed the same row for every token: every activation is constant over the tokens."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_constant_activations_score_zero_not_nan():
    torch.manual_seed(0)
    model = get_peft_model(
        ConstantRows(),
        SAFEConfig(adapter_config=LoraConfig(r=2, target_modules=r"blocks\.\d\.0", init_lora_weights=False)),
    )
    row = torch.randn(1, 8)
    scores = model.base_model.compute_importance([row.expand(16, 8).clone()])
    assert_scores_valid(scores, model.base_model.adapter_units)
    assert set(scores.values()) == {0.0}  # no token differs from another: nothing to tell apart, importance 0


def test_single_token_probe_set_is_refused_instead_of_scoring_every_unit_zero(tiny):
    safe = tiny.safe("bert").base_model
    with pytest.raises(ValueError, match="single real token"):
        safe.update_and_freeze(0, [tiny.batch(batch=1, seq=1)])
    assert safe.freeze_state.history == []


def test_one_real_token_per_sequence_is_enough_over_several_sequences(tiny):
    safe = tiny.safe("bert").base_model
    scores = safe.compute_importance([tiny.batch(batch=4, seq=1)])
    assert_scores_valid(scores, safe.adapter_units)
    assert any(score > 0 for score in scores.values())


@pytest.mark.parametrize("probe_tokens", [2, 64])
def test_huge_probe_batch_is_subsampled_to_the_budget_and_stays_finite(tiny, probe_tokens):
    model = tiny.safe("gpt2", layers=2, probe_tokens=probe_tokens)
    probe = [tiny.batch(batch=48, seq=64, seed=s) for s in (1, 2)]  # 6144 tokens against a budget of <= 64
    scores = model.base_model.compute_importance(probe)
    assert_scores_valid(scores, model.base_model.adapter_units)


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_extreme_adapter_magnitudes_in_float32_stay_finite(tiny, scale):
    model = tiny.safe("llama", layers=2)
    with torch.no_grad():
        for name, param in tiny.adapter_params(model).items():
            if "lora_B" in name:
                param.mul_(scale)
    scores = model.base_model.compute_importance([tiny.batch(batch=2, seq=8)])
    assert_scores_valid(scores, model.base_model.adapter_units)


def test_overflowing_fp16_activations_raise_naming_the_unit(tiny):
    model = half_precision_safe(tiny, "llama", torch.float16)
    with torch.no_grad():
        for name, param in tiny.adapter_params(model).items():
            if "lora_B" in name and "layers.1." in name:
                param.fill_(6e4)  # the adapted block's output overflows float16
    with pytest.raises(ValueError) as info:
        model.base_model.compute_importance([tiny.batch(batch=2, seq=8)])
    assert "model.layers.1" in str(info.value) and "inf or NaN" in str(info.value)
