"""Bottleneck adapters (Houlsby, Pfeiffer) through peft's public API, on tiny random models built here."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

import peft_safe  # noqa: F401  (registers the BOTTLENECK peft type)
from peft_safe import BottleneckConfig, BottleneckModel, HoulsbyConfig, PfeifferConfig
from peft_safe.tuners.bottleneck.adapter import ACTIVATIONS, apply_bottleneck
from peft_safe.tuners.bottleneck.layer import BottleneckLayer

VOCAB = 100
LAYERS = 2


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_config(model_type: str):
    if model_type in ("bert", "roberta", "xlm-roberta", "mpnet"):
        return AutoConfig.for_model(
            model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
            intermediate_size=64,
        )
    if model_type == "distilbert":
        return AutoConfig.for_model(model_type, vocab_size=VOCAB, dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=64)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=2, bos_token_id=0, eos_token_id=0)
    extra = {"head_dim": 8} if model_type == "qwen3" else {}
    return AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, **extra,
    )


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny model in eval mode (no dropout); the same seed gives the same weights."""
    torch.manual_seed(seed)
    if arch == "bert":
        model = BertModel(tiny_config("bert"))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(tiny_config("gpt2"))
    elif arch == "llama":
        model = LlamaForCausalLM(tiny_config("llama"))
    else:
        model = AutoModel.from_config(tiny_config(arch))
    return model.eval()


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def loss_of(out: torch.Tensor) -> torch.Tensor:
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return (out.float() * target).sum()


def wrapped(peft_model: nn.Module) -> set[str]:
    return {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, BottleneckLayer)
    }


def adapter_params(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if ".bottleneck_down." in n or ".bottleneck_up." in n}


def train_steps(peft_model: nn.Module, ids: torch.Tensor, steps: int = 2) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(run(peft_model, ids)).backward()
        optimizer.step()


ARCHS = ["bert", "gpt2", "llama"]
CONFIG_CLASSES = [HoulsbyConfig, PfeifferConfig]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny matrices gain nothing from intra-op threads, and on a busy machine their synchronisation makes each
    # matmul cost milliseconds (this file: ~10 s single-threaded, ~50 s with 2 threads under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch, config_cls):
    ids = input_ids()
    model = make_model(arch)
    reference = run(model, ids)
    peft_model = get_peft_model(model, config_cls())
    assert isinstance(peft_model.base_model, BottleneckModel)
    assert torch.equal(run(peft_model, ids), reference)

    # the check above is not vacuous: an adapter that is not zero-initialised does change the output
    perturbed = get_peft_model(make_model(arch), config_cls(init_weights=False))
    assert not torch.allclose(run(perturbed, ids), reference, rtol=0, atol=1e-7)


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


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_steps_change_adapters_and_leave_base_bit_identical(arch, config_cls):
    ids = input_ids()
    model = make_model(arch)
    reference = run(model, ids)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, config_cls())
    adapters_before = {n: p.detach().clone() for n, p in adapter_params(peft_model).items()}

    train_steps(peft_model, ids, steps=2)

    base_after = {
        n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
        for n, p in peft_model.named_parameters()
        if n not in adapters_before
    }
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[n], base_before[n]) for n in base_before)
    changed = {n for n, p in adapter_params(peft_model).items() if not torch.equal(p, adapters_before[n])}
    assert changed == set(adapters_before)
    assert not torch.allclose(run(peft_model, ids), reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_gives_base_output_after_training(arch):
    ids = input_ids()
    model = make_model(arch)
    reference = run(model, ids)
    peft_model = get_peft_model(model, HoulsbyConfig())
    train_steps(peft_model, ids)
    adapted = run(peft_model, ids)
    assert not torch.allclose(adapted, reference)

    with peft_model.disable_adapter():
        assert torch.equal(run(peft_model, ids), reference)

    assert torch.equal(run(peft_model, ids), adapted)
    assert all(p.requires_grad for p in adapter_params(peft_model).values())


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch, config_cls, tmp_path):
    ids = input_ids()
    config = config_cls(reduction_factor=8, non_linearity="gelu", scaling=0.5)
    peft_model = get_peft_model(make_model(arch), config)
    train_steps(peft_model, ids)
    expected = run(peft_model, ids)
    peft_model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {n.replace(".default.", ".") for n in adapter_params(peft_model)}  # adapters only

    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path)
    assert torch.equal(run(loaded, ids), expected)
    loaded_config = loaded.peft_config["default"]
    assert type(loaded_config) is config_cls
    for field in ("preset", "reduction_factor", "bottleneck_size", "non_linearity", "scaling", "target_modules"):
        assert getattr(loaded_config, field) == getattr(config, field), field

    # the checkpoint keys carry no adapter name, so it loads under any name
    renamed = PeftModel.from_pretrained(make_model(arch), tmp_path, adapter_name="renamed")
    assert torch.equal(run(renamed, ids), expected)


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
def _load_4bit_llama(path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    try:
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
        run(model, input_ids())
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes 4-bit does not run on this machine: {exc}")
    # train mode: bitsandbytes repacks 4-bit weights for CPU inference in eval mode, which would blur the
    # "base weights unchanged" check; the tiny LLaMA has no dropout, so outputs are the same in both modes
    return model.train(), bnb


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    return path


def test_4bit_llama(llama_checkpoint):
    ids = input_ids()
    model, bnb = _load_4bit_llama(llama_checkpoint)
    with torch.no_grad():
        reference = run(model, ids)
    peft_model = get_peft_model(model, HoulsbyConfig())

    layers = [m for m in peft_model.modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == 2 * LAYERS
    assert all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in layers)
    assert {p.dtype for p in adapter_params(peft_model).values()} == {torch.float32}
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
    with pytest.raises(ValueError, match="unload"):
        peft_model.merge_and_unload()
