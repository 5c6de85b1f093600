"""Where should SAFE measure importance? Every scoring site on the same LoRA run, scored side by side.

    python examples/scoring_sites.py --task rotten_tomatoes --steps 200 --json out/sites_minilm.json
    python examples/scoring_sites.py --task wikitext2 --steps 160 --batch-size 4 --lr 1e-3 --json out/sites_llm.json

Trains plain LoRA (SAFE wraps it but never freezes: only ``compute_importance`` is called) with the bench's
model, data and flags (``peft-safe bench --help``; wikitext2 is SmolLM2-135M in 4 bits with LoRA on every
projection), and every ``--score-every`` steps scores every unit at each site of
:data:`peft_safe.core.cka.SCORING_SITES` on the same probe set. Printed per site: the scores (as shares of
their sum) at each scoring, how stable the ranking of the units is from one scoring to the next (Spearman),
how much of the total the bottom half of the blocks holds, and how many bottom blocks a prefix holding less
than ``--tau`` of the total would freeze. ``--json`` keeps everything; a PNG of the score curves goes beside it.
Needs the assets of the task (``SAFE_ASSETS=all bash scripts/setup.sh`` for wikitext2).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from peft_safe.bench.cli import _check_args, build_parser
from peft_safe.bench.data import iter_batches, prepare_task
from peft_safe.bench.runs import build_model, lr_scheduler, total_steps_of
from peft_safe.core.cka import SCORING_SITES
from peft_safe.core.schedule import normalize_scores, prefix_below


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64).argsort().argsort().double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.description = __doc__.split("\n")[0]
    args = parser.parse_args(argv)
    _check_args(parser, args)
    torch.manual_seed(args.first_seed)
    task = prepare_task(args, args.first_seed)
    total = total_steps_of(task, args)
    model = build_model(task, "lora", True, args, args.first_seed, total)
    safe = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = lr_scheduler(optimizer, args, total)
    probe = list(iter_batches(task.probe, args.batch_size, device=args.device))
    generator = torch.Generator().manual_seed(args.first_seed)
    records, step = [], 0
    model.train()
    while step < total:
        order = torch.randperm(len(task.train["input_ids"]), generator=generator).tolist()
        for batch in iter_batches(task.train, args.batch_size, order, device=args.device):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.score_every == 0:
                record = {"step": step, "loss": float(loss.detach()), "scores": {}}
                for site in SCORING_SITES:
                    safe.safe_config.scoring_site = site
                    record["scores"][site] = safe.compute_importance(probe)
                records.append(record)
                print(f"step {step}: loss {record['loss']:.3f}", flush=True)
            if step >= total:
                break
    units = safe.adapter_units
    summary = {}
    for site in SCORING_SITES:
        series = [[r["scores"][site][u] for u in units] for r in records]
        stability = [spearman(a, b) for a, b in zip(series, series[1:])]
        shares = [normalize_scores(dict(zip(units, s)), "share") for s in series]
        bottom_half = [sum(list(share.values())[: len(units) // 2]) for share in shares]
        prefix = [len(prefix_below(share, args.tau, cumulative=True)) for share in shares]
        summary[site] = {"spearman_consecutive": stability, "bottom_half_share": bottom_half, "prefix_blocks": prefix}
        print(f"\n{site}")
        for record, share in zip(records, shares):
            print(f"  step {record['step']:4d}: " + " ".join(f"{v:.3f}" for v in share.values()))
        print("  rank stability (Spearman, consecutive scorings): " + " ".join(f"{v:.2f}" for v in stability))
        print("  share of the bottom half of the blocks: " + " ".join(f"{v:.2f}" for v in bottom_half))
        print(f"  bottom blocks a prefix under tau={args.tau} holds: " + " ".join(map(str, prefix)))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({"task": args.task, "units": units, "records": records, "summary": summary,
                       "argv": sys.argv[1:] if argv is None else argv}, handle, indent=1)
        plot(units, records, os.path.splitext(args.json)[0] + ".png", args.task)


def plot(units: list[str], records: list[dict], path: str, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORING_SITES), figsize=(5 * len(SCORING_SITES), 3.6), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, site in zip(axes, SCORING_SITES):
        for i, record in enumerate(records):
            share = normalize_scores(record["scores"][site], "share")
            ax.plot(range(len(units)), [share[u] for u in units], color=cmap(i / max(1, len(records) - 1)),
                    label=f"step {record['step']}" if i in (0, len(records) - 1) else None)
        ax.set_title(site)
        ax.set_xlabel("block")
    axes[0].set_ylabel("share of total importance")
    axes[0].legend()
    fig.suptitle(f"{task}: importance per block at each scoring (dark: early, light: late)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
