"""adapter_config.json names the weights file saved with it, and is never left half-written (issue 13: 11, 16, 22).

peft loads ``adapter_model.safetensors`` whenever it exists, writes ``adapter_model.bin`` in place with
``torch.save``, and writes ``adapter_config.json`` in place too; ``peft_safe.safe.persistence.weights_file`` records
which weights file the config belongs to and checks it in ``SAFEConfig.from_pretrained``.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import peft.config
import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import save_file

from peft_safe import SAFEConfig

pytestmark = pytest.mark.usefixtures("single_thread_torch")

LAYERS = 3
BIN, SAFETENSORS, CONFIG = "adapter_model.bin", "adapter_model.safetensors", "adapter_config.json"


def make_model(tiny, frozen=(), tau=0.9):
    model = tiny.safe("bert", layers=LAYERS, tau=tau, final_freeze_time=4, warmup_cap=1)
    if frozen:
        model.base_model.freeze(list(frozen))
    return model


def load(tiny, path, **kwargs):
    return PeftModel.from_pretrained(tiny.bert(layers=LAYERS), path, is_trainable=True, **kwargs)


def record(path):
    return json.loads((path / CONFIG).read_text())["safe_weights_file"]


@pytest.mark.parametrize(("serialization", "name"), [(True, SAFETENSORS), (False, BIN)])
def test_config_records_the_weights_file_saved_with_it(tiny, tmp_path, serialization, name):
    make_model(tiny, frozen=[0]).save_pretrained(tmp_path, safe_serialization=serialization)
    assert record(tmp_path)["name"] == name
    assert record(tmp_path)["bytes"] == (tmp_path / name).stat().st_size
    config = PeftConfig.from_pretrained(tmp_path)  # AutoPeftModel's first read: the record is not a field
    assert isinstance(config, SAFEConfig) and "safe_weights_file" not in config.to_dict()


def test_stale_safetensors_beside_a_newer_bin_with_the_same_config_is_refused(tiny, tmp_path):
    # issue 13.11: the integrity record inside the weights passes (same config), so peft's stale pick loaded
    make_model(tiny, frozen=[0]).save_pretrained(tmp_path)
    make_model(tiny, frozen=[0, 1]).save_pretrained(tmp_path, safe_serialization=False)
    for attempt in (lambda: load(tiny, tmp_path),
                    lambda: load(tiny, tmp_path).load_adapter(tmp_path, adapter_name="other")):
        with pytest.raises(ValueError) as info:
            attempt()
        for words in (BIN, SAFETENSORS, f"delete {SAFETENSORS} to load {BIN}"):
            assert words in str(info.value), str(info.value)
    (tmp_path / SAFETENSORS).unlink()  # the fix the message names
    assert load(tiny, tmp_path).base_model.frozen_units == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


def test_a_missing_recorded_file_is_named_when_peft_loads_the_other(tiny, tmp_path):
    make_model(tiny, frozen=[0]).save_pretrained(tmp_path, safe_serialization=False)
    make_model(tiny, frozen=[0, 1]).save_pretrained(tmp_path)
    (tmp_path / SAFETENSORS).unlink()
    with pytest.raises(ValueError, match=f"saved together with {SAFETENSORS} \\(which is missing\\)"):
        load(tiny, tmp_path)


def test_one_state_in_both_formats_loads(tiny, tmp_path):
    model = make_model(tiny, frozen=[0])
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert load(tiny, tmp_path).base_model.frozen_units == ["bert.encoder.layer.0"]
    # a .bin converted to safetensors by hand: the record names the .bin, peft loads the copy, which is equal
    (tmp_path / SAFETENSORS).unlink()
    model.save_pretrained(tmp_path, safe_serialization=False)
    save_file(torch.load(tmp_path / BIN, weights_only=True), tmp_path / SAFETENSORS, metadata={"format": "pt"})
    assert record(tmp_path)["name"] == BIN
    assert load(tiny, tmp_path).base_model.frozen_units == ["bert.encoder.layer.0"]


def test_a_config_saved_on_its_own_carries_no_record_and_loads(tiny, tmp_path):
    make_model(tiny, frozen=[0]).save_pretrained(tmp_path)
    SAFEConfig.from_pretrained(tmp_path).save_pretrained(tmp_path)  # no state dict built: nothing to name
    assert "safe_weights_file" not in json.loads((tmp_path / CONFIG).read_text())
    assert load(tiny, tmp_path).base_model.frozen_units == ["bert.encoder.layer.0"]


def cut_bin_write_short(monkeypatch):
    """torch.save stops half-way, as on a full disk: the file it opened for writing keeps what was written."""
    import peft.peft_model

    real = torch.save

    def partial(obj, filename, *args, **kwargs):
        real(obj, filename, *args, **kwargs)
        path = pathlib.Path(filename)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft.peft_model.torch, "save", partial)


def test_bin_cut_short_by_an_interrupted_save_is_refused_naming_the_cause(tiny, tmp_path, monkeypatch):
    # issue 13.16: torch.load's "OSError: [Errno 22] Invalid argument" said nothing of why
    make_model(tiny, frozen=[0]).save_pretrained(tmp_path, safe_serialization=False)
    with monkeypatch.context() as patch:
        cut_bin_write_short(patch)
        with pytest.raises(OSError, match="No space"):
            make_model(tiny, frozen=[0, 1]).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError) as info:
        load(tiny, tmp_path)
    for words in (BIN, "interrupted", "lost", "safe_serialization=True"):
        assert words in str(info.value), str(info.value)


def test_disk_full_during_a_bin_save_is_refused_naming_the_cause(tmp_path):
    # The real thing: a file-size limit makes the write fail with EFBIG, as a full disk fails with ENOSPC.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parents[2])!r})
        from conftest import TinyModels
        from peft import PeftModel
        tiny, path = TinyModels(), {str(tmp_path)!r}
        model = tiny.safe("bert", layers={LAYERS}, tau=0.9, final_freeze_time=4, warmup_cap=1)
        model.save_pretrained(path, safe_serialization=False)
        size = __import__("os").path.getsize(path + "/{BIN}")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size * 3 // 4, resource.RLIM_INFINITY))  # README.md fits
        model.base_model.freeze([0])
        try:
            model.save_pretrained(path, safe_serialization=False)
        except (OSError, RuntimeError) as err:  # torch reports the failed write as a RuntimeError
            print("save failed:", err)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        try:
            PeftModel.from_pretrained(tiny.bert(layers={LAYERS}), path, is_trainable=True)
        except Exception as err:
            print("load failed:", type(err).__name__, err)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert "save failed:" in result.stdout, result.stdout + result.stderr
    assert "load failed: ValueError" in result.stdout and "interrupted" in result.stdout, result.stdout


class DiskFull:
    """``open`` as peft's config module sees it: the file is opened (and truncated), half the text is written."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self.file = open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed in __exit__

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, text):
        self.file.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_an_interrupted_config_write_leaves_the_previous_config_whole(tiny, tmp_path, monkeypatch):
    # issue 13.22: peft writes adapter_config.json in place, and reads it (bare json) before any SAFE code runs
    make_model(tiny, frozen=[0]).save_pretrained(tmp_path)
    before = (tmp_path / CONFIG).read_text()
    newer = make_model(tiny, frozen=[0, 1])
    with monkeypatch.context() as patch:
        patch.setattr(peft.config, "open", DiskFull, raising=False)
        with pytest.raises(OSError, match="No space"):
            newer.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONFIG, SAFETENSORS]  # no staging left
    # the new weights are whole and the config identical: the new checkpoint loads
    assert load(tiny, tmp_path).base_model.frozen_units == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
