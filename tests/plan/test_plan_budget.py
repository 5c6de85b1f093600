"""The planner's memory-budget section: block costs against what SAFE measures, the rows and the largest batch."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from plan_cases import TINY_B, TINY_C, settings

from peft_safe.plan.budget import largest_batch, plan_budget
from peft_safe.plan.cli import main
from peft_safe.plan.formulas import block_costs, plan_memory
from peft_safe.plan.shapes import ALL_PROJECTIONS, PRESETS
from peft_safe.plan.validation import ValidationCase, _build_model

GIB = 1 << 30


@pytest.mark.parametrize("shape, setup", [
    (TINY_B, settings(bits=32)),
    (TINY_C, settings(bits=32, target_modules=ALL_PROJECTIONS)),
    (TINY_B, settings(bits=4, target_modules=ALL_PROJECTIONS)),
])
def test_planned_block_costs_are_what_safes_budget_measures(shape, setup, tmp_path):
    """The plan's per-block bytes against SAFEConfig(memory_budget=...)'s own measurement on a real model."""
    model = _build_model(ValidationCase(shape, setup, 0), str(tmp_path), memory_budget=0.5)
    safe = model.base_model
    assert safe.checkpoint_budget is not None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, shape.vocab_size, (setup.batch_size, setup.seq_len), generator=generator)
    model.train()
    model(input_ids=ids, labels=ids)
    measured = safe.freeze_state.block_costs
    planned = block_costs(shape, setup)
    assert measured["tokens"] == planned.tokens
    assert measured["kept"] == planned.kept
    for got, want in zip(measured["saved"], planned.saved):
        assert got == pytest.approx(want, rel=0.10)  # the planner's bar against measurement


def test_under_a_budget_safe_checkpoints_fewer_blocks_as_more_freeze_and_fits_what_checkpointing_fits():
    shape = PRESETS["llama-2-7b"]
    setup = dataclasses.replace(settings(bits=4), batch_size=16, seq_len=512)
    rows = {row.setting: row for row in plan_budget(shape, setup, 24 * GIB, frozen=[0, 8, 16, 24])}
    assert not rows["LoRA"].fits and rows["LoRA + checkpointing"].fits  # 16 x 512 needs checkpointing
    safe = [rows[f"SAFE k={k}"] for k in (0, 8, 16, 24)]
    assert all(row.fits for row in safe)
    counts = [row.checkpointed_blocks for row in safe]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert 0 < counts[0] < shape.num_layers  # a budget checkpoints only what it needs
    assert largest_batch(shape, setup, 24 * GIB, "SAFE k=0") == largest_batch(shape, setup, 24 * GIB,
                                                                               "LoRA + checkpointing")
    assert largest_batch(shape, setup, 24 * GIB, "LoRA") < largest_batch(shape, setup, 24 * GIB, "SAFE k=0")


def test_the_plain_rows_match_the_memory_plan():
    shape, setup = TINY_B, settings(bits=32)
    rows = plan_budget(shape, setup, GIB)
    assert rows[0].total_bytes == plan_memory(shape, setup)[0].total_bytes
    checkpointed = dataclasses.replace(setup, gradient_checkpointing=True)
    assert rows[1].total_bytes == plan_memory(shape, checkpointed)[0].total_bytes


def test_cli_memory_section_in_text_and_json(capsys):
    assert main(["--model", "llama-2-7b", "--batch-size", "4", "--seq-len", "512", "--memory", "24"]) == 0
    text = capsys.readouterr().out
    assert "on a GPU of 24.0 GiB" in text and "largest batch at seq 512" in text
    assert main(["--model", "llama-2-7b", "--batch-size", "4", "--memory", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory"]["bytes"] == 24 * GIB
    assert out["memory"]["largest_batch"]["SAFE k=0"] == out["memory"]["largest_batch"]["LoRA + checkpointing"]
    with pytest.raises(SystemExit):
        main(["--memory", "0"])
    assert "--memory must be a positive" in capsys.readouterr().err
