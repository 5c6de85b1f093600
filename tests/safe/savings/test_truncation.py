"""Backprop truncation below the lowest trainable unit, with and without gradient checkpointing.

transformers' ``enable_input_require_grads()`` (called by ``gradient_checkpointing_enable`` and by peft's
``prepare_model_for_kbit_training``) makes the embedding output require grad, which keeps every frozen block
below the lowest trainable one in the autograd graph. SAFE's cut (``peft_safe/tuners/truncation.py``) must give
back plain truncation in every mode without changing any output or gradient. Each test compares the model with
the cut against the same model with the cut's hooks removed, which is what peft alone does.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_safe.measure import measure_training_step
from peft_safe.safe import hooks as safe_hooks
from peft_safe.safe.method.frozen_prefix import locate_frozen_prefix
from peft_safe.safe.savings.truncation import _needs_grad_input, upstream_wants_grad

pytestmark = pytest.mark.usefixtures("single_thread_torch")

LAYERS = 6
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# how the base model is prepared before get_peft_model
MODES = ("plain", "input_grads", "reentrant", "non_reentrant")
KEEPS_CHAIN_ALIVE = ("input_grads", "reentrant", "non_reentrant")  # the modes with an input-require-grads hook


def build(tiny, mode: str, layers: int = LAYERS) -> PeftModel:
    """A SAFE-wrapped LoRA on every projection of a tiny LLaMA, in train mode, prepared as ``mode`` says."""
    base = tiny.llama(layers=layers).train()
    if mode == "input_grads":
        base.enable_input_require_grads()
    elif mode in ("reentrant", "non_reentrant"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers renamed it activation_checkpointing_enable
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    elif mode != "plain":
        raise ValueError(mode)
    torch.manual_seed(1)
    return get_peft_model(base, tiny.safe_config("llama", lora=tiny.lora("llama", target_modules=ALL_PROJECTIONS)))


def freeze_bottom_half(model: PeftModel) -> int:
    """Freeze the bottom half of the units; returns the index of the lowest trainable block."""
    safe = model.base_model
    half = len(safe.adapter_units) // 2
    safe.freeze(safe.adapter_units[:half])
    return half


def cut_removed(model: PeftModel):
    """The model as peft alone would run it: SAFE's cut hooks taken off, put back on exit."""
    return model.base_model.without_backprop_cut()


def batch(tiny) -> dict[str, torch.Tensor]:
    ids = tiny.ids(batch=2, seq=8)
    return {"input_ids": ids, "labels": ids}


def run_step(model: PeftModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradient of every parameter (or inputs_embeds) that requires grad, after one backward."""
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    embeds = inputs.get("inputs_embeds")
    if embeds is not None and embeds.grad is not None:
        grads["inputs_embeds"] = embeds.grad.clone()
        embeds.grad = None
    return output.logits.detach(), grads


def blocks(model: PeftModel) -> nn.ModuleList:
    return model.base_model.model.model.layers


# ---------------------------------------------------------------------------------------------- results unchanged
@pytest.mark.parametrize("mode", MODES)
def test_cut_changes_no_output_and_no_gradient(tiny, mode):
    model = build(tiny, mode)
    cut = freeze_bottom_half(model)
    assert model.base_model.backprop_cut_block == f"model.layers.{cut}"
    logits, grads = run_step(model, batch(tiny))
    with cut_removed(model):
        assert model.base_model.backprop_cut_block is None
        logits_without, grads_without = run_step(model, batch(tiny))
    torch.testing.assert_close(logits, logits_without, rtol=0, atol=0)
    assert grads.keys() == grads_without.keys()
    # the lowest trainable block's adapters train too (reentrant checkpointing needs its input to require grad)
    assert any(f"layers.{cut}." in name for name in grads), sorted(grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_without[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("mode", MODES)
def test_frozen_blocks_below_the_cut_record_no_graph(tiny, mode):
    model = build(tiny, mode)
    cut = freeze_bottom_half(model)
    requires = _block_outputs_require_grad(tiny, model)
    assert requires == [False] * cut + [True] * (LAYERS - cut)
    with cut_removed(model):
        without = _block_outputs_require_grad(tiny, model)
    # the input-require-grads hook keeps every frozen block in the graph; plain models truncate on their own
    assert without == ([True] * LAYERS if mode in KEEPS_CHAIN_ALIVE else requires)


def _block_outputs_require_grad(tiny, model: PeftModel) -> list[bool]:
    seen: dict[int, bool] = {}
    handles = [
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
        for i, block in enumerate(blocks(model))
    ]
    try:
        model(**batch(tiny)).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in range(LAYERS)]


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointed_frozen_blocks_are_not_recomputed(tiny, mode):
    model = build(tiny, mode)
    cut = freeze_bottom_half(model)

    def recomputed_blocks() -> set[int]:
        # transformers checkpoints a block's forward, so the recompute calls its sublayers again during backward
        loss = model(**batch(tiny)).loss
        calls: set[int] = set()
        handles = [
            block.mlp.down_proj.base_layer.register_forward_hook(lambda *_, i=i: calls.add(i))
            for i, block in enumerate(blocks(model))
        ]
        try:
            loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        return calls

    assert recomputed_blocks() == set(range(cut, LAYERS))
    with cut_removed(model):
        assert recomputed_blocks() == set(range(LAYERS))


@pytest.fixture(scope="module")
def step_costs(tiny):
    """``step_costs(mode, freeze, cut=True)``: the measured costs of one training step, each measured once."""
    cache: dict[tuple, object] = {}

    def measure(mode: str, freeze: bool, cut: bool = True):
        key = (mode, freeze, cut)
        if key not in cache:
            model = build(tiny, mode)
            if freeze:
                freeze_bottom_half(model)
            with contextlib.nullcontext() if cut else cut_removed(model):
                cache[key] = measure_training_step(model, batch(tiny), timed=False)
        return cache[key]

    return measure


@pytest.mark.parametrize("mode", MODES)
def test_backward_flops_drop_to_the_trainable_share(step_costs, mode):
    all_trainable = step_costs(mode, freeze=False)
    frozen = step_costs(mode, freeze=True)
    frozen_without_cut = step_costs(mode, freeze=True, cut=False)
    share = (LAYERS - LAYERS // 2) / LAYERS  # blocks at or above the lowest trainable one
    assert frozen.forward_flops == all_trainable.forward_flops  # freezing never changes the forward
    ratio = frozen.backward_flops / all_trainable.backward_flops
    assert abs(ratio - share) < 0.05 * share, (ratio, share)
    ratio_without = frozen_without_cut.backward_flops / all_trainable.backward_flops
    if mode in KEEPS_CHAIN_ALIVE:
        assert ratio_without > 0.9, ratio_without  # peft's input-require-grads hook alone: no truncation
    else:
        assert frozen_without_cut.backward_flops == frozen.backward_flops  # nothing to restore


def test_cut_restores_plain_truncation_of_saved_activations(step_costs):
    # Without checkpointing the input-require-grads hook makes every frozen block save its activations.
    # (Tensors saved inside a non-reentrant checkpoint are invisible to the meter, so that mode is not measured.)
    with_hook = step_costs("input_grads", freeze=True)
    assert with_hook.activation_bytes == step_costs("plain", freeze=True).activation_bytes
    assert with_hook.activation_bytes < 0.6 * step_costs("input_grads", freeze=False).activation_bytes
    without_cut = step_costs("input_grads", freeze=True, cut=False).activation_bytes
    assert without_cut > 0.8 * step_costs("input_grads", freeze=False).activation_bytes
    # reentrant checkpointing saves each checkpointed block's input: none for the frozen blocks with the cut
    with_cut, without_cut = step_costs("reentrant", freeze=True), step_costs("reentrant", True, cut=False)
    assert with_cut.activation_bytes < without_cut.activation_bytes


# ---------------------------------------------------------------------------------------------- where the cut sits
def test_cut_follows_the_freeze_state(tiny):
    model = build(tiny, "input_grads")
    safe = model.base_model
    units = safe.adapter_units
    assert safe.backprop_cut_block is None  # nothing frozen: no hook at all
    assert not any(block._forward_pre_hooks for block in blocks(model))
    safe.freeze(units[:2])
    assert safe.backprop_cut_block == "model.layers.2"
    safe.freeze(units[2])
    assert safe.backprop_cut_block == "model.layers.3"
    hooked = [i for i, block in enumerate(blocks(model)) if block._forward_pre_hooks]
    assert hooked == [0, 3]  # detach at the first block, re-require grad at the cut block


def test_no_cut_when_a_lower_unit_is_still_trainable(tiny):
    model = build(tiny, "input_grads")
    safe = model.base_model
    safe.freeze(safe.adapter_units[2:4])  # the middle: block 0 still trains
    assert safe.backprop_cut_block is None
    assert not any(block._forward_pre_hooks for block in blocks(model))


def test_update_with_nothing_frozen_removes_the_hooks(tiny):
    model = build(tiny, "input_grads")
    safe = model.base_model
    embedding_hooks = len(model.get_input_embeddings()._forward_hooks)  # enable_input_require_grads' own
    safe.freeze(safe.adapter_units[0])
    cut = safe._backprop_cut
    assert len(model.get_input_embeddings()._forward_hooks) == embedding_hooks + 1
    assert cut._handles and cut.block_name == "model.layers.1"
    assert blocks(model)[0]._forward_pre_hooks and blocks(model)[1]._forward_pre_hooks
    assert cut.update(locate_frozen_prefix(safe.model, safe._units(), set())) is None
    assert not cut._handles and cut.block_name is None
    assert not any(block._forward_pre_hooks for block in blocks(model))
    assert len(model.get_input_embeddings()._forward_hooks) == embedding_hooks


def test_cut_is_restored_when_loading_a_checkpoint(tiny, tmp_path):
    model = build(tiny, "reentrant")
    cut = freeze_bottom_half(model)
    model.save_pretrained(tmp_path)
    base = tiny.llama(layers=LAYERS).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert loaded.base_model.backprop_cut_block == f"model.layers.{cut}"
    frozen_run = run_step(loaded, batch(tiny))
    with cut_removed(loaded):
        torch.testing.assert_close(run_step(loaded, batch(tiny))[1], frozen_run[1], rtol=0, atol=0)
    # loading for inference: nothing trains, so nothing is cut
    inference = PeftModel.from_pretrained(tiny.llama(layers=LAYERS), tmp_path)
    assert inference.base_model.backprop_cut_block is None


# ---------------------------------------------------------------------------------------------- gradients kept
def _embeddings_trainable(model: PeftModel, inputs: dict) -> dict:
    model.get_input_embeddings().weight.requires_grad_(True)
    return inputs


def _inputs_embeds_require_grad(model: PeftModel, inputs: dict) -> dict:
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    return {"inputs_embeds": embeds, "labels": inputs["labels"]}


def _frozen_parameter_unfrozen_by_hand(model: PeftModel, inputs: dict) -> dict:
    blocks(model)[0].input_layernorm.weight.requires_grad_(True)
    return inputs


@pytest.mark.parametrize("mode", ["input_grads", "reentrant"])
@pytest.mark.parametrize(
    "wants_grad", [_embeddings_trainable, _inputs_embeds_require_grad, _frozen_parameter_unfrozen_by_hand],
    ids=["trainable-embeddings", "inputs-embeds-require-grad", "parameter-below-unfrozen-by-hand"],
)
def test_cut_never_takes_a_gradient_someone_wants(tiny, mode, wants_grad):
    model = build(tiny, mode)
    freeze_bottom_half(model)
    inputs = wants_grad(model, batch(tiny))
    logits, grads = run_step(model, inputs)
    with cut_removed(model):
        logits_without, grads_without = run_step(model, inputs)
    below = {"inputs_embeds", "base_model.model.model.embed_tokens.weight",
             "base_model.model.model.layers.0.input_layernorm.weight"}
    assert below & grads.keys(), "the gradient below the cut was lost"
    assert grads.keys() == grads_without.keys()
    torch.testing.assert_close(logits, logits_without, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_without[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- the pieces
def test_upstream_wants_grad_finds_leaves_except_the_ignored_ones():
    weight = nn.Parameter(torch.randn(3, 3))
    frozen = torch.randn(3, 3)
    x = torch.randn(2, 3)
    assert not upstream_wants_grad(x @ frozen)
    assert upstream_wants_grad(x @ weight)
    embedding_output = torch.randn(2, 3).requires_grad_(True)  # a leaf, as enable_input_require_grads makes it
    assert upstream_wants_grad(torch.relu(embedding_output @ frozen))
    assert not upstream_wants_grad(torch.relu(embedding_output @ frozen), ignored_leaves=[embedding_output])
    assert upstream_wants_grad(embedding_output @ weight, ignored_leaves=[embedding_output])


@pytest.mark.parametrize(
    ("checkpointing", "kwargs", "expected"),
    [(False, {}, False), (True, {"use_reentrant": True}, True), (True, {"use_reentrant": False}, False),
     (True, {}, True)],  # torch's checkpoint is reentrant when the flag is not passed
)
def test_cut_block_input_requires_grad_only_under_reentrant_checkpointing(checkpointing, kwargs, expected):
    import functools

    from torch.utils.checkpoint import checkpoint

    block = nn.Linear(2, 2).train()
    block.gradient_checkpointing = checkpointing
    block._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)
    assert _needs_grad_input(block) is expected
    block.eval()
    assert _needs_grad_input(block) is False  # transformers checkpoints in training mode only


# transformers' input-require-grads hook is a local function, so only a model without it pickles
@pytest.mark.parametrize(("how", "mode"), [("deepcopy", "reentrant"), ("pickle", "plain")])
def test_model_with_a_cut_copies_and_the_copy_cuts_its_own_blocks(tiny, how, mode):
    import copy
    import pickle

    model = build(tiny, mode)
    cut = freeze_bottom_half(model)
    run_step(model, batch(tiny))  # a forward leaves weak references to its embedding output behind
    # the transformers model carries the hooks (a whole SAFE PeftModel does not deep-copy: SAFEModel.__new__)
    inner = model.base_model.model
    clone = copy.deepcopy(inner) if how == "deepcopy" else pickle.loads(pickle.dumps(inner))
    clone_blocks = clone.model.layers
    hooks = [fn for block in clone_blocks for _, fn in safe_hooks.callbacks(block, "pre")]
    owners = {id(hook.__self__) for hook in hooks}
    assert len(owners) == 1 and id(model.base_model._backprop_cut) not in owners
    assert all(b is c for b, c in zip(hooks[0].__self__._prefix.below, clone_blocks[:cut]))
    seen: dict[int, bool] = {}
    for i, block in enumerate(clone_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
    ids = batch(tiny)["input_ids"]
    clone(input_ids=ids, labels=ids).loss.backward()
    assert [seen[i] for i in range(LAYERS)] == [False] * cut + [True] * (LAYERS - cut)


def test_the_cut_the_prefix_cache_and_the_budget_read_the_tuners_one_frozen_prefix(tiny):
    base = tiny.llama(layers=4).train()
    torch.manual_seed(1)
    model = get_peft_model(base, tiny.safe_config("llama", cache_frozen=True, memory_budget=0.9))
    safe = model.base_model
    assert safe.frozen_prefix() is None  # nothing frozen
    safe.freeze(safe.adapter_units[:2])
    prefix = safe.frozen_prefix()
    assert (prefix.name, prefix.cut) == ("model.layers.2", 2) and safe.frozen_prefix() is prefix  # located once
    assert [id(b) for b in prefix.below] == [id(b) for b in blocks(model)[:2]] and len(prefix.live) == 2
    model(**tiny.batch(), labels=tiny.ids()).loss.backward()  # the cache installs its hooks at a training forward
    assert safe.backprop_cut_block == prefix.name == safe.prefix_cache._site["name"]
    assert safe.checkpoint_budget.first_live() == prefix.cut
    for param in blocks(model)[1].parameters():  # a block below the cut made trainable by hand: located again
        param.requires_grad_(True)
    again = safe.frozen_prefix()
    assert again is not prefix and again.cut == 1 and safe.checkpoint_budget.first_live() == 1
