"""Adapter units: the adapters of one transformer block, found structurally.

A unit is what SAFE scores and freezes. Tuner layers are found by ``isinstance`` on peft's
``BaseTunerLayer`` (never by parameter-name substrings); each is assigned to the transformer block that
holds it. The block lists are found greedily: the ``nn.ModuleList`` (or ``nn.Sequential`` of blocks, timm's
``blocks``) holding the most adapted layers
(``encoder.layer`` in BERT/RoBERTa, ``h`` in GPT-2, ``layers`` in LLaMA), then, among the adapted layers left
outside it, the list holding the most of those, and so on: an encoder-decoder (T5, BART) gets one unit per block
on both stacks, encoder first. ``blocks_path`` names the only block list instead. Adapted layers outside any block
(and every layer of a model with no block list) form one unit each.

A unit outside the block lists of a model that has some (BitFit's ``embeddings.LayerNorm`` and ``pooler.dense``
on BERT, a LoRA on a task head) is not a *candidate*: the schedule neither scores nor freezes it, and it trains
throughout. Such a unit is a single small layer whose change CKA cannot see when it is a constant shift (a bias:
scored 0, it would always freeze first, even where it feeds the classifier), and freezing it saves almost
nothing. :meth:`SAFEModel.freeze` still freezes it on request.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from peft.tuners.tuners_utils import (
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn


@dataclass(frozen=True)
class AdapterUnit:
    """One unit: a name, the module whose output is compared with and without adapters, its tuner layers.

    ``candidate``: whether the schedule scores and freezes it (a block, or any unit of a model without blocks).
    """

    name: str
    module: nn.Module
    layers: tuple[BaseTunerLayer, ...]
    candidate: bool = True


def _holds_adapter(layer: BaseTunerLayer, adapter_name: str) -> bool:
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is not None and adapter_name in container:
            return True
    return False


def adapter_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, BaseTunerLayer]]:
    """Tuner layers holding ``adapter_name``, in module order, outside modules_to_save copies."""
    found, aux = [], []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            aux.append(name + ".")
        elif (
            isinstance(module, BaseTunerLayer)
            and not any(name.startswith(a) for a in aux)
            and _holds_adapter(module, adapter_name)
        ):
            found.append((name, module))
    return found


def _block_lists(
    model: nn.Module, layer_names: list[str], blocks_path: str | None
) -> list[tuple[str, nn.Module]]:
    if blocks_path is not None:
        try:
            blocks = model.get_submodule(blocks_path)
        except AttributeError:
            candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and n]
            raise ValueError(
                f"blocks_path {blocks_path!r} does not exist in {type(model).__name__}; "
                f"module lists in this model: {candidates[:10]}."
            ) from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"blocks_path {blocks_path!r} is a {type(blocks).__name__}, not a list of blocks "
                "(nn.ModuleList or nn.Sequential)."
            )
        return [(blocks_path, blocks)]
    lists: list[tuple[str, nn.Module]] = []
    remaining = list(layer_names)
    while remaining:  # the list holding the most adapted layers, then the most of those left outside it, ...
        best = _best_block_list(model, remaining)
        if best is None:
            break
        lists.append(best)
        remaining = [name for name in remaining if not name.startswith(best[0] + ".")]
    return lists


def _is_block_list(module: nn.Module) -> bool:
    """An ``nn.ModuleList``, or an ``nn.Sequential`` of blocks (timm's ``blocks``: every element a container of
    its own), not of layers (``nn.Sequential(Linear, ReLU, Linear)``, whose layers stay units of their own)."""
    if isinstance(module, nn.ModuleList):
        return len(module) > 0
    if not isinstance(module, nn.Sequential) or len(module) < 2:
        return False
    return all(not isinstance(child, BaseTunerLayer) and any(True for _ in child.children()) for child in module)


def _best_block_list(model: nn.Module, layer_names: list[str]) -> tuple[str, nn.Module] | None:
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not _is_block_list(module):
            continue
        count = sum(1 for layer_name in layer_names if layer_name.startswith(name + "."))
        # most adapted layers wins; on a tie the outer list (shorter name) wins
        if count > best_count or (count == best_count and best is not None and count and len(name) < len(best[0])):
            best, best_count = (name, module), count
    return best


def find_adapter_units(model: nn.Module, adapter_name: str, blocks_path: str | None = None) -> list[AdapterUnit]:
    """Group the tuner layers of ``adapter_name`` into units, input side first.

    Args:
        model: the model holding the injected tuner layers (``SAFEModel.model``).
        adapter_name: the adapter whose layers are grouped.
        blocks_path: dotted path of the block list; found automatically when ``None``.

    Raises:
        ValueError: if ``blocks_path`` does not name a list of modules.
    """
    layers = adapter_layers(model, adapter_name)
    block_lists = _block_lists(model, [n for n, _ in layers], blocks_path)
    groups: dict[str, tuple[nn.Module, list[BaseTunerLayer], bool]] = {}
    for layer_name, layer in layers:
        unit_name, unit_module, in_blocks = layer_name, layer, not block_lists
        for path, blocks in block_lists:
            if layer_name.startswith(path + "."):
                index = layer_name[len(path) + 1 :].split(".", 1)[0]
                unit_name, unit_module, in_blocks = f"{path}.{index}", blocks.get_submodule(index), True
                break
        groups.setdefault(unit_name, (unit_module, [], in_blocks))[1].append(layer)
    return [
        AdapterUnit(name, module, tuple(unit_layers), candidate)
        for name, (module, unit_layers, candidate) in groups.items()
    ]


def unit_parameters(unit: AdapterUnit, adapter_name: str) -> list[nn.Parameter]:
    """The adapter parameters of ``adapter_name`` inside ``unit`` (base weights excluded)."""
    params = []
    for layer in unit.layers:
        prefixes = _get_tuner_state_dict_key_prefixes(layer, adapter_name=adapter_name)
        params.extend(_filter_state_dict_by_key_prefixes(dict(layer.named_parameters()), prefixes).values())
    return params


def as_index(value: object) -> int | None:
    """``value`` as a plain int if it is an integer of any library (``np.int64(1)``, ``torch.tensor(1)``)."""
    if isinstance(value, (bool, str, bytes)) or type(value).__name__ in ("bool", "bool_"):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None


def resolve_units(available: list[str], units: Sequence[str | int] | str | int) -> list[str]:
    """Unit names for ``units``, given as names or indices into ``available`` (negative ones from the end).

    Each unit is named once, in the order first given: ``[0, "layer.0", 0]`` is one unit.

    Raises:
        ValueError: for an unknown name or an index out of range, listing the units.
    """
    if isinstance(units, str) or as_index(units) is not None:
        units = [units]
    names = []
    for unit in units:
        index = as_index(unit)
        if index is not None:
            unit = index
            if not -len(available) <= unit < len(available):
                raise ValueError(f"unit index {unit} is out of range; the model has {len(available)} units.")
            names.append(available[unit])
        elif isinstance(unit, str) and unit in available:
            names.append(unit)
        else:
            raise ValueError(f"unknown adapter unit {unit!r}; the units are {available}.")
    return list(dict.fromkeys(names))


def require_units(units: list[AdapterUnit], expected: list[str], adapter_name: str, action: str) -> None:
    """Refuse to ``action`` when the adapter's layers are gone from the model (``merge_and_unload()``, ``unload()``).

    Raises:
        ValueError: saying that the adapters are gone and what to do instead.
    """
    if expected and not units:
        raise ValueError(
            f"cannot {action}: the layers of SAFE adapter {adapter_name!r} are no longer in the model "
            f"(merge_and_unload() or unload() removed them; the model they returned is the plain base model). "
            "Nothing was changed or written. To go on with SAFE, load the adapter again "
            "(PeftModel.from_pretrained) or build a new model with get_peft_model."
        )


def leaf_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the modules with parameters and no children: what ``target_modules`` can name."""
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and not list(module.children()) and any(True for _ in module.parameters())
    })
