"""``peft-safe bench --safe-memory-budget F``: the SAFE run's budget comes from the baseline's measured peak, and
the report compares the peaks (recompute included). On the tiny BERT and CSV of conftest.py."""

from __future__ import annotations

import json

import pytest

from peft_safe.bench.cli import main
from peft_safe.bench.runs import memory_budget_bytes
from peft_safe.measure.meter import TrainingSummary

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def test_a_budgeted_safe_run_has_a_lower_peak_than_the_baseline(assets, tiny_argv, tmp_path):
    assert main(tiny_argv(assets, tmp_path, "--safe-memory-budget", "0.5", "--no-plots")) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    base, safe = report["results"]
    assert base["memory"]["peak_step_bytes"] > 0
    assert safe["memory_budget_bytes"] == memory_budget_bytes(TrainingSummary(**base["memory"]), 0.5)
    # the step peak (what checkpointing recomputes included) of every measured step of the SAFE run
    assert max(r["peak_bytes"] for r in safe["memory_series"]) == safe["memory"]["peak_step_bytes"]
    assert safe["memory"]["peak_step_bytes"] < base["memory"]["peak_step_bytes"]
    assert report["summary"]["lora"]["peak_step_bytes"]["ratio"] < 1


def test_the_budget_leaves_the_baseline_what_it_holds_besides_activations():
    summary = TrainingSummary(steps=1, measured_steps=1, avg_training_bytes=None, after_training_bytes=None,
                              peak_training_bytes=None, avg_activation_bytes=None, after_activation_bytes=None,
                              peak_activation_bytes=800, after_step=0, total_flops=None, wall_time_s=0.0,
                              mean_unmetered_step_s=None, peak_cuda_max_memory_allocated=None, peak_step_bytes=1000)
    assert memory_budget_bytes(summary, 0.4) == 400 - 200
    from peft_safe.bench.data import BenchInputError

    with pytest.raises(BenchInputError, match="raise it"):
        memory_budget_bytes(summary, 0.2)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_a_budget_outside_the_unit_interval_is_refused(assets, tiny_argv, tmp_path, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(tiny_argv(assets, tmp_path, "--safe-memory-budget", value))
    assert info.value.code == 2
    assert "--safe-memory-budget" in capsys.readouterr().err
