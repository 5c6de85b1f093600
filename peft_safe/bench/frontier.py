"""The frontier of issue 24: the runs of several bench summaries (``peft-safe bench --summary-json``, one file per
seed or sweep point, as committed under ``docs/results/``) as points, each method's metric against its average
training memory and its FLOPs relative to the plain adapter of the same seed, averaged over seeds.

``peft-safe frontier docs/results/paper-minilm/*.json --plot docs/img/frontier-minilm.png`` prints the table and
draws both panels; the fixed-prefix points (``prefix:K@T``) are joined into the line SAFE is held against.

Imports the standard library, and :mod:`.plots` (matplotlib) only to draw; never torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["format_frontier", "frontier", "main", "method_of", "points"]

DEFAULT_TAU = 0.3  # SAFEConfig's, and the bench's


def method_of(result: dict[str, Any], config: dict[str, Any]) -> str:
    """The method a run stands for: the plain adapter, ``SAFE tau=...``, or its ``--baseline`` label (a fixed prefix
    frozen at SAFE's first freeze of a sweep point says which)."""
    tau = config.get("tau", DEFAULT_TAU)
    variant = result.get("variant")
    if variant:
        return f"{variant} (SAFE tau={tau})" if variant.endswith("@safe") and tau != DEFAULT_TAU else variant
    return f"SAFE tau={tau}" if result["safe"] else result["adapter"]


#: The flags and versions that make a plain run: a run of one summary is compared with the plain run of its seed in
#: another only where all of them agree (SAFE's own flags, --baseline and where the files go may differ).
PLAIN_RUN_FIELDS = ("task_name", "model", "train_examples", "test_examples", "total_steps", "train_size", "test_size",
                    "probe_size", "epochs", "steps", "batch_size", "max_length", "rank", "target_modules", "bits",
                    "checkpointing", "lr", "lr_schedule", "regime", "device", "torch", "peft", "transformers")


def _plain_key(config: dict[str, Any], run: dict[str, Any]) -> tuple:
    flags = (json.dumps(config.get(field), sort_keys=True) for field in PLAIN_RUN_FIELDS)
    return (*flags, run["adapter"], run["seed"])


def _is_plain(run: dict[str, Any]) -> bool:
    return not run["safe"] and not run.get("variant")


def points(reports: Iterable[dict[str, Any]], unpaired: list[str] | None = None) -> list[dict[str, Any]]:
    """One point per run that has a plain run of its adapter and seed: in the same report, else in another report
    of the same task and flags (:data:`PLAIN_RUN_FIELDS`; a ``--no-plain`` sweep point).

    Args:
        reports: bench summaries.
        unpaired: if given, gets one line per run left out for want of a plain run.

    Returns:
        dicts with ``method``, ``seed``, ``metric``, ``metric_delta`` (run - plain), ``memory_ratio`` (average
        training memory / plain's), ``flops_ratio``, ``time_ratio`` (train + scoring / plain's; None against another
        report's plain run: times of two processes are not compared), ``frozen`` (units frozen at the end) and
        ``freeze_at`` (the step of the first freeze, None without).
    """
    reports = list(reports)
    elsewhere: dict[tuple, dict[str, Any]] = {}
    for report in reports:
        for run in filter(_is_plain, report["results"]):
            elsewhere.setdefault(_plain_key(report["config"], run), run)
    rows = []
    for report in reports:
        config = report["config"]
        here = {(r["adapter"], r["seed"]): r for r in report["results"] if _is_plain(r)}
        for run in report["results"]:
            base = here.get((run["adapter"], run["seed"]))
            same_process = base is not None
            if base is None:
                base = elsewhere.get(_plain_key(config, run))
            if base is None:
                if unpaired is not None:
                    unpaired.append(f"{method_of(run, config)} seed {run['seed']}")
                continue
            steps = [t for t in (run.get("freeze_steps") or {}).values() if t is not None]
            rows.append({
                "method": method_of(run, config), "seed": run["seed"], "metric": run["metric"],
                "metric_delta": run["metric"] - base["metric"],
                "memory_ratio": run["memory"]["avg_training_bytes"] / base["memory"]["avg_training_bytes"],
                "flops_ratio": run["total_flops"] / base["total_flops"],
                "time_ratio": run["total_time_s"] / base["total_time_s"] if same_process else None,
                "frozen": len(run.get("frozen_units") or []),
                "freeze_at": run.get("freeze_at") if run.get("freeze_at") is not None else min(steps, default=None),
            })
    return rows


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (in first-seen order): the seeds and, for every figure, ``{"mean", "std"}`` over them (None for a
    time no seed of the method could be compared)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"method": method, "seeds": [r["seed"] for r in mine]}
        for key in ("metric", "metric_delta", "memory_ratio", "flops_ratio", "time_ratio", "frozen"):
            values = [r[key] for r in mine if r[key] is not None]  # time: only against a plain run of one process
            if not values:
                entry[key] = None
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[key] = {"mean": statistics.fmean(values), "std": spread}
        out.append(entry)
    return out


def format_frontier(entries: list[dict[str, Any]], metric_name: str) -> str:
    """The printed table: one row per method."""
    scale, fmt = (100, "{:.2f}") if metric_name == "accuracy" else (1, "{:.3f}")
    head = f"{'method':<34} {'seeds':>5} {metric_name + ' (mean ± sd)':>22} {'vs plain':>9} {'memory':>7} "
    lines = [head + f"{'FLOPs':>6} {'time':>6} {'frozen':>6}"]
    for e in entries:
        metric = f"{fmt.format(e['metric']['mean'] * scale)} ± {fmt.format(e['metric']['std'] * scale)}"
        time = "-" if e["time_ratio"] is None else f"{e['time_ratio']['mean']:.3f}x"
        lines.append(f"{e['method']:<34} {len(e['seeds']):>5} {metric:>22} "
                     f"{e['metric_delta']['mean'] * scale:>+9.2f} {e['memory_ratio']['mean']:>6.3f}x "
                     f"{e['flops_ratio']['mean']:>5.3f}x {time:>6} {e['frozen']['mean']:>6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``peft-safe frontier FILE... [--plot PNG] [--json OUT]``: 0, or 2 with a message for unreadable input."""
    parser = argparse.ArgumentParser(prog="peft-safe frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="bench summaries (--summary-json), one per seed or sweep point")
    parser.add_argument("--plot", help="write the two-panel PNG here")
    parser.add_argument("--json", help="write the per-method figures here")
    parser.add_argument("--title", default="", help="the plot's title")
    args = parser.parse_args(argv)
    reports = []
    for name in args.files:
        try:
            with open(name) as handle:
                report = json.load(handle)
            report["config"], report["results"]  # noqa: B018 - a summary has both
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.error(f"{name} is not a bench summary ({err!r}); write one with peft-safe bench --summary-json.")
        reports.append(report)
    metrics = {r["config"].get("metric", "metric") for r in reports}
    if len(metrics) != 1:
        parser.error(f"the summaries measure different metrics {sorted(metrics)}; give one task's files at a time.")
    metric_name = metrics.pop()
    unpaired: list[str] = []
    entries = frontier(points(reports, unpaired))
    print(format_frontier(entries, metric_name))
    if unpaired:
        print(f"left out, no plain run of their seed in a summary of the same task and flags: {', '.join(unpaired)}",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(entries, handle, indent=1)
    if args.plot:
        from .plots import plot_frontier

        plot_frontier(entries, metric_name, args.plot, args.title)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
