"""What a prefix cache (SAFE's ``cache_frozen``) did during each step, for :class:`~peft_safe.measure.TrainingMeter`.

The meter finds the cache by duck typing, so this layer never imports ``peft_safe.safe``: any module of the model
holding a ``prefix_cache`` attribute whose ``stats()`` returns the counters of
:meth:`peft_safe.safe.savings.prefix_cache.PrefixCache.stats` (``served_forwards``, ``row_hits``, ``row_lookups``,
``memory_bytes``, ``disk_bytes``), and optionally ``would_serve(batch)``. A step's figures are the differences of
the counters across it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["CacheReader", "find_prefix_cache"]


def find_prefix_cache(model: nn.Module) -> Any | None:
    """The first ``prefix_cache`` with a ``stats()`` method held by a module of ``model``, or None."""
    for module in model.modules():
        cache = module.__dict__.get("prefix_cache")
        if cache is not None and callable(getattr(cache, "stats", None)):
            return cache
    return None


class CacheReader:
    """Reads a model's prefix cache around each step; every figure is None when the model has none."""

    def __init__(self, model: nn.Module) -> None:
        self.cache = find_prefix_cache(model)
        self._start: dict[str, Any] | None = None

    def begin(self) -> None:
        """Note the counters at the start of a step."""
        self._start = self.cache.stats() if self.cache is not None else None

    def would_serve(self, batch: Any) -> bool:
        """The cache's guess, before a step runs, whether its forward on ``batch`` will be served; False without a
        cache, without a batch, or for a cache that cannot tell (no ``would_serve`` method)."""
        guess = getattr(self.cache, "would_serve", None)
        return bool(guess(batch)) if guess is not None and batch is not None else False

    def end(self) -> dict[str, Any]:
        """The step's figures: ``cache_served`` (a forward of the step was served from the cache),
        ``cache_row_hits`` and ``cache_row_lookups`` (examples found / looked up) and ``cache_bytes`` (memory and
        disk held at the end of the step); all None without a cache or while it is switched off."""
        start, self._start = self._start, None
        if start is None:
            return {"cache_served": None, "cache_row_hits": None, "cache_row_lookups": None, "cache_bytes": None}
        now = self.cache.stats()
        if not (now.get("enabled") or start.get("enabled")):
            return {"cache_served": None, "cache_row_hits": None, "cache_row_lookups": None, "cache_bytes": None}
        return {
            "cache_served": now["served_forwards"] > start["served_forwards"],
            "cache_row_hits": now["row_hits"] - start["row_hits"],
            "cache_row_lookups": now["row_lookups"] - start["row_lookups"],
            "cache_bytes": now["memory_bytes"] + now["disk_bytes"],
        }


def summarize_cache(records: list[Any]) -> dict[str, Any]:
    """``cache_served_steps``, ``cache_hit_rate`` (example hits / lookups over the run) and ``peak_cache_bytes``
    of a run's records; None where no step saw a cache."""
    seen = [r for r in records if r.cache_served is not None]
    if not seen:
        return {"cache_served_steps": None, "cache_hit_rate": None, "peak_cache_bytes": None}
    lookups = sum(r.cache_row_lookups for r in seen)
    return {
        "cache_served_steps": sum(1 for r in seen if r.cache_served),
        "cache_hit_rate": sum(r.cache_row_hits for r in seen) / lookups if lookups else None,
        "peak_cache_bytes": max(r.cache_bytes for r in seen),
    }
