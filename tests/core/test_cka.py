"""Linear CKA and the token accumulator, checked against a naive float64 reference and invariants."""

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

from peft_safe.core import cka as cka_module
from peft_safe.core.cka import CKAAccumulator, NonFiniteActivations, importance_from_cka, linear_cka


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Textbook linear CKA via HSIC with the centring matrix H = I - 11^T / n, in float64."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l = x @ x.T, y @ y.T  # noqa: E741

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def related_pair(n: int, d1: int, d2: int, seed: int = 0, noise: float = 1.0):
    """x and a y that shares part of its structure, so CKA lies strictly inside (0, 1)."""
    g = gen(seed)
    x = torch.randn(n, d1, generator=g)
    y = x @ torch.randn(d1, d2, generator=g) + noise * torch.randn(n, d2, generator=g)
    return x, y


@pytest.mark.parametrize(
    "n, d1, d2",
    [(200, 8, 12), (50, 5, 5), (6, 40, 30), (10, 10, 10), (3, 2, 7), (2, 1, 1)],
    ids=["feature-form", "feature-square", "gram-form", "gram-n-eq-d", "mixed", "minimal"],
)
def test_matches_naive_reference(n, d1, d2):
    x, y = related_pair(n, d1, d2, seed=n + d1)
    expected = reference_cka(x, y)
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-10)


def test_reference_value_is_strictly_inside_unit_interval():
    # Guards the other tests: the data is neither identical nor independent.
    x, y = related_pair(200, 8, 12)
    assert 0.1 < linear_cka(x, y) < 0.95


def test_feature_and_gram_forms_agree_on_same_data():
    for n, d in [(100, 10), (10, 100)]:
        x, y = related_pair(n, d, d + 3, seed=d)
        xc = cka_module._centred_unit_scale(x)
        yc = cka_module._centred_unit_scale(y)
        assert cka_module._cka_feature(xc, yc) == pytest.approx(cka_module._cka_gram(xc, yc), abs=1e-12)


@pytest.mark.parametrize("n, d, expected_form", [(64, 8, "_cka_feature"), (8, 64, "_cka_gram"), (8, 8, "_cka_gram")])
def test_form_chosen_by_shape(monkeypatch, n, d, expected_form):
    called = []
    for name in ("_cka_feature", "_cka_gram"):
        original = getattr(cka_module, name)
        monkeypatch.setattr(cka_module, name, lambda a, b, _n=name, _f=original: called.append(_n) or _f(a, b))
    linear_cka(*related_pair(n, d, d))
    assert called == [expected_form]


def test_identity_and_symmetry():
    x, y = related_pair(30, 6, 9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)


def test_independent_features_give_low_cka():
    g = gen(3)
    x, y = torch.randn(4000, 4, generator=g), torch.randn(4000, 4, generator=g)
    assert linear_cka(x, y) < 0.01


def test_orthogonal_and_translation_invariance():
    x, y = (t.double() for t in related_pair(80, 6, 10, seed=5))
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen(9), dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x, y @ q) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 7.0, y - 3.0) == pytest.approx(base, abs=1e-10)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_isotropic_scaling_fp32_extremes(scale):
    x, y = related_pair(60, 6, 8, seed=2)
    scaled = (y.double() * scale).float()
    value = linear_cka(x, scaled)
    assert math.isfinite(value)
    assert value == pytest.approx(linear_cka(x, y), abs=1e-5)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_float64_extremes_do_not_overflow(scale):
    # Without normalisation, Y^T X would be ~1e400 (inf) or ~1e-400 (0) here.
    x, y = related_pair(60, 6, 8, seed=4)
    x, y = x.double(), y.double()
    assert linear_cka(x * scale, y * scale) == pytest.approx(linear_cka(x, y), abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x, y = related_pair(120, 8, 8, seed=6)
    xh, yh = x.to(dtype), y.to(dtype)
    value = linear_cka(xh, yh)
    assert math.isfinite(value)
    # Computed in float64 from the half values: identical to the reference on the upcast values.
    assert value == pytest.approx(reference_cka(xh.double(), yh.double()), abs=1e-9)
    assert linear_cka(xh, xh) == pytest.approx(1.0, abs=1e-12)


def test_degenerate_inputs():
    x = torch.randn(10, 4, generator=gen(0))
    const = torch.full((10, 4), 3.25)
    zeros = torch.zeros(10, 3)
    assert linear_cka(const, zeros) == 1.0
    assert linear_cka(const, const * 2) == 1.0
    assert linear_cka(x, const) == 0.0
    assert linear_cka(zeros, x) == 0.0
    assert linear_cka(x[:1], x[:1] * 5) == 1.0  # a single token
    assert linear_cka(x[:0], x[:0]) == 1.0  # no token
    assert linear_cka(torch.zeros(5, 0), torch.randn(5, 2)) == 0.0  # no feature


def test_constant_column_rounding_noise_is_ignored():
    # Centring a constant column of 0.1 leaves ~1e-17 noise: it must count as zero, not as a signal.
    col = torch.full((1000, 1), 0.1, dtype=torch.float64)
    x = torch.randn(1000, 3, dtype=torch.float64, generator=gen(1))
    assert linear_cka(col, x) == 0.0
    assert linear_cka(col, col * 3) == 1.0


def test_constant_column_does_not_change_value():
    x, y = related_pair(50, 4, 4)
    padded = torch.cat([x, torch.full((50, 1), 1e6)], dim=1)
    assert linear_cka(padded, y) == pytest.approx(linear_cka(x, y), abs=1e-10)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), r"\(4, 3\).*\(5, 3\)"),
        (torch.zeros(4), torch.zeros(4, 3), r"2-D.*\(4,\)"),
        (torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), r"2-D.*\(2, 4, 3\)"),
    ],
)
def test_bad_shapes_raise_naming_them(x, y, match):
    with pytest.raises(ValueError, match=match):
        linear_cka(x, y)


def test_non_finite_input_raises():
    x = torch.randn(5, 2)
    x[1, 1] = float("nan")
    with pytest.raises(NonFiniteActivations, match="non-finite"):  # a ValueError the scoring names by unit
        linear_cka(x, torch.randn(5, 2))


def test_importance_from_cka():
    assert importance_from_cka(0.75) == pytest.approx(0.25)
    assert importance_from_cka(1.0 + 1e-12) == 0.0
    assert importance_from_cka(-0.5) == 1.0
    # float64 rounding of CKA(X, X) is not importance; a real difference of 1e-6 is
    assert importance_from_cka(1.0 - 4e-16) == 0.0
    assert importance_from_cka(1.0 - 1e-6) == pytest.approx(1e-6)
    with pytest.raises(ValueError):
        importance_from_cka(float("nan"))


# --- accumulator -----------------------------------------------------------------------------------


def batches(seed: int, count: int = 3, shape=(2, 7), d1: int = 6, d2: int = 5):
    g = gen(seed)
    out = []
    for _ in range(count):
        x = torch.randn(*shape, d1, generator=g)
        y = x[..., :d2] * 0.5 + torch.randn(*shape, d2, generator=g)
        out.append((x, y))
    return out


def test_accumulator_under_budget_equals_concatenated_cka():
    data = batches(0)
    acc = CKAAccumulator(max_tokens=1000)
    for x, y in data:
        acc.update(x, y)
    xs = torch.cat([x.reshape(-1, 6) for x, _ in data])
    ys = torch.cat([y.reshape(-1, 5) for _, y in data])
    assert (acc.n_seen, acc.n_kept) == (42, 42)
    assert acc.value() == pytest.approx(linear_cka(xs, ys), abs=1e-12)
    assert torch.equal(acc.rows[0], xs)  # arrival order kept


def test_accumulator_mask_drops_padding_even_with_garbage():
    clean = CKAAccumulator(max_tokens=9, seed=3)
    masked = CKAAccumulator(max_tokens=9, seed=3)
    g = gen(1)
    for x, y in batches(2, count=4):
        mask = torch.rand(x.shape[:-1], generator=g) < 0.6
        mask[0, 0] = True
        keep = mask.reshape(-1)
        clean.update(x.reshape(-1, 6)[keep], y.reshape(-1, 5)[keep])
        x, y = x.clone(), y.clone()
        x[~mask] = float("nan")
        y[~mask] = 1e30
        masked.update(x, y, mask=mask.long())
    assert masked.n_seen == clean.n_seen < 4 * 14
    assert masked.n_kept == 9
    assert torch.equal(masked.rows[0], clean.rows[0])
    assert masked.value() == clean.value()


def test_accumulator_keeps_at_most_max_tokens():
    acc = CKAAccumulator(max_tokens=10)
    for x, y in batches(0, count=5, shape=(3, 4)):
        acc.update(x, y)
        assert acc.n_kept <= 10
    acc.update(*batches(1, count=1, shape=(50,))[0])  # one batch bigger than the budget
    assert (acc.n_seen, acc.n_kept) == (110, 10)
    assert acc.rows[0].shape == (10, 6) and acc.rows[1].shape == (10, 5)
    assert 0.0 <= acc.value() <= 1.0


def test_accumulator_deterministic_per_seed():
    def run(seed):
        acc = CKAAccumulator(max_tokens=8, seed=seed)
        for x, y in batches(5, count=4):
            acc.update(x, y)
        return acc.rows[0]

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_accumulator_sample_is_uniform_over_all_updates():
    # 4 updates of 10 rows, budget 10: every update should keep ~2.5 rows on average, not the first or
    # last batch only. Row i holds the value i in its first feature.
    counts = torch.zeros(4)
    trials = 300
    for seed in range(trials):
        acc = CKAAccumulator(max_tokens=10, seed=seed)
        for b in range(4):
            ids = torch.arange(b * 10, b * 10 + 10, dtype=torch.float32)[:, None]
            acc.update(ids.expand(10, 2), ids)
        counts += torch.bincount((acc.rows[1][:, 0] // 10).long(), minlength=4)
    share = counts / (10 * trials)
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.04), share


def test_accumulator_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    acc = CKAAccumulator(max_tokens=5, seed=1)
    for x, y in batches(0):
        acc.update(x, y)
    acc.value()
    assert torch.equal(torch.get_rng_state(), state)


def test_accumulator_stores_float32_for_half_inputs():
    acc = CKAAccumulator(max_tokens=100)
    x, y = batches(0, count=1)[0]
    acc.update(x.half(), y.bfloat16())
    assert acc.rows[0].dtype == torch.float32 and acc.rows[1].dtype == torch.float32
    assert acc.rows[0].requires_grad is False
    assert acc.value() == pytest.approx(linear_cka(x.half().reshape(-1, 6), y.bfloat16().reshape(-1, 5)), abs=1e-12)


def test_accumulator_errors():
    with pytest.raises(ValueError, match="no tokens"):
        CKAAccumulator(max_tokens=4).value()
    acc = CKAAccumulator(max_tokens=4)
    acc.update(torch.randn(3, 4), torch.randn(3, 2), mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no tokens"):  # only padding was seen
        acc.value()
    with pytest.raises(ValueError, match="max_tokens"):
        CKAAccumulator(max_tokens=0)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 4, 4\)"):
        acc.update(torch.randn(2, 3, 4), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        acc.update(torch.randn(2, 3, 4), torch.randn(2, 3, 4), mask=torch.ones(3, 2))
    with pytest.raises(TypeError, match="mask"):
        acc.update(torch.randn(2, 3, 4), torch.randn(2, 3, 4), mask=torch.ones(2, 3))
    acc.update(torch.randn(3, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match="feature sizes"):
        acc.update(torch.randn(3, 5), torch.randn(3, 2))


def test_core_modules_import_only_torch_and_stdlib():
    core = Path(cka_module.__file__).parent
    for name in ("cka.py", "schedule.py"):
        tree = ast.parse((core / name).read_text())
        roots = {
            (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
        assert roots <= allowed, f"{name} imports {roots - allowed}"
