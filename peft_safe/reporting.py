"""Where SAFE's progress goes: the running transformers Trainer's own logging path, and Python logging.

SAFE reports through ``Trainer.log``, so every ``report_to`` integration (TensorBoard, W&B, MLflow...), the printed
log lines and ``trainer.state.log_history`` see its ``safe/*`` (and the meter's ``memory/*``) keys. The base
``transformers.Trainer.log`` is called, not a subclass's override: TRL's trainers override ``log`` to merge and
clear the metrics they averaged since the last log line, which a SAFE record must neither take nor reset.

The package's log lines follow transformers' verbosity (``transformers.logging.set_verbosity_info()`` shows
them) unless the ``peft_safe`` logger was configured by the user.

A leaf module: it imports the standard library only. Transformers is found (``sys.modules``, a class's module
name) where it is already loaded, never imported, so ``import peft_safe`` stays light.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["find_on_stack", "find_trainer", "follow_transformers_verbosity", "local_of_running", "log_to_trainer"]

_PACKAGE_LOGGER = "peft_safe"


def _base_trainer_class(obj: Any) -> type | None:
    for cls in type(obj).__mro__:
        if cls.__name__ == "Trainer" and cls.__module__ == "transformers.trainer":
            return cls
    return None


def find_on_stack(predicate: Any, max_depth: int = 60, skip: int = 1) -> Any:
    """The first ``self`` of a frame above the caller's for which ``predicate(obj)`` holds, or ``None``."""
    frame = sys._getframe(skip)
    for _ in range(max_depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if obj is not None and predicate(obj):
            return obj
        frame = frame.f_back
    return None


def local_of_running(obj: Any, name: str, max_depth: int = 60) -> Any:
    """The local variable ``name`` of the innermost frame above the caller whose ``self`` is ``obj``, or ``None``.

    What a running method was called with and a callback is not handed: the checkpoint a Trainer's ``train()``
    resumes from is ``resume_from_checkpoint`` of its ``_inner_training_loop``.
    """
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_locals.get("self") is obj and name in frame.f_locals:
            return frame.f_locals[name]
        frame = frame.f_back
    return None


def find_trainer(holding: Any = None, max_depth: int = 60) -> Any:
    """The transformers Trainer whose code is running below the caller on the call stack, or ``None``.

    A Trainer hands its callbacks and its model's forward no reference to itself, but it is the ``self`` of a frame
    of ``train()`` (``training_step``, ``compute_loss``, the callback handler's caller) while they run.

    Args:
        holding: when given, only a Trainer whose callback handler holds this callback is taken.
        max_depth: how many frames up to look.
    """
    def running(obj: Any) -> bool:
        if _base_trainer_class(obj) is None:
            return False
        handler = getattr(obj, "callback_handler", None)
        return holding is None or any(cb is holding for cb in getattr(handler, "callbacks", ()))

    return find_on_stack(running, max_depth, skip=2)


def log_to_trainer(trainer: Any, record: Mapping[str, Any]) -> None:
    """``transformers.Trainer.log(trainer, record)``: into ``log_history`` and every integration's ``on_log``.

    The callback handler's ``on_log`` clears ``control.should_log``; it is put back, so that a record logged in
    the middle of a step never takes the place of the Trainer's own loss line at that step.
    """
    base = _base_trainer_class(trainer)
    if base is None:
        raise TypeError(f"log_to_trainer needs a transformers Trainer, got {type(trainer).__name__}.")
    control = getattr(trainer, "control", None)
    should_log = getattr(control, "should_log", None)
    base.log(trainer, dict(record))
    if should_log is not None and getattr(trainer, "control", None) is not None:
        trainer.control.should_log = should_log


class _TransformersHandler(logging.Handler):
    """Writes the package's records where transformers' own handler writes (stderr), when nothing else would show
    them, under the package's name (transformers' formatter would label them ``[transformers]``)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the application configured logging: the record propagates to its handlers
        for handler in logging.getLogger("transformers").handlers:
            stream = getattr(handler, "stream", None)
            if record.levelno >= handler.level and stream is not None:
                stream.write(f"[peft_safe] {record.getMessage()}\n")
                handler.flush()


def follow_transformers_verbosity() -> None:
    """Give the ``peft_safe`` logger transformers' current verbosity (and its handler), unless the user set one.

    Called when training starts (SAFECallback, MeasureCallback, SAFE's automatic schedule). A level the user set
    on ``logging.getLogger("peft_safe")`` is left alone.
    """
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is None:
        return
    package = logging.getLogger(_PACKAGE_LOGGER)
    follows = getattr(package, "_peft_safe_follows_transformers", False)
    if package.level != logging.NOTSET and not follows:
        return
    package.setLevel(transformers_logging.get_verbosity())
    package._peft_safe_follows_transformers = True
    if not any(isinstance(handler, _TransformersHandler) for handler in package.handlers):
        package.addHandler(_TransformersHandler())
