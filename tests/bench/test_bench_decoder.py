"""The bench's decoder run as a QLoRA user runs it: a 4-bit base prepared by peft, LoRA on every projection,
linear learning-rate decay, gradient checkpointing as a flag. On a tiny random LLaMA saved to a folder."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_safe.bench.cli import _check_args, build_parser
from peft_safe.bench.data import Task
from peft_safe.bench.runs import build_model, lr_scheduler, run_one

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _args(folder: str, *extra: str):
    parser = build_parser()
    args = parser.parse_args(["--task", "wikitext2", "--model", folder, "--steps", "4", "--batch-size", "2",
                              "--score-every", "1", "--final-freeze-fraction", "1", "--quiet", "--device", "cpu",
                              "--measure-every", "2", *extra])
    _check_args(parser, args)
    return args


def _task(folder: str) -> Task:
    generator = torch.Generator().manual_seed(0)

    def blocks(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 128, (n, 16), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    return Task("wikitext2", "causal_lm", folder, None, blocks(8), blocks(2), blocks(4))


def test_the_decoder_task_defaults_to_qlora_with_linear_decay(llama_folder):
    args = _args(llama_folder)
    assert (args.bits, args.lr_schedule, args.checkpointing) == (4, "linear", "none")
    classification = build_parser().parse_args([])
    _check_args(build_parser(), classification)
    assert (classification.bits, classification.lr_schedule) == (32, "constant")


@pytest.mark.parametrize("checkpointing", ["none", "non-reentrant"])
def test_the_decoder_model_is_4bit_with_lora_on_every_projection(llama_folder, checkpointing):
    import bitsandbytes as bnb

    args = _args(llama_folder, "--checkpointing", checkpointing)
    model = build_model(_task(llama_folder), "lora", True, args, seed=0, total_steps=4)
    adapted = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert set(adapted) == PROJECTIONS  # all-linear: attention and MLP, not the output head
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in adapted.values())
    assert all(m.get_base_layer().weight.quant_type == "nf4" for m in adapted.values())
    blocks = model.base_model.model.model.layers
    assert all(block.gradient_checkpointing is (checkpointing != "none") for block in blocks)


def test_linear_decay_reaches_zero_at_the_last_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    args = build_parser().parse_args(["--lr-schedule", "linear"])
    scheduler = lr_scheduler(optimizer, args, total_steps=4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert lr_scheduler(optimizer, build_parser().parse_args([]), 4) is None  # constant


def test_a_4bit_safe_run_with_checkpointing_freezes_a_bottom_prefix_and_reports_the_cut(llama_folder):
    args = _args(llama_folder, "--checkpointing", "non-reentrant", "--tau", "1.0")
    result, _ = run_one(_task(llama_folder), "lora", True, args, seed=0)
    assert result["steps"] == 4 and torch.isfinite(torch.tensor(result["metric"]))
    units, frozen = result["units"], set(result["frozen_units"])
    assert frozen, "tau 1 on shares freezes the bottom blocks holding under all of the importance"
    assert [u in frozen for u in units] == sorted((u in frozen for u in units), reverse=True)  # a bottom prefix
    assert result["cut_block"] == units[len(frozen)]
    assert result["memory_series"][-1]["flops"] > 0


def test_evaluating_after_each_epoch_reports_the_series_and_leaves_training_untouched(llama_folder):
    # issue 24: the paper regime's decoder reports validation perplexity after each epoch. The evaluation runs
    # between steps: it must give back train mode (LoRA's dropout) and dropout's RNG, so the run trains exactly as
    # without it. It runs under scoring's preserved_state, which also keeps bitsandbytes from repacking the 4-bit
    # weights on an AVX512-BF16 CPU (checked where one runs, by tests/safe/method/test_scoring_4bit_cpu.py).
    parser = build_parser()
    runs = {}
    for extra in ((), ("--eval-each-epoch",)):
        args = parser.parse_args(["--task", "wikitext2", "--model", llama_folder, "--epochs", "2", "--batch-size", "2",
                                  "--score-every", "2", "--quiet", "--device", "cpu", "--measure-every", "2", *extra])
        _check_args(parser, args)
        runs[bool(extra)], _ = run_one(_task(llama_folder), "lora", True, args, seed=0)
    series = runs[True]["metric_series"]
    assert [step for step, _ in series] == [4, 8] and series[-1][1] == runs[True]["metric"]
    assert series[0][1] != series[1][1] and all(torch.isfinite(torch.tensor(m)) for _, m in series)
    assert runs[False]["metric_series"] == [(8, runs[False]["metric"])]
    assert runs[True]["loss_series"] == runs[False]["loss_series"]
    assert runs[True]["metric"] == runs[False]["metric"]
