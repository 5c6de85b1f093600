"""The prefix cache against inputs and changes a hostile user brings (issue 21, items 3, 4, 5 and 9): what a row is
keyed by (every input the frozen prefix receives), weights swapped rather than changed in place, inputs that never
repeat, and row files removed under a running cache (``peft_safe/safe/savings/prefix_cache.py``,
``prefix_rows.py``)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from prefix_pair import EXAMPLES, Pair, blocks, collate, epoch_batches

from peft_safe import SAFEConfig
from peft_safe.safe.savings.prefix_rows import RowKeys, row_keys

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def key(batch: dict, row: int = 0) -> bytes:
    keys = row_keys((), batch)
    assert isinstance(keys, RowKeys), keys
    return keys.keys[row]


# ---------------------------------------------------------------------------------------------- keys
def test_keys_ignore_trailing_padding_and_keep_leading_padding():
    row, other = ({"input_ids": ids, "labels": torch.tensor(0)} for ids in (torch.tensor([5, 6, 7]), torch.arange(6)))
    short, long, left = collate([row, row], "bert"), collate([row, other], "bert"), collate([row, other], "bert", True)
    keys = [key(b) for b in (short, long, left)]
    assert keys[0] == keys[1] and keys[0] != keys[2]
    typed = {"input_ids": short["input_ids"], "token_type_ids": torch.ones_like(short["input_ids"])}
    assert key(typed) != key({"input_ids": short["input_ids"]})


def test_every_input_reaching_the_prefix_is_in_the_key_and_the_loss_inputs_are_not():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    plain = key({"input_ids": ids})
    # issue 21.3: the same text with another image, or another flag, is another example
    assert key({"input_ids": ids, "pixel_values": torch.zeros(2, 3, 4, 4)}) != plain
    assert key({"input_ids": ids, "pixel_values": torch.zeros(2, 3, 4, 4)}) != key(
        {"input_ids": ids, "pixel_values": torch.ones(2, 3, 4, 4)})
    assert key({"input_ids": ids, "interpolate_pos_encoding": True}) != plain
    # a 4-D mask (refused before) keys each example by its own rows; a broadcast (1, seq) position_ids by its one row
    masks = torch.ones(2, 1, 3, 3)
    other_masks = masks.clone()
    other_masks[1] = torch.tril(torch.ones(3, 3))
    assert key({"input_ids": ids, "attention_mask": masks}) == key({"input_ids": ids, "attention_mask": other_masks})
    assert key({"input_ids": ids, "attention_mask": masks}, 1) != key(
        {"input_ids": ids, "attention_mask": other_masks}, 1)
    assert key({"input_ids": ids, "position_ids": torch.arange(3)[None]}) == key(
        {"input_ids": ids, "position_ids": torch.arange(3).expand(2, 3)})
    # what reaches only the loss or the output's form does not split examples
    assert key({"input_ids": ids, "labels": ids, "num_items_in_batch": torch.tensor(6), "return_dict": True,
                "output_hidden_states": None}) == plain


def test_a_batch_that_cannot_be_keyed_says_why():
    assert "inputs_embeds" in row_keys((), {"inputs_embeds": torch.zeros(2, 3, 4)})
    assert "'past_key_values'" in row_keys((), {"input_ids": torch.ones(2, 3, dtype=torch.long),
                                                "past_key_values": object()})
    assert "positional" in row_keys((torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)), {})


def tiny_llava(cache: bool) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=127))
    lora = LoraConfig(target_modules=r".*language_model.*\.(q_proj|v_proj)", r=4, init_lora_weights=False)
    model = get_peft_model(model, SAFEConfig(adapter_config=lora, cache_frozen=cache, task_type="CAUSAL_LM"))
    model.base_model.auto_driver.stand_down("the test freezes by hand")
    model.train()
    model.base_model.freeze([0, 1])
    return model


def test_the_same_text_with_another_image_is_computed_not_served():
    # issue 21.3, as found: LoRA on a tiny LLaVA's language model, the first image's hidden states were served
    # for the second image (the key held the text only)
    cached, plain = tiny_llava(True), tiny_llava(False)
    ids = torch.randint(1, 120, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 1:5] = 127  # four image tokens: the 2 x 2 patches of each image
    images = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for pixels in (images[0], images[0], images[1]):
        losses = [m(input_ids=ids, pixel_values=pixels, labels=ids).loss for m in (cached, plain)]
        assert float(losses[0]) == pytest.approx(float(losses[1]), abs=1e-5)
    assert cached.base_model.prefix_cache.stats()["served_forwards"] == 1  # the second forward only


# ---------------------------------------------------------------------------------------------- swapped weights
def swap(model, how: str) -> None:
    dense = blocks(model)[0].output.dense
    if how == "in_place":  # as a merge or load_state_dict would
        with torch.no_grad():
            dense.weight.mul_(1.5)
    elif how == "data":
        dense.weight.data = dense.weight.detach() * 1.5
    else:
        state = {k: v * 1.5 if k == "weight" else v for k, v in dense.state_dict().items()}
        dense.load_state_dict(state, assign=True)
        dense.weight.requires_grad_(False)


@pytest.mark.parametrize("how", ["in_place", "data", "assign"])
def test_a_weight_of_the_prefix_changed_or_replaced_drops_the_rows(tiny, how):
    # issue 21.4: the invalidation summed in-place version counters, which a replaced tensor does not move
    pair = Pair(tiny, "bert")
    pair.epoch(0)
    for model in pair.models:
        swap(model, how)
    pair.epoch(1)  # computed, not served: the stored rows came from the old weight
    assert pair.stats["served_forwards"] == 0 and pair.stats["invalidations"] == 1
    pair.epoch(2)
    assert pair.stats["served_forwards"] == 2
    pair.assert_same_adapters(tiny)


def test_a_model_moved_to_another_dtype_is_served_rows_of_that_dtype(tiny):
    pair = Pair(tiny, "bert")
    pair.epoch(0)
    pair.epoch(1)
    model = pair.cached.to(torch.bfloat16)
    batch = epoch_batches("bert", 2)[0]
    model(**batch).loss.backward()  # was: "expected m1 and m2 to have the same dtype" (float32 rows served)
    stats = pair.stats
    assert stats["invalidations"] == 1 and stats["served_forwards"] == 2
    assert stats["memory_bytes"] == int(batch["attention_mask"].sum()) * 32 * 2  # four rows again, in bfloat16
    model(**batch).loss.backward()
    assert pair.stats["served_forwards"] == 3


# ---------------------------------------------------------------------------------------------- growth
def fresh_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
    """Batches whose examples never repeat (on-the-fly masking): new ids every epoch."""
    gen = torch.Generator().manual_seed(500 + epoch)
    rows = [{"input_ids": torch.randint(4, 100, (6,), generator=gen), "labels": torch.tensor(i % 2)}
            for i in range(EXAMPLES)]
    return [collate(rows[j : j + 4], "bert") for j in range(0, EXAMPLES, 4)]


def test_inputs_that_never_repeat_stop_the_cache_with_a_warning_and_bounded_disk(tiny, tmp_path):
    row_bytes = 6 * 32 * 4
    pair = Pair(tiny, "bert", cache_memory_bytes=2 * row_bytes, cache_disk_bytes=3 * row_bytes,
                cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="no example came back before the cache filled .* caching stopped"):
        for batch in fresh_batches(0):  # 8 rows: 2 fit in memory, 3 on disk, then the store is full with no hit
            cached, plain = pair.step(batch)
            assert cached == pytest.approx(plain, abs=1e-5)
    stats = pair.stats
    assert stats["rows_in_memory"] == stats["rows_on_disk"] == 0 and stats["disk_bytes"] == 0
    assert "never repeat" in stats["refused"] and list(tmp_path.iterdir()) == []
    forwards = stats["forwards"]
    for batch in fresh_batches(1) + fresh_batches(2):  # an uncached run now (dropout back on in the prefix)
        pair.cached(**batch).loss.backward()
    assert pair.stats["forwards"] == forwards and pair.stats["rows_in_memory"] == 0  # stopped: not even looked up
    assert all(m.training for m in blocks(pair.cached)[0].modules())


def test_a_full_cache_keeps_serving_what_it_holds_and_stores_no_more(tiny, tmp_path):
    # the first batch's rows fit in memory; the disk takes none (0 bytes): later examples are computed in full
    pair = Pair(tiny, "bert", cache_memory_bytes=(3 + 8 + 5 + 6) * 32 * 4, cache_disk_bytes=0)
    first = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in _examples()[:4]], "bert")
    pair.step(first)
    assert pair.stats["rows_in_memory"] == 4
    pair.step(first)  # a hit: hits since the rows were stored, so a full store keeps them
    with pytest.warns(UserWarning, match="prefix cache is full .* cache_disk_bytes=0"):
        pair.step(collate(_examples()[4:], "bert"))
    pair.step(first)
    stats = pair.stats
    assert stats["served_forwards"] == 2 and stats["rows_in_memory"] == 4 and stats["rows_on_disk"] == 0
    pair.assert_same_adapters(tiny)


def _examples():
    from prefix_pair import examples

    return examples("bert")


@pytest.mark.parametrize("value", [-1, 1.5, "4GB", True])
def test_a_bad_disk_bound_names_the_value_and_the_fix(tiny, value):
    with pytest.raises(ValueError, match=f"cache_disk_bytes must be .*{value!r}"):
        SAFEConfig(adapter_config=tiny.lora(), cache_disk_bytes=value)


# ---------------------------------------------------------------------------------------------- lost files
def test_row_files_removed_under_the_cache_are_misses_said_once(tiny, tmp_path):
    # issue 21.9: a /tmp cleaner removed the folder mid-run: FileNotFoundError from inside a forward hook
    pair = Pair(tiny, "bert", cache_memory_bytes=0, cache_dir=str(tmp_path))
    pair.epoch(0)
    shutil.rmtree(pair.cached.base_model.prefix_cache.folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair.epoch(1)  # computed in full (and stored again), equal to the reference
    lost = [w for w in caught if "lost row files" in str(w.message)]
    assert len(lost) == 1
    assert pair.stats["served_forwards"] == 0 and pair.stats["rows_on_disk"] == EXAMPLES
    pair.epoch(2)
    assert pair.stats["served_forwards"] == 2
    pair.assert_same_adapters(tiny)
