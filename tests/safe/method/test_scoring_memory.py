"""Scoring within a memory bound: the CKA rows of every unit are held at once only when they fit
(``compute_importance(memory_bytes=...)``); otherwise the units are scored in groups, one probe pass each, with the
same scores. At ``adapter_output`` the layer without its adapter is its base layer's output from the same call,
recomputed only when something changed that output in place."""

from __future__ import annotations

import types
import weakref

import pytest

from peft_safe.core import cka
from peft_safe.safe import scoring

pytestmark = pytest.mark.usefixtures("single_thread_torch")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(tiny, site: str):
    return tiny.safe("llama", layers=4, lora=tiny.lora("llama", target_modules=ALL_LINEAR), scoring_site=site)


def _probe(tiny):
    return [tiny.batch(batch=2, seq=12, seed=s) for s in range(3)]


def _score(model, probe, memory_bytes):
    safe = model.base_model
    return scoring.compute_importance(safe.model, safe._units(), probe, max_tokens=64, seed=0,
                                      site=safe.safe_config.scoring_site, memory_bytes=memory_bytes)


class _Held:
    """Tracks the CKA rows alive at once over every accumulator (a stand-in for CKAAccumulator)."""

    def __init__(self):
        self.now = self.most = 0
        held = self

        class Tracked(cka.CKAAccumulator):
            def update(self, x, y, mask=None):
                before = self._bytes()
                super().update(x, y, mask)
                held.add(self, self._bytes() - before)

            def _bytes(self):
                rows = self.rows
                return 0 if rows is None else sum(t.numel() * t.element_size() for t in rows)

        self.cls = Tracked

    def add(self, acc, size):
        self.now += size
        self.most = max(self.most, self.now)
        weakref.finalize(acc, self._release, size)

    def _release(self, size):
        self.now -= size


@pytest.mark.parametrize("site", ["adapter_output", "block_output", "residual_update"])
def test_scoring_in_groups_gives_the_scores_of_one_pass_and_holds_less(tiny, site, monkeypatch):
    model = _model(tiny, site)
    probe = _probe(tiny)
    held = _Held()
    monkeypatch.setattr(scoring, "CKAAccumulator", held.cls)
    whole = _score(model, probe, None)
    most_whole = held.most
    held.most = held.now = 0
    one_row_set = 2 * 64 * 64 * 4  # the widest layer's rows (gate/up: 64 features), with and without adapters
    grouped = _score(model, probe, one_row_set)
    assert grouped == whole and len(whole) == 4 and all(v > 0 for v in whole.values())
    assert held.most <= one_row_set < most_whole


def test_each_group_stops_its_forward_after_its_last_unit(tiny):
    model = _model(tiny, "block_output")
    blocks = model.base_model.model.model.layers
    runs = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    probe = _probe(tiny)
    per_block = 2 * 64 * 32 * 4  # 64 kept rows (of 72 real tokens) of hidden size 32, with and without adapters
    _score(model, probe, 2 * per_block)  # two groups of two blocks
    # the first group's passes stop after block 1; the reruns without adapters add one call per block and batch
    assert runs == [2 * len(probe) + len(probe)] * 2 + [len(probe) + len(probe)] * 2


def test_the_base_layer_output_stands_in_for_the_rerun_unless_changed_in_place(tiny):
    model = _model(tiny, "adapter_output")
    probe = _probe(tiny)
    reference = _score(model, probe, None)
    layer = model.base_model.model.model.layers[1].mlp.down_proj

    def in_place(self, x, *args, **kwargs):  # what a LoRA variant adding onto the base result in place would do
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        result += self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]
        return result

    layer.forward = types.MethodType(in_place, layer)
    assert _score(model, probe, None) == pytest.approx(reference, rel=1e-9)
    rerun = []
    original = scoring._adapters_off
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scoring, "_adapters_off", lambda layers: rerun.append(layers) or original(layers))
        _score(model, probe, None)
    assert [tuple(layers) for layers in rerun] == [(layer,)] * len(probe)  # only the changed layer is recomputed
