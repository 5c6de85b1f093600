"""Which weights file an ``adapter_config.json`` was saved with, and a config file that is never half-written.

The problem. peft's ``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` (a temporary file renamed
into place) or, with ``safe_serialization=False``, ``adapter_model.bin`` (``torch.save`` on the final path), then
``adapter_config.json`` (``PeftConfig.save_pretrained``: ``open(path, "w")`` on the final path). peft's
``load_peft_weights`` loads ``adapter_model.safetensors`` whenever it exists. The freeze state inside the weights
file (:mod:`.checkpoint`) cannot see three failures of that scheme (issue 13, items 11, 16 and 22):

- a newer ``.bin`` saved beside an older ``.safetensors`` with the same config: peft loads the older file, whose
  own integrity record is intact and matches the config;
- a ``.bin`` cut short by an interrupted save (disk full): ``torch.load`` fails with ``OSError [Errno 22]``, which
  says nothing of why;
- an interrupted write of ``adapter_config.json``: a truncated file, which peft reads before any SAFE code runs
  (``PeftConfig._get_peft_type``), so the error is a bare ``JSONDecodeError``.

The mechanism. Two SAFE hooks see the folder. peft calls ``SAFEConfig.save_pretrained`` right after it wrote the
weights, and ``SAFEConfig.from_pretrained`` with the folder before it reads any weights (``PeftModel.from_pretrained``
without ``config=``, ``load_adapter`` under a new adapter name). On save, ``SAFEModel._get_adapter_state_dict`` notes
the SHA-256 of the freeze-state payload it puts in the weights (:func:`note_payload`); the config's save looks for
the weights file in the folder that carries that payload (the one just written) and records its name, size and the
payload digest under :data:`RECORD_KEY` in ``adapter_config.json``, written to a temporary file in the same folder
and renamed over the old one (:func:`save_config_atomically`). On load, :func:`check_weights_file` takes the file
peft will load (``load_peft_weights``' rule) and refuses it when it is not the recorded one and carries another
payload, or when it is the recorded ``.bin`` and cannot be read.

Why the payload's digest and not the whole file's: the payload holds the digests of every adapter tensor and the
freeze state, so an equal payload means equal weights and state (a folder saved in both formats from one state
passes), it needs no extra pass over the file, and it reads the same from either format.

Out of reach (no SAFE code sees a path there): ``load_adapter`` into an adapter the model already has (the Trainer's
resume path) reads no ``adapter_config.json``, so it checks no record; and the ``.bin`` an interrupted save cut short
is lost all the same, since peft's ``torch.save`` opens it for writing before any SAFE code runs.

Imports: torch, safetensors and peft's file-name constants; nothing of this package.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

__all__ = ["FREEZE_STATE_KEY", "RECORD_KEY", "check_weights_file", "keep_record", "note_payload",
           "save_config_atomically", "weights_record"]

# Key of the freeze state in the adapter state dict (peft strips the adapter name, not this key).
FREEZE_STATE_KEY = "base_model.safe_freeze_state"

# Key of the record in adapter_config.json: {"name": ..., "bytes": ..., "freeze_state_sha256": ...}.
RECORD_KEY = "safe_weights_file"

_RECORD = "_saved_weights_file"  # attribute of a loaded SAFEConfig: the record of its adapter_config.json
_NOTE = "_saved_freeze_state_sha256"  # attribute of the SAFEConfig: the payload digest of its last state dict
_LOAD_ORDER = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)  # peft's load_peft_weights: safetensors first


def keep_record(config: Any, record: Any) -> None:
    """Keep on ``config`` the :data:`RECORD_KEY` record read from its ``adapter_config.json`` (``None``: none)."""
    object.__setattr__(config, _RECORD, record)


def note_payload(config: Any, payload: torch.Tensor) -> None:
    """Remember on ``config`` the digest of the freeze-state ``payload`` about to be written beside it."""
    object.__setattr__(config, _NOTE, _digest(payload))


def weights_record(folder: str, config: Any) -> dict[str, Any] | None:
    """The record of the weights file in ``folder`` that carries ``config``'s last payload; ``None`` if none does."""
    noted = getattr(config, _NOTE, None)
    if noted is None:
        return None
    for name in _LOAD_ORDER:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                found = _payload_digest(path)
            except Exception:  # noqa: BLE001 - an unreadable file is not the one just written
                continue
            if found == noted:
                return {"name": name, "bytes": os.path.getsize(path), "freeze_state_sha256": noted}
    return None


def save_config_atomically(
    folder: str, write_config: Callable[..., None], record: dict[str, Any] | None, **kwargs: Any
) -> None:
    """Write ``adapter_config.json`` with ``record`` into ``folder``: staged in the folder, then renamed over the old.

    Args:
        folder: the checkpoint folder.
        write_config: peft's ``PeftConfig.save_pretrained`` (bound), which renders the file into a directory.
        record: the :func:`weights_record` to add, or ``None``.
        kwargs: passed on to ``write_config`` (peft's ``auto_mapping_dict``).
    """
    if os.path.isfile(folder):
        write_config(folder, **kwargs)  # peft's own error for a file in place of the folder
        return
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".safe-config-") as staging:
        write_config(staging, **kwargs)
        staged = os.path.join(staging, CONFIG_NAME)
        if record is not None:
            with open(staged) as file:
                data = json.load(file)
            data[RECORD_KEY] = record
            with open(staged, "w") as file:
                file.write(json.dumps(data, indent=2, sort_keys=True))  # peft's own layout
        with open(staged, "rb") as file:
            os.fsync(file.fileno())  # on disk before the rename makes it the config
        os.replace(staged, os.path.join(folder, CONFIG_NAME))


def check_weights_file(folder: str, config: Any, subfolder: str | None = None) -> None:
    """Raise if the weights file peft will load from ``folder`` is not the one ``config`` was saved with.

    Args:
        folder: the folder (or Hub id) ``config`` was read from.
        config: the SAFEConfig read from its ``adapter_config.json`` (the record kept by :func:`keep_record`).
        subfolder: peft's ``subfolder`` argument, if any.

    Nothing is checked without a record (checkpoints written before it existed), outside a local folder (the Hub)
    or when no weights file is there (peft's own error follows).

    Raises:
        ValueError: when peft would load another file than the recorded one and it holds another freeze state (a
            stale ``adapter_model.safetensors`` beside a newer ``adapter_model.bin``), or when the recorded
            ``adapter_model.bin`` cannot be read (a save cut it short).
    """
    record = getattr(config, _RECORD, None)
    folder = os.path.join(folder, subfolder) if subfolder else folder
    if not isinstance(record, dict) or not os.path.isdir(folder):
        return
    loaded = next((name for name in _LOAD_ORDER if os.path.isfile(os.path.join(folder, name))), None)
    if loaded is None:
        return
    written, path = record.get("name"), os.path.join(folder, loaded)
    try:
        found, error = _payload_digest(path), None
    except Exception as err:  # noqa: BLE001 - torch's and safetensors' errors for a damaged file vary
        found, error = None, err
    if found is not None and found == record.get("freeze_state_sha256"):
        return  # the file written with this config, or one with the same weights and freeze state
    if loaded != written:
        present = "is there too" if os.path.isfile(os.path.join(folder, str(written))) else "is missing"
        holds = ("another SAFE freeze state" if found is not None
                 else "no SAFE freeze state" if error is None else f"nothing readable ({error})")
        raise ValueError(
            f"{folder}: adapter_config.json was saved together with {written} (which {present}), but peft loads "
            f"{loaded}, which holds {holds}: another save wrote it into this folder (an older one, or a later one "
            f"interrupted before it wrote adapter_config.json). Delete the file you do not want (delete {loaded} to "
            f"load {written}), and keep one weights format per folder."
        )
    if error is not None and loaded == WEIGHTS_NAME:
        raise ValueError(
            f"{path} cannot be read ({type(error).__name__}: {error}): it has {os.path.getsize(path)} bytes, but the "
            f"save that wrote adapter_config.json left {record.get('bytes')} bytes. A later save_pretrained("
            "safe_serialization=False) into this folder was probably interrupted while writing it (disk full?); "
            "torch.save writes that file in place, so the weights it held are lost. Restore the folder from a copy, "
            "and save with safetensors (safe_serialization=True, the default), which writes a temporary file and "
            "renames it."
        ) from error
    # The recorded file, rewritten by a later save that did not reach adapter_config.json (its own integrity record
    # checks the config), or damaged (safetensors' reader and the payload's checks say so).


def _digest(payload: torch.Tensor) -> str:
    return hashlib.sha256(payload.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _payload_digest(path: str) -> str | None:
    """The digest of the freeze-state payload in the weights file at ``path``; ``None`` if it holds none."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as file:
            names = file.keys()
            return _digest(file.get_tensor(FREEZE_STATE_KEY)) if FREEZE_STATE_KEY in names else None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        tensors = torch.load(path, map_location="cpu", weights_only=True)  # a file in torch's legacy format
    payload = tensors.get(FREEZE_STATE_KEY) if isinstance(tensors, dict) else None
    return _digest(payload) if isinstance(payload, torch.Tensor) else None
