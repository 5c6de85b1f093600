"""``peft-safe bench --baseline``: SAFE's simplest competitors (issue 24), on the tiny BERT and CSV of conftest.py.

``prefix:K@T`` freezes exactly the bottom K blocks at step T and scores nothing; ``prefix:K@safe`` takes T from
SAFE's first freeze on the seed; ``top:K`` puts no adapter below block K. Each shares its seed's plain run and is
reported like SAFE (the summary, the table)."""

from __future__ import annotations

import json

import pytest

from peft_safe.bench.baselines import Baseline, parse_baseline
from peft_safe.bench.cli import main

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def report(assets, tiny_argv, single_thread_torch):
    out = assets["root"] / "baselines"
    argv = tiny_argv(assets, out, "--baseline", "prefix:2@4", "--baseline", "prefix:1@safe", "--baseline", "top:3",
                     "--no-plots")
    assert main(argv) == 0
    return json.loads((out / "bench.json").read_text())


def runs(report, variant):
    return [r for r in report["results"] if r.get("variant") == variant]


def test_a_fixed_prefix_freezes_exactly_k_blocks_at_t_and_scores_nothing(report, bench_layers):
    (run,) = runs(report, "prefix:2@4")
    assert run["safe"] is False and run["freeze_at"] == 4
    assert run["frozen_units"] == [f"bert.encoder.layer.{i}" for i in range(2)]
    assert set(run["freeze_steps"].values()) == {4}
    assert run["importance_history"] == [] and run["scoring_time_s"] == 0.0
    assert run["cut_block"] == "bert.encoder.layer.2"  # SAFE's backprop cut: the savings are measured the same way
    assert len(run["units"]) == bench_layers


def test_a_prefix_at_safe_takes_safes_first_freeze_step(report):
    (safe,) = [r for r in report["results"] if r["safe"]]
    (run,) = runs(report, "prefix:1@safe")
    assert safe["freeze_steps"], "SAFE froze nothing: the scenario does not test T=safe"
    assert run["freeze_at"] == min(safe["freeze_steps"].values())
    assert run["frozen_units"] == ["bert.encoder.layer.0"]


def test_top_k_puts_no_adapter_below_block_k(report, assets, tiny_argv, tmp_path, bench_layers):
    from peft_safe.bench.cli import _check_args, build_parser
    from peft_safe.bench.data import prepare_task
    from peft_safe.bench.runs import build_model

    parser = build_parser()
    args = parser.parse_args(tiny_argv(assets, tmp_path))
    _check_args(parser, args)
    model = build_model(prepare_task(args, 0), "lora", False, args, 0, 12, Baseline("top", 3))
    blocks = {int(n.split("layer.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert blocks == {bench_layers - 1}  # L - K = 1 block: the top one
    (run,) = runs(report, "top:3")
    (plain,) = [r for r in report["results"] if not r["safe"] and not r.get("variant")]
    assert run["frozen_units"] == [] and run["trainable_parameters"] < plain["trainable_parameters"]


def test_each_baseline_is_summarised_and_printed_against_the_plain_adapter(report, assets, tiny_argv, capsys):
    summary = report["summary"]
    assert {"lora", "lora+prefix:2@4", "lora+prefix:1@safe", "lora+top:3"} <= set(summary)
    plain = [r for r in report["results"] if not r["safe"] and not r.get("variant")]
    for key in ("lora+prefix:2@4", "lora+top:3"):
        assert summary[key]["metric"]["baseline"]["values"] == [r["metric"] for r in plain]
        assert summary[key]["total_flops"]["ratio"] < 1.0  # fewer FLOPs than the plain adapter: a real saving
    assert summary["lora"]["metric"]["safe"]["values"] == [r["metric"] for r in report["results"] if r["safe"]]


@pytest.mark.parametrize("spec, expected", [
    ("prefix:3@120", Baseline("prefix", 3, 120)),
    ("PREFIX:2@safe", Baseline("prefix", 2, None)),
    ("top:6", Baseline("top", 6)),
])
def test_specs_parse(spec, expected):
    assert parse_baseline(spec) == expected and parse_baseline(expected.label) == expected


@pytest.mark.parametrize("spec, words", [
    ("prefix:3", "prefix:K@T"), ("bottom:2", "top:K"), ("prefix:0@10", "K must be >= 1"),
    ("prefix:2@0", "T must be an optimizer step"), ("top:0", "K must be >= 1"),
])
def test_bad_specs_are_refused_naming_the_forms(assets, tiny_argv, tmp_path, capsys, spec, words):
    with pytest.raises(SystemExit) as info:
        main(tiny_argv(assets, tmp_path, "--baseline", spec))
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_top_k_on_an_adapter_without_layers_to_transform_is_refused(assets, tiny_argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(tiny_argv(assets, tmp_path, "--baseline", "top:2", "--adapters", "lora,houlsby"))
    assert "layers_to_transform" in capsys.readouterr().err


@pytest.mark.parametrize("task, expected", [
    ("rotten_tomatoes", {"train_size": 1000, "epochs": 30, "test_size": 2000, "lr_schedule": "linear"}),
    ("wikitext2", {"train_size": 600, "max_length": 128, "epochs": 3, "batch_size": 4, "test_size": 128,
                   "probe_size": 8, "lr": 1e-3, "lr_schedule": "linear", "eval_each_epoch": True}),
])
def test_the_paper_regime_sets_the_flags_left_at_their_defaults(task, expected):
    from peft_safe.bench.cli import _check_args, build_parser

    parser = build_parser()
    args = parser.parse_args(["--task", task, "--regime", "paper", "--seeds", "3"])
    _check_args(parser, args)
    assert {name: getattr(args, name) for name in expected} == expected and args.seeds == 3
    explicit = parser.parse_args(["--task", task, "--regime", "paper", "--epochs", "2"])
    _check_args(parser, explicit)
    assert explicit.epochs == 2  # a flag given explicitly wins


def test_the_summary_json_keeps_figures_and_decisions_without_series(report, assets, tiny_argv, tmp_path):
    from peft_safe.bench.report import SERIES_KEYS, small_report

    small = small_report(report)
    assert small["summary"] == report["summary"] and len(small["results"]) == len(report["results"])
    for full, kept in zip(report["results"], small["results"]):
        assert not set(SERIES_KEYS) & set(kept)
        assert {k: v for k, v in full.items() if k not in SERIES_KEYS} == kept
    out = tmp_path / "docs" / "seed0.json"
    assert main(tiny_argv(assets, tmp_path, "--summary-json", str(out), "--no-plots", "--epochs", "1")) == 0
    assert "loss_series" not in out.read_text() and json.loads(out.read_text())["results"]


def test_a_sweep_point_without_the_plain_run_is_the_run_it_would_have_been_beside_it(report, assets, tiny_argv):
    # --no-plain skips the plain adapter; peft-safe frontier then pairs the SAFE run with the plain run of its seed
    # in another summary of the same task and flags, which is sound only if the SAFE run does not depend on it
    from peft_safe.bench.frontier import points

    out = assets["root"] / "sweep"
    assert main(tiny_argv(assets, out, "--no-plain", "--baseline", "prefix:1@safe", "--no-plots")) == 0
    sweep = json.loads((out / "bench.json").read_text())
    assert [(r["safe"], r.get("variant")) for r in sweep["results"]] == [(True, None), (False, "prefix:1@safe")]
    (alone,) = [r for r in sweep["results"] if r["safe"]]
    (beside,) = [r for r in report["results"] if r["safe"]]
    for key in ("metric", "freeze_steps", "loss_series", "total_flops"):
        assert alone[key] == beside[key], key
    rows = points([sweep, report])
    paired = [r for r in rows if r["method"] == "SAFE tau=0.9"]  # conftest's tau
    assert len(paired) == 2 and paired[0]["memory_ratio"] == pytest.approx(paired[1]["memory_ratio"])
    assert paired[0]["time_ratio"] is None and paired[1]["time_ratio"] is not None  # times of two processes: not


def test_a_sweep_point_has_no_memory_budget_to_take_from_a_plain_run(assets, tiny_argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(tiny_argv(assets, tmp_path, "--no-plain", "--safe-memory-budget", "0.5"))
    assert info.value.code == 2 and "--no-plain" in capsys.readouterr().err


def test_a_seeds_baselines_run_alone_reproduce_the_ones_run_beside_safe(report, assets, tiny_argv):
    # --no-plain --no-safe: a seed's work split over processes, the prefix frozen at the step SAFE froze at
    (safe,) = [r for r in report["results"] if r["safe"]]
    first = min(safe["freeze_steps"].values())
    out = assets["root"] / "split"
    argv = tiny_argv(assets, out, "--no-plain", "--no-safe", "--baseline", "prefix:1@safe", "--safe-freeze-step",
                     str(first), "--no-plots")
    assert main(argv) == 0
    (alone,) = json.loads((out / "bench.json").read_text())["results"]
    (beside,) = runs(report, "prefix:1@safe")
    assert alone["variant"] == "prefix:1@safe" and alone["freeze_at"] == first
    for key in ("metric", "loss_series", "frozen_units", "total_flops"):
        assert alone[key] == beside[key], key


@pytest.mark.parametrize("flags, words", [
    (("--no-safe", "--baseline", "prefix:1@safe"), "--safe-freeze-step"),
    (("--safe-freeze-step", "4"), "--no-safe"),
    (("--no-safe", "--no-plain"), "nothing to run"),
])
def test_split_runs_without_what_they_need_are_refused(assets, tiny_argv, tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as info:
        main(tiny_argv(assets, tmp_path, *flags))
    assert info.value.code == 2 and words in capsys.readouterr().err
