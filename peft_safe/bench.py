"""``peft-safe bench``: each adapter with and without SAFE, on the same data, seeds and steps, measured side by side.

Default: all-MiniLM-L6-v2 on Rotten Tomatoes (offline asset packages), LoRA against LoRA + SAFE, a plain
PyTorch loop that calls ``SAFEModel.update_and_freeze`` every ``--score-every`` optimizer steps. Per run,
through :class:`~peft_safe.measure.TrainingMeter`:

- training memory of a step: bytes saved for backward (activations, exact, by saved-tensor hooks) + gradient
  bytes + optimizer-state bytes, on every ``--measure-every``-th step and the first step after each freeze;
  reported as the run's average, the average after SAFE's last freeze (over the same steps for both runs) and
  the peak; on CUDA also ``torch.cuda.max_memory_allocated``;
- FLOPs (forward + backward, ``FlopCounterMode``) of every step, counted once per set of trainable
  parameters and batch shape, summed over the run;
- wall time of the training steps, the mean time of a step without meters, and SAFE's scoring time.

The task metric is accuracy for classification, perplexity for WikiText-2 (SmolLM2, causal LM).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

class BenchInputError(ValueError):
    """The data or model the flags point to cannot be used; the message says why and what to change."""


ADAPTERS = ("lora", "adalora", "houlsby", "pfeiffer", "bitfit")
TASKS = ("rotten_tomatoes", "trec", "wikitext2")
_MIB = 2**20


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Task:
    """A prepared task: tokenized splits of one seed, the model to load and how to score it.

    Attributes:
        name: the task's name (a built-in task or the data file's name).
        kind: ``"classification"`` or ``"causal_lm"``.
        model_path: the model folder.
        num_labels: number of classes (classification only).
        train, probe, test: dicts of equally long tensors (``input_ids``, ``attention_mask``, ``labels``...).
    """

    name: str
    kind: str
    model_path: str
    num_labels: int | None
    train: dict[str, torch.Tensor]
    probe: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.kind == "classification" else "perplexity"


def load_table(path: str, text_column: str, label_column: str) -> list[tuple[str, Any]]:
    """Rows ``(text, label)`` of a local CSV file, JSON file (a list of objects) or JSON-lines file.

    Raises:
        BenchInputError: if the file cannot be read as such, is empty, or lacks one of the columns (the message
            lists the columns it has).
    """
    rows: list[dict[str, Any]]
    if path.lower().endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    elif path.lower().endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            data = json.loads(text)
            rows = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as error:
                raise BenchInputError(f"{path} is neither a JSON list of objects nor JSON lines: {error}") from None
    else:
        raise BenchInputError(f"data file {path!r} must end in .csv, .json or .jsonl.")
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise BenchInputError(f"{path} holds no rows of named columns; it needs a header (CSV) or objects (JSON).")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise BenchInputError(
            f"{path} has no column {missing[0]!r}; its columns are {sorted(rows[0])}. "
            "Name the right ones with --text-column and --label-column."
        )
    return [(str(row[text_column]), row[label_column]) for row in rows]


def _label_ids(labels: list[Any]) -> tuple[list[int], int]:
    """Integer labels kept as they are (0..n-1); any other labels mapped to ids in sorted order."""
    values = [str(v).strip() for v in labels]
    if all(v.lstrip("-").isdigit() for v in values):
        ids = [int(v) for v in values]
        if min(ids) >= 0:
            return ids, max(ids) + 1
    names = sorted(set(values))
    return [names.index(v) for v in values], len(names)


def prepare_task(args: argparse.Namespace, seed: int) -> Task:
    """Load, split (seeded) and tokenize the data of ``args.task`` for one seed."""
    from transformers import AutoTokenizer

    from . import assets

    if args.task == "wikitext2":
        return _prepare_wikitext2(args)
    if args.task == "rotten_tomatoes":
        train, test = assets.load_rotten_tomatoes(seed=seed)
        num_labels = 2
    elif args.task == "trec":
        train, test = assets.load_trec()
        train = list(train)
        random.Random(seed).shuffle(train)
        num_labels = 1 + max(y for _, y in train + test)
    else:
        rows = load_table(args.task, args.text_column, args.label_column)
        ids, num_labels = _label_ids([y for _, y in rows])
        rows = [(text, y) for (text, _), y in zip(rows, ids)]
        random.Random(seed).shuffle(rows)
        n_test = max(1, int(len(rows) * 0.2))
        test, train = rows[:n_test], rows[n_test:]
    model_path = args.model or assets.minilm_path()
    train, probe = train[: args.train_size], train[args.train_size : args.train_size + args.probe_size]
    test = test[: args.test_size]
    if not train or not probe or not test:
        raise BenchInputError(
            f"the {args.task} data gives {len(train)} training, {len(probe)} probe and {len(test)} test rows; "
            "each split needs at least one: lower --train-size or use more data."
        )
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def encode(rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = tokenizer([t for t, _ in rows], padding="max_length", truncation=True, max_length=args.max_length,
                        return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return {**batch, "labels": torch.tensor([y for _, y in rows])}

    name = args.task if args.task in TASKS else os.path.basename(args.task)
    return Task(name, "classification", model_path, num_labels, encode(train), encode(probe), encode(test))


def _prepare_wikitext2(args: argparse.Namespace) -> Task:
    """WikiText-2 as blocks of ``--max-length`` tokens (labels = inputs), on SmolLM2 unless ``--model``."""
    from transformers import AutoTokenizer

    from . import assets

    model_path = args.model or assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def blocks(split: str, count: int) -> torch.Tensor:
        ids: list[int] = []
        needed = count * args.max_length
        for line in assets.load_wikitext2(split):
            if line.strip():
                ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
            if len(ids) >= needed:
                break
        n = len(ids) // args.max_length
        if n == 0:
            raise BenchInputError(f"WikiText-2 {split} gave no block of {args.max_length} tokens; lower --max-length.")
        return torch.tensor(ids[: n * args.max_length]).view(n, args.max_length)[:count]

    train = blocks("train", args.train_size + args.probe_size)
    test = blocks("test", args.test_size)

    def as_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    return Task("wikitext2", "causal_lm", model_path, None, as_batch(train[: args.train_size]),
                as_batch(train[args.train_size :]), as_batch(test))


def _batches(data: dict[str, torch.Tensor], batch_size: int, order: list[int] | None = None, device=None):
    n = len(data["input_ids"])
    order = order if order is not None else list(range(n))
    for i in range(0, len(order), batch_size):
        idx = torch.tensor(order[i : i + batch_size])
        yield {k: v[idx].to(device) for k, v in data.items()}


# ---------------------------------------------------------------------------------------------- models
def adapter_config(name: str, args: argparse.Namespace, total_steps: int, task_type: str) -> Any:
    """The peft config of adapter ``name`` (targets: peft's or this package's defaults for the model type)."""
    from peft import AdaLoraConfig, LoraConfig

    from . import BitFitConfig, HoulsbyConfig, PfeifferConfig

    if name == "lora":
        return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1, task_type=task_type)
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


def _task_type(task: Task) -> str:
    return "SEQ_CLS" if task.kind == "classification" else "CAUSAL_LM"


def _build_model(task: Task, adapter: str, use_safe: bool, args: argparse.Namespace, seed: int, total_steps: int):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    task_type = _task_type(task)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the classifier head, as intended
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)  # same head and adapter initialisation with and without SAFE
        if task.kind == "classification":
            base = AutoModelForSequenceClassification.from_pretrained(task.model_path, num_labels=task.num_labels)
        else:
            base = AutoModelForCausalLM.from_pretrained(task.model_path, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(base.config, "pad_token_id", None) is None and task.kind == "classification":
        base.config.pad_token_id = 0
    config = adapter_config(adapter, args, total_steps, task_type)
    if use_safe:
        config = safe_config(config, args, total_steps, task_type)
    return get_peft_model(base, config).to(args.device)


# On MiniLM + LoRA (lr 5e-4, batch 32) importance grows 3-5x per 20 steps until about step 100-120 and then
# settles; a cap before that freezes units whose adapters have barely trained (docs/method.md, docs/results.md).
DEFAULT_WARMUP_CAP_FRACTION = 0.35


def safe_config(adapter: Any, args: argparse.Namespace, total_steps: int, task_type: str) -> Any:
    """SAFE over ``adapter`` with the bench's schedule: step units, t_f at ``--final-freeze-fraction`` of the run.

    Raises:
        BenchInputError: if the flags make an invalid schedule (say, scoring less often than t_f); the message
            names the flags to change.
    """
    from . import SAFEConfig

    final = max(2, int(total_steps * args.final_freeze_fraction))
    fraction = DEFAULT_WARMUP_CAP_FRACTION if args.warmup_cap_fraction is None else args.warmup_cap_fraction
    cap = total_steps * fraction
    if cap >= final:  # t_f before the default cap, or t_f rounded to whole steps (at least 2) in a very short run
        cap = final / 2
    try:
        return SAFEConfig(adapter_config=adapter, tau=args.tau, schedule_unit="step", final_freeze_time=final,
                          scoring_interval=args.score_every, warmup_tolerance=args.warmup_tolerance,
                          warmup_cap=cap, task_type=task_type)
    except ValueError as error:
        raise BenchInputError(
            f"the SAFE schedule is invalid for this run ({total_steps} steps, t_f = {final} steps from "
            f"--final-freeze-fraction {args.final_freeze_fraction}, --score-every {args.score_every}, "
            f"warm-up cap at step {cap:g}): {error} In bench flags: lower --score-every or "
            "--warmup-cap-fraction, or raise --final-freeze-fraction or the run's length."
        ) from error


# ---------------------------------------------------------------------------------------------- one run
def total_steps_of(task: Task, args: argparse.Namespace) -> int:
    steps_per_epoch = -(-len(task.train["input_ids"]) // args.batch_size)
    return args.steps if args.steps is not None else steps_per_epoch * args.epochs


def run_one(task: Task, adapter: str, use_safe: bool, args: argparse.Namespace, seed: int) -> tuple[dict, Any]:
    """Fine-tune ``adapter`` (with SAFE or not) for the run's steps and measure it.

    Returns:
        ``(result, meter)``: the run's results (without its memory summary, which needs the paired run) and
        its :class:`~peft_safe.measure.TrainingMeter`.
    """
    from peft.tuners.adalora import AdaLoraModel
    from tqdm.auto import tqdm

    from .measure import TrainingMeter

    total_steps = total_steps_of(task, args)
    model = _build_model(task, adapter, use_safe, args, seed, total_steps)
    tuner = model.base_model
    safe = tuner if use_safe else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    meter = TrainingMeter(model, optimizer, measure_every=args.measure_every, flops="cached")
    generator = torch.Generator().manual_seed(seed)
    probe = list(_batches(task.probe, args.batch_size, device=args.device))
    n_train = len(task.train["input_ids"])
    label = f"{adapter}+SAFE" if use_safe else adapter
    n_units = len(safe.adapter_units) if safe else 0
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses: list[float] = []
    scoring_time, step = 0.0, 0
    model.train()
    with tqdm(total=total_steps, desc=f"seed {seed} {label}", disable=args.quiet, leave=False) as bar:
        while step < total_steps:
            order = torch.randperm(n_train, generator=generator).tolist()
            for batch in _batches(task.train, args.batch_size, order, device=args.device):
                with meter.step(step, batch=batch, measure=True if step == total_steps - 1 else None):
                    loss = model(**batch).loss
                    loss.backward()
                    optimizer.step()
                    if isinstance(tuner, AdaLoraModel):
                        tuner.update_and_allocate(step)  # SAFE's skips frozen units
                    optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                step += 1
                if safe is not None and step % args.score_every == 0:
                    start = time.perf_counter()
                    safe.update_and_freeze(step, probe, optimizer=optimizer)
                    scoring_time += time.perf_counter() - start
                bar.set_postfix(loss=f"{losses[-1]:.4f}", frozen=f"{len(safe.frozen_units) if safe else 0}/{n_units}",
                                refresh=False)
                bar.update(1)
                if step >= total_steps:
                    break
    meter.close()
    metric = evaluate(model, task, args)
    summary = meter.summary()
    result = {
        "adapter": adapter, "safe": use_safe, "seed": seed, "metric_name": task.metric_name, "metric": metric,
        "steps": step, "final_loss": losses[-1], "loss_series": losses,
        "trainable_parameters": trainable_parameters,
        "total_flops": summary.total_flops, "train_time_s": summary.wall_time_s,
        "step_time_s": summary.mean_unmetered_step_s, "scoring_time_s": scoring_time,
        "total_time_s": summary.wall_time_s + scoring_time,
        "units": safe.adapter_units if safe else [],
        "frozen_units": safe.frozen_units if safe else [],
        "freeze_steps": dict(safe.freeze_state.frozen) if safe else {},
        "warmup_end": safe.freeze_state.warmup_end if safe else None,
        "importance_history": [dict(h) for h in safe.freeze_state.history] if safe else [],
        "memory_series": [r.to_dict() for r in meter.measured],
    }
    logger.info("seed %d %s: %s %.4f, %d/%d units frozen, %.1f s", seed, label, task.metric_name, metric,
                len(result["frozen_units"]), n_units, result["total_time_s"])
    return result, meter


@torch.no_grad()
def evaluate(model: Any, task: Task, args: argparse.Namespace) -> float:
    """Accuracy on the test split (classification) or perplexity (causal LM)."""
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for batch in _batches(task.test, 2 * args.batch_size, device=args.device):
        if task.kind == "classification":
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
        else:
            loss_sum += float(model(**batch).loss) * len(batch["input_ids"])
        count += len(batch["input_ids"])
    model.train()
    return correct / count if task.kind == "classification" else math.exp(loss_sum / count)


# ---------------------------------------------------------------------------------------------- aggregation
# (key in the JSON summary, table label, getter on a result, scale to the table's unit, format)
METRICS = (
    ("metric", None, lambda r: r["metric"], None, None),
    ("avg_training_bytes", "avg training memory (MiB)", lambda r: r["memory"]["avg_training_bytes"], 1 / _MIB,
     "{:.2f}"),
    ("after_training_bytes", "memory after last freeze (MiB)", lambda r: r["memory"]["after_training_bytes"],
     1 / _MIB, "{:.2f}"),
    ("peak_training_bytes", "peak training memory (MiB)", lambda r: r["memory"]["peak_training_bytes"], 1 / _MIB,
     "{:.2f}"),
    ("avg_activation_bytes", "avg activation memory (MiB)", lambda r: r["memory"]["avg_activation_bytes"],
     1 / _MIB, "{:.2f}"),
    ("peak_cuda_max_memory_allocated", "peak CUDA memory (MiB)",
     lambda r: r["memory"]["peak_cuda_max_memory_allocated"], 1 / _MIB, "{:.1f}"),
    ("total_flops", "FLOPs (TFLOP)", lambda r: r["total_flops"], 1e-12, "{:.4g}"),
    ("train_time_s", "train time (s)", lambda r: r["train_time_s"], 1, "{:.1f}"),
    ("step_time_s", "step time, no meters (ms)", lambda r: r["step_time_s"], 1e3, "{:.1f}"),
    ("total_time_s", "train + SAFE scoring (s)", lambda r: r["total_time_s"], 1, "{:.1f}"),
)


def _stats(values: list[float | None]) -> dict[str, Any] | None:
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(results: list[dict]) -> dict[str, dict[str, Any]]:
    """Per adapter and figure: mean and spread over seeds without and with SAFE, and their ratio SAFE/adapter.

    Returns:
        ``{adapter: {figure: {"baseline": stats, "safe": stats, "ratio": safe mean / baseline mean}}}``;
        ``stats`` is ``{"mean", "std", "values"}`` (sample standard deviation over seeds, 0 for one seed) or
        None where a run has no such figure (CUDA memory off CUDA).
    """
    summary: dict[str, dict[str, Any]] = {}
    for adapter in dict.fromkeys(r["adapter"] for r in results):
        runs = {flag: [r for r in results if r["adapter"] == adapter and r["safe"] is flag] for flag in (False, True)}
        figures: dict[str, Any] = {}
        for key, _, get, _, _ in METRICS:
            base, safe = _stats([get(r) for r in runs[False]]), _stats([get(r) for r in runs[True]])
            ratio = safe["mean"] / base["mean"] if base and safe and base["mean"] else None
            figures[key] = {"baseline": base, "safe": safe, "ratio": ratio}
        figures["metric"]["difference"] = (
            figures["metric"]["safe"]["mean"] - figures["metric"]["baseline"]["mean"]
            if figures["metric"]["safe"] and figures["metric"]["baseline"] else None
        )
        summary[adapter] = figures
    return summary


def format_table(results: list[dict], summary: dict[str, dict[str, Any]]) -> str:
    """The printed table: one row group per adapter, columns adapter, adapter+SAFE, SAFE/adapter."""
    metric_name = results[0]["metric_name"]
    metric_label, metric_scale, metric_fmt = (
        ("accuracy (%)", 100, "{:.2f}") if metric_name == "accuracy" else ("perplexity", 1, "{:.3f}")
    )
    rows: list[tuple[str, ...]] = []
    for adapter, figures in summary.items():
        name = adapter if adapter != "lora" else "LoRA"
        rows.append((f"[{name}]", name, f"{name}+SAFE", "SAFE/" + name))
        for key, label, _, scale, fmt in METRICS:
            if key == "metric":
                label, scale, fmt = metric_label, metric_scale, metric_fmt
            entry = figures[key]
            if entry["baseline"] is None and entry["safe"] is None:
                continue
            cells = []
            for side in ("baseline", "safe"):
                stats = entry[side]
                cell = "-" if stats is None else fmt.format(stats["mean"] * scale)
                if stats is not None and len(stats["values"]) > 1:
                    cell += f" ± {fmt.format(stats['std'] * scale)}"
                cells.append(cell)
            ratio = "n/a" if entry["ratio"] is None else f"{entry['ratio']:.3f}"
            if key == "metric" and entry.get("difference") is not None:
                ratio += f" ({entry['difference'] * scale:+.2f}{' pt' if metric_name == 'accuracy' else ''})"
            rows.append((label, *cells, ratio))
        rows.append(("",) * 4)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for r in results:
        if r["safe"]:
            frozen = ", ".join(f"{_short(u)}@{_fmt_t(t)}" for u, t in r["freeze_steps"].items())
            lines.append(f"seed {r['seed']} {r['adapter']}+SAFE: froze {len(r['frozen_units'])}/{len(r['units'])} "
                         f"units (unit@step: {frozen or 'none'}); warm-up ended at step {_fmt_t(r['warmup_end'])}")
    return "\n".join(lines)


def _short(unit: str) -> str:
    return ".".join(unit.split(".")[-2:])


def _fmt_t(t: float | None) -> str:
    return "-" if t is None else f"{t:g}"


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-safe bench", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="rotten_tomatoes",
                   help="rotten_tomatoes (default), trec, wikitext2 (SmolLM2, perplexity), or a local .csv/.json/"
                        ".jsonl file with --text-column and --label-column")
    p.add_argument("--text-column", default="text", help="text column of a local data file")
    p.add_argument("--label-column", default="label", help="label column of a local data file")
    p.add_argument("--model", help="local model folder (default: all-MiniLM-L6-v2; SmolLM2-135M for wikitext2)")
    p.add_argument("--adapters", default="lora",
                   help=f"comma-separated adapters, each run without and with SAFE: {','.join(ADAPTERS)}")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...): mean and spread over them")
    p.add_argument("--first-seed", type=int, default=0,
                   help="first seed, so seeds can run in separate processes: --first-seed 2 --seeds 1 runs seed 2")
    p.add_argument("--train-size", type=int, default=2000, help="training examples (wikitext2: blocks)")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--probe-size", type=int, default=32, help="examples SAFE scores importance on")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (wikitext2: per block)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (AdaLoRA's target rank)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--tau", type=float, default=0.3)
    p.add_argument("--final-freeze-fraction", type=float, default=0.4,
                   help="t_f as a fraction of the run's optimizer steps")
    p.add_argument("--warmup-tolerance", type=float, default=None,
                   help="warm-up ends once the importance vector moves by less than this fraction of its norm "
                        "(default: SAFEConfig's, 0.15)")
    p.add_argument("--warmup-cap-fraction", type=float, default=None,
                   help="warm-up ends at the latest at this fraction of the run (default: 0.35, or half of t_f "
                        "when t_f comes earlier)")
    p.add_argument("--score-every", type=int, default=20, help="SAFE scoring interval in optimizer steps")
    p.add_argument("--measure-every", type=int, default=5, help="measure memory every N steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write config, per-seed results, memory series and importance history here")
    p.add_argument("--plots", help="folder for the PNG plots (default: the JSON's folder, else ./bench_out)")
    p.add_argument("--no-plots", action="store_true", help="write no plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no log lines")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad flags with a message naming the value and the fix (argparse exits with status 2)."""
    for name in ("seeds", "train_size", "test_size", "probe_size", "epochs", "batch_size", "max_length", "rank",
                 "score_every", "measure_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}.")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}.")
    if not 0 < args.final_freeze_fraction <= 1:
        parser.error(f"--final-freeze-fraction must be in (0, 1], got {args.final_freeze_fraction}.")
    if args.warmup_cap_fraction is not None and not 0 < args.warmup_cap_fraction < args.final_freeze_fraction:
        parser.error(f"--warmup-cap-fraction must be in (0, --final-freeze-fraction {args.final_freeze_fraction}), "
                     f"got {args.warmup_cap_fraction}.")
    if args.warmup_tolerance is not None and not args.warmup_tolerance > 0:
        parser.error(f"--warmup-tolerance must be > 0, got {args.warmup_tolerance}.")
    if not 0 < args.tau <= 1:
        parser.error(f"--tau must be in (0, 1], got {args.tau}.")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}.")
    adapters = [a.strip().lower() for a in args.adapters.split(",") if a.strip()]
    unknown = [a for a in adapters if a not in ADAPTERS]
    if unknown or not adapters:
        parser.error(f"unknown adapter {unknown[0] if unknown else args.adapters!r} in --adapters; "
                     f"choose from {','.join(ADAPTERS)}.")
    args.adapters = list(dict.fromkeys(adapters))
    if args.task not in TASKS:
        if not args.task.lower().endswith((".csv", ".json", ".jsonl")):
            parser.error(f"--task must be one of {', '.join(TASKS)} or a .csv/.json/.jsonl file, got {args.task!r}.")
        if not os.path.isfile(args.task):
            parser.error(f"--task data file {args.task!r} does not exist.")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model!r} is not a model folder (no config.json in it).")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for but CUDA is not available; use --device cpu.")


def write_plots(report: dict, folder: str) -> list[str]:
    """The PNG plots of a report (see :mod:`peft_safe.measure.plots`); returns the files written."""
    from .measure.plots import plot_freeze_timeline, plot_importance, plot_memory

    os.makedirs(folder, exist_ok=True)
    written = []
    first_seed = report["results"][0]["seed"]
    for adapter in report["config"]["adapters"]:
        runs = {r["safe"]: r for r in report["results"] if r["adapter"] == adapter and r["seed"] == first_seed}
        for name, draw in (
            (f"importance_{adapter}.png", lambda path: plot_importance(runs[True], path)),
            (f"freeze_timeline_{adapter}.png", lambda path: plot_freeze_timeline(runs[True], path)),
            (f"memory_{adapter}.png", lambda path: plot_memory(runs[False], runs[True], path)),
        ):
            path = os.path.join(folder, name)
            draw(path)
            written.append(path)
    return written


def run_bench(args: argparse.Namespace) -> dict:
    """Run every adapter without and with SAFE for every seed; return the report (what ``--json`` writes)."""
    results = []
    config: dict[str, Any] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        task = prepare_task(args, seed)
        if seed == args.first_seed:  # a bad schedule fails here, not after the first baseline has trained
            total_steps, task_type = total_steps_of(task, args), _task_type(task)
            for adapter in args.adapters:
                safe_config(adapter_config(adapter, args, total_steps, task_type), args, total_steps, task_type)
        for adapter in args.adapters:
            baseline, base_meter = run_one(task, adapter, False, args, seed)
            safe, safe_meter = run_one(task, adapter, True, args, seed)
            # the "after last freeze" window is SAFE's, for both runs, so they are compared over the same steps
            after = safe_meter.last_change or 0
            baseline["memory"] = base_meter.summary(after_step=after).to_dict()
            safe["memory"] = safe_meter.summary(after_step=after).to_dict()
            results += [baseline, safe]
        config = {"task_name": task.name, "kind": task.kind, "model_path": task.model_path,
                  "num_labels": task.num_labels, "metric": task.metric_name, "total_steps": total_steps_of(task, args),
                  "train_examples": len(task.train["input_ids"]), "test_examples": len(task.test["input_ids"])}
    import peft
    import transformers

    config.update(vars(args))
    config.update({"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
                   "python": platform.python_version(), "threads": torch.get_num_threads()})
    return {"config": config, "summary": summarize(results), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if not args.quiet and not logger.handlers:  # one line per finished run; the tuner's own logs stay quiet
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        report = run_bench(args)
    except (BenchInputError, FileNotFoundError) as error:  # data or assets the flags point to are unusable
        parser.exit(2, f"peft-safe bench: error: {error}\n")
    print(format_table(report["results"], report["summary"]))
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"results: {args.json}")
    if not args.no_plots:
        folder = args.plots or (os.path.dirname(os.path.abspath(args.json)) if args.json else "bench_out")
        written = write_plots(report, folder)
        print(f"plots: {', '.join(written)}")
    return 0
