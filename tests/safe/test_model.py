"""SAFEModel on tiny random BERT, GPT-2 and LLaMA: injection, adapter units, freezing, memory, the schedule.

Scoring (importance) is tested in test_scoring.py.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from peft.utils import get_peft_model_state_dict
from torch import nn

from peft_safe import SAFEConfig, SAFEModel
from peft_safe.measure import SavedTensorMeter

pytestmark = pytest.mark.usefixtures("single_thread_torch")

FREEZE_STATE_KEY = "base_model.safe_freeze_state"


# ---------------------------------------------------------------------------------------------- helpers
def unit_params(tiny, model, unit: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in tiny.adapter_params(model).items() if tiny.in_unit(n, unit)}


def requires_grad_map(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = torch.arange(batch["input_ids"].shape[0]) % 2
    return model(**batch, labels=labels).loss


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class SequentialNet(nn.Module):
    """Blocks in an nn.Sequential (no nn.ModuleList anywhere) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(Block(), Block(), Block())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ListNet(nn.Module):
    """Blocks in an nn.ModuleList and an adapted head outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block(), Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def custom_safe(net: nn.Module, targets: list[str], **kwargs) -> PeftModel:
    torch.manual_seed(2)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    return get_peft_model(net, SAFEConfig(adapter_config=lora, **kwargs))


# ---------------------------------------------------------------------------------------------- injection
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_injection_is_plain_lora(tiny, arch):
    base = tiny.model(arch, layers=2, seed=0)
    batch = tiny.batch(batch=2, seq=6, seed=3)
    torch.manual_seed(7)
    safe = get_peft_model(copy.deepcopy(base), tiny.safe_config(arch))
    torch.manual_seed(7)
    lora = get_peft_model(copy.deepcopy(base), tiny.lora(arch))

    assert isinstance(safe.base_model, SAFEModel) and isinstance(safe.base_model, LoraModel)
    safe_params, lora_params = dict(safe.named_parameters()), dict(lora.named_parameters())
    assert list(safe_params) == list(lora_params)
    for name, param in lora_params.items():
        assert torch.equal(safe_params[name], param), name
        assert safe_params[name].requires_grad == param.requires_grad, name
    # the adapters are not a no-op: the adapted output differs from the base output
    assert not torch.allclose(tiny.logits(lora, batch), tiny.logits(base, batch))
    torch.testing.assert_close(tiny.logits(safe, batch), tiny.logits(lora, batch), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_saved_adapter_weights_are_plain_lora_plus_the_freeze_state(tiny, arch):
    base = tiny.model(arch, layers=2, seed=0)
    torch.manual_seed(7)
    safe = get_peft_model(copy.deepcopy(base), tiny.safe_config(arch))
    torch.manual_seed(7)
    lora = get_peft_model(copy.deepcopy(base), tiny.lora(arch))
    safe_state, lora_state = get_peft_model_state_dict(safe), get_peft_model_state_dict(lora)
    assert set(safe_state) - set(lora_state) == {FREEZE_STATE_KEY}
    assert set(lora_state) <= set(safe_state)
    for key, value in lora_state.items():
        assert torch.equal(safe_state[key], value), key
    assert safe_state[FREEZE_STATE_KEY].dtype == torch.uint8


# ---------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_one_unit_per_block_input_side_first(tiny, arch):
    model = tiny.safe(arch, layers=3)
    assert model.base_model.adapter_units == [f"{tiny.blocks[arch]}.{i}" for i in range(3)]


def test_units_follow_block_index_order_past_ten(tiny):
    model = tiny.safe("bert", layers=12)
    assert model.base_model.adapter_units == [f"bert.encoder.layer.{i}" for i in range(12)]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_only_blocks_holding_adapters_are_units(tiny, arch):
    model = tiny.safe(arch, layers=4, lora=tiny.lora(arch, layers_to_transform=[1, 3]))
    assert model.base_model.adapter_units == [f"{tiny.blocks[arch]}.1", f"{tiny.blocks[arch]}.3"]


def test_adapted_layer_outside_the_blocks_is_its_own_unit_in_input_order(tiny):
    lora = tiny.lora("bert", target_modules=["word_embeddings", "query", "value"])
    model = tiny.safe("bert", layers=2, lora=lora)
    assert model.base_model.adapter_units == [
        "bert.embeddings.word_embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
    ]


def test_blocks_path_naming_the_detected_list_gives_the_same_units(tiny):
    model = tiny.safe("bert", layers=3, blocks_path="bert.encoder.layer")
    assert model.base_model.adapter_units == [f"bert.encoder.layer.{i}" for i in range(3)]


def test_model_without_module_list_gives_one_unit_per_adapted_module():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    model = custom_safe(mlp, ["0", "2"])
    safe = model.base_model
    assert safe.adapter_units == ["0", "2"]
    scores = safe.compute_importance([torch.randn(5, 8)])
    assert set(scores) == {"0", "2"}
    safe.freeze(["0"])
    assert not any(p.requires_grad for p in safe.model[0].lora_A.parameters())
    assert all(p.requires_grad for p in safe.model[2].lora_A.parameters())


def test_blocks_in_a_sequential_are_detected_like_a_module_list():
    # issue 21.6: timm-style blocks (an nn.Sequential of blocks) were single-layer units: freeze([0, 1]) froze two
    # layers of one block and there was no cut; blocks_path="body" was needed
    torch.manual_seed(0)
    auto = custom_safe(SequentialNet(), ["fc1", "fc2", "head"])
    assert auto.base_model.adapter_units == ["body.0", "body.1", "body.2", "head"]
    auto.base_model.freeze([0, 1])
    assert auto.base_model.backprop_cut_block == "body.2"
    torch.manual_seed(0)
    by_path = custom_safe(SequentialNet(), ["fc1", "fc2", "head"], blocks_path="body")
    assert by_path.base_model.adapter_units == ["body.0", "body.1", "body.2", "head"]
    by_path.base_model.freeze(["body.1"])
    frozen = {n for n, p in by_path.named_parameters() if "lora_" in n and not p.requires_grad}
    assert frozen and all(".body.1." in n for n in frozen)
    assert len(frozen) == 4  # fc1 and fc2, A and B


def test_module_list_blocks_are_detected_and_an_outside_layer_is_its_own_unit():
    torch.manual_seed(0)
    model = custom_safe(ListNet(), ["fc1", "fc2", "head"])
    assert model.base_model.adapter_units == ["blocks.0", "blocks.1", "blocks.2", "head"]


class NamedBlocksNet(nn.Module):
    """Blocks in an nn.Sequential built from an OrderedDict: children named, not numbered."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(OrderedDict(first=Block(), second=Block()))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_blocks_path_naming_a_sequential_with_named_children():
    torch.manual_seed(0)
    model = custom_safe(NamedBlocksNet(), ["fc1", "fc2"], blocks_path="body")
    assert model.base_model.adapter_units == ["body.first", "body.second"]


def test_missing_blocks_path_raises_naming_it(tiny):
    with pytest.raises(ValueError, match="bert.encoder.blocks"):
        tiny.safe("bert", blocks_path="bert.encoder.blocks")


def test_blocks_path_that_is_not_a_list_raises(tiny):
    with pytest.raises(ValueError, match="bert.encoder"):
        tiny.safe("bert", blocks_path="bert.encoder")


# ---------------------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("selector", ["bert.encoder.layer.1", 1, -2])
def test_freeze_turns_off_exactly_the_units_parameters(tiny, selector):
    model = tiny.safe("bert", layers=3)
    safe = model.base_model
    before = requires_grad_map(model)
    target = unit_params(tiny, model, "bert.encoder.layer.1")
    assert len(target) == 4 and all(p.requires_grad for p in target.values())

    assert safe.freeze([selector]) == ["bert.encoder.layer.1"]
    assert safe.frozen_units == ["bert.encoder.layer.1"]
    after = requires_grad_map(model)
    assert {n for n in after if after[n] != before[n]} == set(target)
    assert not any(after[n] for n in target)
    # the classifier head (modules_to_save) and the other units still train
    assert any(after[n] for n in after if "classifier" in n)


def test_freeze_twice_reports_nothing_new(tiny):
    safe = tiny.safe("bert", layers=3).base_model
    assert safe.freeze([0, 2]) == ["bert.encoder.layer.0", "bert.encoder.layer.2"]
    assert safe.freeze(["bert.encoder.layer.0", 1]) == ["bert.encoder.layer.1"]
    assert safe.frozen_units == [f"bert.encoder.layer.{i}" for i in range(3)]


@pytest.mark.parametrize("unit", ["bert.encoder.layer.7", "layer.0", "encoder.layer.0", 3, -4])
def test_freeze_unknown_unit_raises_and_freezes_nothing(tiny, unit):
    model = tiny.safe("bert", layers=3)
    before = requires_grad_map(model)
    with pytest.raises(ValueError, match=str(unit)):
        model.base_model.freeze([0, unit])
    assert model.base_model.frozen_units == []
    assert requires_grad_map(model) == before


def test_freeze_releases_gradients_of_the_unit_only(tiny):
    model = tiny.safe("bert", layers=3)
    model.train()
    loss_of(model, tiny.batch()).backward()
    adapters = tiny.adapter_params(model)
    assert all(p.grad is not None for p in adapters.values())
    model.base_model.freeze([0])
    for name, param in adapters.items():
        if tiny.in_unit(name, "bert.encoder.layer.0"):
            assert param.grad is None, name
        else:
            assert param.grad is not None, name


def test_freeze_deletes_optimizer_state_of_frozen_parameters_only(tiny):
    model = tiny.safe("bert", layers=3)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_of(model, tiny.batch()).backward()
    optimizer.step()
    optimizer.zero_grad()
    adapters = tiny.adapter_params(model)
    assert all(p in optimizer.state for p in adapters.values())
    unit = "bert.encoder.layer.2"
    kept = {n: copy.deepcopy(optimizer.state[p]) for n, p in adapters.items() if not tiny.in_unit(n, unit)}

    model.base_model.freeze(["bert.encoder.layer.2"], optimizer=optimizer)
    for name, param in adapters.items():
        if tiny.in_unit(name, "bert.encoder.layer.2"):
            assert param not in optimizer.state, name
        else:
            assert torch.equal(optimizer.state[param]["exp_avg"], kept[name]["exp_avg"]), name

    # a later step neither recreates their state nor moves them
    frozen_values = {n: p.detach().clone() for n, p in adapters.items() if tiny.in_unit(n, "bert.encoder.layer.2")}
    loss_of(model, tiny.batch(seed=2)).backward()
    optimizer.step()
    for name, value in frozen_values.items():
        assert adapters[name] not in optimizer.state
        assert torch.equal(adapters[name], value), name


def _set_adapter(model, tiny):
    model.set_adapter("default")


def _enable_adapter_layers(model, tiny):
    model.base_model.enable_adapter_layers()


def _disable_adapter_context(model, tiny):
    with model.disable_adapter():
        model(**tiny.batch())


def _disable_then_enable_layers(model, tiny):
    model.base_model.disable_adapter_layers()
    model.base_model.enable_adapter_layers()


def _compute_importance(model, tiny):
    model.base_model.compute_importance([tiny.batch()])


def _train_and_eval(model, tiny):
    model.train()
    model.eval()


@pytest.mark.parametrize(
    "action",
    [
        _set_adapter,
        _enable_adapter_layers,
        _disable_adapter_context,
        _disable_then_enable_layers,
        _compute_importance,
        _train_and_eval,
    ],
)
def test_frozen_units_stay_frozen(tiny, action):
    model = tiny.safe("bert", layers=3)
    model.base_model.freeze([0, 2])
    expected = requires_grad_map(model)
    action(model, tiny)
    assert requires_grad_map(model) == expected
    assert model.base_model.frozen_units == ["bert.encoder.layer.0", "bert.encoder.layer.2"]
    unfrozen = unit_params(tiny, model, "bert.encoder.layer.1")
    assert all(p.requires_grad for p in unfrozen.values())


def test_freezing_does_not_change_the_output(tiny):
    model = tiny.safe("bert", layers=3)
    batch = tiny.batch(batch=3, seq=7)
    before = tiny.logits(model, batch)
    model.base_model.freeze([0, 1])
    torch.testing.assert_close(tiny.logits(model, batch), before, rtol=0, atol=0)


def test_training_step_moves_only_unfrozen_adapters(tiny):
    model = tiny.safe("bert", layers=3)
    model.base_model.freeze(["bert.encoder.layer.1"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for seed in (1, 2):
        optimizer.zero_grad()
        loss_of(model, tiny.batch(seed=seed)).backward()
        optimizer.step()
    adapters = tiny.adapter_params(model)
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if name in adapters:
            assert changed != tiny.in_unit(name, "bert.encoder.layer.1"), name
        elif "classifier" not in name:
            assert not changed, name  # base weights never move


# ---------------------------------------------------------------------------------------------- memory
def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    model.train()
    with SavedTensorMeter(exclude=model) as meter:
        loss = loss_of(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.activation_bytes


@pytest.fixture(scope="module")
def memory_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (4, 32), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_freezing_bottom_units_truncates_backprop(tiny, memory_batch):
    plain = get_peft_model(tiny.bert(layers=12), tiny.lora("bert", init_lora_weights=True))
    plain_bytes = saved_activation_bytes(plain, memory_batch)

    model = tiny.safe("bert", layers=12, lora=tiny.lora("bert", init_lora_weights=True))
    unfrozen = saved_activation_bytes(model, memory_batch)
    assert unfrozen == plain_bytes  # SAFE adds nothing to the graph before freezing
    model.base_model.freeze(list(range(6)))
    bottom = saved_activation_bytes(model, memory_batch)
    assert bottom <= 0.6 * plain_bytes


def test_freezing_middle_units_saves_much_less_than_bottom_units(tiny, memory_batch):
    def bytes_with(frozen: list[int]) -> int:
        model = tiny.safe("bert", layers=12, lora=tiny.lora("bert", init_lora_weights=True))
        model.base_model.freeze(frozen)
        return saved_activation_bytes(model, memory_batch)

    unfrozen = bytes_with([])
    bottom_saving = unfrozen - bytes_with(list(range(6)))
    middle_saving = unfrozen - bytes_with(list(range(3, 9)))
    assert middle_saving >= 0
    assert middle_saving < 0.25 * bottom_saving


# ---------------------------------------------------------------------------------------------- schedule
def test_update_and_freeze_freezes_units_below_the_threshold(tiny):
    # raw scale, tau at its maximum, warm-up capped at t=1 and t_f=2: at t=2 the threshold is tau = 1,
    # so every unit (raw score < 1) lies below it and all but the top of the prefix freeze (one unit always
    # trains); at t=1 the threshold is 0 and nothing freezes.
    model = tiny.safe("bert", layers=3, tau=1.0, final_freeze_time=2, warmup_cap=1, importance_scale="raw")
    safe = model.base_model
    batches = [tiny.batch()]
    assert safe.update_and_freeze(0, batches) == []
    assert safe.update_and_freeze(1, batches) == []
    assert safe.freeze_state.warmup_end == 1
    newly = safe.update_and_freeze(2, batches)
    assert newly == safe.adapter_units[:-1]
    assert safe.frozen_units == safe.adapter_units[:-1]
    top = safe.adapter_units[-1]
    assert all(p.requires_grad == tiny.in_unit(n, top) for n, p in tiny.adapter_params(model).items())


def test_one_scoring_and_freezing_walks_the_model_for_units_once(tiny, monkeypatch):
    # issue 23: update_and_freeze found the units five times (check, score, freeze, apply, locate the prefix)
    from peft_safe.safe.method import freezing

    model = tiny.safe("bert", layers=3, tau=1.0, final_freeze_time=2, warmup_cap=1, importance_scale="raw")
    safe = model.base_model
    walks = []
    find = freezing.find_adapter_units
    monkeypatch.setattr(freezing, "find_adapter_units", lambda *a, **k: walks.append(a[1]) or find(*a, **k))
    for t in (0, 1, 2):
        walks.clear()
        newly = safe.update_and_freeze(t, [tiny.batch()])
        assert walks == ["default"], (t, walks)
    assert newly == safe.adapter_units[:-1]  # the last call froze, so the walk served the freeze and the cut too
    assert safe.backprop_cut_block == safe.adapter_units[-1]
    walks.clear()
    assert safe.adapter_units and walks == ["default"]  # outside a scoring the units are found afresh


def test_untrained_adapters_scoring_zero_neither_end_warmup_nor_freeze(tiny):
    # issue 13.1: LoRA's B = 0 scores every unit exactly 0; 0 == 0 used to count as "settled" and the next
    # scoring froze every unit.
    model = tiny.safe("bert", layers=3, lora=tiny.lora(init_lora_weights=True), final_freeze_time=4)
    safe = model.base_model
    for t in (1, 2, 3):
        with pytest.warns(RuntimeWarning, match="every unit scored 0"):
            assert safe.update_and_freeze(t, [tiny.batch()]) == []
    assert safe.freeze_state.warmup_end is None  # not even the warm-up cap (t=2) ends it on such scores
    assert safe.frozen_units == []
    assert [h["t"] for h in safe.freeze_state.history] == [1, 2, 3]


def test_scoring_twice_at_the_same_time_is_refused_and_changes_nothing(tiny):
    # issue 13.4: two identical score vectors ended warm-up at once
    safe = tiny.safe("bert", layers=3).base_model
    safe.update_and_freeze(1, [tiny.batch()])
    before = safe.freeze_state.to_dict()
    with pytest.raises(ValueError, match="previous scoring"):
        safe.update_and_freeze(1, [tiny.batch()])
    assert safe.freeze_state.to_dict() == before
    assert safe.freeze_state.warmup_end is None


@pytest.mark.parametrize("value", [3, -1, 0, float("nan"), "0.3"])
def test_hyper_parameter_changed_in_place_is_checked_on_assignment(tiny, value):
    # issue 13.3: model.peft_config["default"].tau = 3 was accepted and froze every unit at the next scoring;
    # tau = -1 raised only after the history had moved.
    model = tiny.safe("bert", layers=3)
    safe = model.base_model
    safe.update_and_freeze(1, [tiny.batch()])
    before = safe.freeze_state.to_dict()
    with pytest.raises(ValueError, match="tau"):
        model.peft_config["default"].tau = value
    assert model.peft_config["default"].tau == 0.3
    safe.safe_config.__dict__["tau"] = value  # even a value slipped past the setter is refused before scoring
    with pytest.raises(ValueError, match="tau"):
        safe.update_and_freeze(2, [tiny.batch()])
    assert safe.freeze_state.to_dict() == before


def test_hyper_parameter_changed_in_place_to_a_valid_value_is_used(tiny):
    model = tiny.safe("bert", layers=3)
    model.peft_config["default"].tau = 0.6
    assert model.base_model.schedule.tau == 0.6


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_scoring_freezing_and_saving_after_the_adapters_are_gone_are_refused(tiny, tmp_path, how):
    # issues 13.7 and 13.15: update_and_freeze recorded an empty scoring, freeze said "0 units", and
    # save_pretrained over a good checkpoint wrote a weights file holding only the freeze state.
    model = tiny.safe("bert", layers=3)
    model.save_pretrained(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "README.md"}
    safe = model.base_model
    getattr(model, how)()
    before = safe.freeze_state.to_dict()
    for call in (
        lambda: safe.update_and_freeze(1, [tiny.batch()]),
        lambda: safe.freeze([0]),
        lambda: safe.compute_importance([tiny.batch()]),
        lambda: model.save_pretrained(tmp_path),
        lambda: model.save_pretrained(tmp_path, safe_serialization=False),
    ):
        with pytest.raises(ValueError, match=r"no longer in the model \(merge_and_unload\(\) or unload\(\)"):
            call()
    assert safe.freeze_state.to_dict() == before
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "README.md"} == files
    reloaded = PeftModel.from_pretrained(tiny.bert(layers=3), tmp_path)  # the good checkpoint still loads
    assert reloaded.base_model.adapter_units == [f"bert.encoder.layer.{i}" for i in range(3)]


def test_freeze_names_each_unit_once(tiny):
    # issue 13.12: the same unit by index and by name was reported three times as newly frozen
    safe = tiny.safe("bert", layers=3).base_model
    assert safe.freeze([0, "bert.encoder.layer.0", 0]) == ["bert.encoder.layer.0"]
    assert safe.frozen_units == ["bert.encoder.layer.0"]


@pytest.mark.parametrize("at", ["yesterday", float("nan"), float("inf"), -1, True])
def test_freeze_refuses_a_bad_time_and_the_checkpoint_stays_loadable(tiny, tmp_path, at):
    # issue 13.14: at="yesterday" saved fine and every later load was refused; NaN broke save_pretrained.
    model = tiny.safe("bert", layers=3)
    with pytest.raises(ValueError, match="freeze time at"):
        model.base_model.freeze([0], at=at)
    assert model.base_model.frozen_units == []
    model.base_model.freeze([0], at=2)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny.bert(layers=3), tmp_path, is_trainable=True)
    assert reloaded.base_model.freeze_state.frozen == {"bert.encoder.layer.0": 2}


def test_numpy_and_torch_scalars_are_numbers_and_indices(tiny, tmp_path):
    # issue 13.17: freeze([np.int64(1)]) said "unknown adapter unit np.int64(1)"
    import numpy as np

    model = tiny.safe("bert", layers=3)
    safe = model.base_model
    assert safe.freeze([np.int64(1)], at=np.float32(0.5)) == ["bert.encoder.layer.1"]
    assert safe.freeze(torch.tensor(0)) == ["bert.encoder.layer.0"]
    safe.update_and_freeze(np.int64(1), [tiny.batch()])
    safe.update_and_freeze(torch.tensor(2.0), [tiny.batch()])
    assert [h["t"] for h in safe.freeze_state.history] == [1, 2.0]
    assert all(type(h["t"]) in (int, float) for h in safe.freeze_state.history)
    model.save_pretrained(tmp_path)  # the state is plain JSON


def test_deepcopy_gives_an_independent_safe_model(tiny):
    import copy

    model = tiny.safe("llama", layers=4)
    model.base_model.freeze([0, 1])
    clone = copy.deepcopy(model)
    assert type(clone.base_model) is type(model.base_model)
    batch = tiny.batch()
    torch.testing.assert_close(tiny.logits(clone, batch), tiny.logits(model, batch), rtol=0, atol=0)
    clone.base_model.freeze([2])
    assert model.base_model.frozen_units == ["model.layers.0", "model.layers.1"]
    assert model.base_model.backprop_cut_block == "model.layers.2"
    assert clone.base_model.backprop_cut_block == "model.layers.3"


# ---------------------------------------------------------------------------------------------- issue 13.8, 13.9
def test_units_outside_the_blocks_are_never_scored_nor_frozen_by_the_schedule(tiny):
    # issue 13.8: BitFit's embeddings.LayerNorm and pooler.dense units scored 0 (CKA cannot see a bias shift)
    # and froze first, even though the pooler feeds the classifier.
    from peft_safe import BitFitConfig

    model = get_peft_model(tiny.bert(layers=3), SAFEConfig(
        adapter_config=BitFitConfig(task_type="SEQ_CLS"), task_type="SEQ_CLS", tau=1.0, final_freeze_time=2,
        warmup_cap=1, importance_scale="raw"))
    safe = model.base_model
    outside = [u for u in safe.adapter_units if not u.startswith("bert.encoder.layer.")]
    assert outside, safe.adapter_units  # BitFit's defaults reach outside the blocks
    with torch.no_grad():  # biases that move the logits
        for name, param in model.named_parameters():
            if "bitfit" in name:
                param.add_(torch.randn_like(param))
    for t in (0, 1, 2):
        safe.update_and_freeze(t, [tiny.batch()])
    assert all(set(h["scores"]) == {f"bert.encoder.layer.{i}" for i in range(3)} for h in safe.freeze_state.history)
    assert not set(outside) & set(safe.frozen_units)
    assert safe.frozen_units == ["bert.encoder.layer.0", "bert.encoder.layer.1"]  # one block keeps training
    for unit in outside:
        assert all(p.requires_grad for n, p in model.named_parameters() if tiny.in_unit(n, unit) and "bitfit" in n)
    assert safe.freeze(outside) == outside  # by hand it still freezes


def _seq2seq(kind: str):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        base = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_heads=2, decoder_start_token_id=0))
        return base, ["q", "v"], "encoder.block", "decoder.block"
    base = BartForConditionalGeneration(BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    return base, ["q_proj", "v_proj"], "model.encoder.layers", "model.decoder.layers"


@pytest.mark.parametrize("site", ["adapter_output", "block_output"])
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_models_get_one_unit_per_block_on_both_stacks(tiny, kind, site):
    # issue 13.9: the encoder's q and v became one unit each while the decoder was per block
    base, targets, encoder, decoder = _seq2seq(kind)
    lora = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, SAFEConfig(adapter_config=lora, task_type="SEQ_2_SEQ_LM", scoring_site=site,
                                            tau=1.0, final_freeze_time=2, warmup_cap=1, importance_scale="raw"))
    safe = model.base_model
    units = [f"{encoder}.0", f"{encoder}.1", f"{decoder}.0", f"{decoder}.1"]
    assert safe.adapter_units == units
    ids = tiny.ids(batch=4, seq=8)
    probe = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids}]
    for t in (0, 1, 2):
        safe.update_and_freeze(t, probe)
    assert set(safe.raw_importance) == set(units)
    assert all(0 <= score <= 1 for score in safe.raw_importance.values())
    assert safe.frozen_units == units[:3]  # a bottom prefix, encoder first; the top decoder block trains
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if tiny.in_unit(n, units[0]))
    assert any(p.grad is not None for n, p in model.named_parameters() if tiny.in_unit(n, units[3]))


def test_add_weighted_adapter_builds_a_safe_adapter_from_a_replaced_config(tiny):
    # issue 14.6: peft's add_weighted_adapter builds the new config with dataclasses.replace(config, r=...)
    model = tiny.safe("llama")
    batch = tiny.batch()
    model.add_weighted_adapter(["default"], [1.0], "merged", combination_type="linear")
    assert type(model.peft_config["merged"]).__name__ == "SAFEConfig" and model.peft_config["merged"].r == 4
    expected = tiny.logits(model, batch)
    model.set_adapter("merged")
    safe = model.base_model
    assert safe.safe_adapter_name == "merged" and safe.adapter_units == ["model.layers.0", "model.layers.1"]
    assert torch.allclose(tiny.logits(model, batch), expected, atol=1e-5)  # weight 1, linear: the same adapter


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_a_model_let_go_carries_nothing_of_safe(tiny, how):
    # issue 21.16: the merged model still had SAFE's hooks; pickling it failed in PrefixCache.__setstate__
    import pickle

    model = tiny.safe("llama", layers=4, cache_frozen=True)
    model.train()
    batch = tiny.batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    model.base_model.freeze([0, 1])
    model(**batch, labels=batch["input_ids"])  # the cut and the cache's hooks are on the blocks now
    merged = getattr(model, how)()
    left = [(name, hook) for name, module in merged.named_modules()
            for hook in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
            if "peft_safe" in repr(hook)]
    assert not left, left
    again = pickle.loads(pickle.dumps(merged))
    torch.testing.assert_close(again(**batch).logits, merged(**batch).logits)


def test_a_forward_after_the_last_adapter_is_deleted_runs_the_base_model(tiny):
    # issue 21.17: the driver's hook raised IndexError at safe_adapter_name
    model = tiny.safe("llama", layers=4)
    model.train()
    base_logits = tiny.llama(layers=4)(**tiny.batch()).logits
    model(**tiny.batch())  # a training forward: the automatic schedule has started
    model.base_model.delete_adapter("default")
    logits = model.base_model(**tiny.batch()).logits  # the tuner's forward (PeftModel's needs an active adapter)
    torch.testing.assert_close(logits, base_logits)


def test_deleting_the_adapter_that_set_the_cut_removes_the_cut(tiny):
    # issue 21.8: backprop_cut_block still named the deleted adapter's cut
    from peft import LoraConfig

    alone = tiny.safe("llama", layers=4).base_model
    alone.freeze([0, 1])
    assert alone.backprop_cut_block == "model.layers.2"
    alone.delete_adapter("default")
    assert alone.backprop_cut_block is None
    model = tiny.safe("llama", layers=4)
    safe = model.base_model
    model.add_adapter("other", tiny.safe_config("llama", lora=LoraConfig(r=2, target_modules=["q_proj"])))
    safe.freeze([0, 1])
    assert safe.backprop_cut_block == "model.layers.2"
    model.delete_adapter("default")  # the active one: peft makes "other" active
    assert safe.backprop_cut_block is None
