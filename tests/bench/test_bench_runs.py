"""The bench's runs (:mod:`peft_safe.bench.runs`): SAFE's schedule from the bench flags, and :func:`perplexity`
(exp of the token-weighted mean next-token loss) on blocks or on batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peft_safe.bench.cli import build_parser
from peft_safe.bench.runs import adapter_config, perplexity, safe_config

pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


@pytest.mark.parametrize("final, cap, expected", [(0.4, None, 0.35), (0.3, None, 0.15), (0.4, 0.1, 0.1)])
def test_warmup_cap_defaults_to_35_percent_of_the_run_unless_t_f_comes_first(final, cap, expected):
    args = build_parser().parse_args(["--final-freeze-fraction", str(final)]
                                     + (["--warmup-cap-fraction", str(cap)] if cap else []))
    config = safe_config(adapter_config("lora", args, 1000, "SEQ_CLS"), args, 1000, "SEQ_CLS")
    assert config.warmup_cap == pytest.approx(1000 * expected) and config.final_freeze_time == int(1000 * final)


def test_warmup_cap_falls_back_to_half_of_t_f_when_rounding_puts_it_past_t_f():
    args = build_parser().parse_args(["--score-every", "1"])
    # 6 steps: t_f rounds to 2 steps, 35 % of the run (2.1) would pass it, so the cap falls back to half of t_f
    short = safe_config(adapter_config("lora", args, 6, "SEQ_CLS"), args, 6, "SEQ_CLS")
    assert (short.final_freeze_time, short.warmup_cap) == (2, 1.0)


@pytest.mark.parametrize("flags, expected", [([], "float64"), (["--cka-precision", "float32"], "float32")])
def test_the_cka_precision_flag_reaches_safe(flags, expected):
    args = build_parser().parse_args(flags)
    assert safe_config(adapter_config("lora", args, 1000, "SEQ_CLS"), args, 1000, "SEQ_CLS").cka_precision == expected


def _token_perplexity(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """exp(NLL summed over every predicted token / their count), from the logits of one forward."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    return math.exp(float(nll) / int((labels[:, 1:] != -100).sum()))


def test_perplexity_of_blocks_and_of_batches_is_the_token_weighted_one(tiny):
    model = tiny.gpt2().train()
    blocks = torch.randint(0, tiny.vocab, (5, 9), generator=torch.Generator().manual_seed(0))
    expected = _token_perplexity(model.eval(), blocks, blocks)
    model.train()
    by_blocks = perplexity(model, blocks, batch_size=2)  # batches of 2, 2 and 1 blocks
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in blocks.split(3)]
    assert by_blocks == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, batches) == pytest.approx(expected, rel=1e-5)
    assert model.training  # given back in the mode it was in


def test_perplexity_weights_each_batch_by_the_tokens_it_predicts(tiny):
    model = tiny.gpt2()
    ids = torch.randint(0, tiny.vocab, (4, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[2:, :6] = -100  # the second batch predicts 2 tokens per row, the first 7
    batches = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    assert perplexity(model, batches) == pytest.approx(_token_perplexity(model, ids, labels), rel=1e-5)
    assert not model.training


@pytest.mark.parametrize(
    "data, batch_size, message",
    [
        ("blocks", None, "needs batch_size >= 1, got None"),
        ("blocks", 0, "needs batch_size >= 1, got 0"),
        ("flat", 2, "blocks of shape (n_blocks, seq_len), got shape (8,)"),
        ("batches", 2, "batch_size=2 goes with a tensor of blocks"),
        ("unlabelled", None, "has no 'labels' (keys: ['input_ids'])"),
        ("one_token", 2, "found no token to predict"),
    ],
)
def test_perplexity_rejects_what_it_cannot_score(tiny, data, batch_size, message):
    ids = torch.zeros(2, 8, dtype=torch.long)
    given = {"blocks": ids, "flat": ids[0], "batches": [{"input_ids": ids, "labels": ids}],
             "unlabelled": [{"input_ids": ids}], "one_token": ids[:, :1]}[data]
    with pytest.raises(ValueError) as error:
        perplexity(tiny.gpt2(), given, batch_size)
    assert message in str(error.value)
