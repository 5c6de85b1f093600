"""``peft-safe plan`` on the command line (``peft_safe.plan.cli``): JSON, the table, and bad input as an
error naming the value and the fix."""

from __future__ import annotations

import json

import pytest

from peft_safe import cli
from peft_safe.plan.cli import main
from peft_safe.plan.shapes import ALL_PROJECTIONS


def test_cli_plan_prints_json_rows_for_lora_and_every_k(capsys):
    assert cli.main(["plan", "--model", "llama-2-7b", "--bits", "4", "--batch-size", "4", "--seq-len", "512",
                     "--all-projections", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["target_modules"] == list(ALL_PROJECTIONS)
    rows = [(r["method"], r["frozen_blocks"]) for r in plan["rows"]]
    assert rows == [("lora", 0)] + [("safe", k) for k in range(33)]
    for row in plan["rows"]:
        parts = ("weight_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes")
        assert row["total_bytes"] == sum(row[p] for p in parts)


def test_cli_plan_prints_a_human_readable_table(capsys):
    assert main(["--model", "llama-2-7b", "--bits", "4", "--batch-size", "4", "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    assert "GiB" in out and "SAFE k=32" in out and "LoRA" in out


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--model", "llama-3-70b"], ["'llama-3-70b'", "llama-2-7b"]),
        (["--model", "/no/such/config.json"], ["/no/such/config.json", "config.json"]),
        (["--bits", "3"], ["3", "4, 8, 16 or 32"]),
        (["--batch-size", "0"], ["batch_size", "0", "--batch-size"]),
        (["--seq-len", "-5"], ["seq_len", "-5", "--seq-len"]),
        (["--rank", "0"], ["lora_r", "--rank"]),
        (["--targets", "query,value"], ["query", "--all-projections"]),
    ],
)
def test_bad_input_is_an_error_naming_the_value_and_the_fix(argv, names, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err

