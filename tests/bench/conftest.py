"""Fixtures of the ``peft-safe bench`` tests: a tiny random BERT and a tiny CSV written here, never downloaded,
and the bench flags that run them in seconds."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

WORDS = ["good", "bad", "film", "plot", "actor", "great", "boring", "the", "a", "was", "very", "fun"]
LAYERS = 4


@pytest.fixture(scope="session")
def bench_layers() -> int:
    """Transformer blocks of the tiny BERT (the SAFE units of a run)."""
    return LAYERS


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


def _tiny_argv(assets, out_dir, *extra: str) -> list[str]:
    return [
        "--task", assets["csv"], "--text-column", "review", "--label-column", "sentiment", "--model", assets["model"],
        "--train-size", "32", "--probe-size", "8", "--test-size", "12", "--batch-size", "8", "--max-length", "12",
        "--epochs", "3", "--score-every", "2", "--measure-every", "3", "--tau", "0.9", "--lr", "1e-2",
        "--final-freeze-fraction", "0.5", "--json", str(out_dir / "bench.json"), "--quiet", "--device", "cpu",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_argv():
    """``tiny_argv(assets, out_dir, *extra)``: bench flags for the tiny model and CSV, 12 steps, JSON in out_dir."""
    return _tiny_argv
