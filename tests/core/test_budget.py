"""The checkpointing plan under a memory budget (core.budget): its peak formula, choices and value checks."""

from __future__ import annotations

import itertools

import pytest

from peft_safe.core.budget import BlockCosts, check_memory_budget, plan_checkpointing, predicted_peak

COSTS = BlockCosts(tokens=100, saved=[40, 40, 40, 40], kept=[4, 4, 4, 4], outside=10)


def brute_force_peak(costs: BlockCosts, first_live: int, checkpointed: list[bool]) -> int:
    """Bytes alive at every moment of a step, walked event by event (forward up, backward down)."""
    live = [i for i in range(len(costs.saved)) if i >= first_live]
    held = sum(costs.kept[i] if checkpointed[i] else costs.saved[i] for i in live)
    peak = held + costs.outside  # the end of forward; the head's backward then frees what it saved
    for i in reversed(live):  # backward, top down
        if checkpointed[i]:
            peak = max(peak, held + costs.saved[i])  # recomputed, while its input is still kept
            held -= costs.kept[i]
        else:
            held -= costs.saved[i]
    return peak


@pytest.mark.parametrize("first_live", [0, 1, 2, 4])
def test_predicted_peak_is_the_step_walked_event_by_event_for_every_bottom_run_of_checkpointed_blocks(first_live):
    costs = BlockCosts(tokens=10, saved=[30, 50, 20, 40], kept=[3, 9, 2, 5], outside=7)
    for flags in itertools.product([False, True], repeat=4):
        checkpointed = list(flags)
        if any(checkpointed[i] for i in range(first_live) if i < 4):
            continue
        # the plans only checkpoint a bottom run of live blocks, which the formula is for
        if all(not checkpointed[i] or all(checkpointed[first_live:i]) for i in range(first_live, 4)):
            assert predicted_peak(costs, first_live, checkpointed) == brute_force_peak(costs, first_live, checkpointed)


def test_nothing_is_checkpointed_when_the_step_fits():
    flags, peak = plan_checkpointing(COSTS, 0, budget=170)
    assert flags == [False] * 4 and peak == 170


def test_the_lowest_live_blocks_are_checkpointed_first_and_only_as_many_as_needed():
    flags, peak = plan_checkpointing(COSTS, 0, budget=100)
    assert flags == [True, True, False, False]  # 10 + 8 + 80 = 98; one block fewer would be 10 + 4 + 120
    assert peak == 98 <= 100


def test_blocks_below_the_cut_are_never_checkpointed_and_freezing_gives_checkpointing_back_from_the_top():
    warm, _ = plan_checkpointing(COSTS, 0, budget=100)
    frozen_two, peak = plan_checkpointing(COSTS, 2, budget=100)
    assert frozen_two == [False, False, False, False] and peak == 90  # two live blocks fit without checkpointing
    frozen_one, _ = plan_checkpointing(COSTS, 1, budget=100)
    assert frozen_one == [False, True, False, False]
    assert sum(frozen_one) < sum(warm)


def test_an_unreachable_budget_checkpoints_every_live_block_and_reports_the_peak_over_it():
    flags, peak = plan_checkpointing(COSTS, 1, budget=20)
    assert flags == [False, True, True, True]
    assert peak == 12 + 40 > 20  # recomputing the top block, its input and the two below it kept


def test_costs_scale_with_tokens_and_round_up():
    scaled = BlockCosts(tokens=3, saved=[10], kept=[1], outside=2).scaled(4)
    assert (scaled.tokens, scaled.saved, scaled.kept, scaled.outside) == (4, [14], [2], 3)


def test_costs_round_trip_and_malformed_or_foreign_costs_are_refused():
    assert BlockCosts.from_dict(COSTS.to_dict()) == COSTS
    for bad in ({}, {**COSTS.to_dict(), "saved": [1, -2, 3, 4]}, {**COSTS.to_dict(), "kept": [1]},
                {**COSTS.to_dict(), "tokens": 0}, [1, 2]):
        with pytest.raises(ValueError, match="corrupt"):
            BlockCosts.from_dict(bad)
    with pytest.raises(ValueError, match="another model"):
        BlockCosts.from_dict(COSTS.to_dict(), blocks=6)


@pytest.mark.parametrize("value", [None, 0.4, 1.0, 1, 10**9])
def test_valid_budgets_pass(value):
    assert check_memory_budget(value) == value


@pytest.mark.parametrize("value, named", [(0.0, "(0, 1]"), (1.5, "as an int"), (-3, "at least 1 byte"),
                                          (0, "at least 1 byte"), (float("nan"), "nan"), ("0.4", "'0.4'"),
                                          (True, "True")])
def test_bad_budgets_name_the_value_and_the_fix(value, named):
    with pytest.raises(ValueError, match="memory_budget") as info:
        check_memory_budget(value)
    assert named in str(info.value)


@pytest.mark.parametrize("value", [-0.5, -2.0])
def test_a_negative_fraction_is_not_told_to_become_a_byte_count_that_is_refused_too(value):
    # issue 21.12: -0.5 was advised "give bytes as an int (memory_budget=0)", and 0 is refused as well
    with pytest.raises(ValueError, match="must be positive.*fraction in \\(0, 1\\].*None") as info:
        check_memory_budget(value)
    assert "memory_budget=0)" not in str(info.value) and "memory_budget=-" not in str(info.value).split(":")[1]
