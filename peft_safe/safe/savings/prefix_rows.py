"""The prefix cache's rows: what keys a training example (:func:`row_keys`) and where its stored hidden states live
(:class:`RowStore`, host memory then disk, both bounded).

- **Keys cover every input the frozen prefix receives** (issue 21.3). The per-token inputs (``input_ids``,
  ``attention_mask``, ``token_type_ids``, ``position_ids``) are keyed per example, with trailing padding (where a
  2-D attention mask ends) stripped, so shuffling and dynamic right padding still hit. Any other tensor
  (``pixel_values``, ``cache_position``...) and any plain value (a bool, a number, a string) is keyed whole, for
  the batch: which row of an image batch feeds which example is the model's business (LLaVA scatters images in
  order over the image tokens of the whole batch), so a batch hits only in the same composition. Inputs that
  reach only the loss or the form of the output (``labels``, ``num_items_in_batch``, ``return_dict``...) are
  not keyed. Anything else (an object, ``inputs_embeds``, positional arguments beyond the ids) makes the batch
  unkeyable: it is computed in full and the reason is returned.
- **Rows** are kept in host memory up to ``cache_memory_bytes``, then one file per example in a temporary folder
  (in ``cache_dir`` when given) up to ``cache_disk_bytes``, never leaving less than :data:`MIN_FREE_DISK_BYTES`
  free on that disk (issue 21.5). A row whose file is gone or unreadable (a /tmp cleaner) is a miss: it is dropped
  and the caller is told (issue 21.9).

Imports torch and the standard library only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MIN_FREE_DISK_BYTES", "RowKeys", "RowStore", "row_keys"]

# Inputs that shape the prefix's output per position: keyed per example.
PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# Inputs that reach only the loss or the form of the output (transformers' and the Trainer's names).
NOT_KEYED = frozenset({
    "labels", "num_items_in_batch", "return_dict", "output_attentions", "output_hidden_states", "use_cache",
    "return_loss", "logits_to_keep",
})
# The cache stops writing rows to a disk with less than this free.
MIN_FREE_DISK_BYTES = 1 << 30


@dataclass
class RowKeys:
    """One content key per example of a batch, the examples' unpadded lengths and the batch's (batch, sequence)."""

    keys: list[bytes]
    lengths: list[int]
    shape: tuple[int, int]


def _digest_tensor(digest: Any, name: str, value: torch.Tensor) -> None:
    """Feed ``value`` (on the CPU), its name, dtype and shape into ``digest``."""
    digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}:".encode())
    digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def row_keys(args: tuple, kwargs: dict) -> RowKeys | str:
    """The content keys of a batch's examples, or the reason the batch cannot be keyed."""
    if len(args) > 1:
        return "the model was called with positional arguments beyond input_ids, which the cache cannot name"
    if kwargs.get("inputs_embeds") is not None:
        return "the batch passes inputs_embeds, not input_ids"
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "the batch has no 2-D input_ids"
    batch, seq = int(ids.shape[0]), int(ids.shape[1])
    per_row: dict[str, torch.Tensor] = {}
    whole = hashlib.blake2b(digest_size=16)
    for name in sorted(kwargs):
        value = kwargs[name] if name != "input_ids" else ids
        if name in NOT_KEYED or value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if name in PER_TOKEN and value.dim() >= 1 and value.shape[0] in (batch, 1):
                per_row[name] = value if value.shape[0] == batch else value.expand(batch, *value.shape[1:])
                continue
            _digest_tensor(whole, name, value)
        elif _plain(value):
            whole.update(f"{name}={value!r};".encode())
        else:
            return f"the batch passes {name!r} as a {type(value).__name__}, which the cache cannot key"
    if "input_ids" not in per_row:  # passed positionally
        per_row["input_ids"] = ids.detach().cpu()
    mask = per_row.get("attention_mask")
    if mask is None or tuple(mask.shape) != (batch, seq):
        lengths = [seq] * batch  # a 4-D mask, or none: the whole row is the example
    else:  # one past the last real position; 0 for a row without any
        lengths = ((mask != 0) * torch.arange(1, seq + 1)).amax(dim=1).tolist()
    shared = whole.digest()
    keys = []
    for i, length in enumerate(lengths):
        digest = hashlib.blake2b(shared, digest_size=16)
        for name in sorted(per_row):
            row = per_row[name][i]
            if row.dim() >= 1 and row.shape[0] == seq and per_row[name].dim() == 2:
                row = row[:length]
            _digest_tensor(digest, name, row)
        keys.append(digest.digest())
    return RowKeys(keys, lengths, (batch, seq))


class RowStore:
    """Stored rows by key: host memory first, then files; ``put`` says whether the row was kept."""

    def __init__(self) -> None:
        self.memory: dict[bytes, torch.Tensor] = {}
        self.disk: dict[bytes, tuple[str, int]] = {}  # the file and the bytes of its row
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.folder: str | None = None
        self._finalizer: Any = None

    def __contains__(self, key: bytes) -> bool:
        return key in self.memory or key in self.disk

    def __len__(self) -> int:
        return len(self.memory) + len(self.disk)

    def put(self, key: bytes, row: torch.Tensor, config: Any) -> bool:
        """Keep ``row`` (a copy on the host) under ``key``; False when neither memory nor disk has room for it.

        Raises:
            OSError: when the row file cannot be written (the caller stops using the disk).
        """
        row = row.clone() if row.device.type == "cpu" else row.cpu()  # its own storage, not the batch's
        if self.memory_bytes + row.nbytes <= config.cache_memory_bytes:
            self.memory[key] = row
            self.memory_bytes += row.nbytes
            return True
        if self.disk_bytes + row.nbytes > config.cache_disk_bytes:
            return False
        folder = self._folder(config)
        if shutil.disk_usage(folder).free - row.nbytes < MIN_FREE_DISK_BYTES:
            return False
        path = os.path.join(folder, key.hex() + ".pt")
        torch.save(row, path)
        self.disk[key] = (path, row.nbytes)
        self.disk_bytes += row.nbytes
        return True

    def get(self, key: bytes) -> torch.Tensor | None:
        """The row stored under ``key``; None (and the key dropped) when its file is gone or unreadable."""
        row = self.memory.get(key)
        if row is not None:
            return row
        path, nbytes = self.disk[key]
        try:
            return torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            del self.disk[key]
            self.disk_bytes -= nbytes
            return None

    def clear(self) -> bool:
        """Drop every row (the folder removed); whether there was any."""
        had = bool(self.memory or self.disk)
        self.memory, self.disk = {}, {}
        self.memory_bytes = self.disk_bytes = 0
        if self._finalizer is not None:
            self._finalizer()  # removes the folder
        self.folder, self._finalizer = None, None
        return had

    def _folder(self, config: Any) -> str:
        if self.folder is not None and os.path.isdir(self.folder):
            return self.folder
        if self.folder is not None:  # removed under us: make it again, with the same clean-up
            os.makedirs(self.folder, exist_ok=True)
            return self.folder
        parent = config.cache_dir
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.folder = tempfile.mkdtemp(prefix="peft_safe_prefix_", dir=parent or None)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        return self.folder
