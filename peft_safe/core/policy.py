"""One scoring step of SAFE's schedule: detect the end of warm-up, compute the threshold, pick units.

Pure: imports only this package's core and the standard library.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .schedule import (
    DEFAULT_WARMUP_TOLERANCE,
    FREEZE_ORDERS,
    cubic_threshold,
    normalize_scores,
    prefix_below,
    units_below,
    warmup_converged,
)
from .state import FreezeState


def check_scoring_time(t: object, last_scored: float | None) -> None:
    """Refuse a scoring time that is not a finite number >= 0, or lies before the previous scoring.

    Raises:
        ValueError: naming the time and what it must be.
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
        raise ValueError(
            f"scoring time t must be a finite number >= 0 (the current epoch or optimizer step), got {t!r}."
        )
    if last_scored is not None and t < last_scored:
        raise ValueError(f"scoring time {t} lies before the previous scoring at {last_scored}; time must not go back.")


@dataclass(frozen=True)
class SchedulePolicy:
    """SAFE's schedule hyper-parameters (see SAFEConfig for their meaning and defaults, which are these).

    ``warmup_tolerance=None`` means the rule's default (:data:`~peft_safe.core.schedule.DEFAULT_WARMUP_TOLERANCE`).
    """

    tau: float
    final_freeze_time: float
    warmup_rule: str = "relative_norm"
    warmup_tolerance: float | None = None
    warmup_floor: float = 0.0
    warmup_cap: float | None = None
    importance_scale: str = "share"
    freeze_order: str = "prefix"

    def __post_init__(self) -> None:
        if self.freeze_order not in FREEZE_ORDERS:
            raise ValueError(f"unknown freeze order {self.freeze_order!r}; allowed: {', '.join(FREEZE_ORDERS)}")
        normalize_scores({}, self.importance_scale)  # raises on an unknown scale

    def threshold(self, t: float, warmup_end: float | None) -> float:
        return cubic_threshold(t, warmup_end, self.final_freeze_time, self.tau)

    def advance(self, state: FreezeState, t: float, scores: dict[str, float]) -> list[str]:
        """Record a scoring at time ``t`` in ``state`` and return the units to freeze now.

        Frozen units never thaw: they are left out of the returned list and stay in ``state.frozen``.

        Raises:
            ValueError: if ``t`` is not finite or lies before the previous scoring, or a score is not finite or
                negative; the state is left unchanged.
        """
        # Everything is checked before the state changes: a bad call leaves it as it was.
        check_scoring_time(t, state.last_scored)
        normalize_scores(scores, self.importance_scale)  # raises on a non-finite or negative score
        previous = state.latest_scores
        state.history.append({"t": t, "scores": dict(scores)})
        state.last_scored = t
        if state.warmup_end is None:
            tolerance = self.warmup_tolerance
            if tolerance is None:
                tolerance = DEFAULT_WARMUP_TOLERANCE[self.warmup_rule]
            settled = bool(previous) and warmup_converged(
                previous, scores, self.warmup_rule, tolerance, self.warmup_floor
            )
            capped = self.warmup_cap is not None and t >= self.warmup_cap
            if settled or capped:
                state.warmup_end = t
        threshold = self.threshold(t, state.warmup_end)
        if threshold <= 0.0 or not any(score > 0 for score in scores.values()):
            return []  # before the threshold rises, or scores that carry no information (adapters that do nothing)
        return self.select(state, scores, threshold)

    def select(self, state: FreezeState, scores: dict[str, float], threshold: float) -> list[str]:
        """The units to freeze at ``threshold`` given this scoring's ``scores`` (of the trainable units).

        On the "share" scale a unit's share is of the total over every unit, frozen ones at their last score (see
        :attr:`FreezeState.last_known_scores`), so the share of what is frozen keeps counting; on the other scales
        the scores of this scoring are scaled among themselves, as the paper does. At least one unit stays
        trainable: when every trainable unit lies under the threshold, the top one (``"any"``) or the highest of
        the prefix (``"prefix"``) is kept.
        """
        if self.importance_scale == "share":
            scaled = normalize_scores(state.last_known_scores, "share")
        else:
            scaled = normalize_scores(scores, self.importance_scale)
        if self.freeze_order == "any":
            chosen = units_below({u: s for u, s in scaled.items() if u in scores}, threshold, state.frozen)
            keep = max(scores, key=scores.get) if scores else None  # the top unit
        else:
            order = state.units or list(scaled)
            ordered = {u: scaled.get(u, 0.0) for u in order if u in scaled or u in state.frozen}
            chosen = prefix_below(ordered, threshold, state.frozen, cumulative=self.importance_scale == "share")
            keep = chosen[-1] if chosen else None  # the highest of the prefix, so it stays a prefix
        if len(chosen) == len(scores):  # every trainable unit under T (raw scores, or a few even shares)
            chosen = [u for u in chosen if u != keep]
        return chosen
