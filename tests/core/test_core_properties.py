"""Property tests for the pure core (hypothesis): CKA, the accumulator, the schedule, the policy and the state.

CKA: invariants (orthogonal maps, isotropic scaling, a shared permutation of the tokens, repeating every token,
permuting or translating features), range [0, 1], the accumulator's token budget. Schedule: the cubic's shape,
never below the linear ramp and continuous at t_w and t_f; normalised scores ignore the scale of the raw ones.
Policy and state: a whole run of scorings keeps its invariants (frozen units never thaw, warm-up ends by the cap,
only units below the threshold freeze, the state survives JSON); a refused scoring leaves the state unchanged.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_safe.core.cka import CKAAccumulator, importance_from_cka, linear_cka
from peft_safe.core.policy import SchedulePolicy
from peft_safe.core.schedule import cubic_threshold, normalize_scores, units_below, warmup_converged
from peft_safe.core.state import FreezeState


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Textbook linear CKA: HSIC with H = I - 11^T / n, in float64 (same as in test_cka.py)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x.double() @ x.double().T, y.double() @ y.double().T  # noqa: E741
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))

FAST = settings(max_examples=50, deadline=None)
FEW = settings(max_examples=40, deadline=None)  # the run-long properties: each example is a whole run

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
    y = x @ torch.randn(d1, d2, generator=g, dtype=torch.float64)
    y = y + torch.randn(n, d2, generator=g, dtype=torch.float64)
    return x, y, g


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
    x, y, _ = random_pair(seed, n, d1, d2)
    assert math.isclose(linear_cka(x, y), reference_cka(x, y), abs_tol=1e-9)


@FAST
@given(seeds, st.integers(2, 30), dims, dims, st.sampled_from([1e-20, 1e-3, 1.0, 7.5, 1e20]))
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(seed, n, d1, d2, scale):
    x, y, _ = random_pair(seed, n, d1, d2)
    g = torch.Generator().manual_seed(seed + 1)
    q, _ = torch.linalg.qr(torch.randn(d2, d2, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert math.isclose(linear_cka(x, scale * (y @ q)), base, abs_tol=1e-9)
    assert math.isclose(linear_cka(scale * x, y), base, abs_tol=1e-9)


@FAST
@given(seeds, st.integers(1, 20), st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_cka_low_precision_and_constant_inputs_never_nan(seed, n, dtype):
    x, y, _ = random_pair(seed, n, 4, 3)
    assert 0.0 <= linear_cka(x.to(dtype), y.to(dtype)) <= 1.0
    const = torch.full((n, 3), 2.0, dtype=dtype)
    assert linear_cka(const, const) == 1.0
    expected_single = 1.0 if n < 2 else 0.0
    assert linear_cka(x.to(dtype) * 0 + 1, y.to(dtype) + torch.arange(n, dtype=dtype)[:, None]) == expected_single


@FAST
@given(seeds, st.lists(st.integers(0, 12), min_size=1, max_size=6), st.integers(1, 20))
def test_accumulator_budget_and_under_budget_equality(seed, batch_sizes, max_tokens):
    x, y, _ = random_pair(seed, sum(batch_sizes), 3, 2)
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


# ---------------------------------------------------------------------------------------------- CKA
@FEW
@given(seeds, st.integers(2, 24), st.integers(1, 10), st.integers(1, 10))
def test_cka_ignores_token_order_and_repetition(seed, n, d1, d2):
    x, y, g = random_pair(seed, n, d1, d2)
    base = linear_cka(x, y)
    perm = torch.randperm(n, generator=g)
    assert math.isclose(linear_cka(x[perm], y[perm]), base, abs_tol=1e-9)
    # every token twice: same distribution of rows, same CKA (and n crosses d, so both forms are exercised)
    assert math.isclose(linear_cka(x.repeat(2, 1), y.repeat(2, 1)), base, abs_tol=1e-9)


@FEW
@given(seeds, st.integers(2, 24), st.integers(1, 10), st.integers(1, 10), st.floats(-1e3, 1e3))
def test_cka_ignores_feature_order_and_per_feature_offsets(seed, n, d1, d2, offset):
    x, y, g = random_pair(seed, n, d1, d2)
    base = linear_cka(x, y)
    shift = offset * torch.randn(1, d1, generator=g, dtype=torch.float64)
    assert math.isclose(linear_cka(x[:, torch.randperm(d1, generator=g)] + shift, y), base, abs_tol=1e-7)


@FEW
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_importance_of_any_finite_cka_is_in_the_unit_interval(cka):
    importance = importance_from_cka(cka)
    assert 0.0 <= importance <= 1.0
    if 0.0 <= cka <= 1.0:
        assert importance == 0.0 or math.isclose(importance, 1.0 - cka)


# ---------------------------------------------------------------------------------------------- schedule
times = st.floats(0, 100, allow_nan=False)


@FEW
@given(times, times, st.floats(0.001, 50), st.floats(0, 1))
def test_cubic_threshold_lies_above_the_linear_ramp_and_is_continuous(t, t_w, span, tau):
    t_f = t_w + span
    value = cubic_threshold(t, t_w, t_f, tau)
    if t_w <= t <= t_f:
        linear = tau * (t - t_w) / (t_f - t_w)
        assert value >= linear - 1e-12
    assert cubic_threshold(t_w, t_w, t_f, tau) == pytest.approx(0.0, abs=1e-12)
    assert cubic_threshold(t_f, t_w, t_f, tau) == pytest.approx(tau)
    just_before = t_f - span * 1e-9
    assert cubic_threshold(just_before, t_w, t_f, tau) == pytest.approx(tau, abs=1e-6)


score_maps = st.dictionaries(st.sampled_from("abcdefgh"), st.floats(0, 1), min_size=1, max_size=8)


@FEW
@given(score_maps, st.floats(1e-6, 1e6))
def test_normalised_scores_and_relative_norm_warmup_ignore_the_scale(scores, factor):
    scaled = {u: s * factor for u, s in scores.items()}
    for unit, value in normalize_scores(scaled, "normalized").items():
        assert value == pytest.approx(normalize_scores(scores, "normalized")[unit], rel=1e-9, abs=1e-12)
    moved = {u: s * 1.3 + 0.01 for u, s in scores.items()}
    moved_scaled = {u: s * factor for u, s in moved.items()}
    assert warmup_converged(scores, moved, "relative_norm", 0.5) == warmup_converged(
        scaled, moved_scaled, "relative_norm", 0.5
    ) or math.isclose(  # equal unless the ratio sits on the tolerance itself
        math.hypot(*(moved[u] - scores[u] for u in scores)) / (math.hypot(*moved.values()) or 1), 0.5, rel_tol=1e-9
    )


@st.composite
def runs(draw):
    """A policy, units, and a run of scorings at increasing times with random scores."""
    units = [f"u{i}" for i in range(draw(st.integers(1, 6)))]
    t_f = draw(st.floats(1, 20))
    policy = SchedulePolicy(
        tau=draw(st.floats(0.01, 1)),
        final_freeze_time=t_f,
        warmup_rule=draw(st.sampled_from(["relative_norm", "per_unit"])),
        warmup_tolerance=draw(st.floats(0.001, 0.5)),
        warmup_cap=draw(st.floats(0.1, 1)) * t_f,
        importance_scale=draw(st.sampled_from(["normalized", "raw", "share"])),
        freeze_order=draw(st.sampled_from(["any", "prefix"])),
    )
    steps = draw(st.lists(st.floats(0.001, 3), min_size=1, max_size=8))
    times = [sum(steps[: i + 1]) for i in range(len(steps))]
    scores = [{u: draw(st.floats(0, 1)) for u in units} for _ in times]
    return policy, units, times, scores


@FEW
@given(runs())
@pytest.mark.filterwarnings("ignore:SAFE. every unit scored 0:RuntimeWarning")
def test_a_run_of_scorings_keeps_the_schedules_invariants(run):
    policy, units, times, all_scores = run
    state = FreezeState(units=list(units))
    for t, scores in zip(times, all_scores):
        frozen_before = dict(state.frozen)
        warmup_before = state.warmup_end
        trainable = {u: s for u, s in scores.items() if u not in state.frozen}
        newly = policy.advance(state, t, trainable)
        threshold = policy.threshold(t, state.warmup_end)
        if policy.importance_scale == "share":  # shares of the total, frozen units at their last score
            scaled = normalize_scores(state.last_known_scores, "share")
        else:
            scaled = normalize_scores(trainable, policy.importance_scale)
        assert not set(newly) & set(frozen_before)  # frozen units are never reported again
        if not any(s > 0 for s in trainable.values()):
            assert not newly  # scores without information freeze nothing
        elif policy.freeze_order == "any":
            below = {u for u in trainable if scaled[u] < threshold}
            if below == set(trainable):  # all of them: the top one stays trainable
                below.discard(max(trainable, key=trainable.get))
            assert below == set(newly)  # exactly the units below it
        assert len(newly) < len(trainable) or not trainable  # something always trains
        for u in newly:
            state.frozen[u] = t
        if policy.freeze_order == "prefix":
            # the frozen set is a bottom prefix: no trainable unit below a frozen one
            flags = [u in state.frozen for u in units]
            assert flags == sorted(flags, reverse=True)
            above = next((u for u in units if u not in state.frozen), None)
            if newly and policy.importance_scale == "share":
                assert math.fsum(scaled.get(u, 0.0) for u in state.frozen) < threshold
            elif newly:
                assert all(scaled[u] < threshold for u in newly)
            # the longest such prefix (unless it was held back to leave one unit trainable)
            if newly and above is not None and len(newly) < len(trainable) - 1:
                if policy.importance_scale == "share":
                    assert math.fsum(scaled.get(u, 0.0) for u in [*state.frozen, above]) >= threshold
                else:
                    assert scaled[above] >= threshold
        assert state.frozen.items() >= frozen_before.items()  # nothing thaws, freezing times never change
        if warmup_before is not None:
            assert state.warmup_end == warmup_before  # the end of warm-up is found once
        if t >= policy.warmup_cap and any(s > 0 for s in trainable.values()):
            assert state.warmup_end is not None and state.warmup_end <= t
        if not any(s > 0 for s in trainable.values()):
            assert state.warmup_end == warmup_before  # scores without information never end warm-up
        if state.warmup_end is None:
            assert not newly
        round_trip = json.loads(json.dumps(state.to_dict(), allow_nan=False))
        assert FreezeState.from_dict(round_trip).to_dict() == state.to_dict()


@FEW
@given(runs(), st.sampled_from([math.nan, math.inf, -1.0]))
def test_a_refused_scoring_leaves_the_state_as_it_was(run, bad):
    policy, units, times, all_scores = run
    state = FreezeState(units=list(units))
    policy.advance(state, times[-1], all_scores[-1])
    before = state.to_dict()
    with pytest.raises(ValueError):
        if bad == -1.0:
            policy.advance(state, times[-1], {units[0]: bad})  # a negative score
        else:
            policy.advance(state, bad, all_scores[-1])
    assert state.to_dict() == before
