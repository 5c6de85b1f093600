"""The bench's data: the built-in tasks and local data files, read, split (seeded), tokenized and batched.

Owns :class:`Task`, :class:`BenchInputError` (shared by the other bench modules), reading local tables, label
ids, WikiText-2 blocks and batching. Imports torch and :mod:`peft_safe.assets` (transformers lazily, inside
the functions that tokenize); never the other bench modules, peft or the tuners.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import assets

TASKS = ("rotten_tomatoes", "trec", "wikitext2")


class BenchInputError(ValueError):
    """The data or model the flags point to cannot be used; the message says why and what to change."""


@dataclass
class Task:
    """A prepared task: tokenized splits of one seed, the model to load and how to score it.

    Attributes:
        name: the task's name (a built-in task or the data file's name).
        kind: ``"classification"`` or ``"causal_lm"``.
        model_path: the model folder.
        num_labels: number of classes (classification only).
        train, probe, test: dicts of equally long tensors (``input_ids``, ``attention_mask``, ``labels``...).
    """

    name: str
    kind: str
    model_path: str
    num_labels: int | None
    train: dict[str, torch.Tensor]
    probe: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]

    @property
    def metric_name(self) -> str:
        """``"accuracy"`` for classification, ``"perplexity"`` for a causal LM."""
        return "accuracy" if self.kind == "classification" else "perplexity"

    @property
    def peft_task_type(self) -> str:
        """The peft ``task_type`` of the task's model: ``"SEQ_CLS"`` or ``"CAUSAL_LM"``."""
        return "SEQ_CLS" if self.kind == "classification" else "CAUSAL_LM"


def load_table(path: str, text_column: str, label_column: str) -> list[tuple[str, Any]]:
    """Rows ``(text, label)`` of a local CSV file, JSON file (a list of objects) or JSON-lines file.

    Args:
        path: the file; its ending (``.csv``, ``.json``, ``.jsonl``) says how to read it.
        text_column: the column holding the text.
        label_column: the column holding the label.

    Returns:
        One ``(text, label)`` pair per row, the label as the file holds it.

    Raises:
        BenchInputError: if the file cannot be read as such, is empty, or lacks one of the columns (the message
            lists the columns it has).
    """
    rows: list[dict[str, Any]]
    if path.lower().endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    elif path.lower().endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            data = json.loads(text)
            rows = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as error:
                raise BenchInputError(f"{path} is neither a JSON list of objects nor JSON lines: {error}") from None
    else:
        raise BenchInputError(f"data file {path!r} must end in .csv, .json or .jsonl.")
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise BenchInputError(f"{path} holds no rows of named columns; it needs a header (CSV) or objects (JSON).")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise BenchInputError(
            f"{path} has no column {missing[0]!r}; its columns are {sorted(rows[0])}. "
            "Name the right ones with --text-column and --label-column."
        )
    return [(str(row[text_column]), row[label_column]) for row in rows]


def _label_ids(labels: list[Any]) -> tuple[list[int], int]:
    """Integer labels kept as they are (0..n-1); any other labels mapped to ids in sorted order.

    Returns:
        ``(ids, number of classes)``.
    """
    values = [str(v).strip() for v in labels]
    if all(v.lstrip("-").isdigit() for v in values):
        ids = [int(v) for v in values]
        if min(ids) >= 0:
            return ids, max(ids) + 1
    names = sorted(set(values))
    return [names.index(v) for v in values], len(names)


def prepare_task(args: argparse.Namespace, seed: int) -> Task:
    """Load, split (seeded) and tokenize the data of ``args.task`` for one seed.

    Args:
        args: the parsed bench flags (``task``, ``model``, the split sizes, ``max_length``, the columns).
        seed: the seed of the split (and of the shuffle of the training rows).

    Returns:
        The task, its splits tokenized to ``--max-length`` tokens.

    Raises:
        BenchInputError: if a local data file cannot be read, or a split would be empty (lower --train-size).
        FileNotFoundError: if an asset package the task needs is not installed.
    """
    from transformers import AutoTokenizer

    if args.task == "wikitext2":
        return _prepare_wikitext2(args)
    if args.task == "rotten_tomatoes":
        train, test = assets.load_rotten_tomatoes(seed=seed)
        num_labels = 2
    elif args.task == "trec":
        train, test = assets.load_trec()
        train = list(train)
        random.Random(seed).shuffle(train)
        num_labels = 1 + max(y for _, y in train + test)
    else:
        rows = load_table(args.task, args.text_column, args.label_column)
        ids, num_labels = _label_ids([y for _, y in rows])
        rows = [(text, y) for (text, _), y in zip(rows, ids)]
        random.Random(seed).shuffle(rows)
        n_test = max(1, int(len(rows) * 0.2))
        test, train = rows[:n_test], rows[n_test:]
    model_path = args.model or assets.minilm_path()
    train, probe = train[: args.train_size], train[args.train_size : args.train_size + args.probe_size]
    test = test[: args.test_size]
    if not train or not probe or not test:
        raise BenchInputError(
            f"the {args.task} data gives {len(train)} training, {len(probe)} probe and {len(test)} test rows; "
            "each split needs at least one: lower --train-size or use more data."
        )
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def encode(rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = tokenizer([t for t, _ in rows], padding="max_length", truncation=True, max_length=args.max_length,
                        return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return {**batch, "labels": torch.tensor([y for _, y in rows])}

    name = args.task if args.task in TASKS else os.path.basename(args.task)
    return Task(name, "classification", model_path, num_labels, encode(train), encode(probe), encode(test))


def _prepare_wikitext2(args: argparse.Namespace) -> Task:
    """WikiText-2 as blocks of ``--max-length`` tokens (labels = inputs), on SmolLM2 unless ``--model``.

    Raises:
        BenchInputError: if a split gives no whole block (lower --max-length).
    """
    from transformers import AutoTokenizer

    model_path = args.model or assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def blocks(split: str, count: int) -> torch.Tensor:
        ids: list[int] = []
        needed = count * args.max_length
        for line in assets.load_wikitext2(split):
            if line.strip():
                ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
            if len(ids) >= needed:
                break
        n = len(ids) // args.max_length
        if n == 0:
            raise BenchInputError(f"WikiText-2 {split} gave no block of {args.max_length} tokens; lower --max-length.")
        return torch.tensor(ids[: n * args.max_length]).view(n, args.max_length)[:count]

    train = blocks("train", args.train_size + args.probe_size)
    test = blocks("test", args.test_size)

    def as_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    return Task("wikitext2", "causal_lm", model_path, None, as_batch(train[: args.train_size]),
                as_batch(train[args.train_size :]), as_batch(test))


def iter_batches(data: dict[str, torch.Tensor], batch_size: int, order: list[int] | None = None,
                 device: torch.device | str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of the rows of ``data``, in ``order`` (default: as stored), moved to ``device``.

    Args:
        data: equally long tensors by name, as a :class:`Task`'s splits hold them.
        batch_size: rows per batch (the last batch may be shorter).
        order: the row indices to take, in the order to take them.
        device: where the batches go (None: where the tensors are).

    Yields:
        Dicts with the keys of ``data``.
    """
    n = len(data["input_ids"])
    order = order if order is not None else list(range(n))
    for i in range(0, len(order), batch_size):
        idx = torch.tensor(order[i : i + batch_size])
        yield {k: v[idx].to(device) for k, v in data.items()}
