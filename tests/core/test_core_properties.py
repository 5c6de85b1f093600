"""Property tests for the pure core: CKA invariants, the accumulator's budget, the schedule's shape."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_safe.core.cka import CKAAccumulator, linear_cka
from peft_safe.core.schedule import cubic_threshold, normalize_scores, units_below, warmup_converged


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Textbook linear CKA: HSIC with H = I - 11^T / n, in float64 (same as in test_cka.py)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x.double() @ x.double().T, y.double() @ y.double().T  # noqa: E741
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))

FAST = settings(max_examples=50, deadline=None)

dims = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def matrix_pairs(draw):
    """Arbitrary small matrices with the same row count: rank-deficient, constant, repeated values."""
    n, d1, d2 = draw(st.integers(0, 10)), draw(dims), draw(dims)
    x = draw(st.lists(finite, min_size=n * d1, max_size=n * d1))
    y = draw(st.lists(finite, min_size=n * d2, max_size=n * d2))
    return torch.tensor(x, dtype=torch.float64).reshape(n, d1), torch.tensor(y, dtype=torch.float64).reshape(n, d2)


def random_pair(seed: int, n: int, d1: int, d2: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + torch.randn(n, d2, generator=g, dtype=torch.float64)
    return x, y


@FAST
@given(matrix_pairs())
def test_cka_in_unit_interval_finite_and_symmetric(pair):
    x, y = pair
    value = linear_cka(x, y)
    assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert math.isclose(value, linear_cka(y, x), abs_tol=1e-9)
    assert math.isclose(linear_cka(x, x), 1.0, abs_tol=1e-9)


@FAST
@given(seeds, st.integers(2, 30), dims, dims)
def test_cka_matches_reference_in_both_forms(seed, n, d1, d2):
    # n ranges over both sides of max(d1, d2), so both the feature and the Gram form are exercised.
    x, y = random_pair(seed, n, d1, d2)
    assert math.isclose(linear_cka(x, y), reference_cka(x, y), abs_tol=1e-9)


@FAST
@given(seeds, st.integers(2, 30), dims, dims, st.sampled_from([1e-20, 1e-3, 1.0, 7.5, 1e20]))
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(seed, n, d1, d2, scale):
    x, y = random_pair(seed, n, d1, d2)
    g = torch.Generator().manual_seed(seed + 1)
    q, _ = torch.linalg.qr(torch.randn(d2, d2, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert math.isclose(linear_cka(x, scale * (y @ q)), base, abs_tol=1e-9)
    assert math.isclose(linear_cka(scale * x, y), base, abs_tol=1e-9)


@FAST
@given(seeds, st.integers(1, 20), st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_cka_low_precision_and_constant_inputs_never_nan(seed, n, dtype):
    x, y = random_pair(seed, n, 4, 3)
    assert 0.0 <= linear_cka(x.to(dtype), y.to(dtype)) <= 1.0
    const = torch.full((n, 3), 2.0, dtype=dtype)
    assert linear_cka(const, const) == 1.0
    expected_single = 1.0 if n < 2 else 0.0
    assert linear_cka(x.to(dtype) * 0 + 1, y.to(dtype) + torch.arange(n, dtype=dtype)[:, None]) == expected_single


@FAST
@given(seeds, st.lists(st.integers(0, 12), min_size=1, max_size=6), st.integers(1, 20))
def test_accumulator_budget_and_under_budget_equality(seed, batch_sizes, max_tokens):
    x, y = random_pair(seed, sum(batch_sizes), 3, 2)
    acc = CKAAccumulator(max_tokens=max_tokens, seed=seed)
    start = 0
    for size in batch_sizes:
        acc.update(x[start : start + size], y[start : start + size])
        start += size
        assert acc.n_kept == min(acc.n_seen, max_tokens)
    assert acc.n_seen == len(x)
    if 0 < len(x) <= max_tokens:
        assert acc.value() == linear_cka(x, y)
    if acc.n_kept:
        kept_x = acc.rows[0]
        # Every kept row is one of the input rows, each at most once.
        matches = (kept_x[:, None, :] == x[None, :, :]).all(-1).sum(1)
        assert bool((matches >= 1).all())
        assert len(torch.unique(kept_x, dim=0)) == len(kept_x)


@FAST
@given(
    st.floats(0, 100, allow_nan=False),
    st.floats(0, 100, allow_nan=False),
    st.one_of(st.none(), st.floats(0, 50, allow_nan=False)),
    st.floats(0, 60, allow_nan=False),
    st.floats(0, 2, allow_nan=False),
)
def test_cubic_threshold_monotone_and_bounded(t1, t2, t_w, t_f, tau):
    lo, hi = sorted((t1, t2))
    a, b = cubic_threshold(lo, t_w, t_f, tau), cubic_threshold(hi, t_w, t_f, tau)
    assert 0.0 <= a <= b <= tau
    if t_w is not None and hi >= max(t_w, t_f):
        assert b == tau


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=3), st.floats(0, 1), min_size=1, max_size=8), st.floats(0.001, 1))
def test_identical_scores_converge_and_are_not_frozen_twice(scores, tolerance):
    for rule in ("relative_norm", "per_unit"):
        assert warmup_converged(scores, dict(scores), rule, tolerance)
    normalized = normalize_scores(scores, "normalized")
    top = max(scores.values())
    assert max(normalized.values()) == (1.0 if top > 0 else 0.0)
    # Normalising keeps the order of the units.
    assert all(normalized[u] <= normalized[v] for u in scores for v in scores if scores[u] <= scores[v])
    ranked = sorted(scores, key=scores.get)
    frozen = ranked[: len(ranked) // 2]
    below = units_below(normalized, 0.5, frozen)
    assert not set(below) & set(frozen)
    assert all(normalized[u] < 0.5 for u in below)
    assert below == [u for u in normalized if u in below]
    assert set(below) | set(frozen) >= {u for u in normalized if normalized[u] < 0.5}
