"""The report of one tiny ``peft-safe bench`` run (tiny random BERT, tiny CSV; see conftest.py): its JSON, the
statistics over seeds (:mod:`peft_safe.bench.report`), the printed table and the plots."""

from __future__ import annotations

import json
import statistics

import pytest

from peft_safe.bench.cli import main
from peft_safe.bench.report import format_table

pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def report(assets, tiny_argv, single_thread_torch):
    """One bench run: two adapters, two seeds, 12 steps each."""
    out = assets["root"] / "out"
    assert main(tiny_argv(assets, out, "--seeds", "2", "--adapters", "lora,pfeiffer")) == 0
    with open(out / "bench.json") as handle:
        return json.load(handle), out


def runs_of(report, adapter, safe):
    return [r for r in report["results"] if r["adapter"] == adapter and r["safe"] is safe]


def test_json_holds_config_results_series_and_history(report, bench_layers):
    data, _ = report
    assert set(data) == {"config", "summary", "results"}
    config = data["config"]
    assert config["adapters"] == ["lora", "pfeiffer"] and config["seeds"] == 2
    assert config["kind"] == "classification" and config["metric"] == "accuracy" and config["num_labels"] == 2
    assert config["total_steps"] == 12  # 32 examples / batch 8 * 3 epochs
    assert len(data["results"]) == 2 * 2 * 2  # adapters x seeds x (without, with SAFE)
    for run in data["results"]:
        assert run["steps"] == 12 and len(run["loss_series"]) == 12
        assert 0.0 <= run["metric"] <= 1.0
        steps = [m["step"] for m in run["memory_series"]]
        assert steps[:4] == [0, 3, 6, 9] or run["safe"]  # every 3rd step; SAFE adds the first after a freeze
        assert steps[-1] == 11  # the last step is always measured
        for entry in run["memory_series"]:
            assert entry["training_bytes"] == (
                entry["activation_bytes"] + entry["gradient_bytes"] + entry["optimizer_state_bytes"]
            )
        assert run["total_flops"] > 0 and run["train_time_s"] > 0
        if run["safe"]:
            assert run["units"] == [f"bert.encoder.layer.{i}" for i in range(bench_layers)]
            assert [h["t"] for h in run["importance_history"]] == [2, 4, 6, 8, 10, 12]
            assert set(run["freeze_steps"]) == set(run["frozen_units"])
        else:
            assert run["units"] == [] and run["importance_history"] == [] and run["scoring_time_s"] == 0


def test_same_seed_same_data_same_start_for_both_runs(report):
    data, _ = report
    for adapter in ("lora", "pfeiffer"):
        for base, safe in zip(runs_of(data, adapter, False), runs_of(data, adapter, True)):
            assert base["seed"] == safe["seed"]
            first_freeze = min(t for t in safe["freeze_steps"].values())
            # identical initialisation, batches and dropout until SAFE first changes something
            assert base["loss_series"][:first_freeze] == safe["loss_series"][:first_freeze]
            assert base["memory"]["after_step"] == safe["memory"]["after_step"]  # compared over the same window


def test_a_seed_run_alone_reproduces_that_seed_of_a_longer_run(report, assets, tiny_argv, tmp_path):
    """Seeds can run in parallel processes (--first-seed) and give the figures the sequential run gives."""
    data, _ = report
    argv = tiny_argv(assets, tmp_path, "--seeds", "1", "--first-seed", "1", "--adapters", "lora")
    assert main(argv) == 0
    alone = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["seed"], r["safe"]) for r in alone] == [(1, False), (1, True)]
    for run in alone:
        (same,) = [r for r in runs_of(data, "lora", run["safe"]) if r["seed"] == 1]
        assert run["loss_series"] == same["loss_series"] and run["metric"] == same["metric"]
        assert run["freeze_steps"] == same["freeze_steps"]


def test_safe_freezes_and_saves_memory_and_flops(report):
    data, _ = report
    for safe in runs_of(data, "lora", True):
        assert len(safe["frozen_units"]) >= 2
    lora = data["summary"]["lora"]
    assert lora["after_training_bytes"]["ratio"] < 0.8
    assert lora["total_flops"]["ratio"] < 1.0
    assert lora["peak_training_bytes"]["ratio"] == pytest.approx(1.0, abs=0.05)  # warm-up trains everything


def test_ratios_means_and_spreads_come_from_the_runs(report):
    data, _ = report
    for adapter in ("lora", "pfeiffer"):
        base, safe = runs_of(data, adapter, False), runs_of(data, adapter, True)
        figures = data["summary"][adapter]
        for key, get in (
            ("metric", lambda r: r["metric"]),
            ("avg_training_bytes", lambda r: r["memory"]["avg_training_bytes"]),
            ("after_training_bytes", lambda r: r["memory"]["after_training_bytes"]),
            ("total_flops", lambda r: r["total_flops"]),
            ("train_time_s", lambda r: r["train_time_s"]),
        ):
            base_values, safe_values = [get(r) for r in base], [get(r) for r in safe]
            entry = figures[key]
            assert entry["baseline"]["values"] == base_values and entry["safe"]["values"] == safe_values
            assert entry["baseline"]["std"] == pytest.approx(statistics.stdev(base_values))
            assert entry["ratio"] == pytest.approx(statistics.fmean(safe_values) / statistics.fmean(base_values))
        assert figures["peak_cuda_max_memory_allocated"]["ratio"] is None  # CPU run: no CUDA figure


def test_memory_summary_matches_the_series(report):
    data, _ = report
    for run in data["results"]:
        series, memory = run["memory_series"], run["memory"]
        assert memory["avg_training_bytes"] == pytest.approx(statistics.fmean(m["training_bytes"] for m in series))
        assert memory["peak_training_bytes"] == max(m["training_bytes"] for m in series)
        after = [m["training_bytes"] for m in series if m["step"] >= memory["after_step"]]
        assert memory["after_training_bytes"] == pytest.approx(statistics.fmean(after))


def test_plots_are_written_next_to_the_json(report):
    _, out = report
    for adapter in ("lora", "pfeiffer"):
        for kind in ("importance", "freeze_timeline", "memory"):
            path = out / f"{kind}_{adapter}.png"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_has_a_row_group_per_adapter(report, assets, capsys):
    data, _ = report
    table = format_table(data["results"], data["summary"])
    assert "[LoRA]" in table and "[pfeiffer]" in table
    ratio = data["summary"]["lora"]["avg_training_bytes"]["ratio"]
    line = next(line for line in table.splitlines() if line.startswith("avg training memory"))
    assert line.split()[-1] == f"{ratio:.3f}"
    assert "±" in line  # two seeds: spread shown
