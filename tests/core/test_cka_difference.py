"""1 - CKA in float32 by the difference form (``importance_by_difference``), held to today's float64 reference.

Stated tolerance: where the float64 reference exceeds 1e-8 (a hundred times the rounding floor below which it reads
0, ``ROUNDING_TOLERANCE``), the two agree within a relative 1e-3; measured on these cases: at most 5e-6. The ranking
of units by importance, which is what SAFE's decisions read, is the same.
"""

from __future__ import annotations

import pytest
import torch

from peft_safe.core.cka import (
    CKAAccumulator,
    NonFiniteActivations,
    importance_by_difference,
    importance_from_cka,
    linear_cka,
)

RELATIVE = 1e-3
FLOOR = 1e-8


def activations(n: int, d: int, eps: float, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer outputs without (y) and with (x) a low-rank change of relative size ``eps``: anisotropic columns, an
    offset and a few massive dimensions, as a decoder's residual stream has."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=g) * (3 * torch.rand(d, generator=g)) + torch.randn(d, generator=g)
    y[:, :3] *= 50
    low_rank = torch.randn(d, 8, generator=g) @ torch.randn(8, d, generator=g) / d
    x = y + eps * (y @ low_rank) + 0.1 * eps * torch.randn(n, d, generator=g)
    return x.to(dtype), y.to(dtype)


def reference(x: torch.Tensor, y: torch.Tensor) -> float:
    return importance_from_cka(linear_cka(x, y))


@pytest.mark.parametrize("n, d", [(2048, 96), (256, 384), (300, 300)], ids=["tokens>features", "gram", "square"])
@pytest.mark.parametrize("eps", [3e-1, 3e-2, 3e-3])
def test_agrees_with_the_float64_reference_within_the_stated_tolerance(n, d, eps):
    x, y = activations(n, d, eps, seed=int(eps * 1e4) + n)
    ref, fast = reference(x, y), importance_by_difference(x, y)
    if ref > FLOOR:
        assert fast == pytest.approx(ref, rel=RELATIVE)
    else:  # below what float64 resolves: the difference form still sees a change, and a tiny one
        assert 0 < fast < 100 * FLOOR


def test_the_ranking_of_units_is_the_reference_ranking():
    pairs = [activations(512, 64, eps, seed=i) for i, eps in enumerate([0.4, 0.05, 0.2, 0.01, 0.1, 0.02, 0.3])]
    refs = [reference(x, y) for x, y in pairs]
    fasts = [importance_by_difference(x, y) for x, y in pairs]
    assert sorted(range(len(refs)), key=refs.__getitem__) == sorted(range(len(fasts)), key=fasts.__getitem__)


@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_a_common_scale_and_offset_change_nothing(magnitude):
    x, y = activations(400, 32, 0.1, seed=3, dtype=torch.float64)
    base = importance_by_difference(x, y)
    assert importance_by_difference(x * magnitude + 7 * magnitude, y * magnitude) == pytest.approx(base, rel=1e-4)
    assert importance_by_difference(3 * y + 1, y) < 1e-12  # a scaled copy: CKA 1


def test_degenerate_inputs_read_as_the_reference_does():
    y = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    constant = torch.ones(50, 8)
    assert importance_by_difference(y, y) == 0.0
    assert importance_by_difference(y[:1], 2 * y[:1]) == 0.0  # one row: nothing to compare
    assert importance_by_difference(constant, y) == 1.0 == reference(constant, y)
    assert importance_by_difference(y, constant) == 1.0 == reference(y, constant)
    assert importance_by_difference(constant, 2 * constant) == 0.0 == reference(constant, 2 * constant)
    moved = y + 3 * torch.randn(50, 8, generator=torch.Generator().manual_seed(1))  # a change larger than y
    assert importance_by_difference(moved, y) == reference(moved, y)  # left to the float64 form
    with pytest.raises(ValueError, match="one shape"):
        importance_by_difference(y, y[:, :4])
    with pytest.raises(NonFiniteActivations, match="non-finite"):
        importance_by_difference(y.clone().fill_(float("nan")), y)


def test_the_accumulator_scores_in_either_precision():
    x, y = activations(600, 48, 0.05, seed=5)
    acc = CKAAccumulator(max_tokens=512, seed=0)
    acc.update(x.view(3, 200, 48), y.view(3, 200, 48))
    assert acc.importance("float32") == pytest.approx(acc.importance("float64"), rel=RELATIVE)
    assert acc.importance() == importance_from_cka(acc.value())  # the reference stays the default
    with pytest.raises(ValueError, match="float16"):
        acc.importance("float16")
