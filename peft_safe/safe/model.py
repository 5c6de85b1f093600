"""SAFEModel: the wrapped adapter's tuner, plus SAFE's public API and the overrides that keep frozen units frozen.

``SAFEModel(model, config)`` returns an instance of a subclass built once per wrapped tuner, e.g.
``SAFELoraModel(SAFEModel, LoraModel)``: injection, merging, unloading and the wrapped method's own extras
(AdaLoRA's ``update_and_allocate``) are the wrapped tuner's code, unchanged. SAFE overrides only what it
must: the methods through which peft sets ``requires_grad`` (so frozen units stay frozen), and the
adapter state-dict hooks (so the freeze state travels inside the checkpoint).

This module is the tuner's shell; the parts live beside it: ``units`` (what a unit is), ``scoring`` (1 - CKA
per unit), ``core.policy`` (the schedule), ``optimizer`` (what freezing frees), ``truncation`` (backprop cut),
``checkpoint`` (the payload and its checks), ``adalora`` (rank allocation), ``distributed`` (ranks agree),
``prefix_cache`` (the frozen blocks' output served from a cache, ``cache_frozen=True``).

Imports: peft's tuner machinery and this package's ``core`` and ``safe``; never transformers' Trainer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ..core.policy import SchedulePolicy, check_scoring_time, check_time
from ..core.schedule import normalize_scores
from ..core.state import FreezeState
from .config import SAFEConfig
from .config_fields import mark_built_into_model
from .method.adalora import allocate_trainable_ranks
from .method.distributed import agree_on_scores
from .method.driver import AutoDriver
from .method.freezing import FrozenUnitsMixin, check_something_trains
from .method.optimizer import check_optimizer
from .method.scoring import compute_importance
from .method.units import (
    AdapterUnit,
    as_index,
    leaf_layer_names,
    require_units,
    resolve_units,
    unit_parameters,
)
from .method.zero import ZeroHold
from .persistence.checkpoint import apply_loaded_freeze_state, check_loadable, read_freeze_state, write_freeze_state
from .persistence.state_dict import extra_state, install_state_dict_hooks, load_extra_state
from .savings.budget import CheckpointBudget, check_one_block_list
from .savings.cache_options import check_cache_dir_writable
from .savings.prefix_cache import PrefixCache
from .savings.truncation import BackpropCut

__all__ = ["SAFEModel", "find_safe_model"]

logger = logging.getLogger(__name__)


def _wrapped_tuner_cls(config: SAFEConfig) -> type[BaseTuner]:
    return PEFT_TYPE_TO_TUNER_MAPPING[config.adapter_config.peft_type]


@functools.cache
def _safe_class_for(tuner_cls: type[BaseTuner]) -> type[SAFEModel]:
    """``SAFE<Tuner>(SAFEModel, <Tuner>)``, built once per wrapped tuner; :func:`__getattr__` finds it by name."""
    name = f"SAFE{tuner_cls.__name__}"
    return type(
        name,
        (SAFEModel, tuner_cls),
        {
            "__module__": __name__,
            "__qualname__": name,
            "prefix": tuner_cls.prefix,
            "tuner_layer_cls": tuner_cls.tuner_layer_cls,
            "target_module_mapping": tuner_cls.target_module_mapping,
        },
    )


def __getattr__(name: str) -> type[SAFEModel]:
    # Pickle (and copy) find a class by module and name: resolve ``SAFELoraModel`` to the cached subclass of the
    # registered tuner of that name, building it on first use (an unpickling process may not have built it yet).
    if name.startswith("SAFE"):
        for tuner_cls in list(PEFT_TYPE_TO_TUNER_MAPPING.values()):
            if f"SAFE{tuner_cls.__name__}" == name and not issubclass(tuner_cls, SAFEModel):
                return _safe_class_for(tuner_cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def find_safe_model(model: nn.Module) -> SAFEModel | None:
    """The SAFE tuner inside ``model`` (a PeftModel, a SAFEModel or any module holding one), or ``None``."""
    if isinstance(model, SAFEModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, SAFEModel):
        return base
    return next((m for m in model.modules() if isinstance(m, SAFEModel)), None)


class SAFEModel(FrozenUnitsMixin, BaseTuner):
    """SAFE (Selective Adapter FrEezing) around a peft adapter.

    Created by ``get_peft_model(model, SAFEConfig(...))``; reach it as ``peft_model.base_model``.

    Args:
        model: the model to adapt.
        config: a :class:`SAFEConfig` (or a dict of them by adapter name).
        adapter_name: name of the adapter, ``"default"`` by default.

    Example:
        >>> peft_model = get_peft_model(model, SAFEConfig(adapter_config=LoraConfig(target_modules=["query"])))
        >>> safe = peft_model.base_model
        >>> safe.adapter_units            # ['bert.encoder.layer.0', ...]
        >>> safe.freeze([0, 1], optimizer=optimizer)
    """

    prefix: str = "safe_"  # the concrete subclass takes the wrapped tuner's prefix
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict = {}
    # The freeze state lives on the tuner, so inject_adapter_in_model (which drops the tuner) is refused.
    uses_shared_state = True

    def __new__(cls, model: nn.Module | None = None, config: Any = None, adapter_name: str = "default", **kwargs: Any):
        # copy.deepcopy reconstructs through cls.__new__(cls): cls is then already the concrete subclass.
        if cls is SAFEModel:
            safe_config = config[adapter_name] if isinstance(config, dict) else config
            if not isinstance(safe_config, SAFEConfig):
                raise TypeError(f"SAFEModel needs a SAFEConfig, got {type(safe_config).__name__}.")
            cls = _safe_class_for(_wrapped_tuner_cls(safe_config))
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        # set before injection: peft's injection calls set_adapter, which re-applies the freeze state
        self._freeze_states: dict[str, FreezeState] = {}
        self._backprop_cut = BackpropCut()
        self._zero_hold = ZeroHold()  # DeepSpeed ZeRO: frozen units' slices written back after each step
        super().__init__(model, config, adapter_name, **kwargs)
        check_cache_dir_writable(self.safe_config)  # now, not at the first row spilled to disk
        if self.safe_config.cache_frozen:  # T5, BART: two stacks, no frozen prefix to cache
            check_one_block_list(self, "cache_frozen", "cache_frozen=False")
        self.auto_driver = AutoDriver(self)  # drives the schedule while nothing else does (see driver.py)
        self.prefix_cache = PrefixCache(self)  # after the driver's hook: it sees the cut a freeze just moved
        install_state_dict_hooks(self)  # the freeze state travels in model.state_dict() too (see state_dict.py)
        # per-block gradient checkpointing under SAFEConfig.memory_budget (see budget.py)
        self.checkpoint_budget = CheckpointBudget(self) if self.safe_config.memory_budget is not None else None

    # ------------------------------------------------------------------ config plumbing
    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        # From here on peft's injection works with the wrapped adapter's own config object.
        inner = peft_config.adapter_config if isinstance(peft_config, SAFEConfig) else peft_config
        return super()._prepare_adapter_config(inner, model_config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, SAFEConfig):
            raise TypeError(
                f"adapter {adapter_name!r} has a {type(config).__name__}; a SAFE model takes SAFEConfig adapters only."
            )
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except NoMatchingPeftModuleError as err:
            leaves = leaf_layer_names(model)
            raise NoMatchingPeftModuleError(
                f"target_modules={getattr(config.adapter_config, 'target_modules', None)!r} of the wrapped "
                f"{config.adapter_peft_type} adapter matched no module of {type(model).__name__}; name some of its "
                f"layers instead, e.g. among {leaves[:20]}. ({err})"
            ) from err
        mark_built_into_model(config)  # the fields a model reads once are refused changes from now on
        if adapter_name not in self._freeze_states:
            self._new_freeze_state(adapter_name)

    def _new_freeze_state(self, adapter_name: str) -> None:
        self._freeze_states[adapter_name] = self._fresh_state(adapter_name)

    def _new_freeze_state_replacing(self, adapter_name: str) -> None:
        self._replace_freeze_state(adapter_name, self._fresh_state(adapter_name))

    def _fresh_state(self, adapter_name: str) -> FreezeState:
        config = self.peft_config[adapter_name]
        return FreezeState(
            units=[u.name for u in self._units(adapter_name)],
            adapter_type=config.adapter_peft_type,
            schedule_unit=config.schedule_unit,
            final_freeze_time=config.final_freeze_time,
        )

    @property
    def safe_adapter_name(self) -> str:
        """The name of the active SAFE adapter: the one scored, frozen and reported."""
        return self.active_adapters[0]

    @property
    def safe_config(self) -> SAFEConfig:
        """The :class:`SAFEConfig` of the active adapter; change hyper-parameters on it."""
        return self.peft_config[self.safe_adapter_name]

    def _live_units(self, action: str, adapter_name: str | None = None) -> list[AdapterUnit]:
        """The units, refused when the adapter's layers are gone (merged and unloaded)."""
        adapter_name = adapter_name or self.safe_adapter_name
        units = self._units(adapter_name)
        require_units(units, self._freeze_states[adapter_name].units, adapter_name, action)
        return units

    # ------------------------------------------------------------------ public surface
    @property
    def adapter_units(self) -> list[str]:
        """Unit names, input side first: one per transformer block holding adapters."""
        return [unit.name for unit in self._units()]

    @property
    def frozen_units(self) -> list[str]:
        """Units frozen so far, in unit order."""
        frozen = self.freeze_state.frozen
        return [name for name in self.freeze_state.units if name in frozen]

    @property
    def freeze_state(self) -> FreezeState:
        """The :class:`FreezeState` of the active SAFE adapter (frozen units, history, warm-up end)."""
        return self._freeze_states[self.safe_adapter_name]

    @property
    def raw_importance(self) -> dict[str, float]:
        """Latest raw importance (1 - CKA) of every unit scored so far; empty before the first scoring.

        Frozen units are not scored again: a frozen unit keeps the score it had when it was last scored (the one
        it froze on), so the reason it froze stays visible.
        """
        return self.freeze_state.last_known_scores

    @property
    def importance(self) -> dict[str, float]:
        """:attr:`raw_importance` on the configured scale, over every unit (frozen ones at their last score)."""
        raw = self.raw_importance
        return normalize_scores(raw, self.safe_config.importance_scale) if raw else {}

    @property
    def schedule(self) -> SchedulePolicy:
        """The schedule of the config as it stands (:meth:`SAFEConfig.schedule_policy`)."""
        return self.safe_config.schedule_policy()

    def threshold(self, t: float) -> float:
        """The freezing threshold T(t) of the schedule as it stands (0 during warm-up)."""
        return self.schedule.threshold(t, self.freeze_state.warmup_end)

    def compute_importance(
        self, probe_batches: Iterable[Any], units: Sequence[str | int] | None = None
    ) -> dict[str, float]:
        """Score units on the probe batches without changing the freeze state.

        Args:
            probe_batches: batches of model inputs.
            units: the units to score (names or indices); all units when ``None``.

        Returns:
            unit name -> raw importance (1 - CKA).
        """
        config = self.safe_config
        chosen = self._live_units("score importance")
        if units is not None:
            names = set(resolve_units([unit.name for unit in chosen], units))
            chosen = [unit for unit in chosen if unit.name in names]
        return compute_importance(
            self.model, chosen, probe_batches, config.probe_tokens, config.seed, site=config.scoring_site_value,
            precision=config.cka_precision,
        )

    def update_and_freeze(
        self, t: float, probe_batches: Iterable[Any], optimizer: torch.optim.Optimizer | None = None
    ) -> list[str]:
        """Score the trainable units, advance the schedule to time ``t``, freeze the units below the threshold.

        Args:
            t: the current time in the config's ``schedule_unit`` (epoch or optimizer step).
            probe_batches: a few batches of model inputs (eval mode, no grad).
            optimizer: if given, newly frozen parameters and their state leave it.

        Returns:
            The units frozen by this call.

        Raises:
            ValueError: if ``t`` is not a finite number >= 0, or lies before the previous scoring.
            TypeError: if ``optimizer`` is not a torch optimizer.

        Under ``torch.distributed`` (world size > 1) every rank must call this with the same ``t``: the scores
        are averaged over the ranks (see :mod:`peft_safe.safe.method.distributed`), so all ranks freeze the same units.

        The first call stands the automatic schedule (:attr:`auto_driver`) down for good: the caller drives.
        """
        if not self.auto_driver.acting:
            self.auto_driver.stand_down("update_and_freeze was called")
        with self._units_found_once():  # scoring and freezing add no adapter layer: one walk of the model
            return self._update_and_freeze(t, probe_batches, optimizer)

    def _update_and_freeze(self, t: float, probe_batches: Iterable[Any], optimizer: Any) -> list[str]:
        # Everything is checked before the state moves: the time, the optimizer, hyper-parameters changed in place
        # (model.peft_config[name].tau = ...) and that the adapters are still in the model.
        t = check_scoring_time(t, self.freeze_state.last_scored)
        check_optimizer(optimizer)
        self.safe_config._validate()
        # Frozen units never thaw, so they are not rerun: scoring costs one probe forward plus one block rerun
        # per trainable unit. The schedule never freezes the last trainable unit (see SchedulePolicy.select).
        # Units outside the block lists are not candidates (see safe/method/units.py): never scored, never frozen here.
        candidates = [unit.name for unit in self._live_units("score and freeze units") if unit.candidate]
        trainable = [name for name in candidates if name not in self.freeze_state.frozen]
        scores = self.compute_importance(probe_batches, units=trainable) if trainable else {}
        scores = agree_on_scores(scores, t)
        newly = [u for u in self.schedule.advance(self.freeze_state, t, scores) if u in candidates]
        if newly:
            self.freeze(newly, optimizer=optimizer, at=t)
        logger.info("SAFE t=%s threshold=%.4f newly frozen=%s", t, self.threshold(t), newly)
        return newly

    def restart_schedule(self) -> None:
        """Start SAFE's schedule again from t=0: history, warm-up end and scoring time cleared, every unit thawed.

        For a new ``train()`` on a loaded SAFE adapter that should be scored and frozen again (a plain new
        ``Trainer`` starts at t=0, which lies before the adapter's last scoring, so it would never score). Call it
        before the optimizer is built, so the thawed units' parameters are in it. To continue the saved run
        instead, resume it (``trainer.train(resume_from_checkpoint=...)``).
        """
        self._live_units("restart the schedule")
        self._new_freeze_state_replacing(self.safe_adapter_name)
        self.auto_driver.restart(0)

    def freeze(
        self, units: Sequence[str | int], optimizer: torch.optim.Optimizer | None = None, at: float | None = None
    ) -> list[str]:
        """Freeze units now: ``requires_grad`` off, ``.grad`` released, optimizer state deleted.

        Args:
            units: unit names (see :attr:`adapter_units`) or their indices.
            optimizer: if given, the frozen parameters and their state (Adam moments) leave it.
            at: time recorded as the freezing time; defaults to the latest scoring time.

        Returns:
            The names of the units that were not frozen before.

        Raises:
            ValueError: if a unit is unknown, ``at`` is not a finite time >= 0, or the adapters are gone.
            TypeError: if ``units`` is not a unit, a list of units, or ``optimizer`` is not a torch optimizer.
        """
        if units is None or not (isinstance(units, (str, Sequence)) or as_index(units) is not None):
            raise TypeError(
                f"freeze() takes a unit name or index, or a list of them (see adapter_units), got {units!r}."
            )
        check_optimizer(optimizer)
        if at is not None:  # it is saved with the checkpoint, as a scoring time is
            at = check_time(at, "freeze time at")
        live = self._live_units("freeze units")
        names = resolve_units([unit.name for unit in live], units)
        state = self.freeze_state
        newly = [name for name in names if name not in state.frozen]
        leaving = [p for unit in live if unit.name in newly for p in unit_parameters(unit, self.safe_adapter_name)]
        check_something_trains(self.model, leaving)
        for name in newly:
            state.frozen[name] = at if at is not None else state.last_scored
        self._apply_freeze_state(optimizer)
        return newly

    def get_extra_state(self) -> torch.Tensor:
        """The freeze states and step count, as ``model.state_dict()`` carries them (:mod:`.state_dict`)."""
        return extra_state(self)

    def set_extra_state(self, state: Any) -> None:
        """Apply a freeze state loaded by ``load_state_dict``, checked first (:mod:`.state_dict`)."""
        load_extra_state(self, state)

    # ------------------------------------------------------------------ AdaLoRA's rank allocation
    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's budget schedule and rank masking, over the trainable units only (see :mod:`.adalora`).

        Call it where AdaLoRA's own is called: after ``loss.backward()`` and ``optimizer.step()``, before
        ``zero_grad()`` (:class:`~peft_safe.SAFECallback` does, at every optimizer step). While no unit is frozen
        this is AdaLoRA's ``update_and_allocate`` unchanged; frozen units keep their weights, masks and ranks.

        Args:
            global_step: the current optimizer step, counted from 0, as for AdaLoRA.

        Raises:
            TypeError: if the wrapped adapter is not AdaLoRA.
        """
        from peft.tuners.adalora import AdaLoraModel

        if not isinstance(self, AdaLoraModel):
            raise TypeError(
                "update_and_allocate is AdaLoRA's rank allocation, but this SAFE model wraps "
                f"{self.safe_config.adapter_peft_type}; call it only with an AdaLoraConfig adapter."
            )
        adapter_name = self.trainable_adapter_name
        state = self._freeze_states.get(adapter_name)
        frozen_units = [u for u in self._units(adapter_name) if state is not None and u.name in state.frozen]
        if not frozen_units:
            return super().update_and_allocate(global_step)
        allocate_trainable_ranks(
            self.model, self.rankallocator, self.peft_config[adapter_name], frozen_units, adapter_name, global_step
        )
        return None

    # ------------------------------------------------------------------ checkpoint hooks
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = _wrapped_tuner_cls(config)._get_adapter_state_dict(
            model=model,
            config=config.adapter_config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        return write_freeze_state(find_safe_model(model), config, adapter_name, out)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        safe, state, state_dict = read_freeze_state(find_safe_model(model), config, adapter_name, state_dict)
        remapped = _wrapped_tuner_cls(config)._remap_adapter_state_dict_for_load(
            model=model, config=config.adapter_config, adapter_name=adapter_name, state_dict=state_dict
        )
        check_loadable(remapped, model)
        apply_loaded_freeze_state(safe, adapter_name, state)  # everything checked: only now is the model touched
        return remapped
