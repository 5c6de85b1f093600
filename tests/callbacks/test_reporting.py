"""SAFE's progress and the meter's figures go through the Trainer's logging path (peft_safe/reporting.py): every
``report_to`` integration's ``on_log`` sees them, and the package's log lines follow transformers' verbosity.

Most tests stand an integration in by a TrainerCallback listed *before* SAFE's callbacks, where the Trainer puts
its ``report_to`` integrations (they run first in ``on_log``); the last one runs with ``report_to=["tensorboard"]``
and reads the event file back with TensorBoard's own reader.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_safe import MeasureCallback, SAFECallback

pytestmark = pytest.mark.usefixtures("single_thread_torch")

STEP = dict(schedule_unit="step", scoring_interval=2, final_freeze_time=6, warmup_cap=2, tau=1.0,
            importance_scale="normalized", freeze_order="any")


class Integration(TrainerCallback):
    """What a report_to integration sees: every ``logs`` dict passed to ``on_log``."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def rows(tiny, n=32):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, tiny.vocab, (n, 8), generator=gen)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def trainer_for(tiny, tmp_path, callbacks, steps=5, **kwargs):
    model = tiny.safe("llama", layers=4, **STEP)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=rows(tiny), callbacks=callbacks)


def test_safe_and_memory_keys_reach_the_integrations_and_the_printed_lines(tiny, tmp_path, capsys):
    # issue 14.2: SAFECallback appended to state.log_history only; MeasureCallback reached only the printer
    integration = Integration()
    probe = [tiny.batch(batch=4, seed=9)]
    trainer = trainer_for(tiny, tmp_path, [integration, SAFECallback(probe), MeasureCallback(measure_every=2)],
                          disable_tqdm=True)
    trainer.train()
    safe_lines = [logs for logs in integration.seen if "safe/frozen_units" in logs]
    memory_lines = [logs for logs in integration.seen if "memory/training_bytes" in logs]
    assert [logs["safe/t"] for logs in safe_lines] == [2, 4]
    assert any(key.startswith("safe/importance/") for key in safe_lines[0])
    assert len(memory_lines) == 3  # steps 1, 3 and 5
    history = [e for e in trainer.state.log_history if "safe/frozen_units" in e]
    assert [e["step"] for e in history] == [2, 4]  # log_history has them too, once each
    losses = [logs for logs in integration.seen if "loss" in logs]
    assert len(losses) == 5  # a SAFE or memory line never takes the place of a step's loss line
    printed = capsys.readouterr().out
    assert "safe/frozen_units" in printed and "memory/training_bytes" in printed


def test_the_automatic_schedule_logs_through_the_trainer_too(tiny, tmp_path):
    integration = Integration()
    trainer = trainer_for(tiny, tmp_path, [integration], disable_tqdm=True)
    trainer.train()
    assert [logs["safe/t"] for logs in integration.seen if "safe/t" in logs] == [2, 4]
    assert trainer.model.base_model.frozen_units


@pytest.fixture
def package_logger():
    logger = logging.getLogger("peft_safe")
    saved = (logger.level, list(logger.handlers), transformers.logging.get_verbosity())
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.__dict__.pop("_peft_safe_follows_transformers", None)
    transformers.logging.set_verbosity(saved[2])


@pytest.mark.parametrize("verbosity", ["info", "warning"])
def test_log_lines_follow_transformers_verbosity(tiny, tmp_path, caplog, package_logger, verbosity):
    getattr(transformers.logging, f"set_verbosity_{verbosity}")()
    trainer_for(tiny, tmp_path, [SAFECallback([tiny.batch(batch=4, seed=9)])], steps=2, disable_tqdm=True).train()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("peft_safe")]
    assert any(line.startswith("SAFE t=2 frozen") for line in lines) == (verbosity == "info")


def test_with_no_logging_configured_the_lines_are_printed_by_transformers_handler(tmp_path):
    # pytest puts handlers on the root logger; a user's script has none: run one
    import subprocess
    import sys

    code = (
        "import logging, transformers\n"
        "from peft_safe.reporting import follow_transformers_verbosity\n"
        "transformers.logging.set_verbosity_info()\n"
        "follow_transformers_verbosity()\n"
        "logging.getLogger('peft_safe.safe.model').info('SAFE line at info')\n"
        "logging.getLogger('peft_safe.safe.model').debug('SAFE line at debug')\n"
        "transformers.logging.set_verbosity_warning()\n"
        "follow_transformers_verbosity()\n"
        "logging.getLogger('peft_safe.safe.model').info('SAFE second line at info')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[peft_safe] SAFE line at info" in result.stderr  # under the package's name (issue 21.14)
    assert "[transformers] SAFE" not in result.stderr
    assert "debug" not in result.stderr and "second line" not in result.stderr


def test_a_level_the_user_set_is_left_alone(tiny, tmp_path, package_logger):
    package_logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_info()
    trainer_for(tiny, tmp_path, [SAFECallback([tiny.batch(batch=4, seed=9)])], steps=2, disable_tqdm=True).train()
    assert package_logger.level == logging.ERROR


def test_safe_and_memory_scalars_reach_a_tensorboard_event_file(tiny, tmp_path, monkeypatch):
    # issue 14.2's check: a real report_to="tensorboard" run, its event file read back with TensorBoard's reader
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    model = tiny.safe("llama", layers=4, **STEP)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=["tensorboard"], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows(tiny), callbacks=[MeasureCallback(measure_every=2)])
    trainer.train()  # no SAFECallback: the automatic schedule's records go the same way

    files = list(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    # TensorBoardCallback writes every key as train/<key> at the Trainer's global step
    assert scalars["train/safe/t"] == [(2, 2.0), (4, 4.0)]
    safe = trainer.model.base_model
    frozen_at = safe.freeze_state.frozen  # unit -> the time it froze
    assert frozen_at, "no unit froze"
    assert scalars["train/safe/frozen_units"] == [(t, sum(when <= t for when in frozen_at.values())) for t in (2, 4)]
    assert [step for step, _ in scalars["train/safe/threshold"]] == [2, 4]
    assert [value for _, value in scalars["train/safe/threshold"]] == pytest.approx([safe.threshold(2),
                                                                                     safe.threshold(4)])
    assert all(0 <= value <= 1 for _, value in scalars["train/safe/threshold"])
    importance = {tag: values for tag, values in scalars.items() if tag.startswith("train/safe/importance/")}
    assert len(importance) == len(safe.adapter_units)
    assert all(len(values) == 2 and all(value >= 0 for _, value in values) for values in importance.values())
    assert max(value for values in importance.values() for _, value in values[:1]) == pytest.approx(1.0)  # normalized
    newly = events.Tensors("train/safe/newly_frozen/text_summary")  # strings go in as text
    assert [e.step for e in newly] == [2, 4]
    memory = scalars["train/memory/training_bytes"]
    assert [step for step, _ in memory] == [1, 3, 5]
    assert all(value > 0 for _, value in memory)
    for part in ("activation_bytes", "gradient_bytes", "optimizer_state_bytes"):
        assert all(value >= 0 for _, value in scalars[f"train/memory/{part}"])
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]  # the loss lines are all there
