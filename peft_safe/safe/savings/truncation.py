"""Backprop truncation below the lowest trainable block, also under gradient checkpointing.

Freezing the bottom units truncates backprop by itself only while nothing below them requires grad. peft's
``prepare_model_for_kbit_training`` and transformers' ``enable_input_require_grads()`` (which
``gradient_checkpointing_enable`` calls too) hook the input embeddings so that their output requires grad: with
reentrant checkpointing a block whose input does not require grad gets no gradient at all, even for its
adapters. That hook keeps the whole chain alive: every frozen block below the lowest trainable one records
its autograd graph (saving activations), is backpropagated through and, when checkpointed, recomputed, only to
deliver a gradient to the embedding output, which nobody reads.

:class:`BackpropCut` puts the cut back with two forward pre-hooks. When units are frozen from the bottom:

- on the first block, the hidden-state input is replaced by a detached copy, so the frozen blocks below the
  lowest trainable one (the *cut block*) run without recording any graph: nothing is saved, recomputed or
  backpropagated there;
- on the cut block, if the first block's input required grad and the cut block is checkpointed reentrantly
  (or in a way that cannot be told), its input is made to require grad again, so the reentrant checkpoint
  still backpropagates into its adapters; otherwise autograd stops at its input exactly as it does for a
  model without the input-require-grads hook.

The copies hold the same values, so forward outputs are unchanged; and the first hook detaches only when no
gradient anybody keeps flows through its input (checked on every call), so no trainable parameter's gradient
changes either.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..method.frozen_prefix import FrozenPrefix
from ..method.hooks import add_hook

__all__ = ["BackpropCut", "hidden_state_of", "upstream_wants_grad", "with_hidden_state"]


def upstream_wants_grad(tensor: torch.Tensor, ignored_leaves: Iterable[torch.Tensor] = ()) -> bool:
    """Whether backprop from ``tensor`` would reach a leaf tensor that requires grad, other than ``ignored_leaves``.

    Walks ``tensor``'s autograd graph. A leaf found there is a trainable parameter (its gradient must not
    change) or a tensor a caller made require grad (``inputs_embeds.requires_grad_()`` for input saliency), so
    either keeps the input alive. Leaves hidden inside a reentrant checkpoint are not seen; the cut checks the
    blocks below it structurally for that reason.

    Args:
        tensor: the tensor whose history is searched.
        ignored_leaves: leaves whose gradient nobody reads (the output of the input embeddings that an
            input-require-grads hook made require grad).
    """
    if not tensor.requires_grad:
        return False
    ignored = {id(leaf) for leaf in ignored_leaves}
    if tensor.grad_fn is None:
        return id(tensor) not in ignored
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the node of a leaf
        if variable is not None and id(variable) not in ignored:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embedding modules of every transformers model inside ``model``."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            embeddings = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embeddings, nn.Module):
            found[id(embeddings)] = embeddings
    return list(found.values())


def hidden_state_of(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor] | None:
    """Where the block's hidden-state input is: the first positional tensor, or ``hidden_states=``."""
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            return i, arg
    value = kwargs.get("hidden_states")
    return ("hidden_states", value) if isinstance(value, torch.Tensor) else None


def _needs_grad_input(block: nn.Module) -> bool:
    """Whether ``block`` gives its parameters gradients only through an input that requires grad.

    True for transformers' reentrant activation checkpointing (``use_reentrant=True``, also torch's default
    when the flag is not passed) and for any checkpointing function whose flag cannot be read; False for a block
    that is not checkpointed or is checkpointed with ``use_reentrant=False``.
    """
    if not (getattr(block, "gradient_checkpointing", False) and block.training):
        return False
    function = getattr(block, "_gradient_checkpointing_func", None)
    keywords = getattr(function, "keywords", None)
    if not isinstance(keywords, dict):
        return True
    return keywords.get("use_reentrant") is not False


def with_hidden_state(args: tuple, kwargs: dict, where: str | int, value: torch.Tensor) -> tuple[tuple, dict]:
    """A block's ``(args, kwargs)`` with the hidden state at ``where`` (from :func:`hidden_state_of`) replaced."""
    if isinstance(where, int):
        return (*args[:where], value, *args[where + 1 :]), kwargs
    return args, {**kwargs, where: value}


class BackpropCut:
    """The forward pre-hooks that stop backprop below the lowest trainable block, and where they sit.

    Owned by a :class:`~peft_safe.SAFEModel`, which calls :meth:`update` whenever the freeze state changes
    (``freeze``, loading a checkpoint, peft's ``requires_grad`` toggles). The hooks are removed when nothing
    frozen lies below a trainable block.

    On each training forward the first block's hidden-state input is detached when all of these hold, and
    otherwise passed through untouched:

    - it requires grad (else no graph is recorded below anyway);
    - no parameter of a block below the cut requires grad (checked again on every call, so unfreezing by hand
      never loses a gradient);
    - its autograd graph reaches no leaf that requires grad, except the output of the input embeddings (the
      leaf ``enable_input_require_grads`` creates): a trainable embedding, a ``modules_to_save`` copy or a
      caller's ``inputs_embeds.requires_grad_()`` keep the chain alive.

    When it was detached, the cut block's input is made to require grad again if the cut block is checkpointed
    reentrantly, which gives gradients to the block's parameters only through an input that requires grad.

    Example:
        >>> cut = BackpropCut()
        >>> cut.update(safe.frozen_prefix())  # doctest: +SKIP
        >>> cut.block_name  # doctest: +SKIP
        'model.layers.2'
    """

    def __init__(self) -> None:
        self.block_name: str | None = None
        self._handles: list[Any] = []  # add_hook's handles
        self._prefix: FrozenPrefix | None = None  # the prefix the hooks were installed for
        self._embedding_outputs: list[weakref.ref] = []
        self._detached = False  # whether the first block's input was detached in the current forward

    def __getstate__(self) -> dict[str, Any]:
        # weak references cannot be pickled (torch.save of a whole model, deepcopy); they only matter mid-forward
        return {**self.__dict__, "_embedding_outputs": [], "_detached": False}

    def update(self, prefix: FrozenPrefix | None) -> str | None:
        """Move the hooks to the cut block of ``prefix`` (the tuner's :meth:`frozen_prefix`), or remove them.

        Returns:
            The name of the cut block, or ``None`` when no hook is installed.
        """
        name = None if prefix is None else prefix.name
        if name == self.block_name:
            return name
        self.remove()
        if prefix is None:
            return None
        self._prefix = prefix
        self._handles.append(add_hook("backprop_cut", prefix.blocks[0], "pre", self._detach_below))
        self._handles.append(add_hook("backprop_cut", prefix.blocks[prefix.cut], "pre", self._regrad_cut))
        for embeddings in _input_embeddings(prefix.model):
            self._handles.append(add_hook("backprop_cut", embeddings, "post", self._note_embedding_output))
        self.block_name = name
        return name

    def remove(self) -> None:
        """Remove the hooks; backprop runs as it would without SAFE's cut."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._prefix, self._embedding_outputs = [], None, []
        self._detached = False
        self.block_name = None

    def _note_embedding_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self._embedding_outputs.append(weakref.ref(output))
            if len(self._embedding_outputs) > 8:  # the latest forwards' only
                del self._embedding_outputs[:-8]

    def _detach_below(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._detached = False
        found = hidden_state_of(args, kwargs)
        if found is None or not torch.is_grad_enabled():
            return None
        where, hidden = found
        if not hidden.requires_grad or self._prefix is None or self._prefix.thawed():
            return None
        embedding_outputs = [t for t in (ref() for ref in self._embedding_outputs) if t is not None]
        if upstream_wants_grad(hidden, ignored_leaves=embedding_outputs):
            return None
        self._detached = True
        return with_hidden_state(args, kwargs, where, hidden.detach())

    def _regrad_cut(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        detached, self._detached = self._detached, False
        found = hidden_state_of(args, kwargs)
        if not detached or found is None or not _needs_grad_input(module):
            return None
        where, hidden = found
        if hidden.requires_grad:
            return None
        return with_hidden_state(args, kwargs, where, hidden.detach().requires_grad_(True))

    def feeds_no_gradient(self, hidden: torch.Tensor) -> bool:
        """Whether the first block's input ``hidden`` carries no gradient anybody keeps (so it is a constant).

        True when it does not require grad, or when its graph reaches no leaf that requires grad except the input
        embeddings' outputs an input-require-grads hook made require grad (seen only while the cut's hooks are
        installed). The prefix cache (:mod:`.prefix_cache`) serves cached states only then.
        """
        if not hidden.requires_grad:
            return True
        embedding_outputs = [t for t in (ref() for ref in self._embedding_outputs) if t is not None]
        return not upstream_wants_grad(hidden, ignored_leaves=embedding_outputs)
