"""BitFit through peft's public API, on tiny random models built here."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
)
from tuner_tester import ARCHS, LAYERS, VOCAB, input_ids, load_4bit_llama, loss_of, make_model, run, train_steps
from tuner_tester import wrapped as wrapped_by

import peft_safe  # noqa: F401  (registers the BITFIT peft type)
from peft_safe import BitFitConfig, BitFitModel
from peft_safe.tuners.bitfit.layer import BitFitLayer

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def wrapped(peft_model: nn.Module) -> set[str]:
    return wrapped_by(peft_model, BitFitLayer)


def deltas(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Bias deltas by the name of the layer they belong to (relative to the base model)."""
    return {
        n.removeprefix("base_model.model.").removesuffix(".bitfit_bias.default"): p
        for n, p in peft_model.named_parameters()
        if n.endswith(".bitfit_bias.default")
    }


# ---------------------------------------------------------------------------------------------- targets
def per_block(patterns: tuple[str, ...]) -> set[str]:
    return {pattern.format(i=i) for i in range(LAYERS) for pattern in patterns}


DEFAULT_TARGETS = {
    # every Linear and LayerNorm, the pooler included
    "bert": per_block(
        (
            "encoder.layer.{i}.attention.self.query",
            "encoder.layer.{i}.attention.self.key",
            "encoder.layer.{i}.attention.self.value",
            "encoder.layer.{i}.attention.output.dense",
            "encoder.layer.{i}.attention.output.LayerNorm",
            "encoder.layer.{i}.intermediate.dense",
            "encoder.layer.{i}.output.dense",
            "encoder.layer.{i}.output.LayerNorm",
        )
    )
    | {"embeddings.LayerNorm", "pooler.dense"},
    # every Conv1D and LayerNorm; not lm_head (the output embedding)
    "gpt2": per_block(
        (
            "transformer.h.{i}.ln_1",
            "transformer.h.{i}.attn.c_attn",
            "transformer.h.{i}.attn.c_proj",
            "transformer.h.{i}.ln_2",
            "transformer.h.{i}.mlp.c_fc",
            "transformer.h.{i}.mlp.c_proj",
        )
    )
    | {"transformer.ln_f"},
    # every Linear (all bias-free: the deltas are new biases); not lm_head, not the RMSNorms
    "llama": per_block(
        (
            "model.layers.{i}.self_attn.q_proj",
            "model.layers.{i}.self_attn.k_proj",
            "model.layers.{i}.self_attn.v_proj",
            "model.layers.{i}.self_attn.o_proj",
            "model.layers.{i}.mlp.gate_proj",
            "model.layers.{i}.mlp.up_proj",
            "model.layers.{i}.mlp.down_proj",
        )
    ),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_are_all_bias_carrying_layers(arch):
    config = BitFitConfig()
    peft_model = get_peft_model(make_model(arch), config)

    assert isinstance(peft_model.base_model, BitFitModel)
    assert wrapped(peft_model) == DEFAULT_TARGETS[arch]
    assert set(config.target_modules) == DEFAULT_TARGETS[arch]  # resolved names are written back for saving


def test_target_modules_and_exclude_modules():
    peft_model = get_peft_model(make_model("bert"), BitFitConfig(target_modules=["query", "value"]))
    expected = per_block(("encoder.layer.{i}.attention.self.query", "encoder.layer.{i}.attention.self.value"))
    assert wrapped(peft_model) == expected

    peft_model = get_peft_model(make_model("bert"), BitFitConfig(exclude_modules=r".*(LayerNorm|pooler\.dense)"))
    assert wrapped(peft_model) == {n for n in DEFAULT_TARGETS["bert"] if "LayerNorm" not in n and "pooler" not in n}


def test_classifier_head_is_trained_whole_not_wrapped():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64
    )
    model = BertForSequenceClassification(config)
    peft_model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))
    assert wrapped(peft_model) == {f"bert.{n}" for n in DEFAULT_TARGETS["bert"]}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)


# ---------------------------------------------------------------------------------------------- training
def test_delta_gradient_equals_bias_gradient():
    ids = input_ids()
    plain = make_model("bert")
    loss_of(run(plain, ids)).backward()
    plain_layers = dict(plain.named_modules())

    peft_model = get_peft_model(make_model("bert"), BitFitConfig())
    loss_of(run(peft_model, ids)).backward()

    for name, delta in deltas(peft_model).items():
        torch.testing.assert_close(delta.grad, plain_layers[name].bias.grad, rtol=1e-5, atol=1e-6)


def test_adam_on_deltas_matches_adam_on_biases():
    """Training the deltas is training the biases: same Adam trajectory, same model after merging."""
    ids = input_ids()
    plain = make_model("bert")
    targets = DEFAULT_TARGETS["bert"]
    plain.requires_grad_(False)
    layers = dict(plain.named_modules())
    biases = [layers[name].bias for name in sorted(targets)]
    for bias in biases:
        bias.requires_grad_(True)
    optimizer = torch.optim.Adam(biases, lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(run(plain, ids)).backward()
        optimizer.step()

    peft_model = get_peft_model(make_model("bert"), BitFitConfig())
    train_steps(peft_model, ids, steps=3)

    torch.testing.assert_close(run(peft_model, ids), run(plain, ids), rtol=1e-4, atol=1e-5)
    merged = dict(peft_model.merge_and_unload().named_modules())
    for name in targets:
        torch.testing.assert_close(merged[name].bias, layers[name].bias, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_matches_adapted_model(arch):
    ids = input_ids()
    model = make_model(arch)
    peft_model = get_peft_model(model, BitFitConfig())
    train_steps(peft_model, ids)
    adapted = run(peft_model, ids)
    trained = {name: delta.detach().clone() for name, delta in deltas(peft_model).items()}

    merged = peft_model.merge_and_unload()

    assert not any(isinstance(m, BitFitLayer) for m in merged.modules())
    torch.testing.assert_close(run(merged, ids), adapted, rtol=1e-5, atol=1e-5)
    layers = dict(merged.named_modules())
    if arch == "llama":  # bias-free layers: merging created the bias, equal to the trained delta
        assert all(torch.equal(layers[name].bias, delta) for name, delta in trained.items())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_merge_then_unmerge_restores_base_biases_exactly(arch):
    ids = input_ids()
    model = make_model(arch)
    reference = run(model, ids)
    peft_model = get_peft_model(model, BitFitConfig())
    train_steps(peft_model, ids)
    adapted = run(peft_model, ids)
    wrappers = {n: m for n, m in peft_model.named_modules() if isinstance(m, BitFitLayer)}
    biases_before = {n: (None if m.bias is None else m.bias.detach().clone()) for n, m in wrappers.items()}

    peft_model.merge_adapter()
    assert all(m.merged for m in wrappers.values())
    assert all(m.bias is not None for m in wrappers.values())
    torch.testing.assert_close(run(peft_model, ids), adapted, rtol=1e-5, atol=1e-5)

    peft_model.unmerge_adapter()
    for name, m in wrappers.items():
        if biases_before[name] is None:
            assert m.get_base_layer().bias is None
        else:
            assert torch.equal(m.get_base_layer().bias, biases_before[name])
    torch.testing.assert_close(run(peft_model, ids), adapted, rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter():
        assert torch.equal(run(peft_model, ids), reference)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_weights": "yes"}, "init_weights"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"target_modules": 3}, "target_modules"),
        ({"exclude_modules": 3}, "exclude_modules"),
    ],
)
def test_bad_config_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BitFitConfig(**kwargs)


def test_unsupported_layers_are_refused():
    with pytest.raises(TypeError, match="Embedding"):
        get_peft_model(make_model("bert"), BitFitConfig(target_modules=["word_embeddings"]))
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False))
    with pytest.raises(TypeError, match="elementwise_affine"):
        get_peft_model(model, BitFitConfig(target_modules=["1"]))
    # by default such a LayerNorm is simply not a target
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False))
    peft_model = get_peft_model(model, BitFitConfig())
    assert wrapped(peft_model) == {"0"}


# ---------------------------------------------------------------------------------------------- 4-bit base
# (training on it, as every tuner does: test_tuners_common.py)
@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    return path


def test_4bit_llama_merges_the_trained_deltas_into_new_biases(llama_checkpoint):
    ids = input_ids()
    model, bnb = load_4bit_llama(llama_checkpoint)
    peft_model = get_peft_model(model, BitFitConfig())
    train_steps(peft_model, ids)
    with torch.no_grad():
        adapted = run(peft_model, ids)

    merged = peft_model.merge_and_unload()
    assert all(isinstance(m.bias, nn.Parameter) for m in merged.modules() if isinstance(m, bnb.nn.Linear4bit))
    with torch.no_grad():
        torch.testing.assert_close(run(merged, ids), adapted, rtol=1e-5, atol=1e-5)
