"""SAFE's schedule: when the warm-up ends, how the freezing threshold rises, which units fall below it.

Pure functions over plain numbers and mappings from unit name to importance score.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

__all__ = [
    "DEFAULT_WARMUP_TOLERANCE",
    "SCORE_SCALES",
    "WARMUP_RULES",
    "FREEZE_ORDERS",
    "cubic_threshold",
    "normalize_scores",
    "prefix_below",
    "units_below",
    "warmup_converged",
]

WARMUP_RULES = ("relative_norm", "per_unit")
# relative_norm: above the 2-30 % jitter between scorings of settled scores, below the 50-90 % of their growth
# (MiniLM + LoRA, docs/method.md); per_unit: the paper's 5 %.
DEFAULT_WARMUP_TOLERANCE = {"relative_norm": 0.15, "per_unit": 0.05}
SCORE_SCALES = ("raw", "normalized", "share")
# any: every unit below the threshold freezes (the paper). prefix: the frozen set stays a bottom prefix of the
# units, the only frozen set that shortens the backward pass (docs/method.md).
FREEZE_ORDERS = ("any", "prefix")


def cubic_threshold(t: float, t_w: float | None, t_f: float, tau: float) -> float:
    """Freezing threshold T(t) on SAFE's cubic schedule.

    T(t) = tau * (1 - (1 - (t - t_w) / (t_f - t_w)) ** 3) for t_w <= t < t_f, 0 before the warm-up has
    ended and tau from t_f on. If the warm-up ended at or after t_f, the threshold is tau at once.

    Args:
        t: Current time (epoch or optimizer step).
        t_w: Time the warm-up ended, or None while it has not.
        t_f: Time the threshold reaches tau.
        tau: Final threshold, >= 0.

    Returns:
        The threshold, in [0, tau].

    Raises:
        ValueError: If tau is negative or a time or tau is not finite.
    """
    for name, value in (("t", t), ("t_f", t_f), ("tau", tau)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if t_w is None:
        return 0.0
    if not math.isfinite(t_w):
        raise ValueError(f"t_w must be finite or None, got {t_w}")
    if t < t_w:
        return 0.0
    if t >= t_f or t_w >= t_f:
        return float(tau)
    progress = (t - t_w) / (t_f - t_w)
    return float(tau * (1.0 - (1.0 - progress) ** 3))


def _check_scores(scores: Mapping[str, float], what: str) -> None:
    for unit, score in scores.items():
        if not math.isfinite(score):
            raise ValueError(f"{what} score of unit {unit!r} must be finite, got {score}")


def warmup_converged(
    previous: Mapping[str, float],
    current: Mapping[str, float],
    rule: str,
    tolerance: float,
    floor: float = 0.0,
) -> bool:
    """Whether the importance scores have settled between two consecutive scorings.

    The units are the keys of `current`; a unit missing from `previous` means not converged.

    - "relative_norm": ||c - p||_2 / ||c||_2 < tolerance over the vector of all units (when ||c|| == 0,
      converged iff c == p). Robust to tiny scores that keep growing in relative terms.
    - "per_unit": the paper's rule read literally: every unit whose score (now or before) is at least
      `floor` changed by less than `tolerance` relative to its previous score. A previous score of 0
      counts as unchanged if the current one is 0 too, as changed otherwise.

    Args:
        previous: Scores per unit at the previous scoring.
        current: Scores per unit now.
        rule: "relative_norm" or "per_unit".
        tolerance: Largest relative change still counted as settled, > 0 (the paper uses 0.05).
        floor: For "per_unit", units whose scores stay below it are ignored; >= 0.

    Returns:
        True when the scores have converged under the rule. An empty `current` counts as converged.

    Raises:
        ValueError: If rule is unknown, tolerance <= 0, floor < 0, or a score is not finite.
    """
    if rule not in WARMUP_RULES:
        raise ValueError(f"unknown warm-up rule {rule!r}; allowed: {', '.join(map(repr, WARMUP_RULES))}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance}")
    if not (math.isfinite(floor) and floor >= 0):
        raise ValueError(f"floor must be a finite number >= 0, got {floor}")
    _check_scores(previous, "previous")
    _check_scores(current, "current")
    if any(unit not in previous for unit in current):
        return False
    pairs = [(float(current[u]), float(previous[u])) for u in current]
    if rule == "relative_norm":
        diff = math.hypot(*(c - p for c, p in pairs))
        norm = math.hypot(*(c for c, _ in pairs))
        return diff == 0 if norm == 0 else diff / norm < tolerance
    for c, p in pairs:
        if max(abs(c), abs(p)) < floor:
            continue
        if p == 0:
            if c != 0:
                return False
        elif abs(c - p) / abs(p) >= tolerance:
            return False
    return True


def normalize_scores(scores: Mapping[str, float], scale: str) -> dict[str, float]:
    """Puts importance scores on the scale the threshold is compared against.

    Args:
        scores: Importance per unit (>= 0).
        scale: "raw" (unchanged copy), "normalized" (divided by the largest score, so the most
            important unit scores 1) or "share" (divided by the sum, so the scores sum to 1); all zeros stay
            zeros.

    Returns:
        A new dict with the same keys, in the same order.

    Raises:
        ValueError: If scale is unknown or a score is negative or not finite.
    """
    if scale not in SCORE_SCALES:
        raise ValueError(f"unknown score scale {scale!r}; allowed: {', '.join(map(repr, SCORE_SCALES))}")
    _check_scores(scores, "importance")
    negative = {u: s for u, s in scores.items() if s < 0}
    if negative:
        raise ValueError(f"importance scores must be >= 0, got {negative}")
    if scale == "raw":
        return {u: float(s) for u, s in scores.items()}
    top = max(scores.values(), default=0.0) if scale == "normalized" else math.fsum(scores.values())
    if top == 0:
        return dict.fromkeys(scores, 0.0)
    return {u: float(s) / top for u, s in scores.items()}


def units_below(scores: Mapping[str, float], threshold: float, frozen: Collection[str] = ()) -> list[str]:
    """The units not frozen yet whose score is below the threshold.

    Args:
        scores: Importance per unit, on the same scale as threshold.
        threshold: Units scoring strictly less than this are returned.
        frozen: Units already frozen; never returned.

    Returns:
        Unit names in the order of `scores`.
    """
    frozen_set = set(frozen)
    return [u for u, s in scores.items() if u not in frozen_set and s < threshold]


def prefix_below(
    scores: Mapping[str, float], threshold: float, frozen: Collection[str] = (), cumulative: bool = False
) -> list[str]:
    """The units to freeze so that the frozen set stays a bottom prefix of the units.

    Walks the units from the input side (the order of ``scores``): frozen units are passed over, and the walk
    stops at the first unit not frozen that may not freeze, so no trainable unit is ever left below a frozen one.
    A unit may freeze when its score is below ``threshold``, or, with ``cumulative``, when the scores of the
    prefix up to and including it sum to less than ``threshold`` (on the "share" scale: the prefix holds less
    than that fraction of the total importance).

    Args:
        scores: Importance per unit, every unit (frozen ones at their last score), input side first.
        threshold: The threshold, on the scale of ``scores``.
        frozen: Units already frozen; never returned.
        cumulative: Compare the prefix's summed score, not each unit's own.

    Returns:
        Unit names, input side first.
    """
    frozen_set = set(frozen)
    chosen, total = [], 0.0
    for unit, score in scores.items():
        total += score
        if unit in frozen_set:
            continue
        if (total if cumulative else score) >= threshold:
            break
        chosen.append(unit)
    return chosen
