"""The bench's report: the figures compared (:data:`METRICS`), their statistics over seeds and the printed table.

Owns :func:`summarize` (mean, spread and SAFE/adapter ratio per figure), :func:`format_table` and
:func:`short_unit` (the short unit names the table and :mod:`.plots` print). Works on the plain result dicts
:func:`~peft_safe.bench.runs.run_one` returns: imports the standard library and ``MIB`` from
:mod:`peft_safe.measure.memory`, never torch, peft, transformers, matplotlib or the other bench modules.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..measure.memory import MIB

# (key in the JSON summary, table label, getter on a result, scale to the table's unit, format)
METRICS = (
    ("metric", None, lambda r: r["metric"], None, None),
    ("avg_training_bytes", "avg training memory (MiB)", lambda r: r["memory"]["avg_training_bytes"], 1 / MIB,
     "{:.2f}"),
    ("after_training_bytes", "memory after last freeze (MiB)", lambda r: r["memory"]["after_training_bytes"],
     1 / MIB, "{:.2f}"),
    ("peak_training_bytes", "peak training memory (MiB)", lambda r: r["memory"]["peak_training_bytes"], 1 / MIB,
     "{:.2f}"),
    ("peak_step_bytes", "peak step memory, recompute incl. (MiB)", lambda r: r["memory"].get("peak_step_bytes"),
     1 / MIB, "{:.2f}"),
    ("avg_activation_bytes", "avg activation memory (MiB)", lambda r: r["memory"]["avg_activation_bytes"],
     1 / MIB, "{:.2f}"),
    ("peak_cuda_max_memory_allocated", "peak CUDA memory (MiB)",
     lambda r: r["memory"]["peak_cuda_max_memory_allocated"], 1 / MIB, "{:.1f}"),
    ("total_flops", "FLOPs (TFLOP)", lambda r: r["total_flops"], 1e-12, "{:.4g}"),
    ("last_step_flops", "FLOPs of the last step (GFLOP)",
     lambda r: r["memory_series"][-1].get("flops") if r["memory_series"] else None, 1e-9, "{:.4g}"),
    ("train_time_s", "train time (s)", lambda r: r["train_time_s"], 1, "{:.1f}"),
    ("step_time_s", "step time, no meters (ms)", lambda r: r["step_time_s"], 1e3, "{:.1f}"),
    ("total_time_s", "train + SAFE scoring (s)", lambda r: r["total_time_s"], 1, "{:.1f}"),
    # --cache-frozen: SAFE's prefix cache (none in the baseline, so its cells read "-")
    ("cache_hit_rate", "prefix cache hit rate (%)", lambda r: r["memory"].get("cache_hit_rate"), 100, "{:.1f}"),
    ("cache_served_steps", "steps served from the cache", lambda r: r["memory"].get("cache_served_steps"), 1,
     "{:.0f}"),
    ("peak_cache_bytes", "prefix cache held (MiB)", lambda r: r["memory"].get("peak_cache_bytes"), 1 / MIB,
     "{:.2f}"),
)


def _stats(values: list[float | None]) -> dict[str, Any] | None:
    """``{"mean", "std", "values"}`` of one figure over seeds; None if there are none or one is missing."""
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per adapter and figure: mean and spread over seeds without and with SAFE, and their ratio SAFE/adapter;
    each ``--baseline`` too, under ``"<adapter>+<spec>"``, in SAFE's place.

    Args:
        results: the runs' results, each with its ``memory`` summary.

    Returns:
        ``{adapter: {figure: {"baseline": stats, "safe": stats, "ratio": safe mean / baseline mean}}}``;
        ``stats`` is ``{"mean", "std", "values"}`` (sample standard deviation over seeds, 0 for one seed) or
        None where a run has no such figure (CUDA memory off CUDA).
    """
    summary: dict[str, dict[str, Any]] = {}
    for adapter in dict.fromkeys(r["adapter"] for r in results):
        plain = [r for r in results if r["adapter"] == adapter and not r["safe"] and not r.get("variant")]
        summary[adapter] = _figures(plain, [r for r in results if r["adapter"] == adapter and r["safe"]])
        for variant in dict.fromkeys(r["variant"] for r in results if r["adapter"] == adapter and r.get("variant")):
            # a --baseline against the plain adapter, in the SAFE column's place: "lora+prefix:3@120"
            runs = [r for r in results if r["adapter"] == adapter and r.get("variant") == variant]
            summary[f"{adapter}+{variant}"] = _figures(plain, runs)
    return summary


def _figures(base_runs: list[dict[str, Any]], other_runs: list[dict[str, Any]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for key, _, get, _, _ in METRICS:
        base, other = _stats([get(r) for r in base_runs]), _stats([get(r) for r in other_runs])
        ratio = other["mean"] / base["mean"] if base and other and base["mean"] else None
        figures[key] = {"baseline": base, "safe": other, "ratio": ratio}
    figures["metric"]["difference"] = (
        figures["metric"]["safe"]["mean"] - figures["metric"]["baseline"]["mean"]
        if figures["metric"]["safe"] and figures["metric"]["baseline"] else None
    )
    return figures


# Per-step series: in the full --json report, left out of the summary one (what docs/results/ keeps).
SERIES_KEYS = ("loss_series", "memory_series", "importance_history")


def small_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` without its per-step series: the config, the summary and every run's figures and decisions."""
    results = [{k: v for k, v in r.items() if k not in SERIES_KEYS} for r in report["results"]]
    return {"config": report["config"], "summary": report["summary"], "results": results}


def format_table(results: list[dict[str, Any]], summary: dict[str, dict[str, Any]]) -> str:
    """The printed table: one row group per adapter, columns adapter, adapter+SAFE, SAFE/adapter.

    Args:
        results: the runs' results (the task metric's name, and what each SAFE run froze when).
        summary: :func:`summarize` of ``results``.

    Returns:
        The table, then one line per SAFE run on its freezes, joined by newlines.
    """
    metric_name = results[0]["metric_name"]
    metric_label, metric_scale, metric_fmt = (
        ("accuracy (%)", 100, "{:.2f}") if metric_name == "accuracy" else ("perplexity", 1, "{:.3f}")
    )
    rows: list[tuple[str, ...]] = []
    for entry_name, figures in summary.items():
        adapter, _, variant = entry_name.partition("+")
        name = adapter if adapter != "lora" else "LoRA"
        other = variant or "SAFE"
        rows.append((f"[{name}]" if not variant else f"[{name} vs {variant}]", name, f"{name}+{other}",
                     f"{other}/{name}"))
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
        if r.get("variant") and r.get("freeze_at") is not None:
            lines.append(f"seed {r['seed']} {r['adapter']}+{r['variant']}: froze {len(r['frozen_units'])} units at "
                         f"step {r['freeze_at']}" + (f"; backprop cut at {short_unit(r['cut_block'])}"
                                                      if r.get("cut_block") else ""))
        if r["safe"]:
            frozen = ", ".join(f"{short_unit(u)}@{_fmt_t(t)}" for u, t in r["freeze_steps"].items())
            lines.append(f"seed {r['seed']} {r['adapter']}+SAFE: froze {len(r['frozen_units'])}/{len(r['units'])} "
                         f"units (unit@step: {frozen or 'none'}); warm-up ended at step {_fmt_t(r['warmup_end'])}"
                         + (f"; backprop cut at {short_unit(r['cut_block'])}" if r.get("cut_block") else ""))
    return "\n".join(lines)


def short_unit(unit: str) -> str:
    """``bert.encoder.layer.3`` -> ``layer.3``: the block, without the model's prefix."""
    parts = unit.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else unit


def _fmt_t(t: float | None) -> str:
    """A step as the table prints it: ``-`` for none, else the shortest form (``12``, ``12.5``)."""
    return "-" if t is None else f"{t:g}"
