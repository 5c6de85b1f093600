"""``peft-safe plan``: the memory of LoRA and SAFE fine-tuning of a LLaMA-style model, planned from its shape.

Owns the command line of the planner: :func:`build_parser` (its flags) and :func:`main` (the plan as a table
or as JSON, or with ``--validate`` the plan against measured training steps). The first line above is the
command's description in ``--help``.

Imports: :mod:`peft_safe.plan.shapes`, :mod:`peft_safe.plan.formulas`, :mod:`peft_safe.plan.validation`
and torch (to set ``--validate``'s threads). Nothing in the package imports this module but its ``__init__``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .budget import budget_json, format_budget, largest_batch, plan_budget
from .formulas import format_table, plan_json, plan_memory
from .shapes import ALL_PROJECTIONS, DEFAULT_TARGETS, DTYPE_BYTES, PRESETS, PlanSettings, resolve_model
from .validation import format_validation, slice_7b_cases, validate

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``peft-safe plan``'s flags (``peft-safe plan --help``)."""
    p = argparse.ArgumentParser(prog="peft-safe plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-2-7b",
                   help=f"a preset ({', '.join(PRESETS)}), a config.json or a model folder (default llama-2-7b)")
    p.add_argument("--bits", type=int, default=4, help="bits of the base weights: 4 (NF4), 8, 16 or 32")
    p.add_argument("--no-double-quant", action="store_true", help="4 bits without double quantization")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated projections with LoRA")
    p.add_argument("--all-projections", action="store_true", help="LoRA on q,k,v,o,gate,up,down_proj")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None,
                   help="activations and unquantized weights (default float32 for 4/8/32 bits, bfloat16 for 16)")
    p.add_argument("--adapter-dtype", choices=sorted(DTYPE_BYTES), default="float32")
    p.add_argument("--memory", type=float, default=None, metavar="GIB",
                   help="also plan a GPU of this many GiB: LoRA, LoRA + checkpointing and SAFE under "
                        "memory_budget (the blocks it checkpoints at several frozen depths), and the largest batch "
                        "each fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.add_argument("--validate", action="store_true",
                   help="measure tiny LLaMA models on this machine and print planned vs measured")
    p.add_argument("--slice-7b", type=int, default=0, metavar="LAYERS",
                   help="with --validate: measure a LAYERS-block slice of LLaMA-2 7B in 4 bits instead (slow)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``peft-safe plan``: print the plan (a table, or JSON with ``--json``), or validate it.

    Args:
        argv: The arguments after ``plan``; None reads ``sys.argv``.

    Returns:
        0. Bad flags or settings exit with status 2 and a message naming the value and the fix.
    """
    args = build_parser().parse_args(argv)
    if args.validate:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "64")))))
        rows = validate(slice_7b_cases(args.slice_7b) if args.slice_7b else None)
        if args.json:
            print(json.dumps([{"case": r.case.label, "planned": r.planned, "measured": r.measured} for r in rows],
                             indent=1))
        else:
            print(format_validation(rows))
            print(f"\nlargest error: {100 * max(r.max_abs_error for r in rows):.2f} %")
        return 0
    try:
        shape = resolve_model(args.model)
        targets = (ALL_PROJECTIONS if args.all_projections
                   else tuple(t.strip() for t in args.targets.split(",") if t.strip()))
        settings = PlanSettings(
            bits=args.bits, double_quant=not args.no_double_quant, batch_size=args.batch_size,
            seq_len=args.seq_len, lora_r=args.rank, target_modules=targets,
            gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, adapter_dtype=args.adapter_dtype,
        )
    except ValueError as exc:
        build_parser().error(str(exc))
    if args.memory is not None and not args.memory > 0:
        build_parser().error(f"--memory must be a positive number of GiB, got {args.memory}; e.g. --memory 24.")
    rows = plan_memory(shape, settings)
    memory = None if args.memory is None else int(args.memory * (1 << 30))
    budget = None if memory is None else plan_budget(shape, settings, memory)
    if args.json:
        out = plan_json(shape, settings, rows)
        if budget is not None:
            out["memory"] = {"bytes": memory, "rows": budget_json(budget), "largest_batch": {
                name: largest_batch(shape, settings, memory, name)
                for name in ("LoRA", "LoRA + checkpointing", "SAFE k=0")}}
        print(json.dumps(out, indent=1))
    else:
        print(format_table(shape, settings, rows))
        if budget is not None:
            print("\n" + format_budget(shape, settings, memory, budget))
    return 0
