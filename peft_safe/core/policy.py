"""One scoring step of SAFE's schedule: detect the end of warm-up, compute the threshold, pick units.

Pure: imports only this package's core and the standard library.
"""

from __future__ import annotations

import math
import numbers
import warnings
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


def as_number(value: object) -> int | float | None:
    """``value`` as a plain Python number if it is a real number of any library, else ``None``.

    A numpy scalar or a one-element tensor (``np.float32(0.3)``, ``torch.tensor(3)``) is the number it holds, so
    it stores and serialises as one; bools, strings, complex numbers and larger arrays are not numbers.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", None) == 0):
        try:
            item = value.item() if hasattr(value, "item") else float(value)  # type: ignore[union-attr]
        except (TypeError, ValueError, RuntimeError):
            return None
        return item if isinstance(item, (int, float)) and not isinstance(item, bool) else None
    return None


def check_time(t: object, what: str = "scoring time t") -> float:
    """``t`` as a plain number, refused unless it is a finite real number >= 0 (numpy and torch scalars are).

    Raises:
        ValueError: naming the time and what it must be.
    """
    number = as_number(t)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (the current epoch or optimizer step), got {t!r}.")
    return number


def check_scoring_time(t: object, last_scored: float | None) -> float:
    """Refuse a scoring time that is not a finite number >= 0, or does not come after the previous scoring.

    A second scoring at the same time would compare two identical score vectors, and the warm-up rule would
    call them settled at once.

    Returns:
        ``t`` as a plain number.

    Raises:
        ValueError: naming the time and what it must be.
    """
    t = check_time(t)
    if last_scored is not None and t < last_scored:
        raise ValueError(f"scoring time {t} lies before the previous scoring at {last_scored}; time must not go back.")
    if last_scored is not None and t == last_scored:
        raise ValueError(
            f"scoring time {t} is the time of the previous scoring; score once per time, at a later t (two "
            "scorings at one time give the same scores, which would end warm-up at once)."
        )
    return t


def no_information_warning(t: float) -> str:
    """The warning given when every score of a scoring is 0."""
    return (
        f"SAFE: every unit scored 0 at t={t}: the adapters do not change the model (yet), e.g. LoRA's B is still "
        "0 because no optimizer step has updated it (an optimizer built before get_peft_model holds the wrong "
        "parameters). Scores that carry no information neither end warm-up nor freeze anything."
    )


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
        t = check_scoring_time(t, state.last_scored)
        normalize_scores(scores, self.importance_scale)  # raises on a non-finite or negative score
        previous = state.latest_scores
        state.history.append({"t": t, "scores": dict(scores)})
        state.last_scored = t
        if scores and not any(score > 0 for score in scores.values()):
            # 0 == 0 would count as settled and the warm-up cap would end warm-up on scores that say nothing
            warnings.warn(no_information_warning(t), RuntimeWarning, stacklevel=3)
            return []
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
        if threshold <= 0.0 or not scores:
            return []  # before the threshold rises
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
