"""The meter's view of SAFE's prefix cache (``cache_frozen``): which steps were served, the hit rate, the bytes
held, and FLOPs counted once per distinct step even though a served step costs less than a computed one."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_safe.measure import TrainingMeter

pytestmark = pytest.mark.usefixtures("single_thread_torch")

EXAMPLES, BATCH, SEQ = 8, 4, 6


def run(tiny, flops: str, cache: bool = True, epochs: int = 3, freeze_after: dict | None = None) -> TrainingMeter:
    """Three epochs of a tiny BERT under SAFE with units 0 and 1 frozen, each epoch in another order;
    ``freeze_after`` maps a step's index to the units frozen after it."""
    base = tiny.bert(layers=4)
    config = tiny.safe_config("bert", cache_frozen=cache, schedule_unit="step")
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    model.base_model.auto_driver.stand_down("frozen by hand")
    model.train()
    model.base_model.freeze([0, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    meter = TrainingMeter(model, optimizer, measure_every=100, flops=flops)
    ids = tiny.ids(EXAMPLES, SEQ)
    labels = torch.arange(EXAMPLES) % 2
    for epoch in range(epochs):
        order = torch.randperm(EXAMPLES, generator=torch.Generator().manual_seed(epoch))
        for rows in order.split(BATCH):
            batch = {"input_ids": ids[rows], "attention_mask": torch.ones(len(rows), SEQ), "labels": labels[rows]}
            with meter.step(batch=batch, measure=flops == "measured"):  # "measured" counts on measured steps
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.base_model.freeze((freeze_after or {}).get(meter.records[-1].step, []))
    meter.close()
    return meter


def test_the_meter_reports_served_steps_hit_rate_and_bytes(tiny):
    meter = run(tiny, "none")
    assert [r.cache_served for r in meter.records] == [False, False, True, True, True, True]
    assert [r.cache_row_hits for r in meter.records] == [0, 0, 4, 4, 4, 4]
    summary = meter.summary()
    assert summary.cache_served_steps == 4 and summary.cache_hit_rate == pytest.approx(16 / 24)
    assert summary.peak_cache_bytes == EXAMPLES * SEQ * 32 * 4  # float32 rows of hidden size 32
    plain = run(tiny, "none", cache=False).summary()
    assert (plain.cache_served_steps, plain.cache_hit_rate, plain.peak_cache_bytes) == (None, None, None)


def test_cached_flops_count_served_and_computed_steps_each_as_counting_every_step_does(tiny):
    cached, counted = run(tiny, "cached"), run(tiny, "measured")
    counted_flops = [r.flops for r in counted.records]
    assert [r.flops for r in cached.records] == counted_flops
    assert counted_flops[2] < counted_flops[0]  # a served step skips two of the four blocks' forward
    # counted: the first two steps of each kind, computed and served (a kind's count is cached from its second: the
    # first may do one-off work); the cache tells the meter before each step whether it will serve it
    assert [r.flops_counted for r in cached.records] == [True, True, True, True, False, False]
    assert cached.summary().total_flops == sum(counted_flops)


def test_the_cache_figures_reach_the_trainer_logs(tiny):
    from peft_safe import MeasureCallback
    from peft_safe.safe.method.driver import progress_record

    meter = run(tiny, "none", epochs=2)
    entry = MeasureCallback()._log_entry(meter.records[-1])
    assert entry["memory/cache_served"] == 1 and entry["memory/cache_bytes"] == EXAMPLES * SEQ * 32 * 4
    safe = meter.model.base_model
    record = progress_record(safe, 4, [])
    assert record["safe/cache_hit_rate"] == pytest.approx(0.5) and record["safe/cache_served_forwards"] == 2
    assert record["safe/cache_bytes"] == EXAMPLES * SEQ * 32 * 4 and record["safe/cache_disk_bytes"] == 0
    assert "memory/cache_served" not in MeasureCallback()._log_entry(run(tiny, "none", cache=False).records[-1])
    safe.peft_config["default"].cache_frozen = False
    assert not any(key.startswith("safe/cache") for key in progress_record(safe, 4, []))


def test_a_served_step_waiting_for_a_count_gets_one_even_when_the_run_ends_early(tiny):
    # two epochs: computed, computed, served, served. The first served step is not counted; the second is its
    # kind's first count, which it must take (no later step of that kind comes).
    cached, counted = run(tiny, "cached", epochs=2), run(tiny, "measured", epochs=2)
    assert [r.cache_served for r in cached.records] == [False, False, True, True]
    assert all(r.flops is not None for r in cached.records)
    assert cached.summary().total_flops == sum(r.flops for r in counted.records)


def test_a_served_step_right_before_a_freeze_gets_its_own_count(tiny):
    # the first served step (index 2) is the last of its kind: unit 2 freezes after it, the cut moves, the rows go
    cached = run(tiny, "cached", freeze_after={2: [2]})
    counted = run(tiny, "measured", freeze_after={2: [2]})
    assert [r.cache_served for r in cached.records[:4]] == [False, False, True, False]
    assert cached.records[2].flops_counted and cached.records[2].flops < cached.records[0].flops
    assert [r.flops for r in cached.records] == [r.flops for r in counted.records]
    assert cached.summary().total_flops == sum(r.flops for r in counted.records)
