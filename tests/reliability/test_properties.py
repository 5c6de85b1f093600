"""Property tests for the pure core that tests/core/test_core_properties.py does not cover.

CKA: invariance to a shared permutation of the tokens, to repeating every token, to permuting or translating
features, and importance always in [0, 1]. Schedule: the cubic never lies below the linear ramp and is continuous
at t_w and t_f; normalised scores ignore the scale of the raw ones; a whole run of scorings keeps its invariants
(frozen units never thaw, warm-up ends by the cap, only units below the threshold freeze, the state survives
JSON); a refused scoring leaves the state unchanged.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_safe.core.cka import importance_from_cka, linear_cka
from peft_safe.core.policy import SchedulePolicy
from peft_safe.core.schedule import cubic_threshold, normalize_scores, warmup_converged
from peft_safe.core.state import FreezeState

FAST = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def random_pair(seed: int, n: int, d1: int, d2: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + torch.randn(n, d2, generator=g, dtype=torch.float64)
    return x, y, g


# ---------------------------------------------------------------------------------------------- CKA
@FAST
@given(seeds, st.integers(2, 24), st.integers(1, 10), st.integers(1, 10))
def test_cka_ignores_token_order_and_repetition(seed, n, d1, d2):
    x, y, g = random_pair(seed, n, d1, d2)
    base = linear_cka(x, y)
    perm = torch.randperm(n, generator=g)
    assert math.isclose(linear_cka(x[perm], y[perm]), base, abs_tol=1e-9)
    # every token twice: same distribution of rows, same CKA (and n crosses d, so both forms are exercised)
    assert math.isclose(linear_cka(x.repeat(2, 1), y.repeat(2, 1)), base, abs_tol=1e-9)


@FAST
@given(seeds, st.integers(2, 24), st.integers(1, 10), st.integers(1, 10), st.floats(-1e3, 1e3))
def test_cka_ignores_feature_order_and_per_feature_offsets(seed, n, d1, d2, offset):
    x, y, g = random_pair(seed, n, d1, d2)
    base = linear_cka(x, y)
    shift = offset * torch.randn(1, d1, generator=g, dtype=torch.float64)
    assert math.isclose(linear_cka(x[:, torch.randperm(d1, generator=g)] + shift, y), base, abs_tol=1e-7)


@FAST
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_importance_of_any_finite_cka_is_in_the_unit_interval(cka):
    importance = importance_from_cka(cka)
    assert 0.0 <= importance <= 1.0
    if 0.0 <= cka <= 1.0:
        assert importance == 0.0 or math.isclose(importance, 1.0 - cka)


# ---------------------------------------------------------------------------------------------- schedule
times = st.floats(0, 100, allow_nan=False)


@FAST
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


@FAST
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
    """A policy, units, and a run of scorings at non-decreasing times with random scores."""
    units = [f"u{i}" for i in range(draw(st.integers(1, 6)))]
    t_f = draw(st.floats(1, 20))
    policy = SchedulePolicy(
        tau=draw(st.floats(0.01, 1)),
        final_freeze_time=t_f,
        warmup_rule=draw(st.sampled_from(["relative_norm", "per_unit"])),
        warmup_tolerance=draw(st.floats(0.001, 0.5)),
        warmup_cap=draw(st.floats(0.1, 1)) * t_f,
        importance_scale=draw(st.sampled_from(["normalized", "raw"])),
    )
    steps = draw(st.lists(st.floats(0, 3), min_size=1, max_size=8))
    times = [sum(steps[: i + 1]) for i in range(len(steps))]
    scores = [{u: draw(st.floats(0, 1)) for u in units} for _ in times]
    return policy, units, times, scores


@FAST
@given(runs())
def test_a_run_of_scorings_keeps_the_schedules_invariants(run):
    policy, units, times, all_scores = run
    state = FreezeState(units=list(units))
    for t, scores in zip(times, all_scores):
        frozen_before = dict(state.frozen)
        warmup_before = state.warmup_end
        trainable = {u: s for u, s in scores.items() if u not in state.frozen}
        newly = policy.advance(state, t, trainable)
        threshold = policy.threshold(t, state.warmup_end)
        scaled = normalize_scores(trainable, policy.importance_scale)
        assert all(scaled[u] < threshold for u in newly)  # only units below the threshold freeze
        assert not set(newly) & set(frozen_before)  # frozen units are never reported again
        assert {u for u, s in scaled.items() if s < threshold} == set(newly)
        for u in newly:
            state.frozen[u] = t
        assert state.frozen.items() >= frozen_before.items()  # nothing thaws, freezing times never change
        if warmup_before is not None:
            assert state.warmup_end == warmup_before  # the end of warm-up is found once
        if t >= policy.warmup_cap:
            assert state.warmup_end is not None and state.warmup_end <= t
        if state.warmup_end is None:
            assert not newly
        assert FreezeState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False))).to_dict() == state.to_dict()


@FAST
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
