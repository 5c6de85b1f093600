"""The freeze state in the model's own ``state_dict()``, so that every checkpoint of the whole model carries it.

``save_pretrained`` writes the freeze state into the adapter file (:mod:`.checkpoint`), but accelerate's
``save_state``, DeepSpeed and FSDP checkpoints write ``model.state_dict()``. With the hooks installed here that
state dict holds, per SAFE adapter, one uint8 tensor under ``<prefix>safe_freeze_state.<adapter>`` (the payload of
:func:`~.checkpoint.encode_payload`, sealed, without tensor digests: the weights beside it are the model's own) and
the automatic schedule's optimizer-step count under ``<prefix>safe_auto_steps``. ``load_state_dict`` takes them out
before torch matches keys (so ``strict=True`` holds) and applies them: the units frozen at save time are frozen
again, before an optimizer is built from the parameters that still train. A state dict without them (saved before
this or by a plain model) loads as before.

Imports: torch, and of this package the ``safe`` sibling ``checkpoint``.
"""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import decode_payload, encode_payload

__all__ = ["FREEZE_STATE_PREFIX", "STEPS_KEY", "install_state_dict_hooks"]

FREEZE_STATE_PREFIX = "safe_freeze_state."
STEPS_KEY = "safe_auto_steps"


def install_state_dict_hooks(safe: Any) -> None:
    """Put the freeze state into ``safe.state_dict()`` and take it out of what ``safe.load_state_dict`` gets."""
    safe.register_state_dict_post_hook(_add_freeze_state)
    safe.register_load_state_dict_pre_hook(_load_freeze_state)


def _add_freeze_state(module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for adapter_name, state in module._freeze_states.items():
        config = module.peft_config.get(adapter_name)
        if config is not None:
            state_dict[f"{prefix}{FREEZE_STATE_PREFIX}{adapter_name}"] = encode_payload(state, config, {})
    driver = getattr(module, "auto_driver", None)
    if driver is not None:
        state_dict[f"{prefix}{STEPS_KEY}"] = torch.tensor([driver.steps], dtype=torch.int64)


def _load_freeze_state(
    module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    states = {}
    for key in [k for k in state_dict if k.startswith(prefix + FREEZE_STATE_PREFIX)]:
        adapter_name = key[len(prefix + FREEZE_STATE_PREFIX):]
        payload = state_dict.pop(key)
        if adapter_name not in module.peft_config:
            error_msgs.append(
                f"this state dict holds the SAFE freeze state of adapter {adapter_name!r}, which this model does "
                f"not have (its adapters: {sorted(module.peft_config)}); build it with the same adapters."
            )
            continue
        units = [unit.name for unit in module._units(adapter_name)]
        try:  # everything checked before anything is applied
            states[adapter_name] = decode_payload(payload, module.peft_config[adapter_name], {}, units)
        except ValueError as err:
            error_msgs.append(f"SAFE freeze state of adapter {adapter_name!r}: {err}")
    steps = state_dict.pop(prefix + STEPS_KEY, None)
    if error_msgs:
        return
    for adapter_name, state in states.items():
        module._replace_freeze_state(adapter_name, state)
    driver = getattr(module, "auto_driver", None)
    if steps is not None and driver is not None:
        driver.steps = int(steps.reshape(-1)[0])
