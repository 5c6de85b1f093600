"""SAFECallback's probe set from what a Trainer or TRL user has at hand, made into batches of model inputs.

Accepted: ready batches (dicts of tensors), tokenized examples (a ``datasets.Dataset`` or list of dicts, e.g.
``trainer.train_dataset`` after TRL's tokenisation), raw text examples (``{"text"}``; ``{"prompt", "completion"}``
or ``{"prompt", "chosen"}``; ``{"messages"}`` with the tokenizer's chat template) and a list of strings. Text is
tokenised with the Trainer's processing class; columns the model's forward does not take are dropped (and
sequence labels, which ``DataCollatorWithPadding`` cannot pad and scoring does not need). Without any probe set
the first examples of the Trainer's training data are held as the probe set.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["examples_to_batches", "is_batch_list", "take", "take_batches"]

MODEL_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values")


def is_batch_list(data: Any) -> bool:
    """Whether ``data`` is a list of ready batches (mappings holding a tensor of at least 2 dimensions)."""
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)) or len(data) == 0:
        return False
    first = data[0]
    import torch

    # a Mapping, not only a dict: a tokenizer's BatchEncoding (return_tensors="pt") is a ready batch too
    return isinstance(first, Mapping) and any(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in first.values())


def take(data: Any, n: int) -> Any:
    """The first ``n`` examples of a dataset or list."""
    if hasattr(data, "select"):  # datasets.Dataset
        return data.select(range(min(n, len(data))))
    return list(data)[:n]


def take_batches(loader: Iterable[Any], n: int) -> list[Any]:
    """The first batches of ``loader`` (a DataLoader) holding at least ``n`` examples between them."""
    import torch

    batches, seen = [], 0
    for batch in loader:
        batches.append(batch)
        values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
        sizes = [v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() >= 1]
        seen += sizes[0] if sizes else 1
        if seen >= n:
            break
    return batches


def _rows(data: Any) -> Iterable[Any]:
    return (data[i] for i in range(len(data)))


def _text_of(row: Any, processing_class: Any) -> str | None:
    """The text of a raw example, or None when it is not one."""
    if isinstance(row, str):
        return row
    if not isinstance(row, Mapping):
        return None
    if isinstance(row.get("text"), str):
        return row["text"]
    prompt = row.get("prompt")
    answer = row.get("completion", row.get("chosen"))
    if isinstance(prompt, str) and isinstance(answer, str):
        return prompt + answer
    messages = row.get("messages")
    if isinstance(messages, list) and getattr(processing_class, "chat_template", None):
        return processing_class.apply_chat_template(messages, tokenize=False)
    return None


def _tokenise(texts: list[str], processing_class: Any, max_length: int | None) -> list[dict]:
    limit = max_length or min(getattr(processing_class, "model_max_length", 1024) or 1024, 1024)
    encoded = processing_class(texts, truncation=True, max_length=limit)
    return [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]


def examples_to_batches(
    examples: Any, model: Any, processing_class: Any, collator: Any, batch_size: int, max_length: int | None
) -> list[Any]:
    """Batches of model inputs from examples of any accepted form (see the module docstring).

    Raises:
        ValueError: for examples that are neither text nor hold a model input, or that cannot be collated.
    """
    raw = list(_rows(examples))
    params = inspect.signature(model.forward).parameters
    inputs = [name for name in MODEL_INPUTS if name in params]
    if raw and not (isinstance(raw[0], Mapping) and any(name in raw[0] for name in inputs)):
        texts = [_text_of(row, processing_class) for row in raw]
        if any(text is None for text in texts):
            keys = sorted(raw[0]) if isinstance(raw[0], Mapping) else type(raw[0]).__name__
            raise ValueError(
                f"SAFECallback's probe examples have keys {keys} but none of the model's inputs {inputs}, and no "
                "text SAFE can tokenise ('text', 'prompt' + 'completion' or 'chosen', 'messages'): tokenize them "
                "first, e.g. dataset.map(lambda x: tokenizer(x['text']), batched=True)."
            )
        if processing_class is None or not callable(processing_class):
            keys = sorted(raw[0]) if isinstance(raw[0], Mapping) else type(raw[0]).__name__
            raise ValueError(
                f"SAFECallback's probe examples are raw text ({keys}, none of the model's inputs {inputs}) and the "
                "Trainer has no tokenizer to tokenise them with: pass processing_class=tokenizer to the Trainer, "
                "or tokenize them first, e.g. dataset.map(lambda x: tokenizer(x['text']), batched=True)."
            )
        raw = _tokenise(texts, processing_class, max_length)
    accepted = set(params) | {"labels", "label"}
    rows = [
        {k: v for k, v in dict(row).items() if k in accepted and not (k in ("labels", "label") and _is_list(v))}
        for row in raw
    ]
    try:
        return [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"SAFECallback could not collate its probe examples into batches ({err}). Examples of different "
            "lengths need padding: give the Trainer its tokenizer (processing_class=tokenizer) or pass "
            "data_collator=DataCollatorWithPadding(tokenizer) to SAFECallback."
        ) from err


def _is_list(value: Any) -> bool:
    import torch

    return isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() >= 1)


def default_collator(processing_class: Any) -> Any:
    """``DataCollatorWithPadding`` with the Trainer's tokenizer, else ``default_data_collator``."""
    from transformers import DataCollatorWithPadding, default_data_collator

    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
    if tokenizer is not None and hasattr(tokenizer, "pad"):
        return DataCollatorWithPadding(tokenizer)
    return default_data_collator
