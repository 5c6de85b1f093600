"""SAFEConfig: validation, JSON round trip, delegation to the wrapped adapter config, mirrored fields."""

from __future__ import annotations

import copy
import json
import math

import pytest
from peft import IA3Config, LoraConfig, PeftConfig, PeftType, PromptTuningConfig, TaskType

from peft_safe import SAFEConfig


def lora(**kwargs) -> LoraConfig:
    kwargs.setdefault("r", 4)
    kwargs.setdefault("target_modules", ["query", "value"])
    return LoraConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"tau": 0}, ["tau", "0"]),
        ({"tau": 0.0}, ["tau", "0.0"]),
        ({"tau": 1.5}, ["tau", "1.5"]),
        ({"tau": -0.1}, ["tau", "-0.1"]),
        ({"tau": math.nan}, ["tau", "nan"]),
        ({"tau": math.inf}, ["tau", "inf"]),
        ({"final_freeze_time": 0}, ["final_freeze_time", "0"]),
        ({"final_freeze_time": -2}, ["final_freeze_time", "-2"]),
        ({"final_freeze_time": 3, "warmup_cap": 3}, ["warmup_cap", "final_freeze_time", "3"]),
        ({"final_freeze_time": 3, "warmup_cap": 4.5}, ["warmup_cap", "final_freeze_time", "4.5"]),
        ({"warmup_cap": 0}, ["warmup_cap", "0"]),
        ({"warmup_rule": "patience"}, ["warmup_rule", "patience"]),
        ({"schedule_unit": "batch"}, ["schedule_unit", "batch"]),
        ({"importance_scale": "log"}, ["importance_scale", "log"]),
        ({"probe_tokens": 1}, ["probe_tokens", "1"]),
        ({"probe_tokens": 0}, ["probe_tokens", "0"]),
        ({"scoring_interval": 0}, ["scoring_interval", "0"]),
        ({"warmup_tolerance": 0}, ["warmup_tolerance", "0"]),
        ({"warmup_floor": -1}, ["warmup_floor", "-1"]),
    ],
)
def test_out_of_range_values_raise_naming_field_and_value(kwargs, names):
    with pytest.raises(ValueError) as info:
        SAFEConfig(adapter_config=lora(), **kwargs)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} missing from {message!r}"


def test_boundary_values_are_accepted():
    config = SAFEConfig(adapter_config=lora(), tau=1.0, final_freeze_time=3, warmup_cap=2.9, probe_tokens=3)
    assert config.tau == 1.0 and config.probe_tokens == 3
    assert SAFEConfig(adapter_config=lora(), tau=1e-6).tau == 1e-6


def test_missing_adapter_config_raises():
    with pytest.raises(ValueError, match="adapter_config"):
        SAFEConfig()


@pytest.mark.parametrize(
    ("adapter_config", "name"),
    [
        (PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"), "PROMPT_TUNING"),
        (IA3Config(target_modules=["query"], feedforward_modules=[]), "IA3"),
        ({"peft_type": "IA3", "target_modules": ["query"]}, "IA3"),
    ],
)
def test_unsupported_adapter_types_raise_naming_the_type(adapter_config, name):
    with pytest.raises(ValueError, match=name):
        SAFEConfig(adapter_config=adapter_config)


@pytest.mark.parametrize(("value", "type_name"), [("lora", "str"), (42, "int"), ([("r", 4)], "list")])
def test_adapter_config_that_is_not_a_config_raises(value, type_name):
    with pytest.raises(TypeError) as info:
        SAFEConfig(adapter_config=value)
    assert "adapter_config" in str(info.value) and type_name in str(info.value)


def test_safe_config_cannot_wrap_itself():
    with pytest.raises(ValueError, match="SAFEConfig"):
        SAFEConfig(adapter_config=SAFEConfig(adapter_config=lora()))


def test_dict_adapter_config_with_unknown_keys_raises_naming_them():
    with pytest.raises(ValueError, match="not_a_lora_field"):
        SAFEConfig(adapter_config={"peft_type": "LORA", "r": 4, "not_a_lora_field": 1})


# ---------------------------------------------------------------------------------------------- JSON round trip
def _full_config() -> SAFEConfig:
    return SAFEConfig(
        adapter_config=LoraConfig(r=6, lora_alpha=12, target_modules={"query", "value", "key"}, lora_dropout=0.1),
        tau=0.45,
        final_freeze_time=7,
        schedule_unit="step",
        scoring_interval=2,
        warmup_rule="per_unit",
        warmup_tolerance=0.1,
        warmup_floor=0.01,
        warmup_cap=3,
        importance_scale="raw",
        probe_tokens=128,
        blocks_path="bert.encoder.layer",
        seed=11,
        task_type="SEQ_CLS",
    )


@pytest.mark.parametrize("loader", [PeftConfig.from_pretrained, SAFEConfig.from_pretrained])
def test_json_round_trip_keeps_every_field(tmp_path, loader):
    config = _full_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SAFE"
    assert sorted(saved["adapter_config"]["target_modules"]) == ["key", "query", "value"]

    loaded = loader(tmp_path)
    assert type(loaded) is SAFEConfig
    assert loaded.peft_type == PeftType.SAFE
    assert type(loaded.adapter_config) is LoraConfig
    assert loaded.adapter_config.target_modules == {"query", "value", "key"}
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout) == (6, 12, 0.1)
    for name in (
        "tau", "final_freeze_time", "schedule_unit", "scoring_interval", "warmup_rule", "warmup_tolerance",
        "warmup_floor", "warmup_cap", "importance_scale", "probe_tokens", "blocks_path", "seed",
    ):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.task_type == "SEQ_CLS" and loaded.adapter_config.task_type == "SEQ_CLS"
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 0.15),  # relative_norm's default: above the jitter of settled scores
        ({"warmup_rule": "per_unit"}, 0.05),  # the paper's 5 %
        ({"warmup_tolerance": 0.3}, 0.3),
        ({"warmup_rule": "per_unit", "warmup_tolerance": 0.2}, 0.2),
    ],
)
def test_warmup_tolerance_defaults_by_rule_and_an_explicit_value_wins(tmp_path, kwargs, expected):
    config = SAFEConfig(adapter_config=LoraConfig(target_modules=["query"]), **kwargs)
    assert config.warmup_tolerance_value == expected
    config.save_pretrained(tmp_path)
    assert SAFEConfig.from_pretrained(tmp_path).warmup_tolerance_value == expected


def test_nested_dict_adapter_config_builds_the_wrapped_config(tmp_path):
    config = SAFEConfig(
        adapter_config={"peft_type": "LORA", "r": 3, "target_modules": ["query"], "lora_alpha": 6}, tau=0.2
    )
    assert type(config.adapter_config) is LoraConfig
    assert (config.adapter_config.r, config.adapter_config.lora_alpha) == (3, 6)
    assert config.adapter_config.target_modules == {"query"}
    assert config.adapter_peft_type == "LORA"

    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded.adapter_config) is LoraConfig and loaded.r == 3 and loaded.tau == 0.2


def test_dict_form_of_to_dict_rebuilds_an_equal_config():
    config = _full_config()
    data = json.loads(json.dumps(config.to_dict()))  # JSON-able: no sets, no enum objects
    data.pop("peft_type")
    rebuilt = SAFEConfig(**data)
    assert rebuilt.to_dict() == config.to_dict()


def test_deepcopy_copies_the_wrapped_config():
    config = SAFEConfig(adapter_config=lora())
    copied = copy.deepcopy(config)
    copied.r = 16
    assert config.r == 4 and copied.r == 16
    assert copied.adapter_config is not config.adapter_config


# ---------------------------------------------------------------------------------------------- delegation
def test_wrapped_config_fields_are_readable_on_the_safe_config():
    inner = lora(r=5, lora_alpha=10)
    config = SAFEConfig(adapter_config=inner)
    assert config.r == 5 and config.lora_alpha == 10
    assert config.target_modules == inner.target_modules == {"query", "value"}


def test_wrapped_config_fields_are_writable_through_the_safe_config():
    config = SAFEConfig(adapter_config=lora())
    config.r = 12
    config.target_modules = ["key"]
    config.modules_to_save = ["classifier"]
    assert config.adapter_config.r == 12
    assert set(config.adapter_config.target_modules) == {"key"}
    assert config.adapter_config.modules_to_save == ["classifier"]
    assert "r" not in vars(config) and "target_modules" not in vars(config)  # not shadowed on the SAFEConfig


def test_safe_fields_are_not_delegated():
    config = SAFEConfig(adapter_config=lora())
    config.tau = 0.7
    assert config.tau == 0.7 and not hasattr(config.adapter_config, "tau")


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_field"):
        SAFEConfig(adapter_config=lora()).no_such_field  # noqa: B018


def test_task_type_and_inference_mode_are_mirrored_into_the_wrapped_config():
    config = SAFEConfig(adapter_config=lora(), task_type="SEQ_CLS")
    assert config.adapter_config.task_type == "SEQ_CLS"
    config.task_type = TaskType.CAUSAL_LM
    assert config.adapter_config.task_type == TaskType.CAUSAL_LM
    config.inference_mode = True
    assert config.adapter_config.inference_mode is True
    config.inference_mode = False
    assert config.adapter_config.inference_mode is False


def test_task_type_given_only_on_the_wrapped_config_reaches_the_safe_config():
    config = SAFEConfig(adapter_config=lora(task_type="SEQ_CLS"))
    assert config.task_type == "SEQ_CLS"


def test_base_model_path_is_mirrored():
    config = SAFEConfig(adapter_config=lora())
    config.base_model_name_or_path = "/some/local/base"
    assert config.adapter_config.base_model_name_or_path == "/some/local/base"


# ---------------------------------------------------------------------------------------------- renamed fields
def test_old_field_names_still_build_the_config_with_a_future_warning():
    with pytest.warns(FutureWarning, match="final_freeze_epoch is deprecated.*final_freeze_time"):
        config = SAFEConfig(adapter_config=lora(), final_freeze_epoch=7, max_warmup=3)
    assert (config.final_freeze_time, config.warmup_cap, config.warmup_cap_value) == (7, 3, 3)
    saved = config.to_dict()
    assert "final_freeze_epoch" not in saved and "max_warmup" not in saved
    assert (saved["final_freeze_time"], saved["warmup_cap"]) == (7, 3)


def test_old_and_new_name_with_different_values_is_refused():
    with pytest.raises(ValueError, match="final_freeze_epoch=7 and final_freeze_time=9"), pytest.warns(FutureWarning):
        SAFEConfig(adapter_config=lora(), final_freeze_epoch=7, final_freeze_time=9)


def test_old_names_read_and_write_the_new_fields_and_writes_are_validated():
    config = SAFEConfig(adapter_config=lora(), final_freeze_time=6)
    with pytest.warns(FutureWarning):
        assert config.final_freeze_epoch == 6
    with pytest.warns(FutureWarning):
        config.max_warmup = 2
    assert config.warmup_cap == 2
    with pytest.raises(ValueError, match="warmup_cap"), pytest.warns(FutureWarning):
        config.max_warmup = 10  # after t_f


def test_warmup_cap_value_defaults_to_half_of_final_freeze_time():
    assert SAFEConfig(adapter_config=lora(), final_freeze_time=6).warmup_cap_value == 3


def test_a_config_saved_with_the_old_names_loads_onto_the_new_ones(tmp_path):
    config = SAFEConfig(adapter_config=lora(), final_freeze_time=7, warmup_cap=3)
    config.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["final_freeze_epoch"], data["max_warmup"] = data.pop("final_freeze_time"), data.pop("warmup_cap")
    path.write_text(json.dumps(data))
    with pytest.warns(FutureWarning):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SAFEConfig)
    assert (loaded.final_freeze_time, loaded.warmup_cap) == (7, 3)


def test_numpy_and_torch_scalars_are_accepted_as_the_numbers_they_hold():
    # issue 13.17: "tau must be a finite number, got np.float32(0.3)"
    import numpy as np
    import torch

    config = SAFEConfig(adapter_config=lora(), tau=np.float32(0.5), final_freeze_time=torch.tensor(4),
                        probe_tokens=np.int64(64), seed=torch.tensor(3))
    assert (config.tau, config.final_freeze_time, config.probe_tokens, config.seed) == (0.5, 4, 64, 3)
    assert all(type(v) in (int, float) for v in (config.tau, config.final_freeze_time, config.probe_tokens))
    config.tau = torch.tensor(0.25)
    assert config.tau == 0.25 and type(config.tau) is float
    for bad in (np.bool_(True), torch.tensor([0.1, 0.2]), np.float64("nan")):
        with pytest.raises(ValueError, match="tau"):
            config.tau = bad
    assert config.tau == 0.25


@pytest.mark.parametrize(
    ("name", "value"),
    [("tau", 3), ("final_freeze_time", -1), ("warmup_rule", "paper"), ("probe_tokens", 1), ("seed", -2),
     ("scoring_interval", 0), ("warmup_cap", 99), ("importance_scale", "log")],
)
def test_assignment_after_construction_is_validated_and_a_refused_value_is_not_kept(name, value):
    # issue 13.3: the docs' way to change hyper-parameters after loading was not checked
    config = SAFEConfig(adapter_config=lora())
    before = getattr(config, name)
    with pytest.raises(ValueError, match=name):
        setattr(config, name, value)
    assert getattr(config, name) == before


# ---------------------------------------------------------------------------------------------- wrapped field names
def test_dataclasses_replace_forwards_wrapped_fields_to_a_copy_of_the_wrapped_config():
    # issue 14.6: peft's add_weighted_adapter calls dataclasses.replace(config, r=..., target_modules=...)
    import dataclasses
    import warnings

    config = SAFEConfig(adapter_config=lora(r=4), tau=0.4, final_freeze_time=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from the old field names either
        new = dataclasses.replace(config, r=16, target_modules={"key"}, tau=0.6)
    assert (new.r, new.target_modules, new.tau, new.final_freeze_time) == (16, {"key"}, 0.6, 8)
    assert (config.r, config.target_modules, config.tau) == (4, {"query", "value"}, 0.4)  # the original is kept
    assert new.adapter_config is not config.adapter_config
    same = dataclasses.replace(config)
    same.r = 32  # a copy without changes does not share the wrapped config either
    assert config.r == 4 and same.to_dict() != config.to_dict()


def test_wrapped_field_names_are_keyword_arguments():
    config = SAFEConfig(adapter_config=lora(r=4), target_modules=["key"], lora_alpha=32, tau=0.5)
    assert config.adapter_config.target_modules == {"key"} and config.lora_alpha == 32 and config.tau == 0.5
    from_dict = SAFEConfig(adapter_config={"peft_type": "LORA", "r": 3}, r=5)
    assert type(from_dict.adapter_config) is LoraConfig and from_dict.r == 5


def test_peft_generic_init_weights_reaches_the_lora_family_field():
    # peft sets config.init_weights = True on non-LoRA peft types (a SAFEConfig) before a PiSSA conversion
    config = SAFEConfig(adapter_config=lora(), init_weights=False)
    assert config.adapter_config.init_lora_weights is False
    config.init_weights = True
    assert config.adapter_config.init_lora_weights is True and "init_weights" not in vars(config)
    from peft_safe import HoulsbyConfig

    houlsby = SAFEConfig(adapter_config=HoulsbyConfig(bottleneck_size=4), init_weights=False)
    assert houlsby.adapter_config.init_weights is False


def test_unknown_keyword_names_both_configs_and_a_saved_unknown_key_is_dropped_by_peft(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'.*SAFE hyper-parameter.*LoraConfig"):
        SAFEConfig(adapter_config=lora(), bogus=1)
    with pytest.raises(ValueError, match=r"\['r'\].*no adapter config"):
        SAFEConfig(adapter_config=SAFEConfig(adapter_config=lora()), r=4)
    config = SAFEConfig(adapter_config=lora(), tau=0.2)
    config.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "field_of_a_newer_version": 1}))
    with pytest.warns(UserWarning, match="field_of_a_newer_version"):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SAFEConfig) and loaded.tau == 0.2


@pytest.mark.parametrize("fields", [{"target_modules": ["query"]}, {"target_modules": ["query"], "r": 4},
                                    {"modules_to_save": ["classifier"], "target_modules": ["query"]}])
def test_adapter_fields_without_an_adapter_config_wrap_lora_and_say_so(fields):
    # issue 21.18: peft's generic code builds configs as SAFEConfig(target_modules=[...]); that was refused
    from peft import LoraConfig

    with pytest.warns(UserWarning, match="no adapter_config: SAFE wraps LoRA, the paper's adapter"):
        config = SAFEConfig(**fields)
    assert type(config.adapter_config) is LoraConfig
    for name, value in fields.items():
        assert getattr(config.adapter_config, name) == LoraConfig(**{name: value}).__dict__[name]  # as LoRA keeps it
    with pytest.raises(ValueError, match="SAFEConfig needs adapter_config"):
        SAFEConfig()  # nothing at all: still says what to pass
