"""What configs and checkpoints written by earlier versions call differently or lack: the two tables that let them
load. The config reads them when a saved config is loaded, the checkpoint when it compares the config recorded in
a weights file with the one it is loaded with.

Imports nothing.
"""

from __future__ import annotations

__all__ = ["LEGACY_VALUES", "RENAMED_FIELDS"]

# Fields added after checkpoints were first written, with the value that reproduces the behaviour of the code
# that wrote them: a saved config without the field loads with this value, not with today's default.
LEGACY_VALUES = {"scoring_site": "block_output", "freeze_order": "any", "cka_precision": "float64"}

# Fields renamed since 0.1.0: old name -> new name. Saved configs and the integrity records of checkpoints
# written before the rename carry the old names; both load, the old names with a FutureWarning.
RENAMED_FIELDS = {"final_freeze_epoch": "final_freeze_time", "max_warmup": "warmup_cap"}
