"""Broken SAFE checkpoints fail with a clear error before the model changes; an interrupted save never loads as valid.

Each broken checkpoint is loaded the way the Trainer resumes (``load_adapter`` into an existing SAFE model with
the same adapter name) and the model is checked afterwards: parameter values, ``requires_grad`` flags and the
freeze state exactly as before.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_safe.safe.persistence.checkpoint import decode_payload, seal

pytestmark = pytest.mark.usefixtures("single_thread_torch")

FREEZE_STATE_KEY = "base_model.safe_freeze_state"
WEIGHTS = "adapter_model.safetensors"
LAYERS = 3


def make_model(tiny, tau: float = 0.9, r: int = 4, adapter_seed: int = 1):
    config = tiny.safe_config("bert", lora=tiny.lora("bert", r=r), tau=tau, final_freeze_time=4, warmup_cap=1)
    torch.manual_seed(adapter_seed)
    return get_peft_model(tiny.bert(layers=LAYERS), config)


def snapshot(model) -> dict:
    return {
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "state": model.base_model.freeze_state.to_dict(),
    }


def assert_untouched(model, before: dict) -> None:
    assert model.base_model.freeze_state.to_dict() == before["state"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["grads"]
    for name, param in model.named_parameters():
        assert torch.equal(param, before["values"][name]), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny, single_thread_torch):
    model = make_model(tiny)
    model.base_model.update_and_freeze(0, [tiny.batch(seed=3)])
    model.base_model.freeze([0])
    path = tmp_path_factory.mktemp("good")
    model.save_pretrained(path)
    model.save_pretrained(path / "bin", safe_serialization=False)
    return {"path": path, "state": model.base_model.freeze_state.to_dict(), "model": model}


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("bin"))
    return dst


def cut(fraction: float, name: str = WEIGHTS):
    def damage(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: int(len(data) * fraction)])

    return damage


def edit_tensors(change):
    def damage(path):
        tensors = load_file(path / WEIGHTS)
        change(tensors)
        save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})

    return damage


def edit_state(change, reseal: bool = True):
    """Edit the freeze-state JSON; ``reseal`` updates its seal, as a payload written that way would carry."""
    def touch(tensors):
        data = json.loads(bytes(tensors[FREEZE_STATE_KEY].tolist()).decode())
        change(data)
        if reseal and isinstance(data.get("integrity"), dict):
            data = seal(data)
        tensors[FREEZE_STATE_KEY] = torch.tensor(list(json.dumps(data).encode()), dtype=torch.uint8)

    return edit_tensors(touch)


def replace_in_state(old: str, new: str):
    """Replace text in the freeze-state bytes as an editor (or a damaged disk) would: no seal update."""
    def touch(tensors):
        text = bytes(tensors[FREEZE_STATE_KEY].tolist()).decode()
        assert old in text
        tensors[FREEZE_STATE_KEY] = torch.tensor(list(text.replace(old, new, 1).encode()), dtype=torch.uint8)

    return edit_tensors(touch)


def flip_lora_value(tensors):
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0


def edit_config(**changes):
    def damage(path):
        data = json.loads((path / "adapter_config.json").read_text())
        for key, value in changes.items():
            if key.startswith("adapter_config."):
                data["adapter_config"][key.split(".", 1)[1]] = value
            else:
                data[key] = value
        (path / "adapter_config.json").write_text(json.dumps(data))

    return damage


def remove(name):
    return lambda path: (path / name).unlink()


BROKEN = {
    # name: (damage, exception types, words the message must hold)
    "weights-truncated-half": (cut(0.5), (Exception,), ["incomplete metadata"]),
    "weights-truncated-one-byte": (cut(0.9999), (Exception,), ["incomplete metadata"]),
    "weights-empty": (cut(0.0), (Exception,), ["header"]),
    "tensor-bytes-flipped": (edit_tensors(flip_lora_value), (ValueError,), ["checksum", "corrupt"]),
    "state-names-unknown-units": (
        edit_state(lambda d: d.update(frozen={"bert.encoder.layer.9": 1})), (ValueError,), ["bert.encoder.layer.9"]),
    "state-units-of-another-model": (
        edit_state(lambda d: d.update(units=[f"bert.encoder.layer.{i}" for i in range(5)], frozen={})),
        (ValueError,), ["bert.encoder.layer.4", "units"]),
    "state-newer-format": (
        edit_state(lambda d: d.update(format_version=3)), (ValueError,), ["3", "upgrade peft_safe"]
    ),
    # issue 13.2: the freeze state itself had no checksum, so another unit frozen loaded silently
    "state-other-unit-frozen": (
        replace_in_state('"frozen": {"bert.encoder.layer.0"', '"frozen": {"bert.encoder.layer.1"'),
        (ValueError,), ["checksum", "corrupt"]),
    "state-seal-removed": (
        edit_state(lambda d: d["integrity"].pop("state_sha256"), reseal=False), (ValueError,), ["checksum"]),
    "state-integrity-removed": (edit_state(lambda d: d.pop("integrity"), reseal=False), (ValueError,), ["corrupt"]),
    "state-integrity-malformed": (edit_state(lambda d: d.update(integrity=[1, 2])), (ValueError,), ["integrity"]),
    "state-missing": (edit_tensors(lambda t: t.pop(FREEZE_STATE_KEY)), (ValueError,), ["no SAFE freeze state"]),
    "weights-missing": (remove(WEIGHTS), (Exception,), []),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_fails_and_leaves_the_model_untouched(saved, tiny, tmp_path, case):
    damage, types, words = BROKEN[case]
    path = copy_checkpoint(saved["path"], tmp_path / "ckpt")
    damage(path)
    model = make_model(tiny, adapter_seed=5)
    model.base_model.freeze([2])
    before = snapshot(model)
    with pytest.raises(types) as info:
        model.load_adapter(path, adapter_name="default", is_trainable=True)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert_untouched(model, before)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_truncated_bin_checkpoint_fails_and_leaves_the_model_untouched(saved, tiny, tmp_path, fraction):
    path = shutil.copytree(saved["path"] / "bin", tmp_path / "ckpt")
    cut(fraction, "adapter_model.bin")(path)
    model = make_model(tiny, adapter_seed=5)
    before = snapshot(model)
    with pytest.raises(Exception):  # noqa: B017 - torch.load's own error (OSError, RuntimeError, EOFError...)
        model.load_adapter(path, adapter_name="default", is_trainable=True)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"tau": 0.5, "warmup_tolerance": 0.2}, ["tau", "0.9", "0.5", "warmup_tolerance", "interrupted"]),
        ({"adapter_config.r": 8}, ["adapter_config.r", "4", "8"]),
        ({"adapter_config.target_modules": ["query"]}, ["adapter_config.target_modules", "value"]),
    ],
    ids=["safe-fields", "rank", "targets"],
)
def test_from_pretrained_with_a_stale_config_fails_naming_the_fields(saved, tiny, tmp_path, changes, words):
    # from_pretrained builds the adapter from adapter_config.json, then reads the weights
    path = copy_checkpoint(saved["path"], tmp_path / "ckpt")
    edit_config(**changes)(path)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(tiny.bert(layers=LAYERS), path, is_trainable=True)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_load_adapter_into_a_model_with_another_config_fails_and_leaves_it_untouched(saved, tiny):
    # the Trainer's resume path: the model's own config is used, and it must be the one the weights were saved with
    model = make_model(tiny, tau=0.5, adapter_seed=5)
    before = snapshot(model)
    with pytest.raises(ValueError, match="tau"):
        model.load_adapter(saved["path"], adapter_name="default", is_trainable=True)
    assert_untouched(model, before)


def test_fields_peft_changes_on_its_own_do_not_count_as_a_mismatch(saved, tiny, tmp_path):
    path = copy_checkpoint(saved["path"], tmp_path / "ckpt")
    edit_config(base_model_name_or_path="/elsewhere", inference_mode=False, peft_version="9.9.9",
                **{"adapter_config.base_model_name_or_path": "/elsewhere"})(path)
    for trainable in (True, False):
        model = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), path, is_trainable=trainable)
        assert model.base_model.freeze_state.to_dict() == saved["state"]


@pytest.mark.parametrize("init", [True, "gaussian", "orthogonal"])
def test_a_config_differing_only_in_an_init_that_keeps_the_base_loads(saved, tiny, tmp_path, init):
    # issue 21.19: how an adapter starts says nothing about trained weights (peft itself sets init_weights = True
    # before a PiSSA conversion); the checkpoint was saved with init_lora_weights=False (tiny configs start non-zero)
    path = copy_checkpoint(saved["path"], tmp_path / "ckpt")
    edit_config(**{"adapter_config.init_lora_weights": init, "adapter_config.loftq_config": {"loftq_bits": 4}})(path)
    model = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), path, is_trainable=True)
    assert model.base_model.freeze_state.to_dict() == saved["state"]
    for name, param in saved["model"].named_parameters():
        if "lora_" in name:
            assert torch.equal(model.get_parameter(name), param), name


def test_a_config_whose_init_rewrites_the_base_is_still_a_mismatch(saved, tiny, tmp_path):
    # PiSSA's adapter is trained against a rewritten base: loading it as a plain LoRA checkpoint is refused
    path = copy_checkpoint(saved["path"], tmp_path / "ckpt")
    edit_config(**{"adapter_config.init_lora_weights": "pissa"})(path)
    with pytest.raises(ValueError, match="init_lora_weights"):
        PeftModel.from_pretrained(tiny.bert(layers=LAYERS), path, is_trainable=True)


def test_checkpoint_without_an_integrity_record_still_loads(saved, tiny, tmp_path):
    # checkpoints written before the record existed (format 1)
    path = copy_checkpoint(saved["path"], tmp_path / "ckpt")
    edit_state(lambda d: (d.pop("integrity"), d.update(format_version=1)))(path)
    model = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), path, is_trainable=True)
    assert model.base_model.freeze_state.to_dict() == {**saved["state"], "format_version": 1}


def test_format_one_checkpoint_with_an_unsealed_integrity_record_still_loads(saved, tiny, tmp_path):
    # written by 0.2 before the state was sealed: the record checks the config and the tensors, not the state
    path = copy_checkpoint(saved["path"], tmp_path / "ckpt")
    edit_state(lambda d: (d["integrity"].pop("state_sha256"), d.update(format_version=1)), reseal=False)(path)
    model = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), path, is_trainable=True)
    assert model.base_model.frozen_units == ["bert.encoder.layer.0"]


def test_weights_file_records_the_config_and_every_adapter_tensor(saved):
    tensors = load_file(saved["path"] / WEIGHTS)
    record = json.loads(bytes(tensors.pop(FREEZE_STATE_KEY).tolist()).decode())["integrity"]
    assert record["config"]["tau"] == 0.9 and record["config"]["adapter_config"]["r"] == 4
    assert "inference_mode" not in record["config"]
    assert len(record["tensor_sha256"]) == sum(1 for k in tensors if "lora_" in k)


# ---------------------------------------------------------------------------------------------- interrupted saves
class PowerCut(Exception):
    pass


def interrupt_config_write(monkeypatch):
    """Saving stops after the weights file is written, before adapter_config.json (peft's order)."""

    def fail(*args, **kwargs):
        raise PowerCut("interrupted before adapter_config.json")

    monkeypatch.setattr(PeftConfig, "save_pretrained", fail)


def interrupt_weights_write(monkeypatch, serializer: str):
    """Saving stops half-way through writing the weights file."""
    import peft.peft_model

    if serializer == "safetensors":
        real = peft.peft_model.safe_save_file

        def partial(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            path = pathlib.Path(filename)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise PowerCut("interrupted while writing the weights")

        monkeypatch.setattr(peft.peft_model, "safe_save_file", partial)
    else:
        real = torch.save

        def partial(obj, filename, *args, **kwargs):
            real(obj, filename, *args, **kwargs)
            path = pathlib.Path(filename)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise PowerCut("interrupted while writing the weights")

        monkeypatch.setattr(peft.peft_model.torch, "save", partial)


def test_new_weights_next_to_an_old_config_are_refused(tiny, tmp_path, monkeypatch):
    make_model(tiny, tau=0.9).save_pretrained(tmp_path)
    newer = make_model(tiny, tau=0.5, adapter_seed=2)
    with monkeypatch.context() as patch:
        interrupt_config_write(patch)
        with pytest.raises(PowerCut):
            newer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["tau"] == 0.9  # the old config survived
    with pytest.raises(ValueError, match="tau"):
        PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path, is_trainable=True)


def test_new_weights_next_to_an_identical_config_load_as_the_new_checkpoint(tiny, tmp_path, monkeypatch):
    # the pair is consistent: the interrupted save had already written everything that differs
    make_model(tiny).save_pretrained(tmp_path)
    newer = make_model(tiny, adapter_seed=2)
    newer.base_model.freeze([1])
    with monkeypatch.context() as patch:
        interrupt_config_write(patch)
        with pytest.raises(PowerCut):
            newer.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path, is_trainable=True)
    assert loaded.base_model.frozen_units == ["bert.encoder.layer.1"]
    batch = tiny.batch(seed=4)
    torch.testing.assert_close(tiny.logits(loaded, batch), tiny.logits(newer, batch), rtol=0, atol=0)


@pytest.mark.parametrize("serializer", ["safetensors", "bin"])
@pytest.mark.parametrize("over_old", [True, False], ids=["over-old-checkpoint", "fresh-folder"])
def test_save_interrupted_while_writing_weights_never_loads(tiny, tmp_path, monkeypatch, serializer, over_old):
    if over_old:
        make_model(tiny).save_pretrained(tmp_path, safe_serialization=serializer == "safetensors")
    model = make_model(tiny, adapter_seed=2)
    with monkeypatch.context() as patch:
        interrupt_weights_write(patch, serializer)
        with pytest.raises(PowerCut):
            model.save_pretrained(tmp_path, safe_serialization=serializer == "safetensors")
    target = make_model(tiny, adapter_seed=5)
    before = snapshot(target)
    with pytest.raises(Exception):  # noqa: B017 - safetensors' / torch.load's / peft's own error
        target.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert_untouched(target, before)


def test_stale_safetensors_next_to_a_newer_bin_save_with_another_config_are_refused(tiny, tmp_path):
    # peft loads adapter_model.safetensors whenever it exists, even when the last save wrote adapter_model.bin
    make_model(tiny, tau=0.9).save_pretrained(tmp_path)
    make_model(tiny, tau=0.5).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="adapter_model.bin"):
        PeftModel.from_pretrained(tiny.bert(layers=LAYERS), tmp_path, is_trainable=True)


def test_random_bit_flips_in_the_freeze_state_never_load(saved):
    # issue 13.2: 8 of 60 random bit flips in the freeze-state tensor loaded silently
    model = saved["model"]
    safe = model.base_model
    tensors = load_file(saved["path"] / WEIGHTS)
    payload = tensors.pop(FREEZE_STATE_KEY)
    config = safe.peft_config["default"]
    units = safe.adapter_units
    intact = decode_payload(payload, config, tensors, units)  # the intact payload loads
    generator = torch.Generator().manual_seed(13)
    for _ in range(200):
        position = int(torch.randint(0, payload.numel(), (1,), generator=generator))
        bit = int(torch.randint(0, 8, (1,), generator=generator))
        damaged = payload.clone()
        damaged[position] ^= 1 << bit
        try:
            loaded = decode_payload(damaged, config, tensors, units)
        except ValueError:
            continue
        # a flip in the 17th digit of a score can parse to the same double: the same state, which may load
        assert loaded.to_dict() == intact.to_dict(), f"bit {bit} of byte {position} loaded another state"
