"""The ``peft-safe bench`` command: its flags, their checks, the runs of every adapter and seed, the output.

Owns :func:`build_parser`, the flag checks, :func:`run_bench` (the report ``--json`` writes), :func:`write_plots`
and :func:`main`, the only code of the bench that prints. Imports :mod:`.data`, :mod:`.runs`, :mod:`.report` and
:mod:`.plots` (peft and transformers lazily, for their versions); nothing in the bench imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import warnings
from typing import Any

import torch

from ..core.cka import CKA_PRECISIONS
from .baselines import parse_baseline
from .data import TASKS, BenchInputError, prepare_task
from .plots import plot_freeze_timeline, plot_importance, plot_memory
from .report import format_table, small_report, summarize
from .runs import ADAPTERS, adapter_config, memory_budget_bytes, run_one, safe_config, total_steps_of

# the parent of :mod:`.runs`' logger, which logs one line per finished run
logger = logging.getLogger("peft_safe.bench")

DESCRIPTION = (
    "``peft-safe bench``: each adapter with and without SAFE, on the same data, seeds and steps, "
    "measured side by side."
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``peft-safe bench``'s flags (checked further by :func:`main`)."""
    p = argparse.ArgumentParser(prog="peft-safe bench", description=DESCRIPTION)
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
    p.add_argument("--eval-each-epoch", action="store_true",
                   help="also evaluate after each pass over the training set (each run's metric_series; not in the "
                        "step times); on with --regime paper for wikitext2")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (wikitext2: per block)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (AdaLoRA's target rank)")
    p.add_argument("--target-modules", help="LoRA's target modules, comma-separated, or all-linear (default: peft's "
                                            "for the model type; all-linear for a causal LM, as QLoRA trains it)")
    p.add_argument("--bits", type=int, choices=(32, 4), default=None,
                   help="base weights: 32 (float32) or 4 (bitsandbytes NF4 with prepare_model_for_kbit_training, "
                        "QLoRA); default 4 for wikitext2, 32 otherwise")
    p.add_argument("--checkpointing", choices=("none", "reentrant", "non-reentrant"), default="none",
                   help="gradient checkpointing of every block, in both runs")
    p.add_argument("--safe-memory-budget", type=float, default=None, metavar="F",
                   help="SAFE run only: keep each step's peak memory within F (in (0, 1]) of the baseline's measured "
                        "peak, by checkpointing blocks (SAFEConfig.memory_budget)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-schedule", choices=("constant", "linear"), default=None,
                   help="constant, or linear decay to 0 (the paper's LinearLR); default linear for wikitext2, "
                        "constant otherwise")
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
    p.add_argument("--scoring-site", choices=("auto", "adapter_output", "block_output", "residual_update"),
                   help="where SAFE measures importance (default: SAFEConfig's, auto)")
    p.add_argument("--freeze-order", choices=("prefix", "any"), help="SAFE's freeze order (default: SAFEConfig's)")
    p.add_argument("--cka-precision", choices=CKA_PRECISIONS,
                   help="how SAFE computes 1 - CKA (default: SAFEConfig's, float64; float32: the difference form)")
    p.add_argument("--importance-scale", choices=("share", "normalized", "raw"),
                   help="the scale SAFE's threshold applies to (default: SAFEConfig's)")
    p.add_argument("--cache-frozen", action="store_true",
                   help="SAFE run: cache the hidden states entering the lowest trainable block per example and skip "
                        "the frozen blocks once every example of a batch is cached (SAFEConfig.cache_frozen; pays "
                        "only over several epochs)")
    _add_comparison_flags(p)
    p.add_argument("--measure-every", type=int, default=5, help="measure memory every N steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write config, per-seed results, memory series and importance history here")
    p.add_argument("--summary-json", help="write the report without its per-step series here (small enough to "
                                          "commit, e.g. under docs/results/)")
    p.add_argument("--plots", help="folder for the PNG plots (default: the JSON's folder, else ./bench_out)")
    p.add_argument("--no-plots", action="store_true", help="write no plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no log lines")
    return p


def _add_comparison_flags(p: argparse.ArgumentParser) -> None:
    """The regime, the competitors run beside SAFE, and which of a seed's runs this process makes."""
    p.add_argument("--regime", choices=("short", "paper"), default="short",
                   help="short: the defaults below (6 epochs on 2,000 reviews); paper: the paper's long regime on "
                        "these machines (MiniLM: 1,000 reviews x 30 epochs, 2,000 test reviews, linear LR decay; "
                        "wikitext2: 600 blocks of 128 tokens x 3 epochs in batches of 4, lr 1e-3); flags given "
                        "explicitly win")
    p.add_argument("--baseline", action="append", default=[], metavar="SPEC",
                   help="also run a simple competitor, reported like SAFE (repeatable): prefix:K@T freezes the bottom "
                        "K blocks at step T (T=safe: SAFE's first freeze step on the seed), top:K puts the adapter "
                        "on all but the bottom K blocks (lora, adalora)")
    p.add_argument("--no-plain", action="store_true",
                   help="a sweep point: SAFE (and any --baseline) only, without the plain adapter run; peft-safe "
                        "frontier pairs it with the plain run of the same seed in another summary of the same task "
                        "and flags (times are not compared across processes)")
    p.add_argument("--no-safe", action="store_true",
                   help="leave out the SAFE run (with --no-plain: the --baseline runs only, a seed's work split "
                        "over processes); prefix:K@safe then takes T from --safe-freeze-step")
    p.add_argument("--safe-freeze-step", type=int, default=None, metavar="T",
                   help="with --no-safe: SAFE's first freeze step on this seed (its summary's freeze_steps), which "
                        "prefix:K@safe baselines freeze at")


# --regime paper (issue 24): the paper's GLUE runs last 50-100 epochs and its LLaMA-2 run 3 epochs; these are the
# same regimes at this machine's scale.
PAPER_REGIME = {
    "encoder": {"train_size": 1000, "epochs": 30, "test_size": 2000, "lr_schedule": "linear"},
    # 450 steps of 4 blocks (as the decoder's short run and the paper's LLaMA-2 batch of 4), so SAFE scores ~20
    # times; 128 validation blocks and 8 probe blocks, as the short run (2,000 blocks would cost a third of training
    # at each of the three evaluations)
    "decoder": {"train_size": 600, "max_length": 128, "epochs": 3, "batch_size": 4, "test_size": 128,
                "probe_size": 8, "lr": 1e-3, "measure_every": 10, "lr_schedule": "linear", "eval_each_epoch": True},
}


def _apply_preset(parser: argparse.ArgumentParser, args: argparse.Namespace, preset: dict[str, Any]) -> None:
    """Set each flag of ``preset`` the user left at its default (an explicit flag wins)."""
    for name, value in preset.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad flags with a message naming the value and the fix (argparse exits with status 2).

    Also normalises ``args.adapters`` from the comma-separated flag to a list without repeats.
    """
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
    if args.safe_memory_budget is not None and not 0 < args.safe_memory_budget <= 1:
        parser.error(f"--safe-memory-budget must be a fraction in (0, 1] of the baseline's peak, got "
                     f"{args.safe_memory_budget}.")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}.")
    if args.no_plain and args.safe_memory_budget is not None:
        parser.error("--safe-memory-budget is a fraction of the plain run's measured peak, which --no-plain does not "
                     "run; drop one of the two.")
    adapters = [a.strip().lower() for a in args.adapters.split(",") if a.strip()]
    unknown = [a for a in adapters if a not in ADAPTERS]
    if unknown or not adapters:
        parser.error(f"unknown adapter {unknown[0] if unknown else args.adapters!r} in --adapters; "
                     f"choose from {','.join(ADAPTERS)}.")
    args.adapters = list(dict.fromkeys(adapters))
    try:
        args.baselines = list(dict.fromkeys(parse_baseline(spec) for spec in args.baseline))
    except ValueError as error:
        parser.error(str(error))
    at_safe = any(b.kind == "prefix" and b.at is None for b in args.baselines)
    if args.no_safe and at_safe and args.safe_freeze_step is None:
        parser.error("--baseline prefix:K@safe takes SAFE's first freeze step from the SAFE run, which --no-safe "
                     "leaves out; give it with --safe-freeze-step T (the earliest of freeze_steps in SAFE's run of "
                     "this seed, in its summary), or a fixed step, prefix:K@T.")
    if args.safe_freeze_step is not None and (not args.no_safe or args.seeds != 1 or args.safe_freeze_step < 1):
        parser.error(f"--safe-freeze-step stands for the SAFE run of one seed that --no-safe leaves out: give it with "
                     f"--no-safe and --seeds 1, as a step >= 1 (got {args.safe_freeze_step}).")
    if args.no_safe and args.no_plain and not args.baselines:
        parser.error("--no-safe with --no-plain leaves nothing to run; add a --baseline.")
    if any(b.kind == "top" for b in args.baselines) and set(args.adapters) - {"lora", "adalora"}:
        parser.error(f"--baseline top:K places the adapter with peft's layers_to_transform, which lora and adalora "
                     f"have; drop it or run --adapters lora (got {','.join(args.adapters)}).")
    decoder = args.task == "wikitext2"
    if args.regime == "paper":
        _apply_preset(parser, args, PAPER_REGIME["decoder" if decoder else "encoder"])
    if args.bits is None:
        args.bits = 4 if decoder else 32
    if args.lr_schedule is None:
        args.lr_schedule = "linear" if decoder else "constant"
    if args.task not in TASKS:
        if not args.task.lower().endswith((".csv", ".json", ".jsonl")):
            parser.error(f"--task must be one of {', '.join(TASKS)} or a .csv/.json/.jsonl file, got {args.task!r}.")
        if not os.path.isfile(args.task):
            parser.error(f"--task data file {args.task!r} does not exist.")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model!r} is not a model folder (no config.json in it).")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for but CUDA is not available; use --device cpu.")


def write_plots(report: dict[str, Any], folder: str) -> list[str]:
    """The PNG plots of a report (see :mod:`peft_safe.bench.plots`), for the first seed of each adapter.

    Args:
        report: what :func:`run_bench` returns.
        folder: where the plots go (made if missing).

    Returns:
        The files written.
    """
    os.makedirs(folder, exist_ok=True)
    written = []
    first_seed = report["results"][0]["seed"]
    for adapter in report["config"]["adapters"]:
        runs = {r["safe"]: r for r in report["results"]
                if r["adapter"] == adapter and r["seed"] == first_seed and not r.get("variant")}
        for name, draw, drawn in (
            (f"importance_{adapter}.png", plot_importance, (runs[True],)),
            (f"freeze_timeline_{adapter}.png", plot_freeze_timeline, (runs[True],)),
            (f"memory_{adapter}.png", plot_memory, (runs[False], runs[True])),
        ):
            path = os.path.join(folder, name)
            draw(*drawn, path)
            written.append(path)
    return written


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every adapter without and with SAFE for every seed; return the report (what ``--json`` writes).

    Args:
        args: the parsed and checked bench flags.

    Returns:
        ``{"config": ..., "summary": ..., "results": ...}``: the task, the flags and the library versions; the
        :func:`~peft_safe.bench.report.summarize` of the runs; each run's results.

    Raises:
        BenchInputError: if the data, or the SAFE schedule the flags make, cannot be used (before any training).
        FileNotFoundError: if an asset package the task needs is not installed.
    """
    results = []
    config: dict[str, Any] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        task = prepare_task(args, seed)
        if seed == args.first_seed:  # a bad schedule fails here, not after the first baseline has trained
            total_steps, task_type = total_steps_of(task, args), task.peft_task_type
            for adapter in args.adapters:
                safe_config(adapter_config(adapter, args, total_steps, task_type), args, total_steps, task_type)
        for adapter in args.adapters:
            if args.no_plain or args.no_safe:  # a seed's work split over processes (summaries frontier pairs)
                results += _partial_seed(task, adapter, args, seed)
                continue
            baseline, base_meter = run_one(task, adapter, False, args, seed)
            safe_args = args
            if args.safe_memory_budget is not None:
                budget = memory_budget_bytes(base_meter.summary(), args.safe_memory_budget)
                safe_args = argparse.Namespace(**{**vars(args), "memory_budget_bytes": budget})
            safe, safe_meter = run_one(task, adapter, True, safe_args, seed)
            if args.safe_memory_budget is not None:
                safe["memory_budget_bytes"] = safe_args.memory_budget_bytes
            # the "after last freeze" window is SAFE's, for both runs, so they are compared over the same steps
            after = safe_meter.last_change or 0
            baseline["memory"] = base_meter.summary(after_step=after).to_dict()
            safe["memory"] = safe_meter.summary(after_step=after).to_dict()
            results += [baseline, safe, *run_baselines(task, adapter, args, seed, safe, after)]
        config = {"task_name": task.name, "kind": task.kind, "model_path": task.model_path,
                  "num_labels": task.num_labels, "metric": task.metric_name, "total_steps": total_steps_of(task, args),
                  "train_examples": len(task.train["input_ids"]), "test_examples": len(task.test["input_ids"])}
    import peft
    import transformers

    config.update({**vars(args), "baselines": [b.label for b in getattr(args, "baselines", [])]})
    config.update({"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
                   "python": platform.python_version(), "threads": torch.get_num_threads()})
    return {"config": config, "summary": summarize(results), "results": results}


def _partial_seed(task: Any, adapter: str, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """The runs of a seed that ``--no-plain`` / ``--no-safe`` leave, each measured after its own last change."""
    runs, safe, after = [], None, 0
    if not args.no_plain:
        plain, meter = run_one(task, adapter, False, args, seed)
        plain["memory"] = meter.summary().to_dict()
        runs.append(plain)
    if not args.no_safe:
        safe, meter = run_one(task, adapter, True, args, seed)
        after = meter.last_change or 0
        safe["memory"] = meter.summary().to_dict()
        runs.append(safe)
    return runs + run_baselines(task, adapter, args, seed, safe, after)


def run_baselines(task: Any, adapter: str, args: argparse.Namespace, seed: int, safe: dict[str, Any] | None,
                  after: int) -> list[dict[str, Any]]:
    """The ``--baseline`` runs of one seed and adapter, each measured after its own last change (else SAFE's)."""
    runs = []
    for spec in getattr(args, "baselines", []):
        freeze_at = spec.at
        if spec.kind == "prefix" and freeze_at is None and safe is None:  # --no-safe: the step given for it
            freeze_at = args.safe_freeze_step
        if spec.kind == "prefix" and freeze_at is None:
            steps = [t for t in safe["freeze_steps"].values() if t is not None]
            if not steps:
                logger.info("seed %d %s+%s skipped: SAFE froze nothing on this seed", seed, adapter, spec.label)
                continue
            freeze_at = int(min(steps))
        result, meter = run_one(task, adapter, False, args, seed, baseline=spec, freeze_at=freeze_at)
        result["memory"] = meter.summary(after_step=meter.last_change or after).to_dict()
        runs.append(result)
    return runs


def _quiet_third_parties() -> None:
    """What the bench's user does not need before its own lines: bitsandbytes' note that an optional CPU kernel
    package (``kernels``) is missing (the built-in kernel runs), and peft's use of a name transformers deprecated
    (``is_gradient_checkpointing``, read by ``get_peft_model``). Errors and other warnings still show."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    """``peft-safe bench``: parse and check the flags, run, print the table, write the JSON and the plots.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).

    Returns:
        0; bad flags, data or assets exit with status 2 and a message naming the fix.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    _quiet_third_parties()
    if not args.quiet and not logger.handlers:  # one line per finished run; the tuner's own logs stay quiet
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # printed once, by this handler
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
    if args.summary_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.summary_json)), exist_ok=True)
        with open(args.summary_json, "w") as handle:
            json.dump(small_report(report), handle, indent=1)
        print(f"summary: {args.summary_json}")
    if not args.no_plots:
        folder = args.plots or (os.path.dirname(os.path.abspath(args.json)) if args.json else "bench_out")
        written = write_plots(report, folder)
        print(f"plots: {', '.join(written)}")
    return 0
