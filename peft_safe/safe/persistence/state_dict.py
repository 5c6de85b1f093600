"""The freeze state in the model's own ``state_dict()``, so that every checkpoint of the whole model carries it.

``save_pretrained`` writes the freeze state into the adapter file (:mod:`.checkpoint`), but accelerate's
``save_state``, DeepSpeed and FSDP (``torch.distributed.checkpoint``) checkpoints write ``model.state_dict()``.
The SAFE tuner therefore has *extra state*, torch's own mechanism (``get_extra_state`` / ``set_extra_state``,
key ``<prefix>_extra_state``, which ``torch.distributed.checkpoint`` knows): one uint8 tensor of JSON holding, per
SAFE adapter, the sealed payload of :func:`~.checkpoint.encode_payload` (without tensor digests: the weights
beside it are the model's own), and the automatic schedule's optimizer-step count.

The tensor has one size, whatever it holds (:data:`EXTRA_STATE_BYTES`: a header, the JSON compressed, zeros):
``torch.distributed.checkpoint`` (FSDP's and accelerate's ``SHARDED_STATE_DICT``) loads into the fresh model's own
state-dict tensors and refuses one whose size differs from the saved one, and a fresh model's state is smaller than
a trained one's. A state too large for it (thousands of scorings of a deep model) is refused at save, naming the
fix. Tensors written before (plain JSON, sized to their content) still load. ``load_state_dict`` checks it
(units, adapter type, config) and applies it: the units frozen at save time freeze again, before an optimizer is
built from the parameters that still train. A state dict without it (saved before this, or by a plain model)
still loads strictly: a load pre-hook stands in the model's own extra state, which changes nothing.

Imports: torch, and of this package the ``safe`` sibling ``checkpoint``.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import torch

from ..method.tuner_view import TunerView
from .checkpoint import decode_payload, encode_payload

__all__ = ["EXTRA_STATE_BYTES", "EXTRA_STATE_FORMAT", "extra_state", "install_state_dict_hooks",
           "load_extra_state"]

EXTRA_STATE_FORMAT = 1
# The extra state's fixed size: 1 MiB holds the compressed history of about 3,000 scorings of 32 units.
EXTRA_STATE_BYTES = 1 << 20
_MAGIC = b"SAFEz"  # then the compressed length (uint32, little-endian), the zlib stream, zeros
_HEADER = struct.Struct("<5sI")
_KEY = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX


def extra_state(safe: TunerView) -> torch.Tensor:
    """The uint8 tensor ``safe.get_extra_state()`` returns: every adapter's freeze state and the step count."""
    adapters = {
        name: bytes(encode_payload(state, safe.peft_config[name], {}).tolist()).decode("utf-8")
        for name, state in safe.freeze_states.items()
        if name in safe.peft_config
    }
    driver = getattr(safe, "auto_driver", None)
    record = {"safe_extra_state": EXTRA_STATE_FORMAT, "adapters": adapters,
              "auto_steps": driver.steps if driver is not None else 0}
    packed = zlib.compress(json.dumps(record, sort_keys=True).encode("utf-8"), 6)
    if _HEADER.size + len(packed) > EXTRA_STATE_BYTES:
        raise ValueError(
            f"SAFE's freeze state takes {_HEADER.size + len(packed):,} bytes compressed, more than the "
            f"{EXTRA_STATE_BYTES:,} that model.state_dict() holds for it (one fixed size, so that sharded checkpoints "
            "load). Save the adapter with save_pretrained, which has no such limit, or score less often "
            "(a larger scoring_interval)."
        )
    out = torch.zeros(EXTRA_STATE_BYTES, dtype=torch.uint8)
    blob = _HEADER.pack(_MAGIC, len(packed)) + packed
    out[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return out


def _record_text(value: torch.Tensor) -> str:
    data = value.reshape(-1).cpu().numpy().tobytes()
    if data[: len(_MAGIC)] == _MAGIC:
        _, length = _HEADER.unpack_from(data)
        return zlib.decompress(data[_HEADER.size : _HEADER.size + length]).decode("utf-8")
    return data.decode("utf-8")  # written before the fixed size: the JSON itself


def load_extra_state(safe: TunerView, value: Any) -> None:
    """Apply what :func:`extra_state` wrote, after checking every adapter's freeze state against this model.

    Raises:
        ValueError: if it is malformed, names an adapter this model lacks, or belongs to another model or config.
    """
    if value is None:
        return  # the stand-in of a state dict saved without extra state
    try:
        record = json.loads(_record_text(value))
        adapters = record["adapters"]
        steps = int(record.get("auto_steps", 0))
    except (AttributeError, TypeError, ValueError, KeyError, UnicodeDecodeError, zlib.error, struct.error) as err:
        raise ValueError(f"the SAFE extra state in this state dict is malformed ({err}); it is corrupt.") from err
    if record.get("safe_extra_state") != EXTRA_STATE_FORMAT:
        raise ValueError(f"this SAFE extra state has format {record.get('safe_extra_state')!r}; this peft_safe "
                         f"reads format {EXTRA_STATE_FORMAT}: upgrade peft_safe.")
    states = {}
    for name, text in adapters.items():
        if name not in safe.peft_config:
            raise ValueError(f"this state dict holds the SAFE freeze state of adapter {name!r}, which this model "
                             f"does not have (its adapters: {sorted(safe.peft_config)}); build it with the same ones.")
        payload = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        try:  # everything is checked before anything is applied
            states[name] = decode_payload(payload, safe.peft_config[name], {}, [u.name for u in safe.units(name)])
        except ValueError as err:
            raise ValueError(f"SAFE freeze state of adapter {name!r}: {err}") from err
    for name, state in states.items():
        safe.set_freeze_state(name, state)
    driver = getattr(safe, "auto_driver", None)
    if driver is not None:
        driver.restart(steps)


def _stand_in_for_missing(module: Any, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.setdefault(prefix + _KEY, None)  # set_extra_state(None): nothing to apply


def install_state_dict_hooks(safe: TunerView) -> None:
    """Let ``safe.load_state_dict(strict=True)`` take state dicts saved without SAFE's extra state."""
    safe.register_load_state_dict_pre_hook(_stand_in_for_missing)
