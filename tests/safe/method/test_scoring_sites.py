"""Where importance is measured (``SAFEConfig.scoring_site``) and which units may freeze (``freeze_order``).

Each site is checked against a reference computed by hand from the model's own activations; a tiny LLaMA with
one massive residual dimension shows why the block output is not the default for LoRA on decoders.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import PAPER_RULE

from peft_safe import BitFitConfig, PfeifferConfig, SAFEConfig


def _one_minus_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Naive float64 reference of 1 - linear CKA on column-centred rows."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    return 1.0 - float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def _perturb(tiny, model, scales: dict[int, float], seed: int = 0) -> None:
    """LoRA B of block i set to random values times scales[i] (0: the adapter does nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tiny.adapter_params(model).items():
            if ".lora_B." in name:
                block = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else int(
                    name.split("layer.")[1].split(".")[0])
                param.copy_(torch.randn(param.shape, generator=generator) * scales.get(block, 0.0))


def _outputs(model, batch, modules) -> list[torch.Tensor]:
    captured = []
    handles = [m.register_forward_hook(lambda _m, _a, out: captured.append(out.detach().clone())) for m in modules]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_adapter_output_is_the_mean_over_the_units_layers_of_one_minus_cka_of_each_layers_output(tiny):
    model = tiny.safe("llama", layers=3, lora=tiny.lora("llama", init_lora_weights=True),
                      scoring_site="adapter_output")
    _perturb(tiny, model, {2: 1.0})  # only the last block's adapters act: its layers see the same input either way
    batch = tiny.batch(batch=3, seq=9, seed=6)
    block = model.base_model.model.model.layers[2]
    layers = [block.self_attn.q_proj, block.self_attn.v_proj]
    with_adapters = _outputs(model, batch, layers)
    with model.disable_adapter():
        without = _outputs(model, batch, layers)
    expected = sum(_one_minus_cka(x.flatten(0, 1), y.flatten(0, 1)) for x, y in zip(with_adapters, without)) / 2
    assert expected > 1e-3
    score = model.base_model.compute_importance([batch])["model.layers.2"]
    assert score == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_residual_update_is_one_minus_cka_of_the_blocks_output_minus_its_input(tiny):
    model = tiny.safe("bert", layers=3, lora=tiny.lora("bert", init_lora_weights=True), scoring_site="residual_update")
    _perturb(tiny, model, {2: 1.0})
    batch = tiny.batch(batch=3, seq=9, seed=6)
    with torch.no_grad():
        h = model(**batch, output_hidden_states=True).hidden_states
        with model.disable_adapter():
            h0 = model(**batch, output_hidden_states=True).hidden_states
    assert torch.equal(h[-2], h0[-2])  # the last block's input is the same with and without adapters
    expected = _one_minus_cka((h[-1] - h[-2]).flatten(0, 1), (h0[-1] - h0[-2]).flatten(0, 1))
    assert expected > 1e-3
    score = model.base_model.compute_importance([batch])["bert.encoder.layer.2"]
    assert score == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_a_massive_residual_dimension_hides_the_adapters_from_the_block_output_but_not_from_their_layers(tiny):
    """LLaMA-family decoders carry a few huge residual dimensions at a few tokens (massive activations): they hold
    almost all of the block output's variance, so 1 - CKA of block outputs is ~0 whatever the adapters do. The
    adapted layers read the normalised stream: their outputs still rank the adapters by how much they act."""

    def scores(site: str) -> dict[str, float]:
        base = tiny.llama(layers=3)
        with torch.no_grad():
            base.model.embed_tokens.weight[1, 0] = 1e4  # token 1, which starts every sequence: one massive dimension
        torch.manual_seed(1)
        model = get_peft_model(base, tiny.safe_config("llama", lora=tiny.lora("llama", init_lora_weights=True),
                                                      scoring_site=site))
        _perturb(tiny, model, {0: 1.0, 1: 0.1})  # block 0 acts strongly, block 1 weakly, block 2 not at all
        ids = tiny.ids(batch=4, seq=12, seed=3)
        ids[:, 0] = 1
        found = model.base_model.compute_importance([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
        return [found[f"model.layers.{i}"] for i in range(3)]

    default = scores("auto")  # LoRA: the adapted layers' outputs
    assert default[0] > default[1] > default[2] == 0.0
    assert default[1] > 0.05  # not a rounding error: a tenth of block 0's LoRA is seen as such
    block = scores("block_output")
    assert not block[0] > block[1] > block[2], block  # what the 0.1 default saw: block 1 as inert as block 2


@pytest.mark.parametrize(
    "adapter, site",
    [
        (LoraConfig(target_modules=["query", "value"]), "adapter_output"),
        (PfeifferConfig(), "block_output"),
        (BitFitConfig(), "block_output"),
    ],
    ids=["lora", "pfeiffer", "bitfit"],
)
def test_auto_site_is_the_adapted_layers_output_for_lora_and_the_block_output_for_additive_adapters(adapter, site):
    config = SAFEConfig(adapter_config=adapter)
    assert config.scoring_site == "auto" and config.scoring_site_value == site
    assert SAFEConfig(adapter_config=adapter, scoring_site="residual_update").scoring_site_value == "residual_update"


@pytest.mark.parametrize(
    "field, value",
    [("scoring_site", "attention"), ("freeze_order", "bottom"), ("importance_scale", "softmax")],
)
def test_an_unknown_site_order_or_scale_is_refused_naming_the_value_and_the_choices(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be one of .*got '{value}'"):
        SAFEConfig(adapter_config=LoraConfig(target_modules=["query"]), **{field: value})


def test_the_prefix_order_never_freezes_a_unit_above_a_trainable_one_while_the_papers_rule_does(tiny):
    def frozen(**kwargs) -> list[str]:
        model = tiny.safe("bert", layers=3, lora=tiny.lora("bert", init_lora_weights=True), tau=0.3,
                          final_freeze_time=2, warmup_cap=1, schedule_unit="step", **kwargs)
        _perturb(tiny, model, {0: 1.0, 1: 0.01, 2: 1.0})  # the middle block barely acts
        safe, batch = model.base_model, [tiny.batch(batch=4, seq=10, seed=2)]
        for t in (1, 2):
            safe.update_and_freeze(t, batch)
        return safe.frozen_units

    assert frozen(**PAPER_RULE) == ["bert.encoder.layer.1"]  # frozen above trainable layer.0: no backprop saved
    assert frozen(freeze_order="prefix", importance_scale="normalized") == []  # layer.0 matters: nothing below it
    assert frozen() == []  # the defaults (prefix order on shares): layer.0 holds about half of the total


def test_frozen_units_keep_the_score_they_froze_on_in_importance(tiny):
    model = tiny.safe("bert", layers=3, tau=1.0, final_freeze_time=2, warmup_cap=1, schedule_unit="step",
                      **PAPER_RULE)
    safe, batch = model.base_model, [tiny.batch(batch=4, seq=10, seed=2)]
    safe.update_and_freeze(1, batch)
    newly = safe.update_and_freeze(2, batch)
    assert newly, "the scenario must freeze a unit"
    at_freeze = dict(safe.raw_importance)
    safe.update_and_freeze(3, batch)
    assert set(safe.importance) == set(safe.adapter_units)  # every unit, frozen ones included
    assert set(safe.freeze_state.latest_scores) == set(safe.adapter_units) - set(safe.frozen_units)
    for unit in safe.frozen_units:
        assert safe.raw_importance[unit] == at_freeze[unit]
