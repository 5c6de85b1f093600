"""SAFE's automatic schedule: scoring and freezing when nothing else drives them (no SAFECallback, no loop code).

``get_peft_model(model, SAFEConfig(...))`` is then all a user writes, under TRL's trainers, the transformers
Trainer or a plain loop. The driver watches training forwards (grad enabled, adapters on, in train or eval mode)
through forward pre-hooks on the SAFE tuner and on the model it wraps (a ``PeftModel`` without ``task_type``
calls the wrapped model directly). It keeps the first few training batches (detached copies, up to
``probe_tokens`` tokens, at most :data:`MAX_PROBE_BATCHES` batches) as the probe set, and follows one of two
clocks:

- **Under a transformers Trainer** (found on the call stack at a training forward) the schedule follows the
  Trainer's own step: the driver attaches a callback to that Trainer which scores at ``on_step_end`` with
  ``state.global_step`` (or at ``on_epoch_end`` with the epoch), exactly where and as :class:`SAFECallback` does,
  through the same :func:`score_if_due`. A resumed run (``resume_from_checkpoint``), a second ``train()``, a new
  Trainer, gradient accumulation and optimizers that step outside torch's hooks therefore keep their schedule.
  The probe set is saved into each Trainer checkpoint (``safe_probe.rank<N>.pt``, beside the optimizer's state)
  and read back on resume, so a resumed run scores on the batches the uninterrupted one did.
- **In a plain loop** it counts optimizer steps with torch's global optimizer step hook, taking any optimizer
  that holds SAFE's adapter parameters (the latest one to step, so a replaced optimizer is followed). At the first
  training forward after a step that ends a scoring interval it calls ``update_and_freeze(steps, probe,
  optimizer)``; an optimizer seen for the first time loses the units frozen before it stepped (they had no
  gradient, so it did not move them). The count is saved with the adapter and the model's state dict and
  restored on load.

Acting at that forward, not in the step hook, lets a loop that calls ``update_and_freeze`` right after
``optimizer.step()`` come first; the driver stands down for good once anyone else has acted (``update_and_freeze``
called by someone else, or ``SAFECallback`` starting). Under ``torch.distributed`` every rank acts at the same step
and ``update_and_freeze`` makes the ranks agree. What it cannot drive (``"epoch"`` outside a Trainer; DDP without
``find_unused_parameters=True``; a DeepSpeed engine in a plain loop, whose steps torch's hooks do not show) is a
warning at the first training step, naming the fix, and the driver stands down. Under a Trainer, DeepSpeed ZeRO
follows the Trainer's clock like any other engine, and frozen units are held still (:mod:`.zero`).

Imports: torch, peft's tuner layer class, and of this package ``batch``, ``reporting`` (the Trainer's logging
path), ``.distributed``, ``.trainer_clock``, ``.units``.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_post_hook

from ...batch import real_tokens
from ...reporting import find_on_stack, find_trainer, follow_transformers_verbosity, log_to_trainer
from .distributed import check_ddp, check_trainer_ddp
from .hooks import add_hook
from .trainer_clock import PROBE_FILE, attach_clock, load_probe, save_probe
from .tuner_view import TunerView
from .units import unit_parameters

__all__ = ["MAX_PROBE_BATCHES", "PROBE_FILE", "AutoDriver", "check_trainer_schedule", "progress_record",
           "resume_steps", "schedule_length_warning", "score_if_due"]

logger = logging.getLogger(__name__)

# The most training batches kept as the automatic probe set (fewer once probe_tokens tokens are held).
MAX_PROBE_BATCHES = 8


def progress_record(safe: TunerView, t: float, newly: list[str]) -> dict[str, Any]:
    """The ``safe/*`` log entry of one scoring at time ``t``: threshold, frozen count, importance per unit."""
    return {
        "safe/t": t,
        "safe/threshold": safe.threshold(t),
        "safe/frozen_units": len(safe.frozen_units),
        "safe/newly_frozen": ",".join(newly),
        **{f"safe/importance/{name}": score for name, score in safe.importance.items()},
        **_cache_record(safe),
    }


def _cache_record(safe: TunerView) -> dict[str, Any]:
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


def score_if_due(safe: TunerView, t: float | None, probe: list[Any], optimizer: Any) -> list[str] | None:
    """``update_and_freeze(t, probe, optimizer)`` when ``t`` ends a scoring interval not yet scored, else ``None``.

    The one decision of when to score, shared by :class:`SAFECallback` and the automatic schedule.
    """
    interval = safe.safe_config.scoring_interval
    if t is None or t <= 0 or not math.isclose(t / interval, round(t / interval), abs_tol=1e-6):
        return None
    last = safe.freeze_state.last_scored
    if (last is not None and t <= last) or not probe:
        return None  # already scored at this time (a resumed run re-entering the same point)
    return safe.update_and_freeze(t, probe, optimizer=optimizer)


def schedule_length_warning(config: Any, length: float | None) -> str | None:
    """Why a run of ``length`` schedule units is too short for the schedule to act, or ``None`` when it is not."""
    if length is None or length <= 0:
        return None
    unit = config.schedule_unit
    if config.scoring_interval > length:
        field, value = "scoring_interval", config.scoring_interval
    elif config.final_freeze_time > length:
        field, value = "final_freeze_time", config.final_freeze_time
    else:
        return None
    return (
        f"SAFE's schedule is longer than this run: {field}={value:g} {unit}(s), but the Trainer trains "
        f"{length:g} {unit}(s), so SAFE freezes less than configured (nothing, if warm-up does not end in time). "
        f"Set final_freeze_time (and scoring_interval, warmup_cap) within the run, e.g. "
        f"final_freeze_time={max(length * 0.6, config.scoring_interval):g}, or train longer."
    )


def check_trainer_schedule(config: Any, state: Any, who: str, stacklevel: int) -> None:
    """What SAFECallback and the automatic schedule check of the schedule when a Trainer's run starts: whole epochs
    for the epoch unit (refused otherwise), and a schedule longer than the run (a warning, and a log line).

    Raises:
        ValueError: for a fractional ``scoring_interval`` with ``schedule_unit="epoch"``.
    """
    if config.schedule_unit == "epoch" and not float(config.scoring_interval).is_integer():
        raise ValueError(
            f"{who} scores at epoch ends, so with schedule_unit='epoch' scoring_interval must be a whole number of "
            f"epochs, got {config.scoring_interval}. To score within an epoch, use schedule_unit='step' with "
            "scoring_interval (and final_freeze_time) in optimizer steps."
        )
    length = getattr(state, "max_steps" if config.schedule_unit == "step" else "num_train_epochs", None)
    message = schedule_length_warning(config, length)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
        logger.warning(message)


def resume_steps(state: Any) -> int:
    """The optimizer step a plain loop resumes at: the count saved, else (older checkpoints) the last scoring step."""
    if state.optimizer_steps is not None:
        return state.optimizer_steps
    if state.schedule_unit == "step" and state.last_scored is not None:
        return int(state.last_scored)
    return 0


def _kept(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class AutoDriver:
    """The automatic schedule of one :class:`~peft_safe.SAFEModel` (``safe.auto_driver``)."""

    def __init__(self, safe: TunerView) -> None:
        self.active = True
        self.reason: str | None = None  # why it stood down
        self.steps = 0  # optimizer steps seen (the plain loop's clock)
        self._safe_ref = weakref.ref(safe)
        self._transient()
        # A PeftModel without task_type calls the wrapped model, not the tuner; with one, the tuner's forward calls
        # the wrapped model: the outermost of the two acts (the tuner's, before the prefix cache's hook there).
        self._handles = (  # first on both modules (hooks.ORDER): the parts after it see the cut a freeze moved
            add_hook("driver", safe, "pre", self._on_tuner_forward),
            add_hook("driver", safe, "post_always", self._after_tuner_forward),
            add_hook("driver", safe.model, "pre", self._on_model_forward),
        )

    def _transient(self) -> None:
        # What a copy (deepcopy, pickle) does not carry: it belongs to this process's run.
        self.probe: list[Any] = []
        self._probe_tokens = 0
        self._optimizer_ref: Any = None
        self._trainer_ref: Any = None  # the Trainer whose train() drives the schedule now
        self._holders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> holds SAFE's params
        self._tuner_layer: Any = None
        self._global_handle: Any = None
        self._pending = False
        self._loop_started = False
        self._in_tuner = 0  # tuner forwards in progress
        self.acting = False  # True while the driver itself calls update_and_freeze

    def __getstate__(self) -> dict[str, Any]:
        keep = ("active", "reason", "steps", "_handles")
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
        """The optimizer that last stepped holding SAFE's parameters (plain loops)."""
        return self._optimizer_ref() if self._optimizer_ref is not None else None

    @property
    def trainer(self) -> Any:
        """The transformers Trainer whose step drives the schedule while its ``train()`` runs, else ``None``."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    def stand_down(self, reason: str) -> None:
        """Stop driving, for good: someone else (``reason``) drives the schedule."""
        if not self.active:
            return
        self.active, self.reason = False, reason
        if self._global_handle is not None:
            self._global_handle.remove()
        self._global_handle = None
        self.probe = []
        logger.debug("SAFE's automatic schedule stands down: %s", reason)

    def restart(self, steps: int = 0) -> None:
        """Count optimizer steps from ``steps`` (a loaded checkpoint's count; 0 for a schedule started anew)."""
        self.steps = int(steps)
        self._pending = False

    # ------------------------------------------------------------------ hooks
    def _on_tuner_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._in_tuner += 1
        self._on_forward(module, args, kwargs)

    def _after_tuner_forward(self, module: Any, args: tuple, output: Any) -> None:
        self._in_tuner = max(0, self._in_tuner - 1)

    def _on_model_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not self._in_tuner:
            self._on_forward(module, args, kwargs)

    def _on_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not self.active or self.acting or not torch.is_grad_enabled():
            return
        safe = self._safe_ref()
        if safe is None or safe.active_safe_adapter is None:
            return  # every adapter deleted
        if self._adapters_disabled(safe):
            return  # a reference forward under disable_adapter(): neither scored nor kept
        trainer = find_trainer()
        if trainer is not None:
            if trainer is not self.trainer:
                self._follow_trainer(trainer, safe)
        else:
            self._trainer_ref = None  # a plain loop (again)
            if not self._loop_started:
                self._start_loop(safe)
            if self._pending and self.active:
                self._pending = False
                self._act(safe, float(self.steps), self.optimizer)
        if self.active:
            self._keep(safe, args, kwargs)

    def _adapters_disabled(self, safe: TunerView) -> bool:
        layer = self._tuner_layer() if self._tuner_layer is not None else None
        if layer is None:
            layer = next((m for m in safe.model.modules() if isinstance(m, BaseTunerLayer)), None)
            if layer is None:
                return False
            self._tuner_layer = weakref.ref(layer)
        return bool(layer.disable_adapters)

    # ------------------------------------------------------------------ the Trainer's clock
    def _follow_trainer(self, trainer: Any, safe: TunerView) -> None:
        self._trainer_ref = weakref.ref(trainer)
        self._pending = False
        follow_transformers_verbosity()
        config = safe.safe_config
        try:  # DDP waits forever for the gradients of frozen units unless told they may be unused
            check_trainer_ddp(trainer.args.world_size, trainer.args.ddp_find_unused_parameters)
        except ValueError as err:
            warnings.warn(f"SAFE will not freeze units by itself here: {err}", UserWarning, stacklevel=5)
            self.stand_down("DistributedDataParallel without find_unused_parameters=True")
            return
        check_trainer_schedule(config, trainer.state, "SAFE", stacklevel=5)
        attach_clock(trainer, self)
        self.probe = load_probe(trainer)  # the resumed checkpoint's, else none yet: this run's first batches
        self._probe_tokens = sum(real_tokens(batch) for batch in self.probe)
        logger.info("SAFE drives its own schedule (no SAFECallback): scoring every %s %s(s) of the Trainer",
                    config.scoring_interval, config.schedule_unit)

    def _on_trainer_time(self, trainer: Any, unit: str, t: float, optimizer: Any) -> None:
        safe = self._safe_ref()
        if safe is None or safe.active_safe_adapter is None or safe.safe_config.schedule_unit != unit:
            return
        if unit == "step":
            self.steps = int(t)  # the Trainer's step is the count a later plain loop or checkpoint continues from
        if self.active and trainer is self.trainer:
            self._act(safe, t, optimizer, trainer)

    def _on_trainer_end(self, trainer: Any) -> None:
        if trainer is self.trainer:
            self._trainer_ref = None

    def _save_probe(self, trainer: Any) -> None:
        if self.active and trainer is self.trainer and self.probe:
            save_probe(trainer, self.probe)

    # ------------------------------------------------------------------ the plain loop's clock
    def _start_loop(self, safe: TunerView) -> None:
        self._loop_started = True
        follow_transformers_verbosity()
        config = safe.safe_config
        try:
            check_ddp(find_on_stack(lambda obj: isinstance(obj, DistributedDataParallel)))
        except ValueError as err:
            warnings.warn(f"SAFE will not freeze units by itself here: {err}", UserWarning, stacklevel=5)
            self.stand_down("DistributedDataParallel without find_unused_parameters=True")
            return
        if find_on_stack(lambda obj: type(obj).__name__ == "DeepSpeedEngine") is not None:
            message = (
                "SAFE cannot drive its schedule by itself in a plain loop over a DeepSpeed engine: the engine's steps "
                "do not go through torch's optimizer hooks on SAFE's parameters, so nothing would be scored. Call "
                "peft_model.base_model.update_and_freeze(step, probe_batches) after engine.step() at each scoring "
                "step (frozen units are then held still under ZeRO), or train with the transformers Trainer."
            )
            warnings.warn(message, UserWarning, stacklevel=5)
            self.stand_down("a DeepSpeed engine in a plain loop")
            return
        if config.schedule_unit == "epoch":
            message = (
                "SAFE cannot drive schedule_unit='epoch' by itself here: outside a transformers Trainer it does not "
                "know where an epoch ends, so nothing will be scored or frozen. Use schedule_unit='step' (with "
                "scoring_interval and final_freeze_time in optimizer steps), or call "
                "peft_model.base_model.update_and_freeze(epoch, probe_batches, optimizer) at each epoch's end."
            )
            warnings.warn(message, UserWarning, stacklevel=5)
            self.stand_down("schedule_unit='epoch' outside a Trainer")
            return
        self._global_handle = register_optimizer_step_post_hook(_GlobalHook(self))
        logger.info("SAFE drives its own schedule (no SAFECallback): scoring every %s optimizer step(s)",
                    config.scoring_interval)

    def _on_any_step(self, optimizer: torch.optim.Optimizer) -> None:
        safe = self._safe_ref()
        if safe is None or not self.active or self.trainer is not None or safe.active_safe_adapter is None:
            return  # under a Trainer its own step is the clock
        holds = self._holders.get(optimizer)
        if holds is None:
            ids = {id(p) for unit in safe.units() for p in unit_parameters(unit, safe.safe_adapter_name)}
            holds = any(id(p) in ids for group in optimizer.param_groups for p in group["params"])
            self._holders[optimizer] = holds
        if holds:  # not another optimizer (a critic, a discriminator...)
            if optimizer is not self.optimizer:  # a new one, built before the last freeze: it keeps no frozen unit
                safe.apply_freeze_state(optimizer)
            self._optimizer_ref = weakref.ref(optimizer)
            self.steps += 1
            self._pending = True

    # ------------------------------------------------------------------ acting
    def _act(self, safe: TunerView, t: float, optimizer: Any, trainer: Any = None) -> None:
        self.acting = True
        try:
            newly = score_if_due(safe, t, self.probe, optimizer)
        finally:
            self.acting = False
        if newly is None:
            return
        if trainer is not None:
            log_to_trainer(trainer, progress_record(safe, t, newly))
        logger.info("SAFE t=%s frozen %d/%d units%s", t, len(safe.frozen_units), len(safe.adapter_units),
                    f" (new: {newly})" if newly else "")

    def _keep(self, safe: TunerView, args: tuple, kwargs: dict) -> None:
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
