"""FreezeState: what SAFE has decided so far, in a form that round-trips through JSON.

Pure: imports only the standard library and ``core.budget``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .budget import BlockCosts

# 1: the state, with an optional integrity record; 2: the integrity record is required and seals the state.
FORMAT_VERSION = 2


@dataclass
class FreezeState:
    """The freeze decisions and importance history of one SAFE adapter.

    Attributes:
        units: the adapter units of the model the state belongs to, input side first.
        frozen: unit name -> time (in the schedule's unit) at which it froze; ``None`` for a time-less
            freeze by hand before any scoring.
        history: one entry per scoring, ``{"t": time, "scores": {unit: raw importance}}``.
        warmup_end: t_w, the time warm-up ended; ``None`` while still warming up.
        last_scored: time of the latest scoring.
        adapter_type: peft type of the wrapped adapter (``"LORA"``...).
        schedule_unit: ``"epoch"`` or ``"step"``.
        final_freeze_time: t_f of the schedule that produced this state.
        format_version: version of this layout; newer versions are refused on load.
        block_costs: what each block saves for backward, measured for a ``memory_budget`` (the dict form of
            :class:`~peft_safe.core.budget.BlockCosts`); ``None`` without a budget. Saved with the state so a
            resumed run checkpoints the same blocks.
        optimizer_steps: the optimizer steps SAFE's automatic schedule had counted when it was saved (plain loops
            count on from there when the adapter is loaded); ``None`` when it was not driving.
    """

    units: list[str] = field(default_factory=list)
    frozen: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    warmup_end: float | None = None
    last_scored: float | None = None
    adapter_type: str = ""
    schedule_unit: str = "epoch"
    final_freeze_time: float | None = None
    format_version: int = FORMAT_VERSION
    block_costs: dict[str, Any] | None = None
    optimizer_steps: int | None = None

    @property
    def phase(self) -> str:
        """``"warmup"`` until t_w is found, ``"freezing"`` while the threshold rises, then ``"final"``."""
        if self.warmup_end is None:
            return "warmup"
        both_known = self.final_freeze_time is not None and self.last_scored is not None
        if both_known and self.last_scored >= self.final_freeze_time:
            return "final"
        return "freezing"

    @property
    def latest_scores(self) -> dict[str, float]:
        """The scores of the latest scoring: the units that were trainable then."""
        return dict(self.history[-1]["scores"]) if self.history else {}

    @property
    def last_known_scores(self) -> dict[str, float]:
        """Every unit ever scored, at its latest score (a frozen unit keeps the score it had when last scored).

        In the order of :attr:`units` (units of an older layout that are not in it come last).
        """
        latest: dict[str, float] = {}
        for record in self.history:
            latest.update(record["scores"])
        ordered = {u: latest[u] for u in self.units if u in latest}
        ordered.update({u: s for u, s in latest.items() if u not in ordered})
        return ordered

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.block_costs is None else {"block_costs": _costs(self.block_costs)}
        if self.optimizer_steps is not None:
            extra["optimizer_steps"] = self.optimizer_steps
        return {**extra,
            "format_version": self.format_version,
            "adapter_type": self.adapter_type,
            "schedule_unit": self.schedule_unit,
            "final_freeze_time": self.final_freeze_time,
            "phase": self.phase,
            "units": list(self.units),
            "frozen": dict(self.frozen),
            "warmup_end": self.warmup_end,
            "last_scored": self.last_scored,
            "history": [{"t": h["t"], "scores": dict(h["scores"])} for h in self.history],
        }

    @classmethod
    def from_dict(cls, data: Any) -> FreezeState:
        """Build a state from :meth:`to_dict` output, checking every field.

        Raises:
            ValueError: if the data is malformed or was written by a newer format version.
        """
        if not isinstance(data, dict):
            raise ValueError(f"SAFE freeze state must be a JSON object, got {type(data).__name__}.")
        version = data.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"SAFE freeze state has no valid format_version (got {version!r}); the file is corrupt.")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"SAFE freeze state has format_version {version}, newer than this peft_safe understands "
                f"({FORMAT_VERSION}); upgrade peft_safe to load it."
            )
        units = data.get("units")
        if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
            raise ValueError(f"SAFE freeze state: 'units' must be a list of names, got {units!r}.")
        frozen = data.get("frozen")
        if not isinstance(frozen, dict) or not all(_is_time(v, allow_none=True) for v in frozen.values()):
            raise ValueError(f"SAFE freeze state: 'frozen' must map unit names to times, got {frozen!r}.")
        unknown = sorted(set(frozen) - set(units))
        if unknown:
            raise ValueError(f"SAFE freeze state freezes units {unknown} that are not among its units {units}.")
        history = data.get("history")
        if not isinstance(history, list) or not all(_is_history_entry(h) for h in history):
            raise ValueError("SAFE freeze state: 'history' must be a list of {'t': time, 'scores': {unit: score}}.")
        for name in ("warmup_end", "last_scored", "final_freeze_time"):
            if not _is_time(data.get(name), allow_none=True):
                raise ValueError(f"SAFE freeze state: {name!r} must be a number or null, got {data.get(name)!r}.")
        steps = data.get("optimizer_steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"SAFE freeze state: 'optimizer_steps' must be an int >= 0 or absent, got {steps!r}.")
        return cls(
            units=list(units),
            frozen=dict(frozen),
            history=[{"t": h["t"], "scores": dict(h["scores"])} for h in history],
            warmup_end=data.get("warmup_end"),
            last_scored=data.get("last_scored"),
            adapter_type=str(data.get("adapter_type", "")),
            schedule_unit=str(data.get("schedule_unit", "epoch")),
            final_freeze_time=data.get("final_freeze_time"),
            format_version=version,
            block_costs=_costs(data.get("block_costs")),
            optimizer_steps=steps,
        )


def _costs(data: Any) -> dict[str, Any] | None:
    return None if data is None else BlockCosts.from_dict(data).to_dict()


def parse_state_json(text: str) -> Any:
    """The JSON of a saved freeze state, parsed; a clear error when it is not JSON."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"SAFE freeze state is not valid JSON ({err}); the checkpoint is corrupt.") from err


def _is_time(value: Any, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_history_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and _is_time(entry.get("t"))
        and isinstance(entry.get("scores"), dict)
        and all(_is_time(v) for v in entry["scores"].values())
    )
