"""Registration of the "SAFE" peft type: enum membership, idempotence, refusal to be replaced, fresh interpreters."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraModel
from transformers import BertForSequenceClassification

import peft_safe
import peft_safe.registry
from peft_safe import HoulsbyConfig, SAFEConfig, SAFEModel

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _safe_members() -> list[PeftType]:
    return [member for member in PeftType if member.value == "SAFE"]


def test_safe_is_a_member_of_peft_type():
    assert PeftType.SAFE == "SAFE"
    assert PeftType("SAFE") is PeftType.SAFE
    assert PeftType["SAFE"] is PeftType.SAFE
    assert isinstance(PeftType.SAFE, PeftType)
    assert "SAFE" in list(PeftType)
    assert PeftType.SAFE.value == "SAFE" and PeftType.SAFE.name == "SAFE"


def test_peft_mappings_point_to_safe_classes():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SAFE] is SAFEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SAFE] is SAFEModel
    # the same entries are found by the plain string stored in adapter_config.json
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SAFE"] is SAFEConfig


def test_peft_own_members_are_untouched():
    assert PeftType("LORA") is PeftType.LORA
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] is LoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] is LoraModel


def test_register_twice_is_harmless():
    members_before = list(PeftType)
    peft_safe.registry.register()
    peft_safe.registry.register()
    assert list(PeftType) == members_before
    assert len(_safe_members()) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SAFE] is SAFEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SAFE] is SAFEModel


def test_reload_of_registry_module_then_register_is_harmless(tiny):
    member = PeftType.SAFE
    members_before = list(PeftType)
    reloaded = importlib.reload(peft_safe.registry)
    reloaded.register()
    assert PeftType.SAFE is member
    assert PeftType("SAFE") is member
    assert list(PeftType) == members_before
    assert len(_safe_members()) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SAFE] is SAFEConfig
    # the package still works end to end after the reload
    model = get_peft_model(tiny.bert(), tiny.safe_config())
    assert isinstance(model.base_model, SAFEModel)


def test_registering_another_config_class_under_safe_raises():
    with pytest.raises(ValueError, match="SAFE"):
        peft_safe.registry.register_peft_type("SAFE", LoraConfig, SAFEModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SAFE] is SAFEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SAFE] is SAFEModel


def test_registering_another_tuner_class_under_safe_raises():
    with pytest.raises(ValueError, match="SAFE"):
        peft_safe.registry.register_peft_type("SAFE", SAFEConfig, LoraModel)
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SAFE] is SAFEModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SAFE] is SAFEConfig


def test_a_saved_safe_config_names_the_safe_type(tmp_path, tiny):
    tiny.safe_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SAFE"
    assert saved["adapter_config"]["peft_type"] == "LORA"
    assert type(PeftConfig.from_pretrained(tmp_path)) is SAFEConfig


# ---------------------------------------------------------------------------------------------- fresh process
_FRESH_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    import peft_safe
    from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, PeftType
    from transformers import AutoModelForSequenceClassification

    adapter_dir, batch_file, result_file = sys.argv[1:4]
    batch = torch.load(batch_file)
    config = PeftConfig.from_pretrained(adapter_dir)
    base = AutoModelForSequenceClassification.from_pretrained(config.base_model_name_or_path)
    by_peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    by_auto = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    with torch.no_grad():
        result = {
            "config_class": type(config).__name__,
            "peft_type_is_member": PeftType("SAFE") is PeftType.SAFE and config.peft_type == PeftType.SAFE,
            "wrapped_type": str(PeftType(config.adapter_config.peft_type).value),
            "frozen_peft_model": by_peft_model.base_model.frozen_units,
            "frozen_auto": by_auto.base_model.frozen_units,
            "tuner_class": type(by_auto.base_model).__name__,
            "logits_peft_model": by_peft_model(**batch).logits,
            "logits_auto": by_auto(**batch).logits,
        }
    torch.save(result, result_file)
    """
)


def test_fresh_interpreter_loads_a_saved_safe_adapter(tmp_path, tiny):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny.bert(layers=3, seed=3).save_pretrained(base_dir)
    base = BertForSequenceClassification.from_pretrained(base_dir)
    torch.manual_seed(4)
    model = get_peft_model(base, tiny.safe_config()).eval()
    model.base_model.freeze(["bert.encoder.layer.1"])
    batch = tiny.batch(batch=3, seq=7, seed=5)
    expected = tiny.logits(model, batch)
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir)

    torch.save(batch, tmp_path / "batch.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_LOAD, str(adapter_dir), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["config_class"] == "SAFEConfig"
    assert result["peft_type_is_member"]
    assert result["wrapped_type"] == "LORA"
    assert result["tuner_class"] == "SAFELoraModel"
    assert result["frozen_peft_model"] == ["bert.encoder.layer.1"]
    assert result["frozen_auto"] == ["bert.encoder.layer.1"]
    torch.testing.assert_close(result["logits_peft_model"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(result["logits_auto"], expected, rtol=0, atol=1e-6)


def test_a_pickled_safe_tuner_class_resolves_by_its_path_before_and_after_the_layout_change():
    # In a fresh interpreter, where no SAFE<Tuner>Model class has been built yet: pickle finds it by name,
    # under the module path of 0.1 (peft_safe.tuners.safe) and under today's (peft_safe.safe.model).
    code = (
        "import pickle\n"
        "import peft_safe\n"
        "from peft.tuners.lora import LoraModel\n"
        "from peft_safe.safe.model import SAFEModel\n"
        "old = pickle.loads(b'cpeft_safe.tuners.safe\\nSAFELoraModel\\n.')\n"
        "new = pickle.loads(b'cpeft_safe.safe.model\\nSAFELoraModel\\n.')\n"
        "assert old is new and issubclass(new, SAFEModel) and issubclass(new, LoraModel), (old, new)\n"
        "assert pickle.loads(pickle.dumps(new)) is new\n"
        "try:\n"
        "    pickle.loads(b'cpeft_safe.safe.model\\nSAFENoSuchModel\\n.')\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('an unknown SAFE class name resolved')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


_TORCH_LOAD = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)  # peft_safe imported by unpickling, nothing else
batch = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model.eval()(**batch).logits
torch.save({"tuner": type(model.base_model).__name__, "frozen": model.base_model.frozen_units,
            "logits": logits}, sys.argv[3])
"""


@pytest.mark.parametrize("wrapped", ["lora", "houlsby"])
def test_a_whole_safe_model_saved_with_torch_save_loads_in_a_fresh_interpreter(tmp_path, tiny, wrapped):
    # issue 13.23: torch.save(model), then torch.load in a new process: "Can't get attribute 'SAFELoraModel'"
    adapter = tiny.lora() if wrapped == "lora" else HoulsbyConfig(task_type="SEQ_CLS", init_weights=False)
    torch.manual_seed(4)
    model = get_peft_model(tiny.bert(layers=3, seed=3), SAFEConfig(adapter_config=adapter, task_type="SEQ_CLS"))
    model.base_model.freeze([0])
    batch = tiny.batch(batch=3, seq=7, seed=5)
    expected = tiny.logits(model, batch)
    torch.save(model, tmp_path / "model.pt")
    torch.save(batch, tmp_path / "batch.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_LOAD, str(tmp_path / "model.pt"), str(tmp_path / "batch.pt"),
         str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["tuner"] == ("SAFELoraModel" if wrapped == "lora" else "SAFEBottleneckModel")
    assert result["frozen"] == ["bert.encoder.layer.0"]
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-6)
