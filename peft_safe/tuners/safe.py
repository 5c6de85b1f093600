"""SAFEModel: the wrapped adapter's tuner, plus units, importance scoring and freezing that frees memory.

``SAFEModel(model, config)`` returns an instance of a subclass built once per wrapped tuner, e.g.
``SAFELoraModel(SAFEModel, LoraModel)``: injection, merging, unloading and the wrapped method's own extras
(AdaLoRA's ``update_and_allocate``) are the wrapped tuner's code, unchanged. SAFE overrides only what it
must: the methods through which peft sets ``requires_grad`` (so frozen units stay frozen), and the
adapter state-dict hooks (so the freeze state travels inside the checkpoint).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ..config import SAFEConfig
from ..core.policy import SchedulePolicy
from ..core.state import FreezeState, parse_state_json
from .scoring import compute_importance
from .truncation import BackpropCut
from .units import AdapterUnit, find_adapter_units, unit_parameters

logger = logging.getLogger(__name__)

# peft types SAFE can wrap; the stand-alone tuners of this package add theirs when they register.
SUPPORTED_ADAPTER_TYPES = ["LORA", "ADALORA", "BOTTLENECK", "BITFIT"]

# Key of the freeze state in the adapter state dict: a uint8 tensor holding FreezeState JSON. Keeping it in
# the weights file makes weights and freeze decisions one atomic file, and Trainer checkpoints carry it.
FREEZE_STATE_KEY = "base_model.safe_freeze_state"


def _wrapped_tuner_cls(config: SAFEConfig) -> type[BaseTuner]:
    return PEFT_TYPE_TO_TUNER_MAPPING[config.adapter_config.peft_type]


@functools.cache
def _safe_class_for(tuner_cls: type[BaseTuner]) -> type[SAFEModel]:
    name = f"SAFE{tuner_cls.__name__}"
    cls = type(
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
    globals()[name] = cls  # picklable by reference
    return cls


def _drop_from_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Delete the state (Adam moments) of ``params`` and take them out of the optimizer's groups.

    Leaving the groups holding only trainable parameters means an optimizer rebuilt from the parameters that
    require grad (as the Trainer does on resume) has exactly the same layout as this one, so its saved state
    loads back.
    """
    ids = {id(p) for p in params}
    for param in params:
        optimizer.state.pop(param, None)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]


def _check_time(t: Any, last_scored: float | None) -> None:
    """Refuse a scoring time that is not a finite number >= 0, or lies before the previous scoring."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
        raise ValueError(
            f"scoring time t must be a finite number >= 0 (the current epoch or optimizer step), got {t!r}."
        )
    if last_scored is not None and t < last_scored:
        raise ValueError(f"scoring time {t} lies before the previous scoring at {last_scored}; time must not go back.")


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (the one training this model) or None, "
            f"got {type(optimizer).__name__}."
        )


def _payload_integrity(config: SAFEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a loader checks a SAFE weights file against: the config it was saved with, and its tensors' digests.

    peft writes ``adapter_model.safetensors`` before ``adapter_config.json``, so an interrupted save over an older
    checkpoint leaves new weights next to the old config; a bit flip in a tensor leaves a file that parses.
    Recording both in the weights file turns either into a clear error on load instead of a wrong model.
    """
    return {"config": _config_fingerprint(config), "tensor_sha256": sorted(_tensor_digest(t) for t in tensors.values())}


# Fields that legitimately differ between the config saved with the weights and the one they are loaded with:
# peft sets inference_mode on load and base_model_name_or_path / auto_mapping on save, peft_version follows the
# installed peft, and AdaLoRA's rank allocation rewrites rank_pattern while training.
_VOLATILE_CONFIG_FIELDS = ("inference_mode", "base_model_name_or_path", "revision", "peft_version", "auto_mapping",
                           "rank_pattern")


def _config_fingerprint(config: SAFEConfig) -> dict[str, Any]:
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


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    header = f"{str(tensor.dtype).removeprefix('torch.')}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(header + data).hexdigest()[:32]


def _check_integrity(integrity: Any, config: SAFEConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise, before anything is loaded, if the weights file does not belong to ``config`` or was damaged."""
    if not isinstance(integrity, dict):
        raise ValueError("the SAFE freeze state's 'integrity' record is malformed; the checkpoint is corrupt.")
    saved = integrity.get("config")
    if saved is not None:
        current = _config_fingerprint(config)
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        inner = sorted(
            k for k in set(saved.get("adapter_config", {})) | set(current.get("adapter_config", {}))
            if saved.get("adapter_config", {}).get(k) != current.get("adapter_config", {}).get(k)
        )
        diffs = [f"{k}: weights {saved.get(k)!r}, config {current.get(k)!r}" for k in changed if k != "adapter_config"]
        diffs += [f"adapter_config.{k}: weights {saved['adapter_config'].get(k)!r}, config "
                  f"{current['adapter_config'].get(k)!r}" for k in inner]
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


def _find_safe_model(model: nn.Module) -> SAFEModel | None:
    base = getattr(model, "base_model", None)
    if isinstance(base, SAFEModel):
        return base
    return next((m for m in model.modules() if isinstance(m, SAFEModel)), None)


class SAFEModel(BaseTuner):
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
        super().__init__(model, config, adapter_name, **kwargs)

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
            leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if name and not list(module.children()) and any(True for _ in module.parameters())})
            raise NoMatchingPeftModuleError(
                f"target_modules={getattr(config.adapter_config, 'target_modules', None)!r} of the wrapped "
                f"{config.adapter_peft_type} adapter matched no module of {type(model).__name__}; name some of its "
                f"layers instead, e.g. among {leaves[:20]}. ({err})"
            ) from err
        if adapter_name not in self._freeze_states:
            self._new_freeze_state(adapter_name)

    def _new_freeze_state(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        self._freeze_states[adapter_name] = FreezeState(
            units=[u.name for u in self._units(adapter_name)],
            adapter_type=config.adapter_peft_type,
            schedule_unit=config.schedule_unit,
            final_freeze_time=config.final_freeze_epoch,
        )

    @property
    def _safe_adapter(self) -> str:
        return self.active_adapters[0]

    def _units(self, adapter_name: str | None = None) -> list[AdapterUnit]:
        adapter_name = adapter_name or self._safe_adapter
        return find_adapter_units(self.model, adapter_name, self.peft_config[adapter_name].blocks_path)

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
        return self._freeze_states[self._safe_adapter]

    @property
    def raw_importance(self) -> dict[str, float]:
        """Latest raw importance (1 - CKA) per unit; empty before the first scoring."""
        return self.freeze_state.latest_scores

    @property
    def importance(self) -> dict[str, float]:
        """Latest importance per unit on the configured scale (what the threshold is compared with)."""
        from ..core.schedule import normalize_scores

        raw = self.raw_importance
        return normalize_scores(raw, self.peft_config[self._safe_adapter].importance_scale) if raw else {}

    @property
    def schedule(self) -> SchedulePolicy:
        config = self.peft_config[self._safe_adapter]
        return SchedulePolicy(
            tau=config.tau,
            final_freeze_time=config.final_freeze_epoch,
            warmup_rule=config.warmup_rule,
            warmup_tolerance=config.warmup_tolerance_value,
            warmup_floor=config.warmup_floor,
            warmup_cap=config.warmup_cap,
            importance_scale=config.importance_scale,
        )

    def threshold(self, t: float) -> float:
        """The freezing threshold T(t) of the schedule as it stands (0 during warm-up)."""
        return self.schedule.threshold(t, self.freeze_state.warmup_end)

    def compute_importance(self, probe_batches: Iterable[Any], units: Sequence[str | int] | None = None) -> dict[str, float]:
        """Score units on the probe batches without changing the freeze state.

        Args:
            probe_batches: batches of model inputs.
            units: the units to score (names or indices); all units when ``None``.

        Returns:
            unit name -> raw importance (1 - CKA).
        """
        config = self.peft_config[self._safe_adapter]
        chosen = self._units()
        if units is not None:
            names = set(self._resolve_units(units))
            chosen = [unit for unit in chosen if unit.name in names]
        return compute_importance(self.model, chosen, probe_batches, config.probe_tokens, config.seed)

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
        are averaged over the ranks (see :mod:`peft_safe.distributed`), so all ranks freeze the same units.
        """
        from ..distributed import agree_on_scores

        _check_time(t, self.freeze_state.last_scored)
        _check_optimizer(optimizer)
        # Frozen units never thaw, so they are not rerun: scoring costs one probe forward plus one block rerun
        # per trainable unit. The top unit, which normalised scores divide by, is never frozen for tau <= 1.
        trainable = [name for name in self.adapter_units if name not in self.freeze_state.frozen]
        scores = self.compute_importance(probe_batches, units=trainable) if trainable else {}
        scores = agree_on_scores(scores, t)
        newly = self.schedule.advance(self.freeze_state, t, scores)
        if newly:
            self.freeze(newly, optimizer=optimizer, at=t)
        logger.info("SAFE t=%s threshold=%.4f newly frozen=%s", t, self.threshold(t), newly)
        return newly

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
            ValueError: if a unit is unknown.
            TypeError: if ``units`` is not a unit, a list of units, or ``optimizer`` is not a torch optimizer.
        """
        if units is None or not isinstance(units, (str, int, Sequence)):
            raise TypeError(
                f"freeze() takes a unit name or index, or a list of them (see adapter_units), got {units!r}."
            )
        _check_optimizer(optimizer)
        names = self._resolve_units(units)
        state = self.freeze_state
        newly = [name for name in names if name not in state.frozen]
        for name in newly:
            state.frozen[name] = at if at is not None else state.last_scored
        self._apply_freeze_state(optimizer)
        return newly

    def _resolve_units(self, units: Sequence[str | int] | str) -> list[str]:
        if isinstance(units, (str, int)):
            units = [units]
        available = self.adapter_units
        names = []
        for unit in units:
            if isinstance(unit, int) and not isinstance(unit, bool):
                if not -len(available) <= unit < len(available):
                    raise ValueError(f"unit index {unit} is out of range; the model has {len(available)} units.")
                names.append(available[unit])
            elif isinstance(unit, str) and unit in available:
                names.append(unit)
            else:
                raise ValueError(f"unknown adapter unit {unit!r}; the units are {available}.")
        return names

    # ------------------------------------------------------------------ keeping frozen units frozen
    def _apply_freeze_state(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        frozen_params = []
        for adapter_name, state in self._freeze_states.items():
            if not state.frozen:
                continue
            for unit in self._units(adapter_name):
                if unit.name in state.frozen:
                    frozen_params.extend(unit_parameters(unit, adapter_name))
        for param in frozen_params:
            param.requires_grad_(False)
            param.grad = None
        if optimizer is not None and frozen_params:
            _drop_from_optimizer(optimizer, frozen_params)
        self._update_backprop_cut()

    def _update_backprop_cut(self) -> None:
        # Backprop stops at the lowest trainable block even when an input-require-grads hook (k-bit preparation,
        # gradient checkpointing) keeps the chain below alive; see truncation.py.
        state = self._freeze_states.get(self.active_adapters[0]) if self.active_adapters else None
        if state is None or not state.frozen:
            self._backprop_cut.remove()
        else:
            self._backprop_cut.update(self.model, self._units(), state.frozen)

    @property
    def backprop_cut_block(self) -> str | None:
        """The block whose input SAFE detaches so that backprop stops there; ``None`` when there is no cut."""
        return self._backprop_cut.block_name

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._apply_freeze_state()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._apply_freeze_state()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._apply_freeze_state()

    def enable_adapter_layers(self) -> None:
        super().enable_adapter_layers()
        self._apply_freeze_state()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._apply_freeze_state()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._freeze_states.pop(adapter_name, None)

    # ------------------------------------------------------------------ AdaLoRA's rank allocation
    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's budget schedule and rank masking, over the trainable units only.

        Call it where AdaLoRA's own is called: after ``loss.backward()`` and ``optimizer.step()``, before
        ``zero_grad()`` (:class:`~peft_safe.SAFECallback` does, at every optimizer step). While no unit is frozen
        this is AdaLoRA's ``update_and_allocate`` unchanged. Frozen units have no gradients and must not change,
        so once some are frozen the rank allocator sees only the trainable units: their sensitivities are
        updated and their ranks allocated on AdaLoRA's cubic schedule, from their own initial ranks down to
        ``target_r`` per adapted layer. Frozen units keep their weights and masks; their ``rank_pattern`` entry
        keeps every rank they were allowed or still use, so saving and loading (which cut ranks by the pattern)
        leaves them exactly as they are. The allocator's statistics of frozen units are dropped.

        Args:
            global_step: the current optimizer step, counted from 0, as for AdaLoRA.

        Raises:
            TypeError: if the wrapped adapter is not AdaLoRA.
        """
        from types import SimpleNamespace

        from peft.tuners.adalora import AdaLoraModel

        if not isinstance(self, AdaLoraModel):
            raise TypeError(
                "update_and_allocate is AdaLoRA's rank allocation, but this SAFE model wraps "
                f"{self.peft_config[self._safe_adapter].adapter_peft_type}; call it only with an AdaLoraConfig adapter."
            )
        adapter_name = self.trainable_adapter_name
        state = self._freeze_states.get(adapter_name)
        frozen_units = [u for u in self._units(adapter_name) if state is not None and u.name in state.frozen]
        if not frozen_units:
            return super().update_and_allocate(global_step)
        frozen_ids = {id(p) for unit in frozen_units for p in unit_parameters(unit, adapter_name)}
        allocator = self.rankallocator
        trainable = []
        for name, param in self.model.named_parameters():
            if id(param) not in frozen_ids:
                trainable.append((name, param))
                continue
            for stats in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc):
                stats.pop(name, None)
        view = SimpleNamespace(named_parameters=lambda: iter(trainable))  # all the allocator reads of a model
        config = self.peft_config[adapter_name]
        final_step = config.total_step - config.tfinal
        budget = (allocator.init_bgt, allocator.target_bgt, allocator.name_set)
        allocator._set_budget_scheduler(view)  # the budget of the trainable units alone
        try:
            if not allocator.name_set:
                return  # every unit frozen: nothing left to allocate
            if global_step <= final_step:
                _, pattern = allocator.update_and_allocate(view, global_step, force_mask=global_step == final_step)
                if pattern:
                    config.rank_pattern = {**self._frozen_rank_pattern(frozen_units, adapter_name), **pattern}
                if global_step == final_step:
                    allocator.reset_ipt()
            elif config.rank_pattern:
                allocator.mask_using_rank_pattern(view, config.rank_pattern)
        finally:
            allocator.init_bgt, allocator.target_bgt, allocator.name_set = budget

    def _frozen_rank_pattern(self, frozen_units: list[AdapterUnit], adapter_name: str) -> dict[str, list[bool]]:
        """``rank_pattern`` entries of frozen AdaLoRA units: the ranks their pattern allowed, or still in use."""
        previous = self.peft_config[adapter_name].rank_pattern or {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        pattern = {}
        for unit in frozen_units:
            for layer in unit.layers:
                singular_values = layer.lora_E[adapter_name]
                name = names[id(singular_values)]
                # a saved checkpoint's pattern is keyed without the adapter name
                allowed = previous.get(name, previous.get(name.replace(f".{adapter_name}", "")))
                in_use = (singular_values.detach() != 0).view(-1).tolist()
                if allowed is None or len(allowed) != len(in_use):  # never masked, or already cut to its ranks
                    pattern[name] = [True] * len(in_use)
                else:
                    pattern[name] = [bool(a) or b for a, b in zip(allowed, in_use)]
        return pattern

    # ------------------------------------------------------------------ checkpoint hooks
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        inner = _wrapped_tuner_cls(config)
        out = inner._get_adapter_state_dict(
            model=model,
            config=config.adapter_config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        safe = _find_safe_model(model)
        if safe is None or adapter_name not in safe._freeze_states:
            raise ValueError(f"cannot save SAFE adapter {adapter_name!r}: no SAFE tuner holding its freeze state.")
        record = {**safe._freeze_states[adapter_name].to_dict(), "integrity": _payload_integrity(config, out)}
        payload = json.dumps(record, sort_keys=True, allow_nan=False).encode("utf-8")
        out[FREEZE_STATE_KEY] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).clone()
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        payload = state_dict.pop(FREEZE_STATE_KEY, None)
        if payload is None:
            raise ValueError(
                "this checkpoint holds no SAFE freeze state, so it was not saved by a SAFE model "
                f"(its weights look like a plain {config.adapter_peft_type} adapter). Load it with its own config "
                "(PeftModel.from_pretrained without a SAFEConfig), or start SAFE from scratch."
            )
        safe = _find_safe_model(model)
        if safe is None:
            raise ValueError("cannot load a SAFE freeze state: the model holds no SAFE tuner.")
        state, integrity = safe._freeze_state_from_payload(payload, adapter_name)
        if integrity is not None:  # checkpoints written before the record existed have none
            _check_integrity(integrity, config, state_dict)
        inner = _wrapped_tuner_cls(config)
        remapped = inner._remap_adapter_state_dict_for_load(
            model=model, config=config.adapter_config, adapter_name=adapter_name, state_dict=state_dict
        )
        safe._check_loadable(remapped, model)
        # Everything checked: only now is the model touched. The loaded state replaces the adapter's own, so
        # units this adapter had frozen that the checkpoint trains become trainable again (unless loading for
        # inference, where nothing trains).
        previous = safe._freeze_states.get(adapter_name)
        safe._freeze_states[adapter_name] = state
        if previous is not None and not getattr(safe.peft_config.get(adapter_name), "inference_mode", True):
            for unit in safe._units(adapter_name):
                if unit.name in previous.frozen and unit.name not in state.frozen:
                    for param in unit_parameters(unit, adapter_name):
                        param.requires_grad_(True)
        safe._apply_freeze_state()
        return remapped

    def _freeze_state_from_payload(self, payload: torch.Tensor, adapter_name: str) -> tuple[FreezeState, Any]:
        """The freeze state in a checkpoint's payload, checked against this model, and its integrity record."""
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError("the SAFE freeze state in this checkpoint is not a byte tensor; the file is corrupt.")
        try:
            text = bytes(payload.cpu().tolist()).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"the SAFE freeze state in this checkpoint is not UTF-8 ({err}); the file is corrupt.") from err
        data = parse_state_json(text)  # parsed once: the state and the integrity record share it
        state = FreezeState.from_dict(data)
        units = [u.name for u in self._units(adapter_name)]
        if state.units != units:
            raise ValueError(
                f"this SAFE checkpoint was saved from a model with units {state.units}, but this model has units "
                f"{units}; load it onto the same architecture and adapter targets it was trained with."
            )
        expected = self.peft_config[adapter_name].adapter_peft_type
        if state.adapter_type and state.adapter_type != expected:
            raise ValueError(
                f"this SAFE checkpoint wraps a {state.adapter_type} adapter but the config wraps {expected}."
            )
        return state, data.get("integrity")

    @staticmethod
    def _check_loadable(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
        # A shape mismatch would otherwise surface only after part of the state was applied.
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
