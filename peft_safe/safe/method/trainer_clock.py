"""The automatic schedule's hold on a running transformers Trainer: a callback on its clock, the probe set in its
checkpoints.

:class:`TrainerClock` is what :class:`~.driver.AutoDriver` attaches to the Trainer it finds running: at
``on_step_end`` (``state.global_step``) or ``on_epoch_end`` it has the driver score, as SAFECallback would (and
runs AdaLoRA's rank allocation at ``on_optimizer_step``, as SAFECallback does); at
``on_save`` the driver's probe set goes into the checkpoint folder (:data:`PROBE_FILE`, per process), and
:func:`load_probe` reads it back when ``train()`` resumes from that folder, so a resumed run scores on the batches
the uninterrupted one did. The driver is held weakly: a Trainer never keeps a model alive through it.

Imports: torch, peft's AdaLoRA tuner (when it runs), and of this package ``reporting`` (to find what the
running ``train()`` resumes from).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch

from ...reporting import local_of_running

__all__ = ["PROBE_FILE", "TrainerClock", "attach_clock", "load_probe", "save_probe"]

logger = logging.getLogger(__name__)

# The probe set's file in a Trainer checkpoint folder, per process.
PROBE_FILE = "safe_probe.rank{rank}.pt"


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def attach_clock(trainer: Any, driver: Any) -> None:
    """Add the driver's :class:`TrainerClock` to ``trainer``'s callbacks, once."""
    handler = trainer.callback_handler
    if not any(isinstance(cb, TrainerClock) and cb.driver is driver for cb in handler.callbacks):
        handler.callbacks.append(TrainerClock(driver, trainer))


def _probe_path(folder: str, trainer: Any) -> str:
    return os.path.join(folder, PROBE_FILE.format(rank=getattr(trainer.args, "process_index", 0)))


def save_probe(trainer: Any, probe: list[Any]) -> None:
    """Write ``probe`` into the checkpoint folder the Trainer has just saved at its current step."""
    folder = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    if os.path.isdir(folder):
        torch.save(probe, _probe_path(folder, trainer))


def load_probe(trainer: Any) -> list[Any]:
    """The probe set saved in the checkpoint the running ``train()`` resumes from; empty when there is none."""
    folder = local_of_running(trainer, "resume_from_checkpoint")
    path = _probe_path(folder, trainer) if isinstance(folder, str) else None
    if path is None or not os.path.isfile(path):
        return []
    try:
        return list(torch.load(path, weights_only=True))
    except Exception as err:  # noqa: BLE001 - any unreadable file: score on this run's batches instead
        logger.warning("SAFE could not read its probe set from %s (%s); probing on this run's batches", path, err)
        return []


class TrainerClock:
    """The driver's callback in a Trainer: a ``TrainerCallback`` in all but its base class (``safe`` does not
    import transformers' Trainer). Events it does not handle are no-ops."""

    def __init__(self, driver: Any, trainer: Any) -> None:
        self._driver = weakref.ref(driver)
        self._trainer = weakref.ref(trainer)

    @property
    def driver(self) -> Any:
        return self._driver()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _ignore
        raise AttributeError(name)

    def _call(self, method: str, *args: Any) -> None:
        driver, trainer = self._driver(), self._trainer()
        if driver is not None and trainer is not None:
            getattr(driver, method)(trainer, *args)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._call("_on_trainer_time", "step", float(state.global_step), kwargs.get("optimizer"))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._call("_on_trainer_time", "epoch", round(state.epoch or 0.0, 6), kwargs.get("optimizer"))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # AdaLoRA reallocates ranks after each optimizer step, while the gradients exist (as SAFECallback does)
        from peft.tuners.adalora import AdaLoraModel

        driver = self._driver()
        safe = driver._safe_ref() if driver is not None else None
        adalora = isinstance(safe, AdaLoraModel) and safe.active_safe_adapter is not None
        if driver is not None and driver.active and adalora:
            safe.update_and_allocate(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._call("_save_probe")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._call("_on_trainer_end")
