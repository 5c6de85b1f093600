"""How few probe tokens SAFE's decisions can be scored on (issue 24, item 4): the scores of a probe budget against
the full probe set's, beside how far the full set's scores move when the probe set itself is another one.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_budget.py --task wikitext2 \
        --snapshots 40,80,120 --budgets 128,256,512 [--budget-json docs/results/probe-budget-smollm2.json]

Trains the bench's model (``peft-safe bench`` flags) with the plain adapter loop, SAFE standing down, and at each
snapshot step scores every unit: on the bench's probe set with every token (the reference), on another probe set of
the same size drawn from the test split (how much the choice of probe set alone moves the scores), and on the
bench's probe set subsampled to each budget, under ``--repeats`` subsampling seeds. SAFE's decision compares the
share of the importance held by each bottom prefix of blocks with a threshold, so each variant is reported by the
largest difference of any bottom prefix's share from the reference's (``prefix_share_gap``), by whether the prefix
chosen at every threshold from 0.01 to 0.30 stays the same (``same_prefix_all_thresholds``), and by its time.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

THRESHOLDS = [i / 100 for i in range(1, 31)]


def prefix_shares(scores: dict[str, float], order: list[str]) -> list[float]:
    """Cumulative share of the total importance held by each bottom prefix, input side first."""
    total = math.fsum(scores.values()) or 1.0
    out, running = [], 0.0
    for unit in order:
        running += scores[unit]
        out.append(running / total)
    return out


def prefix_at(shares: list[float], threshold: float) -> int:
    """Blocks SAFE's prefix rule freezes at ``threshold`` from nothing frozen: those whose prefix share is below it."""
    return next((k for k, share in enumerate(shares) if share >= threshold), len(shares))


def compare(reference: dict[str, float], other: dict[str, float], order: list[str]) -> dict[str, object]:
    ref, oth = prefix_shares(reference, order), prefix_shares(other, order)
    return {"prefix_share_gap": max(abs(a - b) for a, b in zip(ref, oth)),
            "same_prefix_all_thresholds": all(prefix_at(ref, t) == prefix_at(oth, t) for t in THRESHOLDS),
            "prefix_differs_at": [t for t in THRESHOLDS if prefix_at(ref, t) != prefix_at(oth, t)]}


def main(argv: list[str]) -> int:
    from peft_safe.bench.cli import _check_args, build_parser
    from peft_safe.bench.data import iter_batches, prepare_task
    from peft_safe.bench.runs import build_model, lr_scheduler, total_steps_of

    parser = build_parser()
    parser.add_argument("--snapshots", default="40,80,120", help="steps to score at, comma-separated")
    parser.add_argument("--budgets", default="128,256,512", help="probe token budgets, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="subsampling seeds per budget")
    parser.add_argument("--budget-json", help="write the figures here")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    snapshots = sorted(int(s) for s in args.snapshots.split(","))
    budgets = [int(b) for b in args.budgets.split(",")]
    task = prepare_task(args, 0)
    total = total_steps_of(task, args)
    model = build_model(task, "lora", True, args, 0, total)
    safe = model.base_model
    safe.auto_driver.stand_down("the experiment scores by hand")
    config = safe.peft_config[safe.active_adapters[0]]
    order = list(safe.adapter_units)  # unit names, input side first
    probe = list(iter_batches(task.probe, args.batch_size, device=args.device))
    n_probe = len(task.probe["input_ids"])
    other = list(iter_batches({k: v[:n_probe] for k, v in task.test.items()}, args.batch_size, device=args.device))
    full = 1 << 30
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = lr_scheduler(optimizer, args, total)
    generator = torch.Generator().manual_seed(0)

    def score(batches, tokens: int, seed: int = 0) -> tuple[dict[str, float], float]:
        config.probe_tokens, config.seed = tokens, seed
        start = time.perf_counter()
        scores = safe.compute_importance(batches)
        return scores, time.perf_counter() - start

    figures: dict[str, object] = {"task": task.name, "units": len(order), "snapshots": []}
    step, n_train = 0, len(task.train["input_ids"])
    model.train()
    while step < snapshots[-1]:
        for batch in iter_batches(task.train, args.batch_size, torch.randperm(n_train, generator=generator).tolist(),
                                  device=args.device):
            model(**batch).loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step in snapshots:
                reference, ref_s = score(probe, full)
                another, _ = score(other, full)
                snap = {"step": step, "reference_shares": prefix_shares(reference, order), "reference_s": ref_s,
                        "another_probe_set": compare(reference, another, order), "budgets": {}}
                for budget in budgets:
                    runs = []
                    for seed in range(args.repeats):
                        scores, seconds = score(probe, budget, seed)
                        runs.append({**compare(reference, scores, order), "seconds": seconds})
                    snap["budgets"][str(budget)] = runs
                figures["snapshots"].append(snap)
                gaps = {b: max(r["prefix_share_gap"] for r in runs) for b, runs in snap["budgets"].items()}
                print(f"step {step}: full probe set {ref_s:.2f} s; another probe set: share gap "
                      f"{snap['another_probe_set']['prefix_share_gap']:.4f}; budgets' largest gap "
                      + ", ".join(f"{b}: {g:.4f}" for b, g in gaps.items()), flush=True)
            if step >= snapshots[-1]:
                break
    if args.budget_json:
        with open(args.budget_json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
