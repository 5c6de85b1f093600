"""``peft-safe frontier``: runs of several bench summaries as points relative to the plain adapter of their own
seed, averaged per method, printed and drawn (``peft_safe/bench/frontier.py``)."""

from __future__ import annotations

import json

import pytest

from peft_safe.bench.frontier import frontier, main, points
from peft_safe.cli import main as console


def run(seed: int, metric: float, memory: float, flops: float, time_s: float, safe: bool = False,
        variant: str | None = None, frozen: int = 0, freeze_steps: dict | None = None, freeze_at: int | None = None):
    return {"adapter": "lora", "seed": seed, "safe": safe, "variant": variant, "metric": metric,
            "memory": {"avg_training_bytes": memory}, "total_flops": flops, "total_time_s": time_s,
            "frozen_units": [f"u{i}" for i in range(frozen)], "freeze_steps": freeze_steps or {},
            "freeze_at": freeze_at}


def report(seed: int, lora_memory: float, tau: float = 0.3) -> dict:
    # every figure of a seed's runs is a multiple of its plain run's, so the ratios are the same on both seeds
    results = [
        run(seed, 0.80, lora_memory, 1000.0, 100.0),
        run(seed, 0.79 + seed * 0.02, 0.4 * lora_memory, 600.0, 70.0, safe=True, frozen=4,
            freeze_steps={"u0": 120, "u1": 120, "u2": 160, "u3": None}),
        run(seed, 0.78, 0.5 * lora_memory, 700.0, 80.0, variant="prefix:3@safe", frozen=3, freeze_at=120),
    ]
    return {"config": {"metric": "accuracy", "tau": tau}, "summary": {}, "results": results}


def test_points_are_relative_to_the_plain_run_of_their_own_seed():
    rows = points([report(0, 1000.0), report(1, 3000.0)])
    assert [r["method"] for r in rows] == ["lora", "SAFE tau=0.3", "prefix:3@safe"] * 2
    safe = [r for r in rows if r["method"] == "SAFE tau=0.3"]
    assert [r["memory_ratio"] for r in safe] == pytest.approx([0.4, 0.4])  # not 0.4 x the mean LoRA memory
    assert [r["metric_delta"] for r in safe] == pytest.approx([-0.01, 0.01])
    assert [r["freeze_at"] for r in safe] == [120, 120] and safe[0]["frozen"] == 4
    entries = {e["method"]: e for e in frontier(rows)}
    assert entries["SAFE tau=0.3"]["metric"]["mean"] == pytest.approx(0.80)
    assert entries["SAFE tau=0.3"]["metric"]["std"] == pytest.approx(0.02 / 2 ** 0.5)
    assert entries["prefix:3@safe"]["flops_ratio"]["mean"] == pytest.approx(0.7)
    assert entries["lora"]["time_ratio"] == {"mean": 1.0, "std": 0.0} and entries["lora"]["seeds"] == [0, 1]


def test_a_sweep_point_names_its_tau_and_the_prefix_frozen_at_its_first_freeze():
    rows = points([report(0, 1000.0, tau=0.5)])
    assert [r["method"] for r in rows] == ["lora", "SAFE tau=0.5", "prefix:3@safe (SAFE tau=0.5)"]


def test_the_command_prints_the_table_and_writes_the_plot_and_json(tmp_path, capsys):
    files = []
    for seed in (0, 1):
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(report(seed, 1000.0)))
    plot, out = tmp_path / "frontier.png", tmp_path / "frontier.json"
    assert console(["frontier", *map(str, files), "--plot", str(plot), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SAFE tau=0.3" in printed and "80.00 ± 1.41" in printed and "0.400x" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [e["method"] for e in json.loads(out.read_text())] == ["lora", "SAFE tau=0.3", "prefix:3@safe"]


def test_a_file_that_is_not_a_summary_is_refused_with_the_fix(tmp_path, capsys):
    bad = tmp_path / "model.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(SystemExit) as info:
        main([str(bad)])
    assert info.value.code == 2 and "--summary-json" in capsys.readouterr().err


def test_a_sweep_point_pairs_with_the_plain_run_of_a_summary_of_the_same_flags_only(capsys, tmp_path):
    full = report(0, 1000.0)
    full["config"].update({"task_name": "rotten_tomatoes", "lr": 5e-4})
    sweep = {"config": {"metric": "accuracy", "tau": 0.5, "task_name": "rotten_tomatoes", "lr": 5e-4}, "summary": {},
             "results": [run(0, 0.81, 300.0, 500.0, 50.0, safe=True, frozen=5)]}
    rows = {r["method"]: r for r in points([full, sweep])}
    assert rows["SAFE tau=0.5"]["memory_ratio"] == pytest.approx(0.3)
    assert rows["SAFE tau=0.5"]["metric_delta"] == pytest.approx(0.01)
    assert rows["SAFE tau=0.5"]["time_ratio"] is None  # another process's times are not compared
    entries = {e["method"]: e for e in frontier(list(rows.values()))}
    assert entries["SAFE tau=0.5"]["time_ratio"] is None and entries["lora"]["time_ratio"]["mean"] == 1.0
    other = {**sweep, "config": {**sweep["config"], "lr": 1e-3}}  # another learning rate: another plain run
    unpaired: list[str] = []
    assert [r["method"] for r in points([full, other], unpaired)] == ["lora", "SAFE tau=0.3", "prefix:3@safe"]
    assert unpaired == ["SAFE tau=0.5 seed 0"]
    files = [tmp_path / "seed0.json", tmp_path / "tau.json"]
    for path, data in zip(files, (full, other)):
        path.write_text(json.dumps(data))
    assert main(list(map(str, files))) == 0
    assert "SAFE tau=0.5 seed 0" in capsys.readouterr().err
