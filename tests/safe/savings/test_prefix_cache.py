"""The prefix cache (``SAFEConfig(cache_frozen=True)``, ``peft_safe/safe/savings/prefix_cache.py``).

Every training test runs two copies of one tiny model side by side, with the same batches and the same dropout
seed at each step: one caching, one not, whose prefix (the frozen blocks and the embeddings' dropout below them)
is put in eval mode by hand, which is what the cache promises to equal. Their losses and adapter weights must
agree to float rounding, whether a step was served from the cache or not, and whatever moves the cut.
"""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from peft import PeftModel, get_peft_model
from prefix_pair import EXAMPLES, LAYERS, LENGTHS, Pair, blocks, build, calls_of, epoch_batches

from peft_safe import SAFEConfig

pytestmark = pytest.mark.usefixtures("single_thread_torch")

# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_cached_steps_train_exactly_as_uncached_steps_with_the_prefix_in_eval_mode(tiny, arch):
    pair = Pair(tiny, arch)
    frozen_block_calls = calls_of(next(blocks(pair.cached)[0].children()))  # inside: the block itself is called
    pair.epoch(0)  # every example seen once: nothing served yet
    assert pair.stats["served_forwards"] == 0 and pair.stats["rows_in_memory"] == EXAMPLES
    pair.epoch(1)
    pair.epoch(2)  # shuffled into other batches, padded to other lengths: every batch served
    stats = pair.stats
    assert stats["served_forwards"] == 4 and stats["forwards"] == 6
    assert stats["row_hits"] == 2 * EXAMPLES and stats["hit_rate"] == pytest.approx(2 / 3)
    assert stats["memory_bytes"] == sum(LENGTHS) * 32 * 4 and stats["cut_block"].endswith(".2")
    assert frozen_block_calls[0] == 2  # the frozen blocks ran in the first epoch only
    assert all(m.training for m in blocks(pair.cached)[0].modules())  # train mode given back after each forward
    pair.assert_same_adapters(tiny)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_served_steps_train_the_cut_block_under_gradient_checkpointing(tiny, checkpointing):
    # reentrant checkpointing gives the cut block's adapters a gradient only through an input that requires grad:
    # the backprop cut's hook makes the served states require it, as it does the computed ones
    pair = Pair(tiny, "llama", checkpointing=checkpointing)
    cut_block = tiny.adapter_params(pair.cached)
    before = {n: p.detach().clone() for n, p in cut_block.items() if ".layers.2." in n}
    for epoch in range(3):
        pair.epoch(epoch)
    assert pair.stats["served_forwards"] == 4
    assert all(not torch.equal(before[n], cut_block[n]) for n in before)
    pair.assert_same_adapters(tiny)


# ---------------------------------------------------------------------------------------------- invalidation
def test_a_new_freeze_moves_the_cut_and_no_stale_prefix_is_served(tiny):
    pair = Pair(tiny, "bert")
    pair.epoch(0)
    pair.epoch(1)
    assert pair.stats["served_forwards"] == 2
    pair.freeze([2])  # the cut moves to block 3: rows stored at block 2's input would be wrong there
    pair.epoch(2)  # every row computed again, from the new cut
    stats = pair.stats
    assert stats["served_forwards"] == 2 and stats["invalidations"] == 1 and stats["cut_block"].endswith(".3")
    pair.epoch(3)
    assert pair.stats["served_forwards"] == 4
    pair.assert_same_adapters(tiny)


def test_thawing_and_restarting_the_schedule_drop_the_rows(tiny):
    pair = Pair(tiny, "bert")
    pair.epoch(0)
    lora = next(p for n, p in blocks(pair.cached)[1].named_parameters() if "lora_A" in n)
    lora.requires_grad_(True)  # thawed by hand: the cut lies at block 1 now
    pair.cached(**epoch_batches("bert", 1)[0])
    assert pair.stats["cut_block"].endswith(".1") and pair.stats["invalidations"] == 1
    pair.cached.base_model.restart_schedule()
    pair.cached(**epoch_batches("bert", 1)[0])
    assert pair.stats["cut_block"] is None and pair.stats["rows_in_memory"] == 0


def test_turning_the_option_off_drops_the_rows(tiny):
    pair = Pair(tiny, "bert")
    pair.epoch(0)
    pair.cached.peft_config["default"].cache_frozen = False
    for batch in epoch_batches("bert", 1):  # an uncached SAFE run now: dropout back on in its prefix
        pair.cached(**batch).loss.backward()
    assert all(m.training for m in blocks(pair.cached)[0].modules())
    assert pair.stats["rows_in_memory"] == 0 and pair.stats["served_forwards"] == 0


# ---------------------------------------------------------------------------------------------- keys and storage
def test_rows_beyond_the_memory_budget_go_to_disk_and_serve_the_same(tiny, tmp_path):
    row_bytes = 3 * 32 * 4  # the shortest example's hidden states fit; none of the others do
    pair = Pair(tiny, "bert", cache_memory_bytes=row_bytes, cache_dir=str(tmp_path / "rows"))
    pair.epoch(0)
    stats, folder = pair.stats, pair.cached.base_model.prefix_cache.folder
    assert stats["rows_in_memory"] + stats["rows_on_disk"] == EXAMPLES and stats["rows_on_disk"] >= EXAMPLES - 2
    assert stats["memory_bytes"] <= row_bytes and stats["disk_bytes"] > 0
    assert os.path.dirname(folder) == str(tmp_path / "rows") and len(os.listdir(folder)) == stats["rows_on_disk"]
    pair.epoch(1)
    pair.epoch(2)
    assert pair.stats["served_forwards"] == 4
    pair.assert_same_adapters(tiny)
    pair.cached.base_model.prefix_cache.clear()
    assert not os.path.exists(folder) and pair.stats["rows_on_disk"] == 0


# ---------------------------------------------------------------------------------------------- what is never served
def test_scoring_and_evaluation_are_never_served(tiny):
    pair = Pair(tiny, "bert")
    pair.epoch(0)
    pair.epoch(1)
    before = pair.stats
    probe = [{k: v for k, v in b.items() if k != "labels"} for b in epoch_batches("bert", 5)]
    scores = [m.base_model.compute_importance(probe) for m in pair.models]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    logits = [tiny.logits(m, probe[0]) for m in pair.models]
    torch.testing.assert_close(logits[0], logits[1])
    with torch.no_grad():
        pair.cached(**probe[0])  # train mode without grad: not a training step either
    assert pair.stats["forwards"] == before["forwards"] and pair.stats["served_forwards"] == 2


def test_a_prefix_whose_input_trains_is_never_cached(tiny):
    pair = Pair(tiny, "bert")
    pair.cached.base_model.model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="prefix cache .* not used: the input of the frozen blocks carries"):
        for batch in epoch_batches("bert", 0) + epoch_batches("bert", 1):
            pair.cached(**batch).loss.backward()
    assert pair.stats["served_forwards"] == 0 and pair.stats["rows_in_memory"] == 0


def test_off_by_default_nothing_changes(tiny):
    assert SAFEConfig(adapter_config=tiny.lora()).cache_frozen is False
    model = build(tiny, "bert", cache=False)
    block = blocks(model)[0]
    hooks = len(block._forward_pre_hooks), len(block._forward_hooks)
    model(**epoch_batches("bert", 0)[0]).loss.backward()
    assert all(m.training for m in block.modules())  # dropout stays on in the frozen blocks
    assert (len(block._forward_pre_hooks), len(block._forward_hooks)) == hooks
    assert model.base_model.prefix_cache.stats()["forwards"] == 0


def test_a_copy_starts_empty_and_trains_alike(tiny):
    pair = Pair(tiny, "bert")
    pair.epoch(0)
    twin = copy.deepcopy(pair.cached)
    assert twin.base_model.prefix_cache.stats()["rows_in_memory"] == 0
    pickled = pickle.loads(pickle.dumps(pair.cached))  # torch.save(model) pickles it
    assert pickled.base_model.prefix_cache.stats()["rows_in_memory"] == 0
    batch = epoch_batches("bert", 1)[0]
    losses = []
    for model in (pair.cached, twin):
        torch.manual_seed(0)
        losses.append(float(model(**batch).loss.detach()))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert twin.base_model.prefix_cache.stats()["served_forwards"] == 0
    assert pair.cached.base_model.prefix_cache.stats()["served_forwards"] == 1
    hooks = len(blocks(twin)[2]._forward_pre_hooks)
    twin(**batch)
    assert len(blocks(twin)[2]._forward_pre_hooks) == hooks  # the copied hooks were replaced, not added to


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache_frozen": "yes"}, "cache_frozen must be True or False, got 'yes'"),
        ({"cache_frozen": 1}, "cache_frozen must be True or False, got 1"),
        ({"cache_memory_bytes": -1}, "cache_memory_bytes must be >= 0, got -1"),
        ({"cache_memory_bytes": 1.5}, "cache_memory_bytes must be a whole number of bytes >= 0, got 1.5; e.g."),
        ({"cache_memory_bytes": True}, "whole number of bytes >= 0, got True"),
        ({"cache_memory_bytes": "1G"}, "got '1G'; e.g. 4 * 1024**3"),
        ({"cache_dir": ""}, "cache_dir must be a folder path or None"),
    ],
)
def test_bad_cache_options_name_the_value_and_the_fix(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        SAFEConfig(adapter_config=tiny.lora(), **kwargs)


def test_cache_options_are_normalised_and_checked_on_assignment(tiny, tmp_path):
    import numpy as np

    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        SAFEConfig(adapter_config=tiny.lora(), cache_dir=str(a_file))
    config = SAFEConfig(adapter_config=tiny.lora(), cache_memory_bytes=np.int64(2e9), cache_dir=tmp_path)
    assert config.cache_memory_bytes == 2_000_000_000 and type(config.cache_memory_bytes) is int
    assert config.cache_dir == str(tmp_path)
    assert SAFEConfig(adapter_config=tiny.lora(), cache_memory_bytes=2e9).cache_memory_bytes == 2_000_000_000
    with pytest.raises(ValueError, match="got -5"):
        config.cache_memory_bytes = -5
    assert config.cache_memory_bytes == 2_000_000_000  # a refused value leaves the old one


def test_a_checkpoint_loads_whatever_the_cache_options(tiny, tmp_path):
    model = build(tiny, "bert", cache=True)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["cache_frozen"] is True
    for name in ("cache_frozen", "cache_memory_bytes", "cache_dir"):
        saved.pop(name)  # a config saved before the options existed
    path.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].cache_frozen is False
    assert loaded.base_model.frozen_units == model.base_model.frozen_units


class _TupleBlock(torch.nn.Module):
    """A residual block that returns a tuple, hidden states first, as transformers' blocks did before 5.0."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden, attention_mask=None):
        return hidden + torch.tanh(self.proj(hidden)), None


class _TupleModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)
        self.layers = torch.nn.ModuleList(_TupleBlock() for _ in range(3))

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)[0]
        return hidden.pow(2).mean()


def test_blocks_returning_tuples_are_skipped_in_kind_under_a_peft_model_without_a_task(tiny):
    # a PeftModel without a task type calls the wrapped model, not the tuner: the cache hooks both
    from peft import LoraConfig, get_peft_model

    losses, grads = [], []
    for cache in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(_TupleModel(), SAFEConfig(
            adapter_config=LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), cache_frozen=cache,
            schedule_unit="step"))
        model.base_model.auto_driver.stand_down("frozen by hand")
        model.base_model.freeze([0])
        ids = tiny.ids(3, 5)
        for _ in range(2):
            loss = model(input_ids=ids)
            loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        if cache:
            assert model.base_model.prefix_cache.stats()["served_forwards"] == 1
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


@pytest.mark.parametrize("folder", ["/proc/nope/cache", "/dev/null/cache"])
def test_a_cache_dir_that_cannot_be_written_is_refused_when_the_model_is_built(tiny, folder):
    # issue 21.10: it passed SAFEConfig and failed at the first row spilled to disk, inside a forward hook
    config = tiny.safe_config("llama", cache_frozen=True, cache_dir=folder)
    with pytest.raises(ValueError, match=f"cache_dir '{folder}' cannot hold.*cache_dir=None"):
        get_peft_model(tiny.llama(layers=2), config)


def test_a_writable_cache_dir_is_made_when_the_model_is_built(tiny, tmp_path):
    folder = tmp_path / "rows"
    get_peft_model(tiny.llama(layers=2), tiny.safe_config("llama", cache_frozen=True, cache_dir=str(folder)))
    assert folder.is_dir() and not list(folder.iterdir())


def test_cache_frozen_on_an_encoder_decoder_model_is_refused_with_the_fix():
    # issue 21.7: on T5 it was accepted and did nothing (no frozen prefix across two stacks)
    from peft import LoraConfig
    from transformers import T5Config, T5ForConditionalGeneration

    base = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2))
    config = SAFEConfig(adapter_config=LoraConfig(target_modules=["q", "v"]), cache_frozen=True)
    with pytest.raises(ValueError, match="cache_frozen needs the adapter units in one block list.*cache_frozen=False"):
        get_peft_model(base, config)
