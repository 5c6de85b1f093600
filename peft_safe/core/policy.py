"""One scoring step of SAFE's schedule: detect the end of warm-up, compute the threshold, pick units.

Pure: imports only this package's core and the standard library.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .schedule import DEFAULT_WARMUP_TOLERANCE, cubic_threshold, normalize_scores, units_below, warmup_converged
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
    importance_scale: str = "normalized"

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
        if threshold <= 0.0:
            return []
        return units_below(normalize_scores(scores, self.importance_scale), threshold, state.frozen)
