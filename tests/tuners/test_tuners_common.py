"""What every adapter tuner this package adds (Houlsby, Pfeiffer, BitFit) must do through peft's public API, one
test per behaviour, parametrized over :data:`tuner_tester.TUNERS` and three tiny architectures."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tuner_tester import (
    ARCHS,
    TUNERS,
    adapter_params,
    input_ids,
    load_4bit_llama,
    make_model,
    run,
    train_steps,
    wrapped,
)

pytestmark = pytest.mark.usefixtures("single_thread_torch")

each_tuner = pytest.mark.parametrize("tuner", TUNERS, ids=str)
each_arch = pytest.mark.parametrize("arch", ARCHS)


def wrap(arch: str, tuner) -> tuple[torch.Tensor, torch.Tensor, PeftModel]:
    """Inputs, the base model's output on them, and the base model under ``tuner``'s default config."""
    ids = input_ids()
    model = make_model(arch)
    reference = run(model, ids)
    return ids, reference, get_peft_model(model, tuner.config_cls())


@each_tuner
@each_arch
def test_identity_at_init(arch, tuner):
    ids, reference, peft_model = wrap(arch, tuner)
    assert isinstance(peft_model.base_model, tuner.model_cls)
    assert torch.equal(run(peft_model, ids), reference)

    # the check above is not vacuous: an adapter that is not zero-initialised does change the output
    perturbed = get_peft_model(make_model(arch), tuner.config_cls(init_weights=False))
    assert not torch.allclose(run(perturbed, ids), reference, rtol=0, atol=1e-7)


@each_tuner
@each_arch
def test_optimizer_steps_change_adapters_and_leave_base_bit_identical(arch, tuner):
    ids = input_ids()
    model = make_model(arch)
    reference = run(model, ids)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, tuner.config_cls())
    adapters_before = {n: p.detach().clone() for n, p in adapter_params(peft_model, tuner).items()}
    assert adapters_before
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(adapters_before)

    train_steps(peft_model, ids, steps=2)

    base_after = {
        n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
        for n, p in peft_model.named_parameters()
        if n not in adapters_before
    }
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[n], base_before[n]) for n in base_before)
    unchanged = {n for n, p in adapter_params(peft_model, tuner).items() if torch.equal(p, adapters_before[n])}
    pattern = re.compile(r"\.(?:" + "|".join(tuner.layer_cls.adapter_layer_names) + r")\.")
    layer_of = {n: pattern.split(n.removeprefix("base_model.model."))[0] for n in unchanged}
    assert {n for n in unchanged if not tuner.may_stay(arch, layer_of[n])} == set()  # the others all moved
    assert not torch.allclose(run(peft_model, ids), reference)


@each_tuner
@each_arch
def test_disable_adapter_and_unload_give_base_output_after_training(arch, tuner):
    ids, reference, peft_model = wrap(arch, tuner)
    train_steps(peft_model, ids)
    adapted = run(peft_model, ids)
    assert not torch.allclose(adapted, reference)

    with peft_model.disable_adapter():
        assert torch.equal(run(peft_model, ids), reference)
    assert torch.equal(run(peft_model, ids), adapted)
    assert all(p.requires_grad for p in adapter_params(peft_model, tuner).values())

    base = peft_model.unload()
    assert not any(isinstance(m, tuner.layer_cls) for m in base.modules())
    assert torch.equal(run(base, ids), reference)


@each_tuner
@each_arch
def test_save_and_load_round_trip_saves_only_adapters(arch, tuner, tmp_path):
    ids = input_ids()
    config = tuner.config_cls(**tuner.saved_kwargs)
    peft_model = get_peft_model(make_model(arch), config)
    train_steps(peft_model, ids)
    expected = run(peft_model, ids)
    peft_model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    # adapters only, under keys without the adapter's name
    assert set(saved) == {n.replace(".default.", ".").removesuffix(".default")
                          for n in adapter_params(peft_model, tuner)}

    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path)
    assert torch.equal(run(loaded, ids), expected)
    assert wrapped(loaded, tuner.layer_cls) == wrapped(peft_model, tuner.layer_cls)
    loaded_config = loaded.peft_config["default"]
    assert type(loaded_config) is tuner.config_cls
    for name in tuner.saved_fields:  # lists of module names are sets in meaning (JSON gives back a list)
        value, back = getattr(config, name), getattr(loaded_config, name)
        assert (set(back) == set(value)) if isinstance(value, (set, list)) else back == value, name

    # the checkpoint keys carry no adapter name, so it loads under any name
    renamed = PeftModel.from_pretrained(make_model(arch), tmp_path, adapter_name="renamed")
    assert torch.equal(run(renamed, ids), expected)


# ---------------------------------------------------------------------------------------------- 4-bit base
@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    return path


@each_tuner
def test_4bit_llama_trains_its_adapters_in_float32_and_leaves_the_quantized_base(llama_checkpoint, tuner):
    ids = input_ids()
    model, bnb = load_4bit_llama(llama_checkpoint)
    with torch.no_grad():
        reference = run(model, ids)
    peft_model = get_peft_model(model, tuner.config_cls())

    layers = [m for m in peft_model.modules() if isinstance(m, tuner.layer_cls)]
    on_float = wrapped(get_peft_model(make_model("llama"), tuner.config_cls()), tuner.layer_cls)
    assert len(layers) == len(on_float)  # the same layers as on the float model
    assert all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in layers)
    assert {p.dtype for p in adapter_params(peft_model, tuner).values()} == {torch.float32}
    quantized_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.dtype == torch.uint8}
    assert quantized_before
    with torch.no_grad():
        assert torch.equal(run(peft_model, ids), reference)

    train_steps(peft_model, ids)

    with torch.no_grad():
        assert not torch.allclose(run(peft_model, ids), reference)
        with peft_model.disable_adapter():
            assert torch.equal(run(peft_model, ids), reference)
    quantized_after = dict(peft_model.named_parameters())
    assert all(torch.equal(quantized_after[n], p) for n, p in quantized_before.items())

