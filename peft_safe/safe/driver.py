"""SAFE's automatic schedule: scoring and freezing when nothing else drives them (no SAFECallback, no loop code).

``get_peft_model(model, SAFEConfig(...))`` is then all a user writes, under TRL's trainers, the transformers
Trainer or a plain loop. The driver watches training with two hooks:

- a forward pre-hook on the SAFE tuner: a *training forward* (module in train mode, grad enabled) is where it acts,
  and the first few training batches are kept (detached copies, up to ``probe_tokens`` tokens, at most
  :data:`MAX_PROBE_BATCHES` batches) as the probe set;
- torch's optimizer step hooks: first the global one, until the optimizer holding SAFE's adapter parameters steps,
  then that optimizer's own ``register_step_post_hook``. Gradient accumulation therefore counts optimizer steps, not
  forwards; a step skipped by a gradient scaler is not counted.

At the first training forward after an optimizer step that ends a scoring interval it calls
``update_and_freeze(t, probe, optimizer)``: frozen parameters and their state leave that optimizer. ``t`` is the
optimizer step (``schedule_unit="step"``; the Trainer's ``global_step`` when a Trainer runs, so resumed runs
continue), or the completed epoch of the running transformers Trainer (``"epoch"``). Acting at that forward, not in
the step hook, lets a ``SAFECallback`` (``on_step_end``) or a loop that calls ``update_and_freeze`` right after
``optimizer.step()`` come first; the driver stands down for good once either has acted (``update_and_freeze``
called by anyone else, or ``SAFECallback`` starting). Under ``torch.distributed`` every rank acts at the same step
and ``update_and_freeze`` makes the ranks agree. What it cannot drive (``"epoch"`` outside a Trainer; DDP without
``find_unused_parameters=True``, which would hang once a unit froze) is a warning at the first training step,
naming the fix, and the driver stands down.

Imports: torch, and of this package ``reporting`` (the Trainer's logging path), ``safe.distributed``, ``safe.units``.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..batch import real_tokens
from ..reporting import find_on_stack, find_trainer, follow_transformers_verbosity, log_to_trainer
from .distributed import check_ddp, check_trainer_ddp
from .units import unit_parameters

__all__ = ["MAX_PROBE_BATCHES", "AutoDriver", "progress_record"]

logger = logging.getLogger(__name__)

# The most training batches kept as the automatic probe set (fewer once probe_tokens tokens are held).
MAX_PROBE_BATCHES = 8


def progress_record(safe: Any, t: float, newly: list[str]) -> dict[str, Any]:
    """The ``safe/*`` log entry of one scoring at time ``t``: threshold, frozen count, importance per unit."""
    return {
        "safe/t": t,
        "safe/threshold": safe.threshold(t),
        "safe/frozen_units": len(safe.frozen_units),
        "safe/newly_frozen": ",".join(newly),
        **{f"safe/importance/{name}": score for name, score in safe.importance.items()},
        **_cache_record(safe),
    }


def _cache_record(safe: Any) -> dict[str, Any]:
    """The prefix cache's figures (``cache_frozen=True`` only): hit rate, rows and bytes held, forwards served."""
    cache = getattr(safe, "prefix_cache", None)
    stats = cache.stats() if cache is not None else {}
    if not stats.get("enabled"):
        return {}
    figures = {
        "safe/cache_hit_rate": stats["hit_rate"],  # None before the first lookup: left out
        "safe/cache_served_forwards": stats["served_forwards"],
        "safe/cache_bytes": stats["memory_bytes"] + stats["disk_bytes"],
        "safe/cache_disk_bytes": stats["disk_bytes"],
    }
    return {key: value for key, value in figures.items() if value is not None}


def _kept(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class AutoDriver:
    """The automatic schedule of one :class:`~peft_safe.SAFEModel` (``safe.auto_driver``)."""

    def __init__(self, safe: Any) -> None:
        self.active = True
        self.reason: str | None = None  # why it stood down
        self.steps = 0  # optimizer steps seen
        self._safe_ref = weakref.ref(safe)
        self._transient()
        self._forward_handle = safe.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _transient(self) -> None:
        # What a copy (deepcopy, pickle) does not carry: it belongs to this process's run.
        self.probe: list[Any] = []
        self._probe_tokens = 0
        self._optimizer_ref: Any = None
        self._trainer_ref: Any = None
        self._global_handle: Any = None
        self._step_handle: Any = None
        self._pending = False
        self._started = False
        self.acting = False  # True while the driver itself calls update_and_freeze

    def __getstate__(self) -> dict[str, Any]:
        keep = ("active", "reason", "steps", "_forward_handle")
        state = {k: v for k, v in self.__dict__.items() if k in keep}
        state["_safe"] = self._safe_ref()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        safe = state.pop("_safe")
        self.__dict__.update(state)
        self._safe_ref = weakref.ref(safe)
        self._transient()

    # ------------------------------------------------------------------ public
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer found holding SAFE's parameters, once it has stepped."""
        return self._optimizer_ref() if self._optimizer_ref is not None else None

    def stand_down(self, reason: str) -> None:
        """Stop driving, for good: someone else (``reason``) drives the schedule."""
        if not self.active:
            return
        self.active, self.reason = False, reason
        for handle in (self._global_handle, self._step_handle):
            if handle is not None:
                handle.remove()
        self._global_handle = self._step_handle = None
        self.probe = []
        logger.debug("SAFE's automatic schedule stands down: %s", reason)

    # ------------------------------------------------------------------ hooks
    def _on_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not self.active or self.acting or not module.training or not torch.is_grad_enabled():
            return
        if not self._started:
            self._start()
            if not self.active:
                return
        if self._pending:
            self._pending = False
            self._act()
        elif self._optimizer_ref is None and self._trainer_ref is not None:
            self._check_steps_seen()
        if self.active:
            self._keep(args, kwargs)

    def _start(self) -> None:
        self._started = True
        trainer = find_trainer()
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        follow_transformers_verbosity()
        safe = self._safe_ref()
        config = safe.safe_config
        try:  # DDP waits forever for the gradients of frozen units unless told they may be unused
            if trainer is not None:
                check_trainer_ddp(trainer.args.world_size, trainer.args.ddp_find_unused_parameters)
            check_ddp(find_on_stack(lambda obj: isinstance(obj, DistributedDataParallel)))
        except ValueError as err:
            warnings.warn(f"SAFE will not freeze units by itself here: {err}", UserWarning, stacklevel=4)
            self.stand_down("DistributedDataParallel without find_unused_parameters=True")
            return
        if config.schedule_unit == "epoch" and trainer is None:
            message = (
                "SAFE cannot drive schedule_unit='epoch' by itself here: outside a transformers Trainer it does not "
                "know where an epoch ends, so nothing will be scored or frozen. Use schedule_unit='step' (with "
                "scoring_interval and final_freeze_time in optimizer steps), or call "
                "peft_model.base_model.update_and_freeze(epoch, probe_batches, optimizer) at each epoch's end."
            )
            warnings.warn(message, UserWarning, stacklevel=4)
            self.stand_down("schedule_unit='epoch' outside a Trainer")
            return
        if config.schedule_unit == "epoch" and not float(config.scoring_interval).is_integer():
            raise ValueError(
                f"SAFE scores at epoch ends, so with schedule_unit='epoch' scoring_interval must be a whole number "
                f"of epochs, got {config.scoring_interval}; use schedule_unit='step' to score within an epoch."
            )
        self._global_handle = register_optimizer_step_post_hook(_GlobalHook(self))
        logger.info("SAFE drives its own schedule (no SAFECallback): scoring every %s %s(s)",
                    config.scoring_interval, config.schedule_unit)

    def _on_any_step(self, optimizer: torch.optim.Optimizer) -> None:
        safe = self._safe_ref()
        if safe is None or not self.active:
            return
        ids = {id(p) for unit in safe._units() for p in _unit_params(safe, unit)}
        if not any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
            return  # another optimizer (a critic, a discriminator...)
        self._optimizer_ref = weakref.ref(optimizer)
        self._global_handle.remove()
        self._global_handle = None
        self._step_handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._on_step(opt))
        self._on_step(optimizer)

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.active:
            self.steps += 1
            self._pending = True

    # ------------------------------------------------------------------ acting
    def _time(self) -> float | None:
        safe = self._safe_ref()
        config = safe.safe_config
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if config.schedule_unit == "epoch":
            epoch = getattr(trainer.state, "epoch", None) if trainer is not None else None
            return float(math.floor(epoch + 1e-6)) if epoch is not None else None
        if trainer is not None:
            return float(trainer.state.global_step)
        return float(self.steps)

    def _act(self) -> None:
        safe = self._safe_ref()
        t = self._time()
        interval = safe.safe_config.scoring_interval
        if t is None or t <= 0 or not math.isclose(t / interval, round(t / interval), abs_tol=1e-6):
            return
        last = safe.freeze_state.last_scored
        if last is not None and t <= last:
            return
        if not self.probe:
            return
        self.acting = True
        try:
            newly = safe.update_and_freeze(t, self.probe, self.optimizer)
        finally:
            self.acting = False
        record = progress_record(safe, t, newly)
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is not None:
            log_to_trainer(trainer, record)
        logger.info("SAFE t=%s frozen %d/%d units%s", t, len(safe.frozen_units), len(safe.adapter_units),
                    f" (new: {newly})" if newly else "")

    def _check_steps_seen(self) -> None:
        trainer = self._trainer_ref()
        if trainer is None or getattr(trainer.state, "global_step", 0) < 1:
            return
        message = (
            f"SAFE saw no step of an optimizer holding its parameters, yet the Trainer is at step "
            f"{trainer.state.global_step}: its optimizer steps outside torch's optimizer hooks (DeepSpeed?), so SAFE "
            "cannot drive its schedule by itself. Add SAFECallback(probe_dataset=...) to the Trainer's callbacks."
        )
        warnings.warn(message, UserWarning, stacklevel=4)
        self.stand_down("no optimizer step seen")

    def _keep(self, args: tuple, kwargs: dict) -> None:
        safe = self._safe_ref()
        budget = safe.safe_config.probe_tokens
        if len(self.probe) >= MAX_PROBE_BATCHES or self._probe_tokens >= budget:
            return
        if kwargs and not args:
            batch: Any = {k: _kept(v) for k, v in kwargs.items() if v is not None}  # as trained: TRL needs labels
        elif args and not kwargs:
            batch = tuple(_kept(a) for a in args)
        else:
            return
        tokens = real_tokens(batch)
        if tokens:
            self.probe.append(batch)
            self._probe_tokens += tokens


class _GlobalHook:
    """torch's global optimizer step hook, holding the driver weakly (a model never lives on through it)."""

    def __init__(self, driver: AutoDriver) -> None:
        self._driver = weakref.ref(driver)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        driver = self._driver()
        if driver is not None:
            driver._on_any_step(optimizer)


def _unit_params(safe: Any, unit: Any) -> list[torch.nn.Parameter]:
    return unit_parameters(unit, safe.safe_adapter_name)
