"""SAFE's schedule end to end in a plain PyTorch loop, and the warm-up rules at the policy level.

The issue's "done when": on a tiny 12-layer random BERT trained a few epochs, the schedule leaves warm-up,
units freeze for good, frozen parameters stop changing, and the activation memory of a training step falls as
the bottom units freeze.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import PAPER_RULE, SEQ, marker_task, tiny_bert
from transformers import BertForSequenceClassification

import peft_safe  # noqa: F401  (registers the SAFE peft type)
from peft_safe import FreezeState, SAFEConfig
from peft_safe.core.policy import SchedulePolicy
from peft_safe.measure import SavedTensorMeter

BATCH = 16


pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


# ---------------------------------------------------------------------------------------------- builders
def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic task of tests/marker_task.py, as (input_ids, labels)."""
    return marker_task(n, seed, SEQ)


def batches(ids: torch.Tensor, labels: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(ids), BATCH):
        batch = {"input_ids": ids[i : i + BATCH], "attention_mask": torch.ones_like(ids[i : i + BATCH])}
        if labels is not None:
            batch["labels"] = labels[i : i + BATCH]
        out.append(batch)
    return out


def bert(layers: int, seed: int = 0) -> BertForSequenceClassification:
    return tiny_bert(layers, seed)


def safe_bert(layers: int, seed: int = 0, **safe_kwargs):
    config = SAFEConfig(
        adapter_config=LoraConfig(r=4, target_modules=["query", "value"]), task_type="SEQ_CLS",
        **{**PAPER_RULE, **safe_kwargs},
    )
    return get_peft_model(bert(layers, seed), config)


def unit_params(peft_model, unit: str) -> dict[str, torch.nn.Parameter]:
    prefix = f"base_model.model.{unit}."
    return {n: p for n, p in peft_model.named_parameters() if n.startswith(prefix) and ".lora_" in n}


def train_epoch(peft_model, optimizer, train_batches) -> float:
    peft_model.train()
    total = 0.0
    for batch in train_batches:
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item()
    return total / len(train_batches)


def activation_bytes(peft_model, batch) -> int:
    """Bytes autograd saves for backward in one training forward (parameters excluded)."""
    peft_model.train()
    torch.manual_seed(123)  # same dropout masks for every measurement
    with SavedTensorMeter(exclude=peft_model) as meter:
        loss = peft_model(**batch).loss
    del loss
    return meter.activation_bytes


def lowest_trainable(units: list[str], frozen: set[str]) -> int:
    """Index of the lowest unit still training (len(units) when all are frozen)."""
    return next((i for i, unit in enumerate(units) if unit not in frozen), len(units))


# ---------------------------------------------------------------------------------------------- the 12-layer run
LAYERS = 12
EPOCHS = 6
RUN = dict(tau=0.7, final_freeze_time=6, warmup_cap=2, schedule_unit="epoch", importance_scale="normalized")


@pytest.fixture(scope="module")
def run12(single_thread_torch):
    """Train a 12-layer SAFE-LoRA BERT for EPOCHS epochs, calling update_and_freeze after each; record everything."""
    peft_model = safe_bert(LAYERS, seed=0, **RUN)
    safe = peft_model.base_model
    units = safe.adapter_units
    train_batches = batches(*task(96, seed=1))
    probe = batches(task(32, seed=2)[0])
    measure_batch = train_batches[0]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    record = {
        "units": units,
        "bytes": [activation_bytes(peft_model, measure_batch)],
        "frozen": [set()],
        "newly": [],
        "warmup_end": [],
        "losses": [],
        "train_mode_kept": [],
        "snapshots": {},  # unit -> (epoch it froze, its parameters right after)
        "optimizer": optimizer,
    }
    for epoch in range(1, EPOCHS + 1):
        record["losses"].append(train_epoch(peft_model, optimizer, train_batches))
        newly = safe.update_and_freeze(epoch, probe, optimizer=optimizer)
        record["train_mode_kept"].append(peft_model.training)
        record["newly"].append(newly)
        record["warmup_end"].append(safe.freeze_state.warmup_end)
        record["frozen"].append(set(safe.frozen_units))
        for unit in newly:
            record["snapshots"][unit] = (
                epoch, {n: p.detach().clone() for n, p in unit_params(peft_model, unit).items()}
            )
        record["bytes"].append(activation_bytes(peft_model, measure_batch))
    record["model"] = peft_model
    return record


def test_run_leaves_warmup_and_freezes_units(run12):
    assert len(run12["units"]) == LAYERS
    warmup_end = run12["warmup_end"][-1]
    assert warmup_end is not None and warmup_end <= RUN["warmup_cap"]
    # once found, t_w never moves
    found = [w for w in run12["warmup_end"] if w is not None]
    assert found and all(w == warmup_end for w in found)
    final = run12["frozen"][-1]
    assert final and final != set(run12["units"])
    # nothing freezes while warming up, nor at t_w itself (T(t_w) = 0)
    for epoch, newly in enumerate(run12["newly"], start=1):
        if epoch <= warmup_end:
            assert newly == []


def test_frozen_units_grow_monotonically_and_never_thaw(run12):
    safe = run12["model"].base_model
    frozen_sets = run12["frozen"]
    assert all(a <= b for a, b in zip(frozen_sets, frozen_sets[1:]))
    assert len({len(s) for s in frozen_sets}) >= 3, "freezing should spread over several epochs"
    for epoch, newly in enumerate(run12["newly"], start=1):
        assert set(newly) == frozen_sets[epoch] - frozen_sets[epoch - 1]
        assert all(safe.freeze_state.frozen[u] == epoch for u in newly)
    # the final state agrees with what update_and_freeze reported
    assert set(safe.freeze_state.frozen) == frozen_sets[-1]


def test_importance_below_threshold_is_what_freezes(run12):
    safe = run12["model"].base_model
    state = safe.freeze_state
    frozen_before: set[str] = set()
    for entry, newly in zip(state.history, run12["newly"]):
        raw = entry["scores"]
        top = max(raw.values())
        normalized = {u: s / top for u, s in raw.items()}
        threshold = safe.threshold(entry["t"])
        expected = {u for u, s in normalized.items() if s < threshold and u not in frozen_before}
        assert set(newly) == expected
        frozen_before |= set(newly)


def test_frozen_parameters_stop_changing_and_leave_the_optimizer(run12):
    peft_model = run12["model"]
    optimizer = run12["optimizer"]
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    in_state = {id(p) for p in optimizer.state}
    assert set(run12["snapshots"]) == run12["frozen"][-1]
    for unit, (epoch, snapshot) in run12["snapshots"].items():
        params = unit_params(peft_model, unit)
        assert params.keys() == snapshot.keys() and len(params) == 4
        for name, param in params.items():
            assert not param.requires_grad and param.grad is None, name
            assert torch.equal(param.detach(), snapshot[name]), f"{name} changed after freezing at epoch {epoch}"
            assert id(param) not in in_groups and id(param) not in in_state, name
    for unit in set(run12["units"]) - run12["frozen"][-1]:
        assert all(p.requires_grad and id(p) in in_groups for p in unit_params(peft_model, unit).values())


def test_scoring_keeps_the_model_in_training_mode(run12):
    assert all(run12["train_mode_kept"])


def test_activation_bytes_fall_as_bottom_units_freeze(run12):
    units, frozen_sets, measured = run12["units"], run12["frozen"], run12["bytes"]
    lows = [lowest_trainable(units, s) for s in frozen_sets]
    assert lows[-1] > lows[0] == 0, "the run should freeze the bottom unit(s) to exercise backprop truncation"
    for i in range(1, len(measured)):
        if frozen_sets[i] == frozen_sets[i - 1]:
            assert measured[i] == measured[i - 1]
        else:  # any newly frozen unit drops its saved LoRA intermediates
            assert measured[i] < measured[i - 1]
        if lows[i] > lows[i - 1]:
            # the blocks below the lowest trainable one save nothing any more: a drop of whole blocks
            per_block = measured[0] / LAYERS
            assert measured[i - 1] - measured[i] > 0.5 * per_block * (lows[i] - lows[i - 1])
    # almost linear in the number of blocks still on the backward path (one block of slack)
    assert measured[-1] < measured[0] * (LAYERS - lows[-1] + 1) / LAYERS


@pytest.mark.parametrize("count", [3, 6, 9])
def test_freezing_from_the_bottom_saves_activations_linearly_freezing_the_middle_does_not(count):
    batch = batches(*task(BATCH, seed=5))[0]
    full = activation_bytes(safe_bert(LAYERS), batch)
    bottom = safe_bert(LAYERS)
    bottom.base_model.freeze(list(range(count)))
    middle = safe_bert(LAYERS)
    start = (LAYERS - count) // 2
    middle.base_model.freeze(list(range(start, start + count)))
    bottom_ratio = activation_bytes(bottom, batch) / full
    middle_ratio = activation_bytes(middle, batch) / full
    remaining = (LAYERS - count) / LAYERS
    assert bottom_ratio == pytest.approx(remaining, abs=0.05)  # the design's 25 % for 9 of 12
    assert middle_ratio > 0.9  # the design's ~95 % for the middle 6
    assert bottom_ratio < middle_ratio


# ---------------------------------------------------------------------------------------------- warm-up on real scores
def short_run(epochs: list[float], steps_per_epoch: int = 2, **safe_kwargs):
    """A 4-layer model trained a little between scorings at the given times; returns the model and newly lists."""
    peft_model = safe_bert(4, seed=1, **safe_kwargs)
    safe = peft_model.base_model
    ids, labels = task(BATCH * steps_per_epoch, seed=3)
    train_batches = batches(ids, labels)
    probe = batches(task(BATCH, seed=4)[0])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    newly_by_time = []
    for t in epochs:
        train_epoch(peft_model, optimizer, train_batches)
        newly_by_time.append((t, safe.update_and_freeze(t, probe, optimizer=optimizer), safe.freeze_state.warmup_end))
    return peft_model, newly_by_time


def test_per_unit_rule_with_tiny_tolerance_warms_up_until_the_cap_then_freezes():
    peft_model, timeline = short_run(
        [1, 2, 3, 4], warmup_rule="per_unit", warmup_tolerance=1e-9, warmup_cap=3, final_freeze_time=5, tau=1.0
    )
    safe = peft_model.base_model
    for t, newly, warmup_end in timeline[:2]:
        assert warmup_end is None and newly == [] and safe.threshold(t) == 0.0
    t, newly, warmup_end = timeline[2]
    assert warmup_end == 3 and newly == []  # the cap ends warm-up; T(t_w) = 0
    t, newly, _ = timeline[3]
    threshold = 1.0 * (1 - (1 - (4 - 3) / (5 - 3)) ** 3)  # 0.875
    assert safe.threshold(4) == pytest.approx(threshold)
    raw = safe.freeze_state.history[-1]["scores"]
    top = max(raw.values())
    assert set(newly) == {u for u, s in raw.items() if s / top < threshold}
    assert newly  # at least one unit scored below 7/8 of the top one


def test_warmup_ending_at_or_after_final_freeze_time_freezes_at_tau_at_once():
    # scoring at 1 then 6: the cap (4) is passed at t=6 >= t_f=5, so T jumps straight to tau
    peft_model, timeline = short_run(
        [1, 6], warmup_rule="per_unit", warmup_tolerance=1e-9, warmup_cap=4, final_freeze_time=5, tau=1.0
    )
    safe = peft_model.base_model
    assert timeline[0][1] == [] and timeline[0][2] is None
    t, newly, warmup_end = timeline[1]
    assert warmup_end == 6
    assert safe.threshold(6) == 1.0
    raw = safe.freeze_state.history[-1]["scores"]
    top_unit = max(raw, key=raw.get)
    # tau = 1 on the normalized scale: all units but the top scorer freeze in that one scoring, at t=6
    assert set(newly) == set(safe.adapter_units) - {top_unit}
    assert all(safe.freeze_state.frozen[u] == 6 for u in newly)


# ---------------------------------------------------------------------------------------------- policy level
# A short real run as the design describes it: the bottom unit's score is tiny and doubles every epoch, the
# others have settled.
def growing_bottom(t: int) -> dict[str, float]:
    return {"block.0": 0.001 * 2 ** (t - 1), "block.1": 0.12, "block.2": 0.2}


def policy(rule: str, cap: float | None, floor: float = 0.0) -> SchedulePolicy:
    return SchedulePolicy(
        tau=0.5, final_freeze_time=6, warmup_rule=rule, warmup_tolerance=0.05, warmup_floor=floor, warmup_cap=cap,
        importance_scale="normalized",
    )


def play(pol: SchedulePolicy, times, scores_at) -> tuple[FreezeState, dict]:
    """Advance the policy through the scoring times; returns the state and the units it froze at each time."""
    state = FreezeState(units=["block.0", "block.1", "block.2"], final_freeze_time=pol.final_freeze_time)
    newly = {}
    for t in times:
        newly[t] = pol.advance(state, t, scores_at(t))
        for unit in newly[t]:  # recording the freeze is the caller's job, as SAFEModel.freeze does
            state.frozen[unit] = t
    return state, newly


def test_relative_norm_ends_warmup_on_tiny_growing_bottom_scores():
    # t=2: ||diff|| = 0.001, ||scores|| = sqrt(0.002^2 + 0.12^2 + 0.2^2) ~ 0.233 -> 0.4 % < 5 %: settled.
    state, newly = play(policy("relative_norm", cap=None), [1, 2, 3, 4], growing_bottom)
    assert state.warmup_end == 2
    assert newly[2] == []  # T(t_w) = 0
    # t=3: T = 0.5 * (1 - (3/4)^3) = 0.2890625; normalized scores 0.02, 0.6, 1 -> block.0 freezes
    assert newly[3] == ["block.0"]
    # t=4: T = 0.5 * (1 - (1/2)^3) = 0.4375 < 0.6 -> nothing new
    assert newly[4] == []
    assert state.frozen == {"block.0": 3}


def test_per_unit_rule_without_floor_never_ends_warmup_on_the_same_scores():
    state, newly = play(policy("per_unit", cap=None), [1, 2, 3, 4, 5, 6, 7], growing_bottom)
    assert state.warmup_end is None
    assert state.frozen == {} and all(v == [] for v in newly.values())


def test_per_unit_rule_without_floor_waits_for_the_cap():
    state, newly = play(policy("per_unit", cap=3), [1, 2, 3, 4], growing_bottom)
    assert state.warmup_end == 3
    assert newly[1] == newly[2] == newly[3] == []
    # t=4: T = 0.5 * (1 - (1 - 1/3)^3) = 0.5 * 19/27 ~ 0.352; block.0 normalized 0.04 freezes
    assert newly[4] == ["block.0"]
    assert state.frozen == {"block.0": 4}


def test_per_unit_rule_with_floor_ignores_the_tiny_scores():
    state, _ = play(policy("per_unit", cap=None, floor=0.01), [1, 2], growing_bottom)
    assert state.warmup_end == 2


def test_policy_warmup_found_after_final_time_jumps_to_tau():
    # The bottom score doubles until t=7, then holds: per_unit settles at t=8 > t_f=6, so T(8) = tau = 0.5.
    def scores(t: int) -> dict[str, float]:
        return {"block.0": 0.001 * 2 ** (min(t, 7) - 1), "block.1": 0.09, "block.2": 0.2}

    state, newly = play(policy("per_unit", cap=None), [1, 2, 3, 4, 5, 6, 7, 8], scores)
    assert state.warmup_end == 8
    assert all(newly[t] == [] for t in range(1, 8))
    # normalized at t=8: block.0 = 0.064 / 0.2 = 0.32, block.1 = 0.45, block.2 = 1 -> both below 0.5 freeze at once
    assert newly[8] == ["block.0", "block.1"]
    assert state.frozen == {"block.0": 8, "block.1": 8}


# ---------------------------------------------------------------------------------- scoring is free of side effects
def test_scoring_that_freezes_nothing_trains_bit_identically_to_plain_lora():
    """SAFE scoring every step (dropout on, AdamW) must not change training: RNG, modes, grads all untouched.

    If scoring drew random numbers, left a module in eval mode or touched optimizer state, a SAFE run that
    never freezes would drift from plain LoRA; any accuracy gap in a real run would then not be SAFE's doing.
    """
    train_batches = batches(*task(64, seed=1))
    probe = batches(task(16, seed=2)[0])

    def build(use_safe: bool):
        base = bert(3, seed=0)
        torch.manual_seed(1)
        config = LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.1, task_type="SEQ_CLS")
        if use_safe:  # warm-up can never end here, so the threshold stays 0 and nothing freezes
            config = SAFEConfig(adapter_config=config, task_type="SEQ_CLS", schedule_unit="step", scoring_interval=1,
                                final_freeze_time=10_000, warmup_cap=9_999, warmup_tolerance=1e-12)
        return get_peft_model(base, config)

    def trainable(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def train(use_safe: bool):
        model = build(use_safe)
        initial = trainable(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(2)  # dropout masks
        losses, step = [], 0
        model.train()
        for _ in range(2):
            for batch in train_batches:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                if use_safe:
                    assert model.base_model.update_and_freeze(step, probe, optimizer=optimizer) == []
        return losses, initial, trainable(model)

    plain_losses, plain_initial, plain = train(False)
    safe_losses, safe_initial, safe = train(True)
    assert all(torch.equal(safe_initial[n], plain_initial[n]) for n in plain_initial)
    assert all(not torch.equal(plain[n], plain_initial[n]) for n in plain if ".lora_B." in n)  # training moved them
    assert safe_losses == plain_losses
    assert safe.keys() == plain.keys()
    assert all(torch.equal(safe[n], plain[n]) for n in plain)


# ---------------------------------------------------------------------------------- default warm-up tolerance
def growing_then_jittering(t: int) -> dict[str, float]:
    """Like the real MiniLM runs (docs/method.md): scores grow ~3x per scoring until t=4, then jitter by +-10 %."""
    level = 3.0 ** (min(t, 4) - 1)
    jitter = 1.0 if t <= 4 else (1.1 if t % 2 else 0.9)
    return {"block.0": 0.001 * level * jitter, "block.1": 0.02 * level, "block.2": 0.06 * level * jitter}


@pytest.mark.parametrize("tolerance, end", [(None, 5), (0.05, None)])
def test_default_tolerance_ends_warmup_on_jittering_plateau_where_five_percent_does_not(tolerance, end):
    config = SAFEConfig(adapter_config=LoraConfig(target_modules=["query"]), warmup_tolerance=tolerance)
    pol = SchedulePolicy(tau=0.5, final_freeze_time=100, warmup_rule=config.warmup_rule,
                         warmup_tolerance=config.warmup_tolerance_value, importance_scale="normalized")
    state, _ = play(pol, range(1, 11), growing_then_jittering)
    # growth (t <= 4) moves the vector by 2/3 of its norm per scoring; 4 -> 5 by ~9 %, then +-10 % swings by ~20 %
    assert state.warmup_end == end


def test_model_schedule_uses_the_rules_default_tolerance():
    for rule, expected in (("relative_norm", 0.15), ("per_unit", 0.05)):
        model = safe_bert(2, warmup_rule=rule)
        assert model.base_model.schedule.warmup_tolerance == expected
