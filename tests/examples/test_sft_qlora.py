"""examples/sft_qlora.py in its tiny mode: TRL's SFTTrainer on a 4-bit tiny LLaMA with peft_config=SAFEConfig and
nothing else SAFE-specific freezes units, and the saved adapter reloads with its freeze state."""

import math
import pathlib

import pytest
from tiny_models import load_example

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def test_tiny_sft_qlora_freezes_units_and_saves_a_loadable_adapter(tmp_path, capsys):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    module = load_example("sft_qlora")
    result = module.main(["--tiny", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert result["frozen_units"] and "trained 12 steps" in out and "step 2: threshold" in out
    adapter = pathlib.Path(result["adapter_dir"])
    assert "import peft_safe" in (adapter / "README.md").read_text()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-base")
    loaded = PeftModel.from_pretrained(base, adapter)
    assert loaded.base_model.frozen_units == result["frozen_units"]


def test_tiny_sft_qlora_as_plain_lora_trains_every_adapter_and_reports_held_out_loss(tmp_path, capsys):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    module = load_example("sft_qlora")
    safe = module.main(["--tiny", "--output-dir", str(tmp_path / "safe")])
    lora = module.main(["--tiny", "--adapter", "lora", "--output-dir", str(tmp_path / "lora")])
    out = capsys.readouterr().out
    assert "lora: 12 steps in" in out and "held-out loss" in out
    assert lora["eval_loss"] > 0 and abs(lora["perplexity"] - math.exp(lora["eval_loss"])) < 1e-6 * lora["perplexity"]
    # the only difference is SAFEConfig: SAFE froze units, so fewer parameters train at the end than under LoRA
    assert 0 < safe["trainable_parameters"] < lora["trainable_parameters"]
