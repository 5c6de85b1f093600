"""Bottleneck adapters (Houlsby, Pfeiffer) through peft's public API, on tiny random models built here."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import (
    AutoModel,
    BertForSequenceClassification,
)
from tuner_tester import ARCHS, LAYERS, input_ids, load_4bit_llama, loss_of, make_model, run, tiny_config, train_steps
from tuner_tester import wrapped as wrapped_by

import peft_safe  # noqa: F401  (registers the BOTTLENECK peft type)
from peft_safe import BottleneckConfig, HoulsbyConfig, PfeifferConfig
from peft_safe.tuners.bottleneck.adapter import ACTIVATIONS, apply_bottleneck
from peft_safe.tuners.bottleneck.layer import BottleneckLayer

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def wrapped(peft_model: nn.Module) -> set[str]:
    return wrapped_by(peft_model, BottleneckLayer)


def adapter_params(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if ".bottleneck_down." in n or ".bottleneck_up." in n}


CONFIG_CLASSES = [HoulsbyConfig, PfeifferConfig]




# ---------------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("non_linearity", sorted(ACTIVATIONS))
def test_apply_bottleneck_matches_float64_reference(non_linearity):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 16, generator=g)
    down, up = nn.Linear(16, 4), nn.Linear(4, 16)
    with torch.no_grad():
        for p in (*down.parameters(), *up.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    reference_act = {
        "relu": lambda t: t.clamp(min=0),
        "swish": lambda t: t * torch.sigmoid(t),
        "silu": lambda t: t * torch.sigmoid(t),
        "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
        "tanh": torch.tanh,
    }[non_linearity]
    h = hidden.double()
    z = reference_act(h @ down.weight.double().T + down.bias.double())
    expected = h + 0.5 * (z @ up.weight.double().T + up.bias.double())

    out = apply_bottleneck(hidden, down, up, non_linearity, scaling=0.5)

    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_apply_bottleneck_runs_in_adapter_dtype_and_returns_hidden_dtype():
    hidden = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    down, up = nn.Linear(8, 2), nn.Linear(2, 8)  # float32
    out = apply_bottleneck(hidden, down, up, "relu", 1.0)
    assert out.dtype == torch.bfloat16
    nn.init.zeros_(up.weight), nn.init.zeros_(up.bias)
    assert torch.equal(apply_bottleneck(hidden, down, up, "relu", 1.0), hidden)  # hidden itself is never rounded


# ---------------------------------------------------------------------------------------------- placement
# Per model type, relative to a block: (attention output projection, feed-forward output projection).
SUBLAYER_OUTPUTS = {
    "bert": ("encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"),
    "roberta": ("encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"),
    "xlm-roberta": ("encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"),
    "mpnet": ("encoder.layer.{i}.attention.attn.o", "encoder.layer.{i}.output.dense"),
    "distilbert": ("transformer.layer.{i}.attention.out_lin", "transformer.layer.{i}.ffn.lin2"),
    "gpt2": ("h.{i}.attn.c_proj", "h.{i}.mlp.c_proj"),
    "llama": ("layers.{i}.self_attn.o_proj", "layers.{i}.mlp.down_proj"),
    "mistral": ("layers.{i}.self_attn.o_proj", "layers.{i}.mlp.down_proj"),
    "qwen2": ("layers.{i}.self_attn.o_proj", "layers.{i}.mlp.down_proj"),
    "qwen3": ("layers.{i}.self_attn.o_proj", "layers.{i}.mlp.down_proj"),
}


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
@pytest.mark.parametrize("model_type", sorted(SUBLAYER_OUTPUTS))
def test_default_placement_per_model_type_and_preset(model_type, config_cls):
    model = AutoModel.from_config(tiny_config(model_type))
    assert model.config.model_type == model_type
    attention_out, ffn_out = SUBLAYER_OUTPUTS[model_type]
    sublayers = (attention_out, ffn_out) if config_cls is HoulsbyConfig else (ffn_out,)
    expected = {pattern.format(i=i) for i in range(LAYERS) for pattern in sublayers}

    peft_model = get_peft_model(model, config_cls())

    assert wrapped(peft_model) == expected


def test_pfeiffer_on_bert_classifier_skips_attention_output_and_head():
    model = BertForSequenceClassification(tiny_config("bert"))
    peft_model = get_peft_model(model, PfeifferConfig(task_type="SEQ_CLS"))

    assert wrapped(peft_model) == {f"bert.encoder.layer.{i}.output.dense" for i in range(LAYERS)}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)  # the head is trained and saved, not wrapped


def test_target_modules_override_the_preset():
    config = HoulsbyConfig(target_modules=r".*layers\.0\.mlp\.down_proj")
    peft_model = get_peft_model(make_model("llama"), config)
    assert wrapped(peft_model) == {"model.layers.0.mlp.down_proj"}


def test_unknown_model_type_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(model, PfeifferConfig())
    config = PfeifferConfig(target_modules=["2"], reduction_factor=4)
    peft_model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), config)
    assert wrapped(peft_model) == {"2"}


def test_unsupported_layer_type_is_refused():
    with pytest.raises(TypeError, match="output projection"):
        get_peft_model(make_model("bert"), PfeifferConfig(target_modules=["word_embeddings"]))


def test_bottleneck_width_from_reduction_factor_or_explicit_size():
    peft_model = get_peft_model(make_model("bert"), PfeifferConfig(reduction_factor=8))
    layer = peft_model.base_model.model.encoder.layer[0].output.dense
    assert layer.bottleneck_down["default"].weight.shape == (32 // 8, 32)
    assert layer.bottleneck_up["default"].weight.shape == (32, 32 // 8)

    peft_model = get_peft_model(make_model("bert"), PfeifferConfig(reduction_factor=8, bottleneck_size=3))
    layer = peft_model.base_model.model.encoder.layer[0].output.dense
    assert layer.bottleneck_down["default"].weight.shape == (3, 32)


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_adapters_only(arch):
    peft_model = get_peft_model(make_model(arch), HoulsbyConfig())
    loss_of(run(peft_model, input_ids())).backward()

    adapters = adapter_params(peft_model)
    assert adapters
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(adapters)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if n not in adapters)
    # up-projections start at zero, so they get the first non-zero gradients
    assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if ".bottleneck_up." in n and n.endswith("weight"))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_is_refused_and_unload_returns_the_base_model(arch):
    ids = input_ids()
    model = make_model(arch)
    reference = run(model, ids)
    peft_model = get_peft_model(model, PfeifferConfig())
    train_steps(peft_model, ids)
    adapted = run(peft_model, ids)

    with pytest.raises(ValueError, match=r"non-linear.*unload\(\)"):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_adapter()
    assert torch.equal(run(peft_model, ids), adapted)  # the refused merge changed nothing

    base = peft_model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())
    assert torch.equal(run(base, ids), reference)


def test_bfloat16_base_keeps_adapter_in_float32():
    ids = input_ids()
    model = make_model("llama").to(torch.bfloat16)
    reference = run(model, ids)
    peft_model = get_peft_model(model, HoulsbyConfig())

    assert {p.dtype for p in adapter_params(peft_model).values()} == {torch.float32}
    out = run(peft_model, ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference)
    loss_of(out).backward()
    assert all(p.grad is not None for p in adapter_params(peft_model).values())


# ---------------------------------------------------------------------------------------------- config
def test_presets_and_their_defaults():
    houlsby, pfeiffer = HoulsbyConfig(), PfeifferConfig()
    assert (houlsby.preset, houlsby.non_linearity, houlsby.reduction_factor) == ("houlsby", "swish", 16)
    assert (pfeiffer.preset, pfeiffer.non_linearity, pfeiffer.reduction_factor) == ("pfeiffer", "relu", 16)
    assert houlsby.init_weights and houlsby.scaling == 1.0 and houlsby.target_modules is None
    assert type(BottleneckConfig(preset="houlsby")) is HoulsbyConfig
    assert type(BottleneckConfig()) is PfeifferConfig
    assert HoulsbyConfig(non_linearity="tanh").non_linearity == "tanh"
    assert str(houlsby.peft_type.value) == "BOTTLENECK"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"non_linearity": "sigmoid"}, "non_linearity"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"reduction_factor": -4}, "reduction_factor"),
        ({"reduction_factor": float("inf")}, "reduction_factor"),
        ({"reduction_factor": "16"}, "reduction_factor"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"bottleneck_size": 2.5}, "bottleneck_size"),
        ({"scaling": float("nan")}, "scaling"),
        ({"init_weights": "yes"}, "init_weights"),
        ({"preset": "adapterhub"}, "preset"),
    ],
)
def test_bad_config_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**kwargs)


@pytest.mark.parametrize(("factor", "width"), [(1e-6, "32,000,000"), (0.01, "3,200"), (0.5, "64")])
def test_reduction_factor_below_one_is_refused_naming_the_width_it_would_give(factor, width):
    # issue 13.18: 1e-6 built a 32-million-wide bottleneck (OOM-killed at 22 GB); 0.01 silently gave 3199
    with pytest.raises(ValueError, match="reduction_factor must be >= 1") as info:
        HoulsbyConfig(reduction_factor=factor)
    assert f"a {width}-wide bottleneck" in str(info.value)


def test_bottleneck_wider_than_the_layer_is_refused():
    with pytest.raises(ValueError, match="64 wide on a layer with 32 features"):
        get_peft_model(make_model("bert"), HoulsbyConfig(bottleneck_size=64))
    layer = get_peft_model(make_model("bert"), HoulsbyConfig(bottleneck_size=32, reduction_factor=1))
    assert layer.base_model.model.encoder.layer[0].output.dense.bottleneck_down["default"].weight.shape == (32, 32)


def test_preset_contradicting_the_class_raises():
    with pytest.raises(ValueError, match="HoulsbyConfig has preset 'houlsby'"):
        HoulsbyConfig(preset="pfeiffer")


# ---------------------------------------------------------------------------------------------- 4-bit base
# (training on it, as every tuner does: test_tuners_common.py)
@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    return path


def test_4bit_llama_puts_one_adapter_after_each_sublayer_and_refuses_to_merge(llama_checkpoint):
    model, bnb = load_4bit_llama(llama_checkpoint)
    peft_model = get_peft_model(model, HoulsbyConfig())
    layers = [m for m in peft_model.modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == 2 * LAYERS
    train_steps(peft_model, input_ids())
    with pytest.raises(ValueError, match="unload"):
        peft_model.merge_and_unload()
