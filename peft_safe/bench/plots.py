"""PNG plots of measured runs (the result dicts ``peft-safe bench`` writes): importance of each unit over
training, the freeze timeline (units x steps, as Figure 5 of the SAFE paper), training memory over steps, and
the frontier of several runs' methods (:mod:`.frontier`).

Drawn with matplotlib's object API on a plain :class:`~matplotlib.figure.Figure` (Agg canvas), so no pyplot
state or GUI backend is touched. matplotlib is an optional dependency (``pip install peft-safe[bench]``),
imported only when a plot is drawn. Imports :mod:`.report` (unit names) and ``MIB``; never torch, peft,
transformers, :mod:`.runs` or :mod:`.cli`.
"""

from __future__ import annotations

from typing import Any

from ..measure.memory import MIB
from .report import short_unit

__all__ = ["plot_freeze_timeline", "plot_frontier", "plot_importance", "plot_memory"]


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    """A blank matplotlib figure of ``width`` x ``height`` inches, not tied to pyplot.

    Raises:
        ImportError: if matplotlib is not installed, naming the package to install.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is installed with the bench extra
        raise ImportError("plots need matplotlib: pip install matplotlib (or peft-safe[bench]).") from error
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_importance(run: dict[str, Any], path: str) -> None:
    """Raw importance (1 - CKA) of each unit at each scoring; a cross marks where a unit froze.

    Args:
        run: a SAFE run's result (``importance_history``, ``units``, ``freeze_steps``).
        path: the PNG file to write.
    """
    fig = _figure()
    ax = fig.add_subplot()
    history = run["importance_history"]
    for index, unit in enumerate(run["units"]):
        points = [(h["t"], h["scores"][unit]) for h in history if unit in h["scores"]]
        if not points:
            continue
        color = f"C{index % 10}"
        ax.plot([t for t, _ in points], [s for _, s in points], marker=".", color=color, label=short_unit(unit))
        if run["freeze_steps"].get(unit) is not None:
            ax.plot(*points[-1], marker="x", markersize=9, color=color)
    if run.get("warmup_end") is not None:
        ax.axvline(run["warmup_end"], color="grey", linestyle=":", label="warm-up end")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("importance (1 - CKA)")
    ax.set_title(f"{run['adapter']}+SAFE, seed {run['seed']}: importance per unit (x: frozen)")
    if history:
        ax.legend(fontsize="small", ncol=2)
    fig.savefig(path)


def plot_freeze_timeline(run: dict[str, Any], path: str) -> None:
    """Units (rows) against steps: trainable until the unit froze, frozen after.

    Args:
        run: a SAFE run's result (``units``, ``freeze_steps``, ``steps``).
        path: the PNG file to write.
    """
    units = run["units"]
    fig = _figure(height=max(2.5, 0.35 * len(units) + 1.2))
    ax = fig.add_subplot()
    end = run["steps"]
    for row, unit in enumerate(units):
        frozen_at = run["freeze_steps"].get(unit, end)
        frozen_at = 0 if frozen_at is None else frozen_at  # frozen by hand before any scoring
        ax.broken_barh([(0, frozen_at)], (row - 0.4, 0.8), color="tab:orange")
        if frozen_at < end:
            ax.broken_barh([(frozen_at, end - frozen_at)], (row - 0.4, 0.8), color="lightgrey")
    if run.get("warmup_end") is not None:
        ax.axvline(run["warmup_end"], color="black", linestyle=":")
    ax.set_yticks(range(len(units)), [short_unit(u) for u in units])
    ax.set_xlim(0, max(end, 1))
    ax.set_xlabel("optimizer step (orange: trainable, grey: frozen, dotted: warm-up end)")
    ax.set_title(f"{run['adapter']}+SAFE, seed {run['seed']}: freeze timeline")
    fig.savefig(path)


def plot_memory(baseline: dict[str, Any], safe: dict[str, Any], path: str) -> None:
    """Training memory (activations + gradients + optimizer state; dashed: activations alone) per measured step.

    Args:
        baseline: the run without SAFE (``memory_series``).
        safe: the run with SAFE (``memory_series``, ``freeze_steps``).
        path: the PNG file to write.
    """
    fig = _figure()
    ax = fig.add_subplot()
    for run, color, label in ((baseline, "tab:blue", baseline["adapter"]),
                              (safe, "tab:orange", f"{safe['adapter']}+SAFE")):
        series = run["memory_series"]
        steps = [r["step"] for r in series]
        ax.plot(steps, [r["training_bytes"] / MIB for r in series], color=color, drawstyle="steps-post",
                label=f"{label}: training")
        ax.plot(steps, [r["activation_bytes"] / MIB for r in series], color=color, linestyle="--",
                drawstyle="steps-post", label=f"{label}: activations")
    for t in sorted({t for t in safe["freeze_steps"].values() if t is not None}):
        ax.axvline(t, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("optimizer step (dotted: SAFE froze units)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"training memory per step, seed {safe['seed']}")
    ax.legend(fontsize="small")
    fig.savefig(path)


def _family(method: str) -> str:
    return method.split(":", 1)[0].split(" ", 1)[0] if ":" in method or method.startswith("SAFE") else "plain"


def plot_frontier(entries: list[dict[str, Any]], metric_name: str, path: str, title: str = "") -> None:
    """Two panels, the metric against average training memory and against FLOPs (both relative to the plain
    adapter); error bars are the spread over seeds; the fixed prefixes are joined by a line."""
    fig = _figure(11.0, 4.5)
    colours = {"plain": "black", "SAFE": "tab:red", "prefix": "tab:blue", "top": "tab:green"}
    scale = 100 if metric_name == "accuracy" else 1
    for axis, key, label in zip(fig.subplots(1, 2), ("memory_ratio", "flops_ratio"),
                                ("average training memory / plain", "FLOPs / plain")):
        for e in entries:
            family = _family(e["method"])
            axis.errorbar(e[key]["mean"], e["metric"]["mean"] * scale, xerr=e[key]["std"],
                          yerr=e["metric"]["std"] * scale, fmt="o", color=colours.get(family, "tab:gray"), capsize=3)
            axis.annotate(e["method"], (e[key]["mean"], e["metric"]["mean"] * scale), fontsize=7,
                          textcoords="offset points", xytext=(4, 4))
        prefix = sorted((e for e in entries if _family(e["method"]) == "prefix"), key=lambda e: e[key]["mean"])
        if len(prefix) > 1:
            axis.plot([e[key]["mean"] for e in prefix], [e["metric"]["mean"] * scale for e in prefix],
                      color=colours["prefix"], linestyle="--", linewidth=1, label="fixed prefix")
            axis.legend(fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel(f"{metric_name}{' (%)' if scale == 100 else ''}")
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path)
