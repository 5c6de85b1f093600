"""The bench's runs: adapter and SAFE configs, the model, the measured training loop and the evaluation.

Owns the peft config factories (:func:`adapter_config`, :func:`safe_config`), :func:`run_one` (a plain PyTorch
loop that calls ``SAFEModel.update_and_freeze`` every ``--score-every`` optimizer steps, measured by a
:class:`~peft_safe.measure.meter.TrainingMeter`), :func:`evaluate` and :func:`perplexity`. Imports torch, the
package's tuners and meters and :mod:`.data` (peft, transformers and tqdm lazily, inside functions); never
:mod:`.report`, :mod:`.plots` or :mod:`.cli`.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..measure.meter import TrainingMeter
from ..safe.config import SAFEConfig
from ..safe.method.scoring import preserved_state
from ..tuners.bitfit import BitFitConfig
from ..tuners.bottleneck import HoulsbyConfig, PfeifferConfig
from .baselines import Baseline
from .data import BenchInputError, Task, iter_batches

logger = logging.getLogger(__name__)

ADAPTERS = ("lora", "adalora", "houlsby", "pfeiffer", "bitfit")

# On MiniLM + LoRA (lr 5e-4, batch 32) importance grows 3-5x per 20 steps until about step 100-120 and then
# settles; a cap before that freezes units whose adapters have barely trained (docs/method.md, docs/results.md).
DEFAULT_WARMUP_CAP_FRACTION = 0.35


# ---------------------------------------------------------------------------------------------- configs and model
def adapter_config(name: str, args: argparse.Namespace, total_steps: int, task_type: str) -> Any:
    """The peft config of adapter ``name`` (targets: peft's or this package's defaults for the model type).

    Args:
        name: one of :data:`ADAPTERS`.
        args: the parsed bench flags (``rank``).
        total_steps: the run's optimizer steps (AdaLoRA's budget schedule).
        task_type: the peft task type, ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.

    Raises:
        ValueError: if ``name`` is not one of :data:`ADAPTERS`.
    """
    from peft import AdaLoraConfig, LoraConfig

    if name == "lora":
        return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1, task_type=task_type,
                          target_modules=target_modules(args, task_type))
    if name == "adalora":
        # AdaLoRA prunes from init_r towards target_r between tinit and total_step - tfinal
        return AdaLoraConfig(init_r=max(args.rank + 4, args.rank * 3 // 2), target_r=args.rank,
                             lora_alpha=2 * args.rank, lora_dropout=0.1, total_step=total_steps,
                             tinit=total_steps // 10, tfinal=total_steps // 5, task_type=task_type)
    if name == "houlsby":
        return HoulsbyConfig(task_type=task_type)
    if name == "pfeiffer":
        return PfeifferConfig(task_type=task_type)
    if name == "bitfit":
        return BitFitConfig(task_type=task_type)
    raise ValueError(f"unknown adapter {name!r}; choose from {', '.join(ADAPTERS)}.")


def target_modules(args: argparse.Namespace, task_type: str) -> str | list[str] | None:
    """``--target-modules`` as peft takes it; by default peft's targets, or every projection of a causal LM
    (``"all-linear"``: attention and MLP, not the output head), as QLoRA users train it."""
    flag = getattr(args, "target_modules", None)
    if flag is None:
        return "all-linear" if task_type == "CAUSAL_LM" else None
    return flag if flag == "all-linear" else [name.strip() for name in flag.split(",") if name.strip()]


def safe_config(adapter: Any, args: argparse.Namespace, total_steps: int, task_type: str) -> SAFEConfig:
    """SAFE over ``adapter`` with the bench's schedule: step units, t_f at ``--final-freeze-fraction`` of the run.

    Args:
        adapter: the peft config SAFE wraps (from :func:`adapter_config`).
        args: the parsed bench flags (``tau``, ``score_every``, ``final_freeze_fraction``, the warm-up flags).
        total_steps: the run's optimizer steps.
        task_type: the peft task type, ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.

    Raises:
        BenchInputError: if the flags make an invalid schedule (say, scoring less often than t_f); the message
            names the flags to change.
    """
    final = max(2, int(total_steps * args.final_freeze_fraction))
    fraction = DEFAULT_WARMUP_CAP_FRACTION if args.warmup_cap_fraction is None else args.warmup_cap_fraction
    cap = total_steps * fraction
    if cap >= final:  # t_f before the default cap, or t_f rounded to whole steps (at least 2) in a very short run
        cap = final / 2
    # SAFEConfig's defaults unless a flag names another choice
    choices = {name: getattr(args, name, None)
               for name in ("scoring_site", "freeze_order", "importance_scale", "cka_precision")}
    choices["memory_budget"] = getattr(args, "memory_budget_bytes", None)
    try:
        return SAFEConfig(adapter_config=adapter, tau=args.tau, schedule_unit="step", final_freeze_time=final,
                          scoring_interval=args.score_every, warmup_tolerance=args.warmup_tolerance,
                          warmup_cap=cap, task_type=task_type, cache_frozen=bool(getattr(args, "cache_frozen", False)),
                          **{name: value for name, value in choices.items() if value is not None})
    except ValueError as error:
        raise BenchInputError(
            f"the SAFE schedule is invalid for this run ({total_steps} steps, t_f = {final} steps from "
            f"--final-freeze-fraction {args.final_freeze_fraction}, --score-every {args.score_every}, "
            f"warm-up cap at step {cap:g}): {error} In bench flags: lower --score-every or "
            "--warmup-cap-fraction, or raise --final-freeze-fraction or the run's length."
        ) from error


def build_model(task: Task, adapter: str, use_safe: bool, args: argparse.Namespace, seed: int,
                 total_steps: int, baseline: Baseline | None = None) -> nn.Module:
    """The task's model with ``adapter`` (under SAFE if ``use_safe``), seeded, on ``--device``.

    A ``top:K`` baseline puts the adapter on the top blocks only; a ``prefix:K@T`` one builds SAFE's model (its
    freezing and backprop cut) with the automatic schedule off: the loop freezes the prefix itself.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    task_type = task.peft_task_type
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the classifier head, as intended
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)  # same head and adapter initialisation with and without SAFE
        kwargs = {"quantization_config": _four_bit(args)} if getattr(args, "bits", 32) == 4 else {}
        if task.kind == "classification":
            base = AutoModelForSequenceClassification.from_pretrained(task.model_path, num_labels=task.num_labels,
                                                                      **kwargs)
        else:
            base = AutoModelForCausalLM.from_pretrained(task.model_path, dtype=torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(base.config, "pad_token_id", None) is None and task.kind == "classification":
        base.config.pad_token_id = 0
    base = _prepare_for_training(base, args)
    config = adapter_config(adapter, args, total_steps, task_type)
    if baseline is not None and baseline.kind == "top":
        blocks = int(getattr(base.config, "num_hidden_layers", 0))
        if not 0 < baseline.blocks < blocks or not hasattr(config, "layers_to_transform"):
            raise BenchInputError(f"--baseline {baseline.label} needs K below the model's {blocks} blocks and an "
                                  f"adapter with layers_to_transform (lora, adalora), got {adapter}.")
        config.layers_to_transform = list(range(baseline.blocks, blocks))
    prefix = baseline is not None and baseline.kind == "prefix"
    if use_safe or prefix:
        config = safe_config(config, args, total_steps, task_type)
    model = get_peft_model(base, config).to(args.device)
    if prefix:
        model.base_model.auto_driver.stand_down("the bench's fixed-prefix baseline: no scoring")
        if baseline.blocks >= len(model.base_model.adapter_units):
            raise BenchInputError(f"--baseline {baseline.label}: K must leave a unit training (the model has "
                                  f"{len(model.base_model.adapter_units)}).")
    return model


def _four_bit(args: argparse.Namespace) -> Any:
    from transformers import BitsAndBytesConfig

    # QLoRA's base: NF4 weights, computing in float32 (the CPU's dtype; bfloat16 is the usual GPU choice)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _prepare_for_training(base: nn.Module, args: argparse.Namespace) -> nn.Module:
    """A 4-bit base as QLoRA users prepare it (peft's ``prepare_model_for_kbit_training``), and ``--checkpointing``."""
    checkpointing = getattr(args, "checkpointing", "none")
    kwargs = {"use_reentrant": checkpointing == "reentrant"}
    if getattr(args, "bits", 32) == 4:
        from bitsandbytes.nn import Linear4bit
        from peft import prepare_model_for_kbit_training

        for module in base.modules():
            if isinstance(module, Linear4bit):
                # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on their first eval forward without grad
                # (an evaluation; SAFE's scoring prevents it) and from then on computes in other numbers and passes
                # no gradient to the layer's input: both runs keep the training kernel throughout.
                module.support_avx512bf16_for_cpu = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing != "none",
                                                   gradient_checkpointing_kwargs=kwargs)
    elif checkpointing != "none":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        base.enable_input_require_grads()
    if hasattr(base.config, "use_cache"):
        base.config.use_cache = False
    return base


def lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, total_steps: int) -> Any:
    """``--lr-schedule``: ``constant``, or ``linear`` decay to 0 over the run (the paper's LinearLR, no warm-up)."""
    if getattr(args, "lr_schedule", "constant") == "linear":
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total_steps)
    return None


# ---------------------------------------------------------------------------------------------- one run
def total_steps_of(task: Task, args: argparse.Namespace) -> int:
    """The run's optimizer steps: ``--steps``, else ``--epochs`` passes over the training split."""
    steps_per_epoch = -(-len(task.train["input_ids"]) // args.batch_size)
    return args.steps if args.steps is not None else steps_per_epoch * args.epochs


def memory_budget_bytes(baseline: Any, fraction: float) -> int:
    """SAFE's ``memory_budget`` (saved-activation bytes) for a step peak of ``fraction`` x the baseline's.

    The baseline's peak holds its saved activations and the rest (gradients, optimizer state, temporaries); the
    SAFE run keeps that rest (its adapters are the baseline's until they freeze), so its activations get what the
    fraction leaves of the peak after the rest.

    Args:
        baseline: the baseline run's :class:`~peft_safe.measure.meter.TrainingSummary`.
        fraction: the ``--safe-memory-budget`` fraction.

    Raises:
        BenchInputError: if the baseline has no peak measured, or the fraction leaves no room for activations.
    """
    peak, activations = baseline.peak_step_bytes, baseline.peak_activation_bytes
    if peak is None or activations is None:
        raise BenchInputError("--safe-memory-budget needs the baseline's measured peak, which this torch cannot "
                              "measure (torch.distributed._tools.mem_tracker is missing); drop the flag.")
    budget = int(fraction * peak) - (peak - activations)
    if budget < 1:
        raise BenchInputError(f"--safe-memory-budget {fraction}: {fraction} x the baseline's peak ({peak} bytes) is "
                              f"less than what it holds besides activations ({peak - activations} bytes); raise it.")
    return budget


def run_one(task: Task, adapter: str, use_safe: bool, args: argparse.Namespace, seed: int,
            baseline: Baseline | None = None, freeze_at: int | None = None) -> tuple[dict[str, Any], TrainingMeter]:
    """Fine-tune ``adapter`` (with SAFE or not) for the run's steps and measure it.

    Args:
        task: the prepared task of this seed.
        adapter: one of :data:`ADAPTERS`.
        use_safe: wrap the adapter in SAFE.
        args: the parsed bench flags.
        seed: the seed of the initialisation, the batch order and dropout.
        baseline: a ``--baseline`` to run instead of the plain adapter (``use_safe`` False).
        freeze_at: the step a ``prefix`` baseline freezes at (its ``T``, or SAFE's first freeze step).

    Returns:
        ``(result, meter)``: the run's results (without its memory summary, which needs the paired run) and
        its :class:`~peft_safe.measure.meter.TrainingMeter`.
    """
    from peft.tuners.adalora import AdaLoraModel
    from tqdm.auto import tqdm

    total_steps = total_steps_of(task, args)
    model = build_model(task, adapter, use_safe, args, seed, total_steps, baseline)
    tuner = model.base_model
    prefix = baseline is not None and baseline.kind == "prefix"
    safe = tuner if use_safe or prefix else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = lr_scheduler(optimizer, args, total_steps)
    meter = TrainingMeter(model, optimizer, measure_every=args.measure_every, flops="cached")
    generator = torch.Generator().manual_seed(seed)
    probe = list(iter_batches(task.probe, args.batch_size, device=args.device))
    n_train = len(task.train["input_ids"])
    label = f"{adapter}+SAFE" if use_safe else f"{adapter}+{baseline.label}" if baseline else adapter
    n_units = len(safe.adapter_units) if safe else 0
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses: list[float] = []
    metric_series: list[tuple[int, float]] = []  # (step, metric) after each pass over the training set
    scoring_time, step = 0.0, 0
    model.train()
    with tqdm(total=total_steps, desc=f"seed {seed} {label}", disable=args.quiet, leave=False) as bar:
        while step < total_steps:
            order = torch.randperm(n_train, generator=generator).tolist()
            for batch in iter_batches(task.train, args.batch_size, order, device=args.device):
                with meter.step(step, batch=batch, measure=True if step == total_steps - 1 else None):
                    loss = model(**batch).loss
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    if isinstance(tuner, AdaLoraModel):
                        tuner.update_and_allocate(step)  # SAFE's skips frozen units
                    optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                step += 1
                if prefix and step == freeze_at:  # the fixed schedule: the bottom K blocks, now, no scoring
                    safe.freeze(list(range(baseline.blocks)), optimizer=optimizer, at=step)
                if use_safe and step % args.score_every == 0:
                    start = time.perf_counter()
                    safe.update_and_freeze(step, probe, optimizer=optimizer)
                    scoring_time += time.perf_counter() - start
                bar.set_postfix(loss=f"{losses[-1]:.4f}", frozen=f"{len(safe.frozen_units) if safe else 0}/{n_units}",
                                refresh=False)
                bar.update(1)
                if step >= total_steps:
                    break
            else:  # a whole pass, not the last: evaluated between steps, outside the measured step times
                if args.eval_each_epoch:
                    metric_series.append((step, evaluate(model, task, args)))
    meter.close()
    metric = evaluate(model, task, args)
    metric_series.append((step, metric))
    summary = meter.summary()
    result = {
        "adapter": adapter, "safe": use_safe, "seed": seed, "metric_name": task.metric_name, "metric": metric,
        "variant": baseline.label if baseline else None, "freeze_at": freeze_at,
        "steps": step, "final_loss": losses[-1], "loss_series": losses, "metric_series": metric_series,
        "trainable_parameters": trainable_parameters,
        "total_flops": summary.total_flops, "train_time_s": summary.wall_time_s,
        "step_time_s": summary.mean_unmetered_step_s, "scoring_time_s": scoring_time,
        "total_time_s": summary.wall_time_s + scoring_time,
        "units": safe.adapter_units if safe else [],
        "frozen_units": safe.frozen_units if safe else [],
        "freeze_steps": dict(safe.freeze_state.frozen) if safe else {},
        "warmup_end": safe.freeze_state.warmup_end if safe else None,
        "cut_block": safe.backprop_cut_block if safe else None,
        "importance_history": [dict(h) for h in safe.freeze_state.history] if safe else [],
        "memory_series": [r.to_dict() for r in meter.measured],
    }
    logger.info("seed %d %s: %s %.4f, %d/%d units frozen, %.1f s", seed, label, task.metric_name, metric,
                len(result["frozen_units"]), n_units, result["total_time_s"])
    return result, meter


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, task: Task, args: argparse.Namespace) -> float:
    """Accuracy on the test split (classification) or its :func:`perplexity` (causal LM).

    Args:
        model: the trained model; it is back in training mode on return.
        task: the task whose test split is scored.
        args: the parsed bench flags (``batch_size``: batches of twice that; ``device``).

    Between training steps too: modes and RNG states are given back, and bitsandbytes' 4-bit layers are kept from
    repacking their weights for the CPU (which would cut the gradient through them afterwards), as in SAFE's scoring.
    """
    batches = iter_batches(task.test, 2 * args.batch_size, device=args.device)
    with preserved_state(model):
        if task.kind != "classification":
            return perplexity(model, batches)
        correct, count = 0, 0
        for batch in batches:
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            count += len(batch["input_ids"])
    return correct / count


def perplexity(model: nn.Module, blocks_or_batches: torch.Tensor | Iterable[Mapping[str, torch.Tensor]],
               batch_size: int | None = None) -> float:
    """Perplexity of a causal LM: exp of its mean next-token loss per predicted token (token-weighted NLL).

    Each forward's loss (transformers' mean over the tokens it predicts) is weighted by the number of tokens
    it predicts: the labels after the first of each row that are not ``-100``.

    Args:
        model: a causal LM whose forward takes ``labels`` and returns ``.loss``; it is put in eval mode and
            given back in the modes it was in (and its 4-bit layers unrepacked: it may run between training steps).
        blocks_or_batches: a tensor ``(n_blocks, seq_len)`` of token blocks, each its own labels; or batches,
            mappings of the model's inputs with ``labels``, already on the model's device.
        batch_size: blocks per forward, with a tensor of blocks; None with batches (they come batched).

    Raises:
        ValueError: if ``batch_size`` is missing or below 1 with a tensor (or given with batches), the tensor
            is not 2-D, a batch has no ``labels``, or nothing is left to predict.
    """
    if isinstance(blocks_or_batches, torch.Tensor):
        blocks = blocks_or_batches
        if blocks.dim() != 2:
            raise ValueError(f"perplexity takes blocks of shape (n_blocks, seq_len), got shape "
                             f"{tuple(blocks.shape)}; reshape them or pass batches of inputs with labels.")
        if batch_size is None or batch_size < 1:
            raise ValueError(f"perplexity of a tensor of blocks needs batch_size >= 1, got {batch_size}.")
        batches: Iterable[Mapping[str, torch.Tensor]] = (
            {"input_ids": ids, "labels": ids} for ids in blocks.split(batch_size)
        )
    elif batch_size is not None:
        raise ValueError(f"batch_size={batch_size} goes with a tensor of blocks; batches come batched already: "
                         "leave batch_size out.")
    else:
        batches = blocks_or_batches
    total, count = 0.0, 0
    with preserved_state(model):  # eval mode, no grad, no 4-bit repacking; the modes given back
        for batch in batches:
            if "labels" not in batch:
                raise ValueError(f"a batch for perplexity has no 'labels' (keys: {sorted(batch)}); "
                                 "add labels (the input ids, -100 where no token is to be predicted).")
            n = int((batch["labels"][..., 1:] != -100).sum())  # tokens predicted
            if n:
                loss = model(**batch).loss
                total, count = total + loss.item() * n, count + n
    if count == 0:
        raise ValueError("perplexity found no token to predict: pass blocks of at least 2 tokens, or labels "
                         "that are not all -100.")
    return math.exp(total / count)
