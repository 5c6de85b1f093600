"""SAFE checkpoints: the freeze state travels with the adapter weights and comes back exactly, or loading fails."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from peft_safe import SAFEConfig

pytestmark = pytest.mark.usefixtures("single_thread_torch")

FREEZE_STATE_KEY = "base_model.safe_freeze_state"
LAYERS = 4
FROZEN = ["bert.encoder.layer.0", "bert.encoder.layer.2"]


def safe_config(tiny) -> SAFEConfig:
    # warm-up capped at t=1, threshold rising to tau (on scores normalised to the top unit) at t=4
    return tiny.safe_config("bert", tau=0.9, final_freeze_time=4, warmup_cap=1)


def new_safe(tiny, layers: int = LAYERS, hidden: int = 32, adapter_seed: int = 1) -> PeftModel:
    base = tiny.bert(layers=layers, hidden=hidden)
    torch.manual_seed(adapter_seed)
    return get_peft_model(base, safe_config(tiny))


def requires_grad_of(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def lora_trainable_units(tiny, model) -> set[str]:
    """Units (block paths) that hold at least one adapter parameter with requires_grad=True."""
    units = set()
    for name, param in tiny.adapter_params(model).items():
        for i in range(LAYERS):
            if tiny.in_unit(name, f"bert.encoder.layer.{i}") and param.requires_grad:
                units.add(f"bert.encoder.layer.{i}")
    return units


PROBE_SEED = 11


def scored_model(tiny) -> PeftModel:
    """A SAFE model scored twice (warm-up ends at t=1) with two units frozen by hand."""
    model = new_safe(tiny)
    safe = model.base_model
    probe = [tiny.batch(batch=2, seq=8, seed=PROBE_SEED)]
    safe.update_and_freeze(0, probe)
    safe.update_and_freeze(1, probe)
    assert safe.freeze_state.warmup_end == 1 and safe.frozen_units == []
    safe.freeze(FROZEN)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny, single_thread_torch):
    path = tmp_path_factory.mktemp("safe_ckpt")
    model = scored_model(tiny)
    batch = tiny.batch(batch=3, seq=9, seed=12)
    logits = tiny.logits(model, batch)
    state = model.base_model.freeze_state.to_dict()
    model.save_pretrained(path)
    probe = [tiny.batch(batch=2, seq=8, seed=PROBE_SEED)]
    return {"path": path, "model": model, "batch": batch, "logits": logits, "state": state, "probe": probe}


def rewrite_freeze_state(src, dst, payload: torch.Tensor) -> None:
    """Copy a checkpoint, replacing the freeze-state tensor."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    assert FREEZE_STATE_KEY in tensors
    tensors[FREEZE_STATE_KEY] = payload
    save_file(tensors, dst / "adapter_model.safetensors")


def json_payload(data) -> torch.Tensor:
    return torch.tensor(list(json.dumps(data).encode("utf-8")), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- round trip
def test_checkpoint_holds_the_freeze_state_as_uint8_json(saved):
    tensors = load_file(saved["path"] / "adapter_model.safetensors")
    payload = tensors[FREEZE_STATE_KEY]
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    data = json.loads(bytes(payload.tolist()).decode("utf-8"))
    assert sorted(data["frozen"]) == FROZEN
    assert [entry["t"] for entry in data["history"]] == [0, 1]
    assert data["warmup_end"] == 1


def test_reload_trainable_restores_frozen_units_history_and_outputs(saved, tiny):
    model = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), saved["path"], is_trainable=True)
    safe = model.base_model
    assert safe.frozen_units == FROZEN
    assert safe.adapter_units == [f"bert.encoder.layer.{i}" for i in range(LAYERS)]
    assert safe.freeze_state.to_dict() == saved["state"]
    assert safe.freeze_state.warmup_end == 1
    assert [entry["t"] for entry in safe.freeze_state.history] == [0, 1]
    assert safe.raw_importance == saved["model"].base_model.raw_importance
    # requires_grad exactly as in the saved model: off on the frozen units, on for the rest and the head
    assert requires_grad_of(model) == requires_grad_of(saved["model"])
    assert lora_trainable_units(tiny, model) == {"bert.encoder.layer.1", "bert.encoder.layer.3"}
    assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    torch.testing.assert_close(tiny.logits(model, saved["batch"]), saved["logits"], rtol=0, atol=0)


def test_reload_for_inference_freezes_everything_and_reproduces_outputs(saved, tiny):
    model = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), saved["path"], is_trainable=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.base_model.frozen_units == FROZEN
    torch.testing.assert_close(tiny.logits(model, saved["batch"]), saved["logits"], rtol=0, atol=0)


def test_resumed_schedule_continues_like_an_uninterrupted_one(saved, tiny):
    resumed = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), saved["path"], is_trainable=True)
    uninterrupted = scored_model(tiny)  # the same run, never saved
    newly = []
    for t in (2, 3, 4):
        expected = uninterrupted.base_model.update_and_freeze(t, saved["probe"])
        assert resumed.base_model.update_and_freeze(t, saved["probe"]) == expected, t
        newly += expected
    assert newly  # the rising threshold froze something after the resume
    assert resumed.base_model.freeze_state.to_dict() == uninterrupted.base_model.freeze_state.to_dict()
    assert requires_grad_of(resumed) == requires_grad_of(uninterrupted)
    # time cannot go back past the restored history
    with pytest.raises(ValueError, match="before"):
        resumed.base_model.update_and_freeze(0.5, saved["probe"])


def test_merge_and_unload_returns_the_plain_model_with_the_same_outputs(saved, tiny):
    model = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), saved["path"])
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(tiny.logits(merged, saved["batch"]), saved["logits"], rtol=1e-5, atol=1e-6)


def test_trainer_style_load_adapter_restores_the_state(saved, tiny):
    model = new_safe(tiny, adapter_seed=99)  # other adapter values, nothing frozen, no history
    assert model.base_model.frozen_units == []
    model.load_adapter(saved["path"], adapter_name="default", is_trainable=True)
    safe = model.base_model
    assert safe.frozen_units == FROZEN
    assert safe.freeze_state.to_dict() == saved["state"]
    assert lora_trainable_units(tiny, model) == {"bert.encoder.layer.1", "bert.encoder.layer.3"}
    torch.testing.assert_close(tiny.logits(model, saved["batch"]), saved["logits"], rtol=0, atol=0)


def test_load_adapter_replaces_an_existing_freeze_state_exactly(saved, tiny):
    model = new_safe(tiny)
    model.base_model.freeze(["bert.encoder.layer.1"])  # frozen here, trainable in the checkpoint
    model.load_adapter(saved["path"], adapter_name="default", is_trainable=True)
    assert model.base_model.frozen_units == FROZEN
    assert lora_trainable_units(tiny, model) == {"bert.encoder.layer.1", "bert.encoder.layer.3"}


def test_optimizer_saved_after_freezing_loads_into_one_rebuilt_from_the_reloaded_model(saved, tiny, tmp_path):
    # the Trainer rebuilds its optimizer from the parameters that require grad, then loads optimizer.pt
    model = new_safe(tiny)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    labels = torch.tensor([0, 1, 0])
    model(**saved["batch"], labels=labels).loss.backward()
    optimizer.step()
    model.base_model.freeze(FROZEN, optimizer=optimizer)
    model.save_pretrained(tmp_path)
    optimizer_state = optimizer.state_dict()

    reloaded = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path, is_trainable=True)
    rebuilt = torch.optim.AdamW([p for p in reloaded.parameters() if p.requires_grad], lr=1e-3)
    rebuilt.load_state_dict(optimizer_state)
    assert len(rebuilt.state) == sum(p.requires_grad for p in reloaded.parameters())


def test_adapter_saved_under_one_name_loads_under_another(tiny, tmp_path):
    base = tiny.bert(layers=LAYERS)
    torch.manual_seed(1)
    model = get_peft_model(base, safe_config(tiny), adapter_name="first")
    model.base_model.freeze([3])
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(
        tiny.bert(layers=LAYERS), tmp_path / "first", adapter_name="second", is_trainable=True
    )
    assert reloaded.active_adapter == "second"
    assert reloaded.base_model.frozen_units == ["bert.encoder.layer.3"]


def test_pickle_format_checkpoint_keeps_the_freeze_state(tiny, tmp_path):
    model = new_safe(tiny)
    model.base_model.freeze([1])
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    reloaded = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path, is_trainable=True)
    assert reloaded.base_model.frozen_units == ["bert.encoder.layer.1"]


# ---------------------------------------------------------------------------------------------- refusals
def test_plain_lora_checkpoint_with_a_safe_config_raises(tiny, tmp_path):
    torch.manual_seed(1)
    lora = get_peft_model(tiny.bert(layers=LAYERS), tiny.lora("bert"))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="SAFE"):
        PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path, config=safe_config(tiny))


@pytest.mark.parametrize(
    ("layers", "hidden", "named"),
    [(LAYERS + 2, 32, "bert.encoder.layer.5"), (LAYERS - 1, 32, "bert.encoder.layer.3"), (LAYERS, 48, "48")],
    ids=["more-layers", "fewer-layers", "wider"],
)
def test_checkpoint_onto_another_shape_raises(saved, tiny, layers, hidden, named):
    base = tiny.bert(layers=layers, hidden=hidden)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(base, saved["path"], is_trainable=True)
    message = str(info.value)
    assert "checkpoint" in message and named in message  # names what does not fit


@pytest.mark.parametrize(("layers", "hidden"), [(LAYERS + 2, 32), (LAYERS, 48)])
def test_failed_load_leaves_the_existing_adapter_untouched(saved, tiny, layers, hidden):
    model = new_safe(tiny, layers=layers, hidden=hidden, adapter_seed=5)
    model.base_model.freeze([1])
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = requires_grad_of(model)
    state = model.base_model.freeze_state.to_dict()
    with pytest.raises(ValueError):
        model.load_adapter(saved["path"], adapter_name="default", is_trainable=True)
    assert model.base_model.freeze_state.to_dict() == state
    assert requires_grad_of(model) == grads
    for name, param in model.named_parameters():
        assert torch.equal(param, values[name]), name


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (torch.tensor([0xFF, 0xFE, 0x00, 0x81], dtype=torch.uint8), ["corrupt"]),
        (torch.tensor(list(b"{not json"), dtype=torch.uint8), ["JSON"]),
        (json_payload(["a", "list"]), ["JSON object"]),
        (None, ["format_version", "99"]),  # filled in below from the real state
        (torch.zeros(4, dtype=torch.float32), ["byte"]),
    ],
    ids=["garbage-bytes", "not-json", "json-list", "format-99", "float-tensor"],
)
def test_corrupt_freeze_state_raises(saved, tiny, tmp_path, payload, words):
    if payload is None:
        payload = json_payload({**saved["state"], "format_version": 99})
    rewrite_freeze_state(saved["path"], tmp_path / "bad", payload)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path / "bad", is_trainable=True)
    for word in words:
        assert word in str(info.value)


def test_freeze_state_naming_units_the_model_lacks_raises(saved, tiny, tmp_path):
    # format 1: a payload from before the seal, so the state's own check is what refuses it
    state = {**saved["state"], "frozen": {"bert.encoder.layer.9": 1}, "format_version": 1}
    rewrite_freeze_state(saved["path"], tmp_path / "bad", json_payload(state))
    with pytest.raises(ValueError, match="bert.encoder.layer.9"):
        PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path / "bad", is_trainable=True)
