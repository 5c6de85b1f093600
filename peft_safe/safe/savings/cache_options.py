"""The prefix cache's options on :class:`~peft_safe.SAFEConfig` (``cache_frozen``, ``cache_memory_bytes``,
``cache_disk_bytes``, ``cache_dir``): their defaults and their checks.

Kept apart from ``config.py`` (which declares the fields and calls :func:`check_cache_options`) so that the
config module stays short; what the cache does with them is :mod:`.prefix_cache`. Imports the standard library
and ``core.policy`` only.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ...core.policy import as_number

__all__ = ["CACHE_FIELDS", "DEFAULT_CACHE_DISK_BYTES", "DEFAULT_CACHE_MEMORY_BYTES", "check_cache_dir_writable",
           "check_cache_options"]

# Host memory the cached hidden states may take before further rows are written to disk: 1 GiB holds MiniLM's
# 2,000 x 64-token examples (196 MB) five times over, and about 2,000 512-token examples of a 2,048-wide model in
# bfloat16 would spill.
DEFAULT_CACHE_MEMORY_BYTES = 1 << 30
# Disk the rows beyond that may take (issue 21.5: unbounded, inputs that never repeat filled it without end). 4 GiB
# holds one epoch of 40,000 MiniLM examples of 64 tokens, or about 1,000 LLaMA-2 7B examples of 512 tokens in
# bfloat16; a larger epoch fills it and the cache says so.
DEFAULT_CACHE_DISK_BYTES = 4 << 30

# They change how a step is computed, never what the saved weights mean: a checkpoint loads under any of them.
CACHE_FIELDS = ("cache_frozen", "cache_memory_bytes", "cache_disk_bytes", "cache_dir")


def check_cache_options(config: Any) -> None:
    """Check (and normalise in place) the cache options of ``config``.

    A numpy or torch integer ``cache_memory_bytes`` / ``cache_disk_bytes`` is stored as the plain int it holds; an
    ``os.PathLike`` ``cache_dir`` as its string.

    Raises:
        ValueError: naming the value and what to pass instead.
    """
    flag = config.cache_frozen
    if not isinstance(flag, bool):
        raise ValueError(
            f"cache_frozen must be True or False, got {flag!r}; True caches the hidden states entering the lowest "
            "trainable block per training example and skips the frozen blocks on later epochs."
        )
    for name, where in (("cache_memory_bytes", "host memory"), ("cache_disk_bytes", "disk")):
        _check_bytes(config, name, where)
    folder = config.cache_dir
    if folder is None:
        return
    if isinstance(folder, os.PathLike):
        folder = os.fspath(folder)
        object.__setattr__(config, "cache_dir", folder)
    if not isinstance(folder, str) or not folder:
        raise ValueError(
            f"cache_dir must be a folder path or None (a temporary folder), got {folder!r}; it is where cached "
            "rows beyond cache_memory_bytes are written."
        )
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(
            f"cache_dir {folder!r} exists and is not a folder; name a folder (made if missing) or pass None."
        )


def _check_bytes(config: Any, name: str, where: str) -> None:
    budget = getattr(config, name)
    if not isinstance(budget, int) or isinstance(budget, bool):
        number = as_number(budget)
        if isinstance(number, float) and number.is_integer():
            number = int(number)  # 2e9
        if not isinstance(number, int) or isinstance(budget, bool):
            raise ValueError(
                f"{name} must be a whole number of bytes >= 0, got {budget!r}; e.g. 4 * 1024**3 for 4 GiB of "
                f"{where} (0: none)."
            )
        budget = number
        object.__setattr__(config, name, budget)
    if budget < 0:
        raise ValueError(
            f"{name} must be >= 0, got {budget}; it is the {where} the cache's rows may take "
            "(cache_memory_bytes first, then cache_disk_bytes; 0: none)."
        )


def check_cache_dir_writable(config: Any) -> None:
    """Refuse, when the model is built, a ``cache_dir`` the cache could not write its rows to (issue 21.10: a
    folder that cannot be made failed at the first row spilled to disk, from inside a forward hook).

    Raises:
        ValueError: naming ``cache_dir``, the reason and what to pass instead.
    """
    folder = getattr(config, "cache_dir", None)
    if not getattr(config, "cache_frozen", False) or folder is None:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(
            f"cache_dir {folder!r} cannot hold the prefix cache's rows ({err.strerror or err}); name a folder this "
            "process can create and write, or pass cache_dir=None (a temporary folder)."
        ) from err
