"""The SAFE payload of a checkpoint: the freeze state, written into the adapter weights file and checked on load.

The freeze state (which units froze, when, the importance history, the end of warm-up) travels as one uint8
tensor of JSON under :data:`FREEZE_STATE_KEY` in ``adapter_model.safetensors``, so weights and freeze decisions
are one atomic file and Trainer checkpoints carry them without any hook of their own. Beside the state the
payload holds an *integrity record*: the config the weights were saved with and a digest of every tensor.
peft writes ``adapter_model.safetensors`` before ``adapter_config.json``,
so an interrupted save over an older checkpoint leaves new weights next to the old config; a bit flip leaves
a file that parses. With the record, either is a clear error on load instead of a wrong model.

Everything here is checked before anything is loaded: a failed load leaves the model as it was. The tuner's
peft hooks (``SAFEModel._get_adapter_state_dict`` / ``_remap_adapter_state_dict_for_load``) only call
:func:`write_freeze_state`, :func:`read_freeze_state` and :func:`apply_loaded_freeze_state`, which reach the tuner
through its public view (``safe.method.tuner_view``).

Imports: torch, and of this package only ``core.state`` and the SAFE config (for its fields).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from peft.config import PeftConfig
from torch import nn

from ...core.state import FORMAT_VERSION, FreezeState, parse_state_json
from ..method.driver import resume_steps
from ..method.tuner_view import TunerView
from ..method.units import require_units
from ..savings.cache_options import CACHE_FIELDS
from .history import LEGACY_VALUES, RENAMED_FIELDS
from .weights_file import FREEZE_STATE_KEY, note_payload

__all__ = ["FREEZE_STATE_KEY", "apply_loaded_freeze_state", "check_loadable", "decode_payload", "encode_payload",
           "read_freeze_state", "write_freeze_state"]


# Fields that legitimately differ between the config saved with the weights and the one they are loaded with:
# peft sets inference_mode on load and base_model_name_or_path / auto_mapping on save, peft_version follows the
# installed peft, and AdaLoRA's rank allocation rewrites rank_pattern while training. The prefix cache's options
# change how a step is computed, never what the weights mean (a run may train with the cache and resume without).
_VOLATILE_CONFIG_FIELDS = ("inference_mode", "base_model_name_or_path", "revision", "peft_version", "auto_mapping",
                           "rank_pattern", *CACHE_FIELDS,
                           # how an adapter starts that leaves the base weights as they are: a trained checkpoint
                           # means the same under any of them (issue 21.19; peft sets init_weights = True itself
                           # before a PiSSA conversion). Inits that rewrite the base (PiSSA, OLoRA, LoftQ...) stay.
                           "loftq_config", "eva_config", "corda_config", "lora_ga_config")

# Values of ``init_lora_weights`` / ``init_weights`` under which the base model is left untouched: one value in
# the fingerprint. "pissa", "olora", "loftq", "corda"... rewrite the base weights and stay distinct.
_BASE_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal")
_INIT_FIELDS = ("init_lora_weights", "init_weights")


# Payloads from this format version on carry an integrity record whose ``state_sha256`` seals the whole record.
SEALED_FROM_VERSION = 2


def encode_payload(state: FreezeState, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The uint8 tensor that stores ``state`` beside ``tensors``, with the integrity record of both."""
    record = {**state.to_dict(), "format_version": FORMAT_VERSION, "integrity": _integrity_record(config, tensors)}
    record = seal(record)
    payload = json.dumps(record, sort_keys=True, allow_nan=False).encode("utf-8")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).clone()


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``integrity.state_sha256`` set to the digest of everything else in it."""
    return {**record, "integrity": {**record["integrity"], "state_sha256": _record_digest(record)}}


def _record_digest(record: dict[str, Any]) -> str:
    integrity = {k: v for k, v in record["integrity"].items() if k != "state_sha256"}
    text = json.dumps({**record, "integrity": integrity}, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_seal(data: Any) -> None:
    """Raise if a sealed record (format 2 on) lacks its seal or does not match it: a damaged freeze state."""
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or not SEALED_FROM_VERSION <= version <= FORMAT_VERSION:
        return  # older payloads have no seal; malformed or newer ones are refused by FreezeState.from_dict
    integrity = data.get("integrity")
    recorded = integrity.get("state_sha256") if isinstance(integrity, dict) else None
    try:
        matches = isinstance(recorded, str) and recorded == _record_digest(data)
    except (TypeError, ValueError):  # an integrity record that is not an object, a value JSON cannot hold
        matches = False
    if not matches:
        raise ValueError(
            "the SAFE freeze state in this checkpoint does not match the checksum recorded when it was saved (or "
            "its integrity record is missing): the file is corrupt (damaged on disk or in transfer, or edited). "
            "Restore it from a good copy."
        )


def decode_payload(
    payload: Any, config: PeftConfig, tensors: dict[str, torch.Tensor], units: list[str]
) -> FreezeState:
    """The freeze state stored in ``payload``, after checking it against the model, the config and the tensors.

    Args:
        payload: the tensor found under :data:`FREEZE_STATE_KEY`.
        config: the SAFE config the checkpoint is loaded with.
        tensors: the checkpoint's other tensors.
        units: the adapter units of the model it is loaded into.

    Raises:
        ValueError: if the payload is corrupt, belongs to another model, adapter type or config, or a tensor does
            not match its recorded digest.
    """
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError("the SAFE freeze state in this checkpoint is not a byte tensor; the file is corrupt.")
    try:
        text = bytes(payload.cpu().tolist()).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"the SAFE freeze state in this checkpoint is not UTF-8 ({err}); the file is corrupt."
        ) from err
    data = parse_state_json(text)  # parsed once: the state and the integrity record share it
    _check_seal(data)  # first: a damaged state must read as damaged, not as another model's
    state = FreezeState.from_dict(data)
    if state.units != units:
        raise ValueError(
            f"this SAFE checkpoint was saved from a model with units {state.units}, but this model has units "
            f"{units}; load it onto the same architecture and adapter targets it was trained with."
        )
    expected = config.adapter_peft_type
    if state.adapter_type and state.adapter_type != expected:
        raise ValueError(f"this SAFE checkpoint wraps a {state.adapter_type} adapter but the config wraps {expected}.")
    integrity = data.get("integrity")
    if integrity is not None:  # checkpoints written before the record existed have none
        _check_integrity(integrity, config, tensors)
    return state


def check_loadable(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise if a tensor of ``state_dict`` has another shape than the model's: before any is applied.

    Raises:
        ValueError: naming the first mismatching keys and both shapes.
    """
    own = model.state_dict()
    prefixed = any(k.startswith("base_model.model.") for k in own)
    wrong = []
    for key, value in state_dict.items():
        target = own.get(key if prefixed else key.removeprefix("base_model.model."))
        if target is not None and tuple(target.shape) != tuple(value.shape):
            wrong.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(target.shape)}")
    if wrong:
        raise ValueError(
            "this SAFE checkpoint does not fit the model (was it saved from another model or adapter config?): "
            + "; ".join(wrong[:5])
        )


# ---------------------------------------------------------------------------------------------- integrity
def _integrity_record(config: PeftConfig, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    digests = sorted(_tensor_digest(t) for t in tensors.values())
    return {"config": _config_fingerprint(config), "tensor_sha256": digests}


def _config_fingerprint(config: PeftConfig) -> dict[str, Any]:
    def strip(data: dict[str, Any]) -> dict[str, Any]:
        # Lists of names are sets in meaning (peft appends the task's heads to modules_to_save on every load).
        return {
            k: sorted(set(v)) if isinstance(v, list) and all(isinstance(i, str) for i in v) else v
            for k, v in data.items()
            if k not in _VOLATILE_CONFIG_FIELDS
        }

    data = config.to_dict()
    data = {**strip(data), "adapter_config": strip(data["adapter_config"])}
    return json.loads(json.dumps(data, sort_keys=True, default=str))  # the form it has after a JSON round trip


def _comparable(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint (as written, by any version) as compared: the volatile fields out, base-keeping inits as one."""
    def normalise(data: dict[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_FIELDS}
        return kept | {k: "keeps the base" for k in _INIT_FIELDS if kept.get(k, ()) in _BASE_KEEPING_INITS}

    inner = fingerprint.get("adapter_config")
    return {**normalise(fingerprint), **({"adapter_config": normalise(inner)} if isinstance(inner, dict) else {})}


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    header = f"{str(tensor.dtype).removeprefix('torch.')}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(header + data).hexdigest()[:32]


def _check_integrity(integrity: Any, config: PeftConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise if the weights file does not belong to ``config`` or was damaged."""
    if not isinstance(integrity, dict):
        raise ValueError("the SAFE freeze state's 'integrity' record is malformed; the checkpoint is corrupt.")
    saved = integrity.get("config")
    if isinstance(saved, dict):
        # checkpoints written before a field was renamed record it under its old name
        saved = {RENAMED_FIELDS.get(k, k): v for k, v in saved.items()}
        # and before a field was added, under none: the value the code that wrote it behaved as
        saved = {**LEGACY_VALUES, **saved}
    if saved is not None:
        diffs = _config_differences(_comparable(saved), _comparable(_config_fingerprint(config)))
        if diffs:
            raise ValueError(
                "this SAFE weights file was saved with another config than the one loading it ("
                + "; ".join(diffs[:5])
                + "). Either adapter_config.json is stale (a save interrupted between writing the weights and the "
                "config) or a different config was passed in: load it with the config saved next to it, and change "
                "hyper-parameters afterwards through model.peft_config[adapter_name] if you mean to."
            )
    digests = integrity.get("tensor_sha256")
    if digests is not None:
        available: dict[str, int] = {}
        for tensor in state_dict.values():
            if isinstance(tensor, torch.Tensor):
                digest = _tensor_digest(tensor)
                available[digest] = available.get(digest, 0) + 1
        for digest in digests:
            if available.get(digest, 0) == 0:
                raise ValueError(
                    "a tensor in this SAFE weights file does not match the checksum recorded when it was saved: "
                    "the file is corrupt (damaged on disk or in transfer). Restore it from a good copy."
                )
            available[digest] -= 1


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: weights X, config Y"`` for each field (the wrapped config's too) that differs."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key == "adapter_config":
            continue
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: weights {saved.get(key)!r}, config {current.get(key)!r}")
    inner_saved, inner_current = saved.get("adapter_config", {}), current.get("adapter_config", {})
    for key in sorted(set(inner_saved) | set(inner_current)):
        if inner_saved.get(key) != inner_current.get(key):
            diffs.append(f"adapter_config.{key}: weights {inner_saved.get(key)!r}, config {inner_current.get(key)!r}")
    return diffs


# ------------------------------------------------------------------------------ the tuner's save and load
def write_freeze_state(
    safe: TunerView | None, config: PeftConfig, adapter_name: str, out: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add the payload of ``adapter_name``'s freeze state to ``out``, the state dict peft is about to write
    (``SAFEModel._get_adapter_state_dict``); refused, before anything is written, when the adapter's layers are gone.
    """
    if safe is None or adapter_name not in safe.freeze_states:
        raise ValueError(f"cannot save SAFE adapter {adapter_name!r}: no SAFE tuner holding its freeze state.")
    state = safe.freeze_states[adapter_name]
    require_units(safe.units(adapter_name), state.units, adapter_name, "save the SAFE adapter")
    driver = safe.auto_driver
    if driver.active and driver.steps and adapter_name == safe.active_safe_adapter:
        state = dataclasses.replace(state, optimizer_steps=driver.steps)  # a plain loop counts on after a load
    out[FREEZE_STATE_KEY] = encode_payload(state, config, out)
    note_payload(config, out[FREEZE_STATE_KEY])  # the config's save records which file carries it
    return out


def read_freeze_state(
    safe: TunerView | None, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> tuple[TunerView, FreezeState, dict[str, torch.Tensor]]:
    """The tuner, the checked freeze state of a loaded file and its other tensors (``SAFEModel.
    _remap_adapter_state_dict_for_load``); nothing is applied yet. Raises on a file without a SAFE payload."""
    state_dict = dict(state_dict)
    payload = state_dict.pop(FREEZE_STATE_KEY, None)
    if payload is None:
        raise ValueError(
            "this checkpoint holds no SAFE freeze state, so it was not saved by a SAFE model "
            f"(its weights look like a plain {config.adapter_peft_type} adapter). Load it with its own config "
            "(PeftModel.from_pretrained without a SAFEConfig), or start SAFE from scratch."
        )
    if safe is None:
        raise ValueError("cannot load a SAFE freeze state: the model holds no SAFE tuner.")
    units = [u.name for u in safe.units(adapter_name)]
    return safe, decode_payload(payload, config, state_dict, units), state_dict


def apply_loaded_freeze_state(safe: TunerView, adapter_name: str, state: FreezeState) -> None:
    """Make a loaded, checked freeze state the adapter's own; the automatic schedule counts on from its step."""
    steps, state.optimizer_steps = resume_steps(state), None  # the count lives in the driver from here on
    safe.set_freeze_state(adapter_name, state)
    if adapter_name == safe.active_safe_adapter:
        safe.auto_driver.restart(steps)
