"""Skip the frozen prefix: the hidden states entering the lowest trainable block, cached per training example.

Once SAFE has frozen the bottom blocks (and backprop stops below the lowest trainable one, :mod:`.truncation`),
those blocks compute the same function at every later step. With ``SAFEConfig(cache_frozen=True)`` a training
forward stores, for each example of the batch, the hidden states entering the *cut block*; once every example of
a batch is stored, the frozen blocks' forward is skipped (each returns its input untouched) and the cut block
gets the stored states instead. The input embeddings still run (cheap).

- **Keys.** An example is keyed by every input the frozen prefix receives (:func:`.prefix_rows.row_keys`):
  its ids, masks, token types and positions with trailing padding stripped, and the rest of the batch's inputs
  whole. Shuffling and dynamic right padding therefore hit; leading (left) padding is part of the key. Stored
  rows hold the real positions only and are padded back with zeros, which no real token attends to.
- **When.** Only on training forwards (train mode, grad enabled) that pass ``input_ids`` and no
  ``inputs_embeds``: never during SAFE's scoring (eval mode, no grad) or evaluation.
- **Exactness.** While caching, the frozen blocks run in eval mode (no dropout in them, LoRA's dropout included),
  so a served step equals one computed in full with those blocks in eval mode, to float rounding.
- **Invalidation.** The rows are dropped whenever the prefix may compute something else: the cut moves (a new
  freeze, ``restart_schedule``, a unit thawed by hand), a frozen tensor of the prefix is changed in place or
  replaced (its ``_version``, storage, identity, dtype or device: a merge, ``load_state_dict`` with or without
  ``assign``, ``weight.data = ...``, ``model.to(torch.bfloat16)``), the adapters below the cut are switched off or
  swapped, or autocast changes. A prefix whose input carries a gradient somebody keeps (a trainable embedding) is
  never cached (a warning).
- **Where rows live.** Host memory up to ``cache_memory_bytes``, then one file per example under a temporary
  folder (in ``cache_dir`` when given) up to ``cache_disk_bytes`` (:class:`.prefix_rows.RowStore`), removed when
  the rows are dropped. When both are full, rows already held are still served and no more are stored (a
  warning); when they fill before any example came back (inputs that never repeat), caching stops (a warning).
  A row file removed under the cache is a miss, said once.

:meth:`PrefixCache.stats` reports hits, the hit rate and the bytes held; the meter reads it
(:mod:`peft_safe.measure.cache`). Imports torch and peft's tuner-layer base, and of this package
``.truncation``, ``.prefix_rows`` and ``safe.method`` (hooks, the tuner view).
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.nn.modules.module import register_module_forward_pre_hook

from ..method.hooks import add_hook
from ..method.tuner_view import TunerView
from .prefix_rows import RowStore, row_keys
from .truncation import hidden_state_of, with_hidden_state

__all__ = ["PrefixCache", "row_keys"]

_MISSING = object()


def _autocast_state() -> tuple:
    return tuple(
        (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
    )


def _active_config(safe: TunerView) -> Any:
    """The active adapter's config of the SAFE tuner, or None (the tuner is gone or has no active adapter)."""
    adapter = safe.active_safe_adapter if safe is not None else None
    return safe.peft_config[adapter] if adapter is not None else None


class PrefixCache:
    """The cache of one :class:`~peft_safe.SAFEModel` (``safe.prefix_cache``); it acts only when the active
    adapter's config has ``cache_frozen=True``.

    Example:
        >>> config = SAFEConfig(adapter_config=lora, cache_frozen=True)  # doctest: +SKIP
        >>> safe = get_peft_model(model, config).base_model  # doctest: +SKIP
        >>> safe.prefix_cache.stats()["hit_rate"]  # doctest: +SKIP
    """

    def __init__(self, safe: TunerView) -> None:
        self._safe_ref = weakref.ref(safe)
        self._counters()
        self._transient()
        # On the tuner (peft's task models call it) and on the model it wraps (a PeftModel without a task type calls
        # that directly; the tuner's forward calls model.forward, which runs no hook): the outermost one acts.
        for module in (safe, safe.model):
            add_hook("prefix_cache", module, "pre", self._before)
            add_hook("prefix_cache", module, "post_always", self._after)

    def _counters(self) -> None:
        self.forwards = 0  # keyable training forwards while a cut existed
        self.served_forwards = 0
        self.row_lookups = 0
        self.row_hits = 0
        self.invalidations = 0  # times stored rows were dropped because the prefix changed

    def _transient(self) -> None:
        self._rows = RowStore()
        self._hits_since_drop = 0  # row hits since the rows were last dropped: none when the store fills means
        self._stopped: str | None = None  # that inputs never repeat, and caching stops until clear()
        self._full = False  # the store had no room for a row: no more are stored until the rows are dropped
        self._site: dict[str, Any] | None = None
        self._refused: str | None = None
        self._warned: set[str] = set()
        self._stale_handles: list[Any] = []
        self._depth = 0  # nested forwards of the hooked modules in progress
        self._forward_state()

    def _forward_state(self) -> None:
        self._step: dict[str, Any] | None = None
        self._serving = False
        self._modes: list[tuple[torch.nn.Module, bool]] = []
        self._patched: list[tuple[torch.nn.Module, Any]] = []
        self._recorder: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) starts with no rows; its blocks' hooks are removed at its first forward
        handles = self._site["handles"] if self._site else []
        return {"_safe": self._safe_ref(), "_stale_handles": handles}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._safe_ref = weakref.ref(state["_safe"])
        self._counters()
        self._transient()
        self._stale_handles = list(state["_stale_handles"])

    # ------------------------------------------------------------------ public
    def stats(self) -> dict[str, Any]:
        """Counts since the model was built: training forwards seen and served, example lookups and hits, the hit
        rate (hits / lookups, None before any), rows and bytes held in memory and on disk, invalidations, the cut
        block cached at and why caching was refused (None when it was not)."""
        safe = self._safe_ref()
        config = _active_config(safe)
        return {
            "enabled": bool(getattr(config, "cache_frozen", False)),
            "cut_block": self._site["name"] if self._site else None,
            "forwards": self.forwards,
            "served_forwards": self.served_forwards,
            "row_lookups": self.row_lookups,
            "row_hits": self.row_hits,
            "hit_rate": self.row_hits / self.row_lookups if self.row_lookups else None,
            "rows_in_memory": len(self._rows.memory),
            "memory_bytes": self._rows.memory_bytes,
            "rows_on_disk": len(self._rows.disk),
            "disk_bytes": self._rows.disk_bytes,
            "invalidations": self.invalidations,
            "refused": self._stopped or self._refused,
        }

    def would_serve(self, inputs: Any) -> bool:
        """Whether a training forward on ``inputs`` (a batch mapping) would be served now: every example's row held
        at the current cut. The meter's guess before a step; a change of the frozen weights or of the adapters'
        switches before the forward makes it wrong. Holds no rows and moves no hooks."""
        safe, site = self._safe_ref(), self._site
        enabled = getattr(_active_config(safe), "cache_frozen", False) and isinstance(inputs, Mapping)
        if not enabled or site is None or self._stopped or self._refused or site["output_kind"] is None:
            return False
        prefix = safe.frozen_prefix()  # where the cut is now (a freeze since the last forward moves it)
        if prefix is None or prefix.name != site["name"]:
            return False
        rows = row_keys((), dict(inputs))
        keys = rows.keys if not isinstance(rows, str) else []
        return bool(keys) and all(key in self._rows for key in keys)

    @property
    def folder(self) -> str | None:
        """The folder rows beyond the memory budget are written to; None while none is."""
        return self._rows.folder

    def clear(self) -> None:
        """Drop every stored row (memory and disk) and the hooks on the blocks; the next forward starts afresh."""
        self._drop_rows()
        self._uninstall()
        self._stopped = None

    # ------------------------------------------------------------------ the tuner's forward
    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        self._end_forward()
        for handle in self._stale_handles:
            handle.remove()
        self._stale_handles = []
        safe = self._safe_ref()
        config = _active_config(safe)
        if not getattr(config, "cache_frozen", False):
            if self._site is not None or len(self._rows):
                self.clear()
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        site = self._current_site(safe)
        if site is None or self._refused is not None or self._stopped is not None:
            return
        rows = row_keys(args, kwargs)
        if isinstance(rows, str):
            self._warn_once(f"SAFE's prefix cache computes such batches in full: {rows}.")
            return
        hits = sum(1 for key in rows.keys if key in self._rows)
        self.forwards += 1
        self.row_lookups += len(rows.keys)
        self.row_hits += hits
        self._hits_since_drop += hits
        self._step = {"keys": rows.keys, "lengths": rows.lengths, "shape": rows.shape}
        if rows.keys and hits == len(rows.keys) and site["output_kind"] is not None:
            self._step["rows"] = self._load(rows.keys)
            self._serving = self._step["rows"] is not None
        # No dropout in the prefix (the frozen blocks and the leaf modules that run before them, such as the
        # embeddings' dropout): what is stored is what every later epoch gets.
        self._modes = [(m, m.training) for block in site["below"] for m in block.modules()]
        self._modes += [(m, m.training) for m in site["upstream"] or ()]
        for m, _ in self._modes:
            m.training = False
        if site["upstream"] is None:  # learnt on the first forward: the leaves called before the first block
            site["upstream_seen"] = []
            self._recorder = register_module_forward_pre_hook(self._record_upstream)
        if self._serving:
            for block in site["below"]:
                own = block.__dict__.get("forward", _MISSING)
                block.forward = functools.partial(self._skip, block.forward)
                self._patched.append((block, own))

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._end_forward()

    def _record_upstream(self, module: torch.nn.Module, args: tuple) -> None:
        site = self._site
        if site is None or module is site["below"][0]:
            if site is not None:
                site["upstream"] = site["upstream_seen"]
            self._recorder.remove()
            self._recorder = None
        elif id(module) in site["members"] and next(module.children(), None) is None:
            site["upstream_seen"].append(module)
            self._modes.append((module, module.training))
            module.training = False

    def _end_forward(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
        for module, mode in self._modes:
            module.training = mode
        for block, own in self._patched:
            if own is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = own
        self._forward_state()

    # ------------------------------------------------------------------ where the cut is
    def _current_site(self, safe: TunerView) -> dict[str, Any] | None:
        prefix = safe.frozen_prefix()
        if prefix is None:
            if self._site is not None:
                self.clear()
            return None
        if self._site is None or self._site["name"] != prefix.name:
            self._drop_rows()
            self._uninstall()
            self._install(safe, prefix)
        site = self._site
        signature = self._signature(safe, site)
        if signature != site["signature"]:
            if site["signature"] is not None:
                self._drop_rows()
            site["signature"] = signature
            self._refused = None
        return site

    def _install(self, safe: TunerView, prefix: Any) -> None:
        path, index, blocks, below = prefix.path, prefix.cut, prefix.blocks, list(prefix.below)
        self._site = {
            # what the cut block's input depends on: the blocks below and everything outside the block list
            "above": tuple(f"{path}.{i}." for i in range(index, len(blocks))),
            "name": prefix.name,
            "below": below,
            "layers": [m for block in below for m in block.modules() if isinstance(m, BaseTunerLayer)],
            "signature": None,
            "output_kind": None,
            "upstream": None,
            "members": {id(m) for m in safe.model.modules()},
            "handles": [
                add_hook("prefix_cache", blocks[0], "pre", self._at_first_block),
                add_hook("prefix_cache", blocks[0], "post", self._note_output),
                # before the backprop cut's hook there (hooks.ORDER): the cut then sees the states served here
                add_hook("prefix_cache", blocks[index], "pre", self._at_cut),
            ],
        }
        self._refused = None

    def _uninstall(self) -> None:
        if self._site is not None:
            for handle in self._site["handles"]:
                handle.remove()
        self._site = None
        self._refused = None

    def _signature(self, safe: TunerView, site: dict[str, Any]) -> tuple:
        # Every frozen tensor the cut block's input depends on, read afresh (load_state_dict(assign=True) puts new
        # ones in): _version counts in-place changes (a merge, load_state_dict), the storage moves with
        # `weight.data = new`, the dtype and device with model.to(...).
        model = safe.model
        versions = tuple(
            (name, id(t), t.data_ptr(), t._version, t.dtype, t.device)
            for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if not t.requires_grad and not name.startswith(site["above"])
        )
        switches = tuple(
            (layer.disable_adapters, tuple(layer.active_adapters), layer.merged) for layer in site["layers"]
        )
        return versions, switches, _autocast_state()

    # ------------------------------------------------------------------ the blocks' hooks
    def _at_first_block(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._step is None:
            return
        found = hidden_state_of(args, kwargs)
        safe = self._safe_ref()
        if found is None or not safe.backprop_cut.feeds_no_gradient(found[1]):
            self._refuse(
                "the input of the frozen blocks carries a gradient that is kept (a trainable embedding, or "
                "inputs_embeds that require grad), so their output changes from step to step"
            )

    def _note_output(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._step is None or self._serving or self._site is None:
            return
        if isinstance(output, torch.Tensor):
            self._site["output_kind"] = 0  # a tensor (transformers 5's BertLayer, LlamaDecoderLayer...)
        elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            self._site["output_kind"] = len(output)  # a tuple, hidden states first (older transformers)
        else:
            self._refuse(f"the blocks return a {type(output).__name__}, which the cache cannot stand in for")

    def _skip(self, forward: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._serving:
            return forward(*args, **kwargs)
        hidden = hidden_state_of(args, kwargs)[1]
        kind = self._site["output_kind"]
        return hidden if kind == 0 else (hidden, *([None] * (kind - 1)))

    def _at_cut(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        step, serving = self._step, self._serving
        self._end_forward()  # the frozen blocks have run (or been skipped): their modes and forwards come back
        if step is None:
            return None
        found = hidden_state_of(args, kwargs)
        if found is None:
            self._refuse("the lowest trainable block takes no hidden-state tensor")
            return None
        where, hidden = found
        batch, seq = step["shape"]
        if serving:
            rows = step["rows"]
            states = torch.zeros((batch, seq, *rows[0].shape[1:]), dtype=rows[0].dtype)
            for i, (row, length) in enumerate(zip(rows, step["lengths"])):
                states[i, :length] = row
            self.served_forwards += 1
            return with_hidden_state(args, kwargs, where, states.to(hidden.device))
        if tuple(hidden.shape[:2]) != (batch, seq):
            self._refuse(f"the hidden states at the cut have shape {tuple(hidden.shape)}, not (batch, sequence, ...) "
                         f"= ({batch}, {seq}, ...) of the input ids")
            return None
        for i, (key, length) in enumerate(zip(step["keys"], step["lengths"])):
            if key not in self._rows and not self._full and self._stopped is None:
                self._store(key, hidden[i, :length].detach())
        return None

    def _refuse(self, reason: str) -> None:
        self._end_forward()
        self._drop_rows()
        self._refused = reason
        self._warn_once(f"SAFE's prefix cache (cache_frozen=True) is not used: {reason}.")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ rows
    def _store(self, key: bytes, row: torch.Tensor) -> None:
        config = self._safe_ref().safe_config
        try:
            kept = self._rows.put(key, row, config)
        except OSError as err:
            kept = False
            self._warn_once(f"SAFE's prefix cache cannot write rows to {self._rows.folder!r} ({err}); it keeps "
                            "serving the rows it holds and stores no more until they are dropped.")
        if kept:
            return
        self._full = True
        held = f"{len(self._rows)} rows, {(self._rows.memory_bytes + self._rows.disk_bytes) / 2**20:.0f} MiB"
        if self._hits_since_drop == 0:
            self._stopped = (
                f"no example came back before the cache filled ({held}): the inputs never repeat (on-the-fly "
                "masking, random crops, streaming) or one epoch does not fit in cache_memory_bytes + "
                "cache_disk_bytes; caching stopped, raise those to cache a larger epoch"
            )
            self._drop_rows()
            self._warn_once(f"SAFE's prefix cache (cache_frozen=True) is not used: {self._stopped}.")
        else:
            self._warn_once(f"SAFE's prefix cache is full ({held}, cache_memory_bytes={config.cache_memory_bytes}, "
                            f"cache_disk_bytes={config.cache_disk_bytes}): it serves the rows it holds and computes "
                            "other examples in full; raise those to hold more.")

    def _load(self, keys: list[bytes]) -> list[torch.Tensor] | None:
        """Every row of ``keys``, or None when one has gone from disk (it is dropped, and stored again)."""
        rows = [self._rows.get(key) for key in keys]
        if any(row is None for row in rows):
            self._warn_once(f"SAFE's prefix cache lost row files under {self._rows.folder!r} (removed by another "
                            "process?): those examples are computed in full and stored again.")
            return None
        return rows

    def _drop_rows(self) -> None:
        if self._rows.clear():
            self.invalidations += 1
        self._hits_since_drop = 0
        self._full = False
