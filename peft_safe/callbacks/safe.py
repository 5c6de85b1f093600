"""SAFECallback: runs SAFE's schedule inside a transformers Trainer.

A thin shell over :meth:`SAFEModel.update_and_freeze`: it builds the probe batches once, calls the tuner
at every scoring time (epoch ends or every N optimizer steps, as the SAFEConfig says) with the Trainer's
optimizer, and logs importance and frozen units through ``Trainer.log`` (so every ``report_to`` integration and
the printed log lines get the ``safe/*`` keys). With it in the Trainer, SAFE's automatic schedule stands down.
All schedule state lives in the tuner and is saved with the adapter, so
``trainer.train(resume_from_checkpoint=...)`` continues exactly.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any

from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..reporting import find_trainer, follow_transformers_verbosity, log_to_trainer
from ..safe.method.distributed import check_trainer_ddp
from ..safe.method.driver import check_trainer_schedule, progress_record, score_if_due
from ..safe.method.probe_inputs import check_probe_batch
from ..safe.model import SAFEModel, find_safe_model
from .probe import default_collator, examples_to_batches, is_batch_list, take, take_batches

logger = logging.getLogger(__name__)


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module") and not isinstance(model, SAFEModel):  # DDP / accelerate wrappers
        model = model.module
    return model


class SAFECallback(TrainerCallback):
    """Freeze unimportant adapter units during ``Trainer.train()``.

    Args:
        probe_dataset: the probe set: a list of ready batches (dicts of tensors); tokenized examples (a
            ``datasets.Dataset`` or list of dicts, e.g. ``trainer.train_dataset`` after TRL's tokenisation); a
            ``DataLoader`` (its first batches, up to ``probe_size`` examples); raw
            text examples (``{"text"}``, ``{"prompt", "completion"}``, ``{"messages"}``) or a list of strings,
            tokenised with the Trainer's processing class. The first ``probe_size`` examples are used. ``None``:
            the first ``probe_size`` examples of the Trainer's training data (see :mod:`.probe`).
        probe_size: number of examples taken from ``probe_dataset``.
        batch_size: batch size of the probe batches built from examples.
        data_collator: collates examples into batches; by default the Trainer's tokenizer pads them, or
            ``transformers.default_data_collator`` is used.

    Raises:
        ValueError: if the probe set is empty or cannot be made into batches, or the model holds no SAFE adapter.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=train, eval_dataset=val,
        ...                   callbacks=[SAFECallback(probe_dataset=val)])
        >>> trainer = Trainer(...); trainer.add_callback(SAFECallback.for_trainer(trainer))
    """

    def __init__(
        self,
        probe_dataset: Any = None,
        *,
        probe_size: int = 64,
        batch_size: int = 16,
        data_collator: Any = None,
    ) -> None:
        for name, value in (("probe_size", probe_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if isinstance(probe_dataset, (str, bytes)) or (
            probe_dataset is not None
            and not hasattr(probe_dataset, "__getitem__")
            and not hasattr(probe_dataset, "__iter__")
        ):
            raise TypeError(
                f"probe_dataset must be tokenized examples (a datasets.Dataset or list of dicts) or a list of ready "
                f"batches, got {type(probe_dataset).__name__} {probe_dataset!r:.60}; load and tokenize files first."
            )
        self.probe_dataset = probe_dataset
        self.probe_size = probe_size
        self.batch_size = batch_size
        self.data_collator = data_collator
        self._probe_batches: list[Any] | None = None
        self._trainer: Any = None
        self.scorings: list[dict[str, Any]] = []

    @classmethod
    def for_trainer(cls, trainer: Any, probe_size: int = 64) -> SAFECallback:
        """A callback probing on the first ``probe_size`` examples of the trainer's eval set.

        Raises:
            ValueError: if the trainer has no eval dataset.
        """
        if trainer.eval_dataset is None:
            raise ValueError("SAFECallback.for_trainer needs trainer.eval_dataset for its probe set; pass one.")
        subset = take(trainer.eval_dataset, probe_size)
        batches = list(trainer.get_eval_dataloader(subset))
        callback = cls(probe_dataset=batches, probe_size=probe_size)
        callback._trainer = weakref.ref(trainer)
        return callback

    # ------------------------------------------------------------------ probe set
    def _build_probe_batches(self, model: Any, processing_class: Any, trainer: Any = None) -> list[Any]:
        data = self.probe_dataset
        if data is None:
            data = getattr(trainer, "train_dataset", None)
            if data is None or not hasattr(data, "__len__"):
                raise ValueError(
                    "SAFECallback has no probe set and found no training dataset to hold one from: pass "
                    "probe_dataset=... (examples, text or ready batches), or use SAFECallback.for_trainer(trainer)."
                )
            logger.info("SAFE: probing on the first %d examples of the training data", self.probe_size)
        if isinstance(data, DataLoader):  # its batches are probe batches: as many as hold probe_size examples
            batches = take_batches(data, self.probe_size)
        elif is_batch_list(data):
            batches = list(data)
        else:
            collator = self.data_collator or default_collator(processing_class)
            max_length = getattr(getattr(trainer, "args", None), "max_length", None)
            batches = examples_to_batches(
                take(data, self.probe_size), model, processing_class, collator, self.batch_size, max_length
            )
        if not batches:
            raise ValueError("SAFECallback's probe set is empty; give it at least one example.")
        for batch in batches:  # now, not an epoch into training at the first scoring
            check_probe_batch(model, batch)
        return batches

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        safe = self._safe(kwargs["model"])
        check_trainer_ddp(args.world_size, args.ddp_find_unused_parameters)
        trainer = find_trainer(holding=self) or (self._trainer() if self._trainer is not None else None)
        safe.auto_driver.stand_down("SAFECallback drives the schedule")
        follow_transformers_verbosity()
        if trainer is not None:
            self._trainer = weakref.ref(trainer)
        config = safe.safe_config
        check_trainer_schedule(config, state, "SAFECallback", stacklevel=2)  # as the automatic schedule checks it
        self._probe_batches = self._build_probe_batches(kwargs["model"], kwargs.get("processing_class"), trainer)
        start = getattr(state, "global_step" if config.schedule_unit == "step" else "epoch", None) or 0
        last = safe.freeze_state.last_scored
        if last is not None and start < last:
            message = (
                f"SAFE: this adapter was already scored up to t={last} {config.schedule_unit}(s) but this train() "
                f"starts at {start}, so SAFE will not score (nor freeze) until t passes {last}. To continue the "
                "saved run, pass trainer.train(resume_from_checkpoint=...); to run SAFE's schedule again from t=0, "
                "call peft_model.base_model.restart_schedule() before building the Trainer."
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            logger.warning(message)
        logger.info(
            "SAFE: %d units, scoring every %s %s(s) on %d probe batches",
            len(safe.adapter_units), config.scoring_interval, config.schedule_unit, len(self._probe_batches),
        )

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # AdaLoRA reallocates ranks after each optimizer step, while the gradients still exist (the Trainer
        # zeroes them before on_step_end) and the Trainer itself never calls it.
        from peft.tuners.adalora import AdaLoraModel

        safe = self._safe(kwargs["model"])
        if isinstance(safe, AdaLoraModel):
            safe.update_and_allocate(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        safe = self._safe(kwargs["model"])
        if safe.safe_config.schedule_unit == "step":
            self._maybe_score(safe, state.global_step, state, kwargs.get("optimizer"))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        safe = self._safe(kwargs["model"])
        if safe.safe_config.schedule_unit == "epoch":
            self._maybe_score(safe, round(state.epoch or 0.0, 6), state, kwargs.get("optimizer"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # load_best_model_at_end restores the best checkpoint (with its freeze state) before this event: the
        # units the logs say froze may be trainable again. Correct, but it must not pass unnoticed.
        if not self.scorings:
            return
        safe = self._safe(kwargs["model"])
        logged, now = self.scorings[-1]["safe/frozen_units"], len(safe.frozen_units)
        if now != logged:
            logger.warning(
                "SAFE: %d of %d units were frozen at the end of training, but the model now has %d frozen: the "
                "Trainer loaded another checkpoint (load_best_model_at_end=True restores %s, with the freeze "
                "state saved there).", logged, len(safe.adapter_units), now, state.best_model_checkpoint,
            )

    # ------------------------------------------------------------------ internals
    def _safe(self, model: Any) -> SAFEModel:
        safe = find_safe_model(_unwrap(model))
        if safe is None:
            raise ValueError("SAFECallback needs a model made by get_peft_model(model, SAFEConfig(...)).")
        return safe

    def _maybe_score(self, safe: SAFEModel, t: float, state: TrainerState, optimizer: Any) -> None:
        if self._probe_batches is None:
            raise RuntimeError("SAFECallback.on_train_begin was not called; add the callback before train().")
        newly = score_if_due(safe, t, self._probe_batches, optimizer)  # the automatic schedule's own decision
        if newly is None:
            return
        record = progress_record(safe, t, newly)
        self.scorings.append({"step": state.global_step, "epoch": state.epoch, **record})
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:  # Trainer.log: log_history, the printed lines and every report_to integration
            log_to_trainer(trainer, record)
        else:
            state.log_history.append(self.scorings[-1])
        logger.info("SAFE t=%s frozen %d/%d units%s", t, len(safe.frozen_units), len(safe.adapter_units),
                    f" (new: {newly})" if newly else "")
