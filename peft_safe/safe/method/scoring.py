"""Importance scoring: 1 - CKA between activations with a unit's adapters and without them, at a chosen site.

Sites (:data:`SCORING_SITES`, ``SAFEConfig.scoring_site``):

- ``"block_output"``: the block's output with vs without its adapters (the paper's Figure 1).
- ``"residual_update"``: the block's update to the residual stream (output minus input), with vs without.
- ``"adapter_output"``: each adapted layer's output with vs without its own adapter (the paper's section 4.1,
  "the activation of a layer adapted with an adapter and that of the original layer"), averaged over the
  unit's layers. In LLaMA-family decoders a few residual dimensions carry most of the block output's variance
  (massive activations), which makes 1 - CKA of block outputs ~0 for most blocks; the adapted layers read the
  normalised stream and do not see them (docs/method.md).

One forward pass per probe batch captures what each site needs with forward hooks; the unit (or layer) is then
rerun alone on exactly its args and kwargs with its adapters switched off. No second full forward is needed, and
the model's modes, adapter switches and RNG are restored afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...batch import call_model, real_tokens, to_device
from ...core.cka import SCORING_SITES, CKAAccumulator, NonFiniteActivations
from .probe_inputs import check_probe_batch, check_probe_set
from .units import AdapterUnit

# The most bytes of CKA rows scoring holds at once (compute_importance's default): the kept token rows of every unit,
# with and without adapters, for a whole probe pass. Beyond it, units are scored in groups (one pass each).
SCORING_MEMORY_BYTES = 1 << 30


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


def _no_cache(model: nn.Module, batch: Any) -> dict[str, Any]:
    if isinstance(batch, Mapping) and "use_cache" in inspect.signature(model.forward).parameters:
        return {"use_cache": False}
    return {}


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; modes, adapter switches and RNG states restored afterwards.

    bitsandbytes' 4-bit layers are kept from repacking their weights for the CPU inside: on a CPU with
    AVX512-BF16, ``Linear4bit`` repacks its weight at its first eval forward without grad (bitsandbytes 0.49-0.50,
    ``support_avx512bf16_for_cpu``) and keeps it packed, and the packed kernel passes no gradient back to its
    input. Every training step after a scoring would then lose the gradient through the frozen base weights.
    """
    modes = [(m, m.training) for m in model.modules()]
    # bitsandbytes sets the flag to has_avx512bf16(), an int
    packers = [(m, m.support_avx512bf16_for_cpu) for m in model.modules()
               if getattr(m, "support_avx512bf16_for_cpu", False)]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    for module, _ in packers:
        module.support_avx512bf16_for_cpu = False
    try:
        with torch.no_grad():
            yield
    finally:
        for module, setting in packers:
            module.support_avx512bf16_for_cpu = setting
        for module, mode in modes:
            module.training = mode
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@contextlib.contextmanager
def _adapters_off(layers: Iterable[Any]) -> Iterator[None]:
    # Flip the tuner layers' switch directly: `enable_adapters(True)` would set requires_grad=True on every
    # adapter parameter and so unfreeze frozen units.
    layers = tuple(layers)
    saved = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, saved):
            layer._disable_adapters = flag


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def _pair_at_site(site: str, args: tuple, kwargs: dict, output: Any, baseline: Any, name: str):
    x, y = _first_tensor(output), _first_tensor(baseline)
    if x is None or y is None:
        raise TypeError(f"unit {name!r} returned no tensor; cannot score it.")
    if site == "residual_update":
        # A unit that is not a residual block (its output has another shape than its input, e.g. a lone
        # pooler layer) is scored on its output.
        h = _block_input(args, kwargs)
        if h is not None and h.shape == x.shape and h.shape == y.shape:
            x, y = x - h, y - h
    return x, y


def _mask_for(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return mask if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]) else None


def compute_importance(
    model: nn.Module,
    units: list[AdapterUnit],
    probe_batches: Iterable[Any],
    max_tokens: int,
    seed: int = 0,
    site: str = "block_output",
    memory_bytes: int | None = SCORING_MEMORY_BYTES,
    precision: str = "float64",
) -> dict[str, float]:
    """Raw importance (1 - linear CKA) of each unit over the probe batches, at ``site``.

    The rows kept for CKA (``max_tokens`` token rows, with and without adapters, per unit or per adapted layer) are
    held for every unit at once when they fit in ``memory_bytes``; otherwise the units are scored in groups that
    fit, one pass over the probe set per group, each pass stopping after its group's last unit. The scores are the
    same either way.

    Args:
        model: the model with adapters injected.
        units: the units to score.
        probe_batches: an iterable of batches (dicts of tensors for transformers models).
        max_tokens: token budget per unit (per adapted layer at ``"adapter_output"``); real tokens beyond it are
            subsampled uniformly.
        seed: seed of the subsampling (the global RNG is not touched).
        site: one of :data:`SCORING_SITES` (see the module docstring).
        memory_bytes: most bytes of kept rows at once (estimated from the layers' widths); None for no bound.
        precision: how 1 - CKA is computed (:meth:`~peft_safe.core.cka.CKAAccumulator.importance`).

    Returns:
        unit name -> importance in [0, 1].

    Raises:
        ValueError: if the site is unknown, the probe set is empty, a batch lacks the model's inputs, or adapters
            are merged.
    """
    if site not in SCORING_SITES:
        raise ValueError(f"unknown scoring site {site!r}; choose one of {SCORING_SITES}.")
    merged = [unit.name for unit in units if any(layer.merged for layer in unit.layers)]
    if merged:
        raise ValueError(f"cannot score units {merged} while their adapters are merged; call unmerge_adapter() first.")
    check_probe_set(probe_batches)
    if not units:
        return {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    per_layer = site == "adapter_output"
    # one accumulator per unit, or per adapted layer of each unit at "adapter_output"
    keys = [(u.name, j) for u in units for j in range(len(u.layers))] if per_layer else [(u.name, 0) for u in units]
    seeds = {key: seed + i for i, key in enumerate(keys)}
    batches = probe_batches if isinstance(probe_batches, (list, tuple)) else list(probe_batches)
    for batch in batches:  # every batch before the first is used: a bad one leaves nothing half-scored
        check_probe_batch(model, batch)
    groups = _groups(model, units, keys, batches, max_tokens, per_layer, memory_bytes)
    per_unit: dict[str, list[float]] = {}
    for group in groups:
        accumulators = {key: CKAAccumulator(max_tokens=max_tokens, seed=seeds[key]) for key in group}
        names = {name for name, _ in group}
        ProbePass(model, [u for u in units if u.name in names], accumulators, site,
                  stop_early=len(groups) > 1).run(batches, device)
        for (name, _), value in [(key, _importance(key[0], acc, precision)) for key, acc in accumulators.items()]:
            per_unit.setdefault(name, []).append(value)
        accumulators.clear()  # this group's rows go before the next group's come
    return {name: sum(values) / len(values) for name, values in per_unit.items()}


class _GroupDone(Exception):
    """Raised by :class:`ProbePass`'s stop hook once every unit of its group has run, and caught by
    :meth:`ProbePass.run` alone: a hook cannot end a torch forward any other way, and the blocks above the group
    would cost a whole forward per group otherwise (a 7B model's units are scored in up to one group per block)."""


class ProbePass:
    """One pass over the probe batches that fills the CKA accumulators of one group of units.

    At ``"block_output"`` and ``"residual_update"`` a forward hook on each unit records its calls; after each
    batch's forward every recorded call is rerun with the unit's adapters off, and the pair goes to the unit's
    accumulator. At ``"adapter_output"`` each adapted layer is scored inside its own call: the output without its
    adapter is its base layer's output in the same call (recorded by a hook on the base layer), or a rerun with the
    adapter off where the base layer ran more than once or its output was changed in place.

    State, all per batch except the accumulators: ``recording`` (off while reruns run, so their calls are not
    recorded again), ``mask`` (the batch's attention mask), ``calls`` (unit -> recorded calls), ``base_outputs``
    (layer -> its base layer's outputs and their versions) and ``seen`` (units of the group that ran).

    Args:
        model: the model with adapters injected.
        group: the units to score in this pass.
        accumulators: one per (unit name, layer index) to fill; layer index 0 for the per-unit sites.
        site: one of :data:`SCORING_SITES`.
        stop_early: end each forward once the group's last unit has run (when other groups follow).
    """

    def __init__(self, model: nn.Module, group: list[AdapterUnit], accumulators: dict, site: str,
                 stop_early: bool) -> None:
        self.model, self.group, self.accumulators, self.site = model, group, accumulators, site
        self.per_layer = site == "adapter_output"
        self.stop_early = stop_early
        self.recording = False
        self.mask: torch.Tensor | None = None
        self.calls: dict[str, list[tuple[tuple, dict, Any]]] = {}
        self.base_outputs: dict[int, list[tuple[Any, int | None]]] = {}
        self.seen: set[str] = set()

    def run(self, batches: list, device: torch.device) -> None:
        """Every batch forward once with the hooks in place, then :meth:`check` what was gathered.

        Raises:
            ValueError: if the probe set is empty or a unit saw too few tokens (see :meth:`check`).
        """
        n_batches = 0
        with preserved_state(self.model):
            handles = self._install()
            try:
                for batch in batches:
                    self._forward(to_device(batch, device))
                    n_batches += 1
                    self._score_recorded_calls()
            finally:
                for handle in handles:
                    handle.remove()
                self.calls.clear()
                self.base_outputs.clear()
        if n_batches == 0:
            raise ValueError("the probe set is empty; pass at least one batch to score importance.")
        self.check()

    def _install(self) -> list:
        handles = []
        for unit in self.group:
            if not self.per_layer:
                handles.append(unit.module.register_forward_hook(self._record_call(unit.name), with_kwargs=True))
                continue
            for j, layer in enumerate(unit.layers):
                if (unit.name, j) not in self.accumulators:
                    continue
                base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
                if isinstance(base, nn.Module) and base is not layer:
                    handles.append(base.register_forward_hook(self._record_base_output(layer)))
                handles.append(layer.register_forward_hook(self._score_layer((unit.name, j), layer), with_kwargs=True))
        if self.stop_early:
            handles.append(self.group[-1].module.register_forward_hook(self._stop_when_done))
        return handles

    def _forward(self, batch: Any) -> None:
        self.calls.clear()
        self.seen.clear()
        self.base_outputs.clear()
        self.mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.recording = True
        try:
            # use_cache=False: a forward whose blocks are rerun must not append to a KV cache
            call_model(self.model, batch, **_no_cache(self.model, batch))
        except _GroupDone:
            pass
        finally:
            self.recording = False

    def _add(self, key: tuple[str, int], output: Any, baseline: Any, args: tuple, kwargs: dict) -> None:
        x, y = _pair_at_site(self.site, args, kwargs, output, baseline, key[0])
        self.accumulators[key].update(x, y, _mask_for(self.mask, x))
        self.seen.add(key[0])

    def _score_recorded_calls(self) -> None:
        """The block sites: each recorded call of a unit rerun with its adapters off (nothing at "adapter_output",
        whose layers were scored inside the forward)."""
        for unit in self.group:
            for args, kwargs, output in self.calls.get(unit.name, ()):
                with _adapters_off(unit.layers):
                    baseline = unit.module(*args, **kwargs)
                self._add((unit.name, 0), output, baseline, args, kwargs)

    def _record_call(self, name: str):
        def hook(module, args, kwargs, output):
            if self.recording:
                self.calls.setdefault(name, []).append((args, kwargs, output))
                self.seen.add(name)

        return hook

    def _record_base_output(self, layer: Any):
        def hook(module, args, output):
            if self.recording:
                self.base_outputs.setdefault(id(layer), []).append((output, getattr(output, "_version", None)))

        return hook

    def _score_layer(self, key: tuple[str, int], layer: Any):
        def hook(module, args, kwargs, output):
            if self.recording:
                self._add(key, output, self._without_adapter(layer, module, args, kwargs), args, kwargs)

        return hook

    def _without_adapter(self, layer: Any, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The layer's output without its adapter: its base layer's from the call just made when that ran once and
        was not changed in place since, else the call again with the adapter off (not recorded)."""
        outputs = self.base_outputs.pop(id(layer), [])
        if len(outputs) == 1 and isinstance(outputs[0][0], torch.Tensor) and outputs[0][0]._version == outputs[0][1]:
            return outputs[0][0]
        self.recording = False
        try:
            with _adapters_off([layer]):
                return module(*args, **kwargs)
        finally:
            self.recording = True

    def _stop_when_done(self, module, args, output) -> None:
        if self.recording and len(self.seen) == len(self.group):
            raise _GroupDone

    def check(self) -> None:
        """Raise if a unit never ran, or saw fewer than 3 real tokens over the whole probe set."""
        unused = sorted({name for (name, _), acc in self.accumulators.items() if acc.n_seen == 0})
        if unused:
            raise ValueError(f"units {unused} were never called (or saw no real token) during the probe forward.")
        few = {name: acc.n_seen for (name, _), acc in self.accumulators.items() if acc.n_seen < 3}
        if few:
            # CKA of one row is undefined (taken as 1), and two centred rows are x and -x, whose CKA is always 1:
            # either way every unit would score 0, look unimportant and never (or always) freeze.
            raise ValueError(
                f"units {sorted(few)} saw {min(few.values())} real token(s) over the whole probe set; CKA says "
                "nothing below 3 tokens (two centred tokens always give CKA 1, importance 0): give the probe set "
                "more tokens (longer or more sequences)."
            )


def _importance(name: str, accumulator: CKAAccumulator, precision: str) -> float:
    """1 - CKA of one accumulator; inf or NaN in its rows (found where CKA reads them, once) named by unit."""
    try:
        return accumulator.importance(precision)
    except NonFiniteActivations as error:
        raise ValueError(
            f"unit {name!r} produced inf or NaN activations on the probe batches (a {accumulator.rows[0].dtype} "
            "overflow, or NaN in the model): its importance cannot be scored. Check the model's outputs, or score in "
            "bfloat16/float32."
        ) from error


def _width(module: Any) -> int | None:
    """Features of a layer's output (its base layer's ``out_features``), or None when it does not tell."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    for attribute in ("out_features", "nf"):
        value = getattr(base, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _groups(model: nn.Module, units: list[AdapterUnit], keys: list, batches: list, max_tokens: int,
            per_layer: bool, memory_bytes: int | None) -> list[list]:
    """The accumulator keys split, in model order, into groups whose kept rows fit ``memory_bytes`` (a key larger
    than that alone); one group when there is no bound or a width or the token count is unknown."""
    if memory_bytes is None:
        return [keys]
    tokens = sum(real_tokens(batch) for batch in batches)
    rows = min(max_tokens, tokens) if tokens else max_tokens
    by_name = {u.name: u for u in units}
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    widths = [_width(by_name[name].layers[j]) if per_layer else hidden for name, j in keys]
    if any(not isinstance(w, int) for w in widths):
        return [keys]
    groups: list[list] = [[]]
    held = 0
    for key, width in zip(keys, widths):
        size = 2 * rows * width * 4  # with and without adapters, float32
        if groups[-1] and held + size > memory_bytes:
            groups.append([])
            held = 0
        groups[-1].append(key)
        held += size
    return groups
