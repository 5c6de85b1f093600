"""The model card peft writes beside a SAFE adapter says what to install and import (issue 14.4), and a load
without ``import peft_safe`` fails with peft's KeyError, the error the card and docs/tuner.md name."""

from __future__ import annotations

import subprocess
import sys

import peft_safe


def test_the_card_names_the_package_its_version_the_import_and_the_freeze_state(tiny, tmp_path):
    model = tiny.safe("llama")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card  # peft's own card, extended
    assert "- peft-safe" in card and "- safe" in card  # tags
    assert f"peft-safe>={peft_safe.__version__}" in card and "import peft_safe" in card
    assert "freeze state" in card and "KeyError: 'SAFE'" in card
    model.save_pretrained(tmp_path)  # saving again does not repeat the section
    assert (tmp_path / "README.md").read_text().count("## SAFE adapter (peft-safe)") == 1


def test_a_named_adapter_in_a_subfolder_extends_the_card_at_the_top(tiny, tmp_path):
    model = tiny.safe("llama")
    model.add_adapter("second", tiny.safe_config("llama"))
    model.save_pretrained(tmp_path, selected_adapters=["second"])
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    assert "import peft_safe" in (tmp_path / "README.md").read_text()


def test_loading_without_import_peft_safe_is_the_keyerror_the_card_names(tiny, tmp_path):
    tiny.safe("llama").save_pretrained(tmp_path)
    code = f"from peft import PeftConfig\nPeftConfig.from_pretrained({str(tmp_path)!r})\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "KeyError: 'SAFE'" in result.stderr
