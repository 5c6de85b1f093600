"""The simplest competitors of SAFE, run beside it and reported exactly like it (``--baseline SPEC``, repeatable).

- ``prefix:K@T``: the adapter on every block, the bottom ``K`` blocks frozen at optimizer step ``T``, no scoring.
  It is SAFE's own machinery (the same freezing, optimizer-state release and backprop cut) with the decision
  taken by hand, so what it saves is measured the same way. ``T`` may be ``safe``: the step of SAFE's first freeze
  on the same seed and adapter (the prefix baseline is then skipped, with a log line, where SAFE froze nothing).
- ``top:K``: the adapter only on the top ``L - K`` blocks from the start (the paper's "adapters on upper layers
  only"), through peft's ``layers_to_transform``: LoRA and AdaLoRA only.

Each baseline of a seed shares that seed's plain adapter run and SAFE run. Imports the standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Baseline", "parse_baseline"]

_PREFIX = re.compile(r"^prefix:(\d+)@(\d+|safe)$")
_TOP = re.compile(r"^top:(\d+)$")


@dataclass(frozen=True)
class Baseline:
    """One ``--baseline``: ``kind`` ``"prefix"`` or ``"top"``, ``blocks`` (K) and, for a prefix, ``at`` (T, a step,
    or ``None`` for SAFE's first freeze step)."""

    kind: str
    blocks: int
    at: int | None = None

    @property
    def label(self) -> str:
        """The spec as given: ``prefix:3@120``, ``prefix:3@safe``, ``top:3``."""
        if self.kind == "top":
            return f"top:{self.blocks}"
        return f"prefix:{self.blocks}@{'safe' if self.at is None else self.at}"


def parse_baseline(text: str) -> Baseline:
    """``prefix:K@T`` (T a step or ``safe``) or ``top:K``, K >= 1.

    Raises:
        ValueError: naming the spec and the accepted forms.
    """
    spec = text.strip().lower()
    prefix, top = _PREFIX.match(spec), _TOP.match(spec)
    if prefix is None and top is None:
        raise ValueError(f"--baseline {text!r} is neither prefix:K@T (K blocks frozen at step T, or T=safe: SAFE's "
                         "first freeze step) nor top:K (the adapter on all but the bottom K blocks), e.g. "
                         "prefix:3@120.")
    blocks = int((prefix or top).group(1))
    if blocks < 1:
        raise ValueError(f"--baseline {text!r}: K must be >= 1 (K = 0 is the plain adapter, run anyway).")
    if top is not None:
        return Baseline("top", blocks)
    at = prefix.group(2)
    if at != "safe" and int(at) < 1:
        raise ValueError(f"--baseline {text!r}: T must be an optimizer step >= 1, or safe.")
    return Baseline("prefix", blocks, None if at == "safe" else int(at))
